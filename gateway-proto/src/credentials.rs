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
    /// The username is well formed, but no secret derives the password the request
    /// was signed with.
    #[error("no secret matches the credentials")]
    NoMatch,
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
///
/// A secret may have predecessors, for rotation ([`SharedSecret::with_previous`]):
/// credentials derived from any of them are accepted ([`SharedSecret::check_with`]);
/// new ones ([`SharedSecret::issue`], [`SharedSecret::password`]) come from the
/// current, first, one.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret {
    /// The current secret first, then older ones still accepted.
    secrets: Vec<Vec<u8>>,
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
            secrets: vec![secret.trim_ascii().to_vec()],
        }
    }

    /// Adds an older secret whose credentials are still accepted (after those
    /// already given; surrounding whitespace removed). A secret already present is
    /// not added twice.
    #[must_use]
    pub fn with_previous(mut self, older: &[u8]) -> Self {
        let older = older.trim_ascii();
        if !self.secrets.iter().any(|s| s == older) {
            self.secrets.push(older.to_vec());
        }
        self
    }

    /// How many secrets are accepted (the current one and its predecessors).
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// Always false: there is at least the current secret.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The password belonging to `username` under the current secret.
    pub fn password(&self, username: &str) -> String {
        self.password_with(0, username)
    }

    /// The password belonging to `username` under secret `index` (0 the current
    /// one); the current secret's when there is no such secret.
    pub fn password_with(&self, index: usize, username: &str) -> String {
        let secret = self
            .secrets
            .get(index)
            .or_else(|| self.secrets.first())
            .map_or(&[][..], Vec::as_slice);
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(username.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Where secret `index` of `self` is in `other` (after a rotation: which secret
    /// of the new set a peer's credentials now come from), if it still is.
    pub fn position_in(&self, index: usize, other: &SharedSecret) -> Option<usize> {
        let secret = self.secrets.get(index)?;
        other.secrets.iter().position(|s| s == secret)
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

    /// Checks a username's form and expiry at `now_unix`, then offers the password
    /// each secret derives (current first) to `verify` until it accepts one. Returns
    /// the peer id, the accepted password and the index of its secret;
    /// [`CredentialError::NoMatch`] when `verify` accepts none.
    pub fn check_with<'u>(
        &self,
        username: &'u str,
        now_unix: u64,
        mut verify: impl FnMut(&str) -> bool,
    ) -> Result<(&'u str, String, usize), CredentialError> {
        let (peer_id, current) = self.check(username, now_unix)?;
        if verify(&current) {
            return Ok((peer_id, current, 0));
        }
        for index in 1..self.secrets.len() {
            let password = self.password_with(index, username);
            if verify(&password) {
                return Ok((peer_id, password, index));
            }
        }
        Err(CredentialError::NoMatch)
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

    #[test]
    fn rotated_secrets_accept_old_credentials_and_issue_new_ones() {
        let old = SharedSecret::new(b"old");
        let rotated = SharedSecret::new(b"new\n").with_previous(b"old\n");
        assert_eq!(rotated.len(), 2);
        let from_old = old.issue("alice", 1_000).expect("issue");
        let (peer, password, index) = rotated
            .check_with(&from_old.username, 10, |p| p == from_old.password)
            .expect("the old secret still verifies");
        assert_eq!((peer, index), ("alice", 1));
        assert_eq!(password, from_old.password);
        let issued = rotated.issue("alice", 1_000).expect("issue");
        assert_ne!(
            issued.password, from_old.password,
            "new ones from the first"
        );
        assert_eq!(
            issued,
            SharedSecret::new(b"new")
                .issue("alice", 1_000)
                .expect("issue")
        );
        assert_eq!(
            rotated.check_with(&issued.username, 10, |p| p == issued.password),
            Ok(("alice", issued.password.clone(), 0))
        );
        // Once the old secret is dropped, its credentials are refused.
        let dropped = SharedSecret::new(b"new");
        assert_eq!(
            dropped.check_with(&from_old.username, 10, |p| p == from_old.password),
            Err(CredentialError::NoMatch)
        );
        assert_eq!(
            rotated.check_with(&from_old.username, 1_000, |_| true),
            Err(CredentialError::Expired)
        );
        // Indices follow the secrets across a rotation.
        assert_eq!(rotated.position_in(1, &old), Some(0));
        assert_eq!(rotated.position_in(0, &old), None);
        assert_eq!(SharedSecret::new(b"a").with_previous(b"a").len(), 1);
    }

    proptest! {
        #[test]
        fn check_never_panics(username in ".{0,100}", now in any::<u64>()) {
            let _ = SharedSecret::new(b"k").check(&username, now);
        }
    }
}
