//! Long-term authentication (RFC 8489 §9.2) with stateless nonces, and the budget
//! that bounds what unauthenticated requests get back.
use std::time::Instant;

use super::{ClientAddr, RequestMethod, RequestOutcome, TurnServer};
use crate::{
    nonce::NonceCheck,
    stun::{Class, Message, MessageType, MessageWriter, attr as stun_attr},
};

/// The authenticated part of a request.
pub(super) struct Authenticated {
    pub(super) username: String,
    pub(super) user: String,
    pub(super) key: [u8; 16],
    /// The request was protected with MESSAGE-INTEGRITY-SHA256 only: answer in kind.
    pub(super) sha256: bool,
}

impl TurnServer {
    /// RFC 8489 §9.2.4 for long-term credentials: challenge, nonce, user, integrity.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: ClientAddr,
        request_method: RequestMethod,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Authenticated, RequestOutcome> {
        let tid = message.transaction_id();
        let mut username = None;
        let mut realm = None;
        let mut nonce = None;
        let mut has_integrity = false;
        let mut has_fingerprint = false;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                stun_attr::USERNAME => username = Some(attribute.value),
                stun_attr::REALM => realm = Some(attribute.value),
                stun_attr::NONCE => nonce = Some(attribute.value),
                stun_attr::MESSAGE_INTEGRITY | stun_attr::MESSAGE_INTEGRITY_SHA256 => {
                    has_integrity = true;
                }
                stun_attr::FINGERPRINT => has_fingerprint = true,
                _ => {}
            }
        }
        let method_number = request_method.number();
        if !has_integrity {
            return Err(self.challenge(
                now,
                now_unix,
                client,
                method_number,
                tid,
                401,
                has_fingerprint,
                out,
            ));
        }
        let (Some(username), Some(realm), Some(nonce)) = (username, realm, nonce) else {
            // Integrity but no USERNAME/REALM/NONCE: 400, unauthenticated.
            if self.take_challenge_budget(now, client) {
                unauthenticated_error(out, method_number, tid, 400, "Bad Request", has_fingerprint);
                return Err(RequestOutcome::BadRequest);
            }
            return Err(RequestOutcome::Throttled);
        };
        let challenge_401 = |server: &mut Self, out: &mut Vec<u8>| {
            server.challenge(
                now,
                now_unix,
                client,
                method_number,
                tid,
                401,
                has_fingerprint,
                out,
            )
        };
        if realm != self.config.realm.as_bytes() {
            return Err(challenge_401(self, out));
        }
        let Ok(username) = std::str::from_utf8(username) else {
            return Err(challenge_401(self, out));
        };
        // Every accepted secret (the current one first, then those being rotated
        // out) is tried until one derives the key the request was signed with.
        let mut key = [0u8; 16];
        let mut sha256 = false;
        let realm_text = &self.config.realm;
        let checked = self.secret.check_with(username, now_unix, |password| {
            let candidate = crate::turn::long_term_key(username, realm_text, password);
            if message.verify_integrity(&candidate).is_ok() {
                key = candidate;
                return true;
            }
            if message.verify_integrity_sha256(&candidate).is_ok() {
                (key, sha256) = (candidate, true);
                return true;
            }
            false
        });
        let Ok((user, _, _)) = checked else {
            return Err(challenge_401(self, out));
        };
        let user = user.to_owned();
        // The nonce is judged after the integrity: a 438 goes only to a request
        // signed with valid credentials, so it is no reflection (the request is
        // larger than the answer) and needs no budget. Decided before the integrity,
        // a spoofed flood that used up the budget kept live allocations from
        // refreshing past their nonce's expiry.
        match self.nonces.check(nonce, client.addr, now_unix) {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.write_challenge(
                    now_unix,
                    client,
                    method_number,
                    tid,
                    438,
                    has_fingerprint,
                    out,
                );
                return Err(RequestOutcome::StaleNonce);
            }
        }
        Ok(Authenticated {
            username: username.to_owned(),
            user,
            key,
            sha256,
        })
    }

    /// Spends one reply to an unauthenticated request from `client` (see
    /// [`crate::budget`]).
    fn take_challenge_budget(&mut self, now: Instant, client: ClientAddr) -> bool {
        // A TCP (or TLS) client completed a handshake: its address is not forged.
        client.transport.is_stream() || self.budget.allow(now, client.addr.ip())
    }

    /// A 401 or 438 carrying REALM and a fresh NONCE bound to `client`. Kept small
    /// (short reason, 16-byte nonce, FINGERPRINT only when the request had one) so
    /// the reply to an unauthenticated request is barely larger than the request.
    #[allow(clippy::too_many_arguments)]
    fn challenge(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: ClientAddr,
        method_number: u16,
        tid: [u8; 12],
        code: u16,
        fingerprint: bool,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        if !self.take_challenge_budget(now, client) {
            return RequestOutcome::Throttled;
        }
        self.write_challenge(now_unix, client, method_number, tid, code, fingerprint, out);
        if code == 438 {
            RequestOutcome::StaleNonce
        } else {
            RequestOutcome::Unauthorized
        }
    }

    /// Writes a 401 or 438 with REALM and a fresh NONCE bound to `client`.
    #[allow(clippy::too_many_arguments)]
    fn write_challenge(
        &mut self,
        now_unix: u64,
        client: ClientAddr,
        method_number: u16,
        tid: [u8; 12],
        code: u16,
        fingerprint: bool,
        out: &mut Vec<u8>,
    ) {
        let nonce = self.nonces.issue(client.addr, now_unix);
        let reason = if code == 438 {
            "Stale Nonce"
        } else {
            "Unauthorized"
        };
        out.clear();
        let mut writer = MessageWriter::new(
            out,
            MessageType {
                method: method_number,
                class: Class::Error,
            },
            tid,
        );
        writer
            .error_code(code, reason)
            .attribute(stun_attr::REALM, self.config.realm.as_bytes())
            .attribute(stun_attr::NONCE, nonce.as_bytes());
        if fingerprint {
            writer.finish_with_fingerprint();
        }
    }
}

fn unauthenticated_error(
    out: &mut Vec<u8>,
    method_number: u16,
    tid: [u8; 12],
    code: u16,
    reason: &str,
    fingerprint: bool,
) {
    out.clear();
    let mut writer = MessageWriter::new(
        out,
        MessageType {
            method: method_number,
            class: Class::Error,
        },
        tid,
    );
    writer.error_code(code, reason);
    if fingerprint {
        writer.finish_with_fingerprint();
    }
}
