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

/// Where this gateway answers STUN Binding besides its service endpoint, told to
/// every peer in its Register answer (DISCOVERY-ENDPOINT) so agents classify their
/// NAT without flags. Wildcard-bound sockets answer on whatever address a request
/// reached, so what a peer is told depends on that address (`local`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryEndpoints {
    /// The service socket's port (it answers Binding too).
    pub service_port: u16,
    /// Whether the service socket is wildcard-bound (then it also answers on
    /// `other_addresses`).
    pub service_wildcard: bool,
    /// The discovery sockets' addresses; a wildcard one answers on the request's
    /// address (and on `other_addresses`).
    pub sockets: Vec<SocketAddr>,
    /// Other addresses of this host that peers can reach (a second address, for the
    /// address-dependence test); one of the request's family is told, next to the
    /// wildcard sockets' ports.
    pub other_addresses: Vec<IpAddr>,
}

impl DiscoveryEndpoints {
    /// The endpoints to tell a peer at `from` whose request reached `local`: the
    /// wildcard discovery sockets' ports on the address the peer sent to (told with
    /// an unspecified address, which the peer reads as "the server address you
    /// use": behind a 1:1 NAT the gateway's own address is not the one peers
    /// reach), the same ports and the service port on another address of the same
    /// family and scope (only when the peer reached `local` without crossing a NAT
    /// into another scope), and fixed discovery sockets of the peer's family; never
    /// the service endpoint itself, at most
    /// [`crate::rendezvous::wire::MAX_DISCOVERY_ENDPOINTS`].
    pub fn for_request(&self, local: Option<IpAddr>, from: SocketAddr) -> Vec<SocketAddr> {
        let v4 = from.ip().to_canonical().is_ipv4();
        let local = local.map(|ip| ip.to_canonical());
        let mut out: Vec<SocketAddr> = Vec::new();
        let mut push = |addr: SocketAddr| {
            let ip = addr.ip().to_canonical();
            let addr = SocketAddr::new(ip, addr.port());
            let service = local.is_some_and(|l| l == ip) && addr.port() == self.service_port;
            if ip.is_ipv4() == v4
                && !service
                && !out.contains(&addr)
                && out.len() < crate::rendezvous::wire::MAX_DISCOVERY_ENDPOINTS
            {
                out.push(addr);
            }
        };
        let wildcard_ports: Vec<u16> = self
            .sockets
            .iter()
            .filter(|s| s.ip().is_unspecified())
            .map(SocketAddr::port)
            .collect();
        let unspecified = if v4 {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        for &port in &wildcard_ports {
            push(SocketAddr::new(unspecified, port));
        }
        for socket in self.sockets.iter().filter(|s| !s.ip().is_unspecified()) {
            push(*socket);
        }
        let same_scope = local.is_some_and(|l| private(l) == private(from.ip().to_canonical()));
        let second = local.filter(|_| same_scope).and_then(|local| {
            self.other_addresses
                .iter()
                .map(|ip| ip.to_canonical())
                .find(|&ip| {
                    ip != local && ip.is_ipv4() == local.is_ipv4() && private(ip) == private(local)
                })
        });
        if let Some(second) = second {
            if self.service_wildcard {
                push(SocketAddr::new(second, self.service_port));
            }
            for &port in &wildcard_ports {
                push(SocketAddr::new(second, port));
            }
        }
        out
    }
}

/// Whether `ip` is in a private or shared range (RFC 1918, RFC 6598, unique local):
/// a peer that reached the gateway on a public address is told only public ones.
fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn a_peer_is_told_the_ports_on_the_address_it_reached_and_a_second_address() {
        let endpoints = DiscoveryEndpoints {
            service_port: 3478,
            service_wildcard: true,
            sockets: vec![a("0.0.0.0:3479")],
            other_addresses: vec![
                "10.0.0.5".parse().expect("ip"),
                "203.0.113.10".parse().expect("ip"),
                "203.0.113.11".parse().expect("ip"),
                "2001:db8::1".parse().expect("ip"),
            ],
        };
        let local = Some("203.0.113.10".parse().expect("ip"));
        assert_eq!(
            endpoints.for_request(local, a("198.51.100.2:4000")),
            vec![
                a("0.0.0.0:3479"),
                a("203.0.113.11:3478"),
                a("203.0.113.11:3479")
            ]
        );
        // A peer on the private side is told a private second address.
        let private = Some("10.0.0.9".parse().expect("ip"));
        assert_eq!(
            endpoints.for_request(private, a("10.0.0.2:4000")),
            vec![a("0.0.0.0:3479"), a("10.0.0.5:3478"), a("10.0.0.5:3479")]
        );
        // A public peer that reached a private address (the gateway behind a 1:1
        // NAT) is told no second address: it could not reach one.
        assert_eq!(
            endpoints.for_request(private, a("198.51.100.2:4000")),
            vec![a("0.0.0.0:3479")]
        );
        // An IPv6 peer: the port on the address it used, and the IPv6 address.
        assert_eq!(
            endpoints.for_request(
                Some("2001:db8::2".parse().expect("ip")),
                a("[2001:db8::9]:4000")
            ),
            vec![
                a("[::]:3479"),
                a("[2001:db8::1]:3478"),
                a("[2001:db8::1]:3479")
            ]
        );
        // Fixed sockets are told as they are, to peers of their family, never the
        // service endpoint.
        let fixed = DiscoveryEndpoints {
            service_port: 3478,
            service_wildcard: false,
            sockets: vec![
                a("192.0.2.10:3479"),
                a("[2001:db8::1]:3479"),
                a("192.0.2.10:3478"),
            ],
            other_addresses: Vec::new(),
        };
        assert_eq!(
            fixed.for_request(Some("192.0.2.10".parse().expect("ip")), a("198.51.100.2:1")),
            vec![a("192.0.2.10:3479")]
        );
        assert_eq!(
            DiscoveryEndpoints::default().for_request(local, a("198.51.100.2:1")),
            vec![]
        );
    }
}
