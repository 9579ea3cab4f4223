//! Stateless nonces bound to the client's transport address.
//!
//! A nonce is `base64(expiry ‖ MAC(key, expiry ‖ client address)[..8])`: the server
//! checks it by recomputing the MAC, so it keeps no state for a source before that
//! source has echoed a nonce it was given, and a nonce captured on the wire is useless
//! from any other address (it fails the MAC there and the sender is challenged
//! afresh). Expired nonces are "stale" (TURN's 438), not forged.
use std::net::SocketAddr;

use base64::Engine;
use hmac::{Hmac, Mac};

/// Bytes of MAC kept in a nonce (64 bits: forging one by chance takes 2^63 tries,
/// each of which also needs a valid MESSAGE-INTEGRITY).
const MAC_LEN: usize = 8;
/// Raw nonce length: 4-byte expiry plus the MAC; 16 characters of base64.
const RAW_LEN: usize = 4 + MAC_LEN;

/// What a received nonce turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceCheck {
    /// Issued by us, to this address, not yet expired.
    Valid,
    /// Issued by us to this address but expired: answer 438 with a fresh one.
    Stale,
    /// Not ours, or issued to another address: treat like a stale nonce (challenge
    /// again) so the sender learns nothing more.
    Invalid,
}

/// Issues and checks nonces with a key that lives as long as the process.
#[derive(Clone)]
pub struct NonceIssuer {
    key: [u8; 32],
    lifetime_secs: u32,
}

impl std::fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
}

impl NonceIssuer {
    /// An issuer with a (random, secret) `key` whose nonces live `lifetime_secs`.
    pub fn new(key: [u8; 32], lifetime_secs: u32) -> Self {
        Self { key, lifetime_secs }
    }

    fn mac(&self, expiry: u32, client: SocketAddr) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(&expiry.to_be_bytes());
        match client.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => mac.update(&v4.octets()),
            std::net::IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        let tag = mac.finalize().into_bytes();
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&tag[..MAC_LEN]);
        out
    }

    /// A fresh nonce for `client`, valid from `now_unix` for the issuer's lifetime.
    pub fn issue(&self, client: SocketAddr, now_unix: u64) -> String {
        // u32 seconds last until 2106; saturate rather than wrap after that.
        let expiry = u32::try_from(now_unix.saturating_add(u64::from(self.lifetime_secs)))
            .unwrap_or(u32::MAX);
        let mut raw = [0u8; RAW_LEN];
        raw[..4].copy_from_slice(&expiry.to_be_bytes());
        raw[4..].copy_from_slice(&self.mac(expiry, client));
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
    }

    /// Checks a nonce echoed by `client` at `now_unix`.
    pub fn check(&self, nonce: &[u8], client: SocketAddr, now_unix: u64) -> NonceCheck {
        let mut raw = [0u8; RAW_LEN + 2];
        let Ok(len) =
            base64::engine::general_purpose::STANDARD_NO_PAD.decode_slice(nonce, &mut raw)
        else {
            return NonceCheck::Invalid;
        };
        if len != RAW_LEN {
            return NonceCheck::Invalid;
        }
        let expiry = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let expected = self.mac(expiry, client);
        let mut diff = 0u8;
        for (a, b) in expected.iter().zip(&raw[4..RAW_LEN]) {
            diff |= a ^ b;
        }
        if diff != 0 {
            NonceCheck::Invalid
        } else if u64::from(expiry) <= now_unix {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn nonce_is_valid_for_its_address_until_it_expires() {
        let issuer = NonceIssuer::new([7; 32], 600);
        let client = addr("192.0.2.1:4000");
        let nonce = issuer.issue(client, 1_000);
        assert_eq!(nonce.len(), 16);
        assert_eq!(
            issuer.check(nonce.as_bytes(), client, 1_000),
            NonceCheck::Valid
        );
        assert_eq!(
            issuer.check(nonce.as_bytes(), client, 1_599),
            NonceCheck::Valid
        );
        assert_eq!(
            issuer.check(nonce.as_bytes(), client, 1_600),
            NonceCheck::Stale
        );
        // Same nonce from another port or address: not ours.
        assert_eq!(
            issuer.check(nonce.as_bytes(), addr("192.0.2.1:4001"), 1_000),
            NonceCheck::Invalid
        );
        assert_eq!(
            issuer.check(nonce.as_bytes(), addr("192.0.2.2:4000"), 1_000),
            NonceCheck::Invalid
        );
        // IPv4-mapped form of the same client is the same client.
        assert_eq!(
            issuer.check(nonce.as_bytes(), addr("[::ffff:192.0.2.1]:4000"), 1_000),
            NonceCheck::Valid
        );
        // Another key (a restarted gateway) does not accept it.
        let other = NonceIssuer::new([8; 32], 600);
        assert_eq!(
            other.check(nonce.as_bytes(), client, 1_000),
            NonceCheck::Invalid
        );
    }

    #[test]
    fn tampered_expiry_is_invalid() {
        let issuer = NonceIssuer::new([1; 32], 60);
        let client = addr("[2001:db8::1]:9");
        let nonce = issuer.issue(client, 5);
        let mut raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&nonce)
            .expect("own nonce decodes");
        raw[3] ^= 1;
        let forged = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
        assert_eq!(
            issuer.check(forged.as_bytes(), client, 5),
            NonceCheck::Invalid
        );
    }

    proptest! {
        #[test]
        fn check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), now in any::<u64>()) {
            let issuer = NonceIssuer::new([3; 32], 600);
            let _ = issuer.check(&bytes, addr("192.0.2.1:1"), now);
        }
    }
}
