//! Who may talk to the rendezvous: REST credentials checked with
//! MESSAGE-INTEGRITY-SHA256, nonces bound to the sender's address, and the global
//! budget of error replies to unauthenticated requests; the replies these checks
//! produce.
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{RendezvousHandled, RendezvousServer};
use crate::{
    Transmit,
    credentials::CredentialError,
    nonce::NonceCheck,
    stun::{Class, Message, MessageType, MessageWriter, attr as stun_attr},
};

/// What an authenticated request carried.
pub(super) struct Authenticated<'a> {
    /// The request.
    pub(super) message: Message<'a>,
    /// The sender, as its credentials name it.
    pub(super) peer_id: String,
    /// The sender's password (the key its request and our replies are signed with).
    pub(super) password: String,
    /// When the sender's credentials expire (Unix seconds).
    pub(super) expiry_unix: u64,
    /// Which accepted secret its credentials derive from (0 the current one).
    pub(super) secret: u8,
    /// A fresh nonce for the sender, returned in every reply.
    pub(super) next_nonce: String,
}

impl RendezvousServer {
    /// Checks a signed request: USERNAME (REST credentials derived from the shared
    /// secret, not expired) and MESSAGE-INTEGRITY-SHA256 under its password. 400
    /// without USERNAME, 401 otherwise; nothing is kept either way.
    pub(super) fn authenticate<'a>(
        &self,
        message: Message<'a>,
        from: SocketAddr,
        now_unix: u64,
    ) -> Result<Authenticated<'a>, RendezvousHandled> {
        let username = message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == stun_attr::USERNAME)
            .ok_or(RendezvousHandled::BadRequest)?;
        let username =
            std::str::from_utf8(username.value).map_err(|_| RendezvousHandled::Unauthorized)?;
        // Every accepted secret (the current one first, then those being rotated
        // out) is tried until one derives the password the request was signed with.
        let (peer_id, password, secret) = self
            .secret
            .check_with(username, now_unix, |password| {
                message.verify_integrity_sha256(password.as_bytes()).is_ok()
            })
            .map_err(|e| match e {
                CredentialError::Malformed
                | CredentialError::BadPeerId
                | CredentialError::Expired
                | CredentialError::NoMatch => RendezvousHandled::Unauthorized,
            })?;
        let expiry_unix = username
            .split_once(':')
            .and_then(|(e, _)| e.parse().ok())
            .ok_or(RendezvousHandled::Unauthorized)?;
        Ok(Authenticated {
            message,
            peer_id: peer_id.to_owned(),
            password,
            expiry_unix,
            secret: u8::try_from(secret).unwrap_or(u8::MAX),
            next_nonce: self.nonces.issue(from, now_unix),
        })
    }

    /// Whether a signed request echoes a nonce issued to `from`; if not, answers 401
    /// (missing) or 438 (expired, or issued to another address), authenticated and
    /// with the nonce to use.
    pub(super) fn nonce_echoed(
        &mut self,
        now: Instant,
        auth: &Authenticated<'_>,
        from: SocketAddr,
        local: Option<IpAddr>,
        now_unix: u64,
    ) -> bool {
        let nonce = auth
            .message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == stun_attr::NONCE)
            .map(|a| self.nonces.check(a.value, from, now_unix));
        if nonce == Some(NonceCheck::Valid) {
            return true;
        }
        // Signed, but anyone holding any credential can sign and forge the
        // source: the answer (larger than a request without a nonce) is budgeted
        // per source.
        if !self.signed_error_budget.allow(now, from.ip()) {
            return false;
        }
        let (code, reason) = if nonce.is_none() {
            (401, "Nonce Required")
        } else {
            (438, "Stale Nonce")
        };
        self.transmits.push_back(error_reply(
            &auth.message,
            code,
            reason,
            Some((&auth.password, &auth.next_nonce)),
            from,
            local,
        ));
        false
    }

    /// Spends one unauthenticated error reply to `from` (see [`crate::budget`]).
    pub(super) fn take_error_budget(&mut self, now: Instant, from: SocketAddr) -> bool {
        self.error_budget.allow(now, from.ip())
    }
}

/// A success answer carrying only the sender's next nonce, signed with its key.
pub(super) fn signed_success(method: u16, tid: [u8; 12], auth: &Authenticated<'_>) -> Vec<u8> {
    let mut reply = Vec::with_capacity(64);
    let mut writer = MessageWriter::new(
        &mut reply,
        MessageType {
            method,
            class: Class::Success,
        },
        tid,
    );
    writer
        .attribute(stun_attr::NONCE, auth.next_nonce.as_bytes())
        .message_integrity_sha256(auth.password.as_bytes());
    writer.finish_with_fingerprint();
    reply
}

/// An error response; integrity-protected only when the requester authenticated.
pub(super) fn error_reply(
    request: &Message<'_>,
    code: u16,
    reason: &str,
    authenticated: Option<(&str, &str)>,
    to: SocketAddr,
    from_local: Option<IpAddr>,
) -> Transmit {
    let (method, tid) = (request.message_type().method, request.transaction_id());
    error_reply_to(method, tid, code, reason, authenticated, to, from_local)
}

/// 300 Try Alternate with ALTERNATE-SERVER `alternate` (RFC 8489 §10): a draining
/// server sends a newcomer to another node; signed like [`error_reply`].
pub(super) fn try_alternate_reply(
    request: &Message<'_>,
    alternate: SocketAddr,
    authenticated: Option<(&str, &str)>,
    to: SocketAddr,
    from_local: Option<IpAddr>,
) -> Transmit {
    let mut payload = Vec::with_capacity(112);
    let mut writer = MessageWriter::new(
        &mut payload,
        MessageType {
            method: request.message_type().method,
            class: Class::Error,
        },
        request.transaction_id(),
    );
    writer
        .error_code(300, crate::drain::TRY_ALTERNATE_REASON)
        .address(stun_attr::ALTERNATE_SERVER, alternate);
    if let Some((password, nonce)) = authenticated {
        writer
            .attribute(stun_attr::NONCE, nonce.as_bytes())
            .message_integrity_sha256(password.as_bytes());
    }
    writer.finish_with_fingerprint();
    Transmit::udp(to, payload).from_local(from_local)
}

/// [`error_reply`] to a request known by its method and transaction id only (one
/// answered after the datagram is gone: a Connect that waited for the cluster).
pub(super) fn error_reply_to(
    method: u16,
    tid: [u8; 12],
    code: u16,
    reason: &str,
    authenticated: Option<(&str, &str)>,
    to: SocketAddr,
    from_local: Option<IpAddr>,
) -> Transmit {
    let mut payload = Vec::with_capacity(96);
    let mut writer = MessageWriter::new(
        &mut payload,
        MessageType {
            method,
            class: Class::Error,
        },
        tid,
    );
    writer.error_code(code, reason);
    if let Some((password, nonce)) = authenticated {
        writer
            .attribute(stun_attr::NONCE, nonce.as_bytes())
            .message_integrity_sha256(password.as_bytes());
    }
    writer.finish_with_fingerprint();
    Transmit::udp(to, payload).from_local(from_local)
}
