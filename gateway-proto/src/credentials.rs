//! Credentials in the TURN REST API convention (draft-uberti-behave-turn-rest): the
//! username is `expiry:peer-id` (expiry in Unix seconds) and the password is the
//! base64 HMAC-SHA1 of the username under the operator's shared secret. A peer id may
//! name a group, `group/peer` (see [`peer_group`]): with the rendezvous's
//! `same-group` connect policy, peers are introduced only within their group.
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
    /// The peer id is empty, too long, or has characters outside `[A-Za-z0-9._-]`
    /// (besides one `/` between a group and the peer's name).
    #[error(
        "peer id must be 1..={MAX_PEER_ID_LEN} characters of A-Z a-z 0-9 . _ -, optionally as group/name"
    )]
    BadPeerId,
    /// The expiry is in the past.
    #[error("credentials expired")]
    Expired,
}

/// Checks a peer id: 1 to [`MAX_PEER_ID_LEN`] characters of `[A-Za-z0-9._-]`, or
/// `group/name` with both parts non-empty of those characters (and the whole no
/// longer).
pub fn valid_peer_id(peer_id: &str) -> bool {
    let part = |text: &str| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    peer_id.len() <= MAX_PEER_ID_LEN
        && match peer_id.split_once('/') {
            Some((group, name)) => part(group) && part(name),
            None => part(peer_id),
        }
}

/// The group a peer id names (`group/name`), if any.
pub fn peer_group(peer_id: &str) -> Option<&str> {
    peer_id.split_once('/').map(|(group, _)| group)
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
        for bad in ["/alice", "red/", "red/blue/alice", "red alice/x"] {
            assert_eq!(
                secret.issue(bad, 5),
                Err(CredentialError::BadPeerId),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_peer_id_may_name_its_group() {
        let secret = SharedSecret::new(b"s");
        let issued = secret.issue("red/alice", 10).expect("group/name");
        assert_eq!(issued.username, "10:red/alice");
        let (peer, password) = secret.check(&issued.username, 5).expect("valid");
        assert_eq!((peer, password), ("red/alice", issued.password));
        assert_eq!(peer_group("red/alice"), Some("red"));
        assert_eq!(peer_group("alice"), None);
    }

    proptest! {
        #[test]
        fn check_never_panics(username in ".{0,100}", now in any::<u64>()) {
            let _ = SharedSecret::new(b"k").check(&username, now);
        }
    }
}
