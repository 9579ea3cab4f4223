//! RFC 5780 CHANGE-REQUEST: Binding answers from another of the gateway's endpoints,
//! so a peer can measure its NAT's filtering, and how such an answer names the
//! socket it must leave from.
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{RendezvousHandled, RendezvousServer, auth::error_reply};
use crate::{
    MAIN_SOCKET, Transmit, binding,
    stun::{Message, attr as stun_attr},
};

/// The [`Transmit::socket`] of an answer that must leave from discovery endpoint
/// `index` (its index in the `Alternates` given to
/// [`RendezvousServer::set_alternates`]): socket 0 ([`MAIN_SOCKET`]) is the service
/// socket, so discovery endpoint `i` is socket `i + 1`.
pub fn discovery_socket(index: usize) -> u32 {
    u32::try_from(index)
        .ok()
        .and_then(|i| i.checked_add(MAIN_SOCKET + 1))
        .unwrap_or(u32::MAX)
}

/// The discovery endpoint a [`Transmit::socket`] names, `None` for the service socket
/// ([`MAIN_SOCKET`]): the inverse of [`discovery_socket`], for drivers.
pub fn discovery_index(socket: u32) -> Option<usize> {
    socket
        .checked_sub(MAIN_SOCKET + 1)
        .and_then(|i| usize::try_from(i).ok())
}

impl RendezvousServer {
    /// A Binding request with CHANGE-REQUEST (RFC 5780): answered from the endpoint it
    /// asks for, when the sender authenticated like any rendezvous request (REST
    /// credentials, MESSAGE-INTEGRITY-SHA256, a nonce issued to its address) or the
    /// operator allowed unauthenticated ones; otherwise a small 401 and nothing from
    /// another endpoint. 420 when no endpoint can serve the change.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn change_request(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        message: Message<'_>,
        change: Option<binding::ChangeRequest>,
    ) -> RendezvousHandled {
        let Some(change) = change else {
            if self.take_error_budget(now, from) {
                self.transmits.push_back(error_reply(
                    &message,
                    400,
                    "Bad Request",
                    None,
                    from,
                    local,
                ));
            }
            return RendezvousHandled::BadRequest;
        };
        let signed = message
            .attributes()
            .filter_map(Result::ok)
            .any(|a| a.ty == stun_attr::USERNAME);
        let auth = if signed || !self.change_unauthenticated {
            match self.authenticate(message, from, now_unix) {
                Ok(auth) => Some(auth),
                Err(_) => {
                    if self.take_error_budget(now, from) {
                        self.transmits.push_back(error_reply(
                            &message,
                            401,
                            "Unauthorized",
                            None,
                            from,
                            local,
                        ));
                    }
                    return RendezvousHandled::Unauthorized;
                }
            }
        } else if self.take_error_budget(now, from) {
            // Unauthenticated answers share the budget of unauthenticated errors: a
            // global cap on what spoofed requests can make the gateway send.
            None
        } else {
            return RendezvousHandled::RateLimited;
        };
        if let Some(auth) = &auth
            && !self.nonce_echoed(now, auth, from, local, now_unix)
        {
            return RendezvousHandled::StaleNonce;
        }
        let tid = message.transaction_id();
        let mut payload = Vec::with_capacity(binding::MAX_CHANGE_RESPONSE);
        let Some(selected) = self.alternates.select(local, from, change) else {
            binding::change_unsupported(
                tid,
                auth.as_ref()
                    .map(|a| (a.password.as_str(), a.next_nonce.as_str())),
                &mut payload,
            );
            self.transmits
                .push_back(Transmit::udp(from, payload).from_local(local));
            return RendezvousHandled::Binding(binding::Outcome::UnknownAttribute);
        };
        binding::change_response(
            tid,
            from,
            selected.origin,
            self.alternates.other_address(local, from),
            auth.as_ref().map(|a| a.password.as_str()),
            &mut payload,
        );
        let transmit = Transmit::udp(from, payload).from_local(selected.from_local);
        match selected.endpoint {
            Some(endpoint) => self
                .transmits
                .push_back(transmit.on_socket(discovery_socket(endpoint))),
            None => self.transmits.push_back(transmit),
        }
        RendezvousHandled::ChangeAnswered
    }
}
