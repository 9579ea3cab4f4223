//! Credentials in the TURN REST API convention (draft-uberti-behave-turn-rest): the
//! username is `expiry:peer-id` (expiry in Unix seconds) and the password is the
//! base64 HMAC-SHA1 of the username under the operator's shared secret.
//!
//! The gateway keeps no per-user state: it recomputes the password from the
//! username. One token serves rendezvous (as the short-term MESSAGE-INTEGRITY key)
//! and the TURN relay (as the long-term password).
use base64::Engine;
use hmac::{Hmac, Mac};

/// Longest peer id accepted.
pub const MAX_PEER_ID_LEN: usize = 64;

/// Why a username was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not `expiry:peer-id`.
    #[error("username is not `expiry:peer-id`")]
    Malformed,
    /// The peer id is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    #[error("peer id must be 1..={MAX_PEER_ID_LEN} characters of A-Z a-z 0-9 . _ -")]
    BadPeerId,
    /// The expiry is in the past.
    #[error("credentials expired")]
    Expired,
}

/// Checks a peer id: 1 to [`MAX_PEER_ID_LEN`] characters of `[A-Za-z0-9._-]`.
pub fn valid_peer_id(peer_id: &str) -> bool {
    !peer_id.is_empty()
        && peer_id.len() <= MAX_PEER_ID_LEN
        && peer_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The operator's shared secret, and the derivation of passwords from usernames.
#[derive(Clone)]
pub struct SharedSecret {
    secret: Vec<u8>,
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

/// A username and password issued for one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// `expiry:peer-id`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub password: String,
}

impl SharedSecret {
    /// Wraps the secret bytes (surrounding whitespace, e.g. a file's newline, removed).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            secret: secret.trim_ascii().to_vec(),
        }
    }

    /// The password belonging to `username`.
    pub fn password(&self, username: &str) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(username.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Issues credentials for `peer_id` valid until `expiry_unix`.
    pub fn issue(&self, peer_id: &str, expiry_unix: u64) -> Result<Credentials, CredentialError> {
        if !valid_peer_id(peer_id) {
            return Err(CredentialError::BadPeerId);
        }
        let username = format!("{expiry_unix}:{peer_id}");
        let password = self.password(&username);
        Ok(Credentials { username, password })
    }

    /// Checks a username's form and expiry at `now_unix`; returns the peer id and the
    /// password the client must have used.
    pub fn check<'u>(
        &self,
        username: &'u str,
        now_unix: u64,
    ) -> Result<(&'u str, String), CredentialError> {
        let (expiry, peer_id) = username.split_once(':').ok_or(CredentialError::Malformed)?;
        let expiry: u64 = expiry.parse().map_err(|_| CredentialError::Malformed)?;
        if !valid_peer_id(peer_id) {
            return Err(CredentialError::BadPeerId);
        }
        if expiry <= now_unix {
            return Err(CredentialError::Expired);
        }
        Ok((peer_id, self.password(username)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn password_is_base64_hmac_sha1_of_username() {
        // HMAC-SHA1(key="key", "The quick brown fox jumps over the lazy dog")
        // = de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9 (RFC 2104 test value).
        let secret = SharedSecret::new(b"key");
        assert_eq!(
            secret.password("The quick brown fox jumps over the lazy dog"),
            "3nybhbi3iqa8ino29wqQcBydtNk="
        );
    }

    #[test]
    fn issued_credentials_check_until_expiry() {
        let secret = SharedSecret::new(b"s3cret\n");
        let issued = secret.issue("alice", 1_000).expect("issue");
        assert_eq!(issued.username, "1000:alice");
        let (peer, password) = secret.check(&issued.username, 999).expect("valid");
        assert_eq!(peer, "alice");
        assert_eq!(password, issued.password);
        assert_eq!(
            secret.check(&issued.username, 1_000),
            Err(CredentialError::Expired)
        );
        let other = SharedSecret::new(b"other");
        assert_ne!(
            other.check(&issued.username, 0).expect("form ok").1,
            issued.password
        );
    }

    #[test]
    fn malformed_usernames_are_refused() {
        let secret = SharedSecret::new(b"s");
        assert_eq!(secret.check("alice", 0), Err(CredentialError::Malformed));
        assert_eq!(
            secret.check("soon:alice", 0),
            Err(CredentialError::Malformed)
        );
        assert_eq!(secret.check("5:", 0), Err(CredentialError::BadPeerId));
        assert_eq!(secret.check("5:a b", 0), Err(CredentialError::BadPeerId));
        assert_eq!(
            secret.issue(&"x".repeat(65), 5),
            Err(CredentialError::BadPeerId)
        );
    }

    proptest! {
        #[test]
        fn check_never_panics(username in ".{0,100}", now in any::<u64>()) {
            let _ = SharedSecret::new(b"k").check(&username, now);
        }
    }
}
