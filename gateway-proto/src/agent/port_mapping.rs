//! The agent's port mapping: a [`PortMapClient`] for the agent's own socket port,
//! asked of the default router at start. A granted mapping is endpoint-independent
//! in mapping and filtering, so its external endpoint, announced in Register as a
//! [`CandidateKind::Mapped`] candidate, lets a peer reach this one directly even
//! behind a random-port NAT. The client's datagrams leave on the agent's socket (the
//! mapped one); the router's answers are taken before anything else; refreshes and
//! the delete at close are the client's.
//!
//! With TCP punching on, a second client asks for a TCP mapping of the TCP punching
//! port and the agent announces it as a [`CandidateKind::TcpMapped`] candidate (not
//! checked by the gateway: its check is a UDP probe). Both clients send from the
//! agent's socket to the same router port, so every answer from the router is
//! offered to both and each keeps its own: PCP MAP answers carry the client's
//! nonce (and the transport), NAT-PMP mapping answers their opcode (1 UDP, 2 TCP);
//! the answers that carry neither (PCP ANNOUNCE, NAT-PMP's external address) say
//! the same thing to both.
//!
//! [`CandidateKind::Mapped`]: crate::rendezvous::wire::CandidateKind::Mapped
//! [`CandidateKind::TcpMapped`]: crate::rendezvous::wire::CandidateKind::TcpMapped
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use rand::Rng;

use super::{Agent, AgentEvent, PendingRequest, session::SessionState};
use crate::portmap::{
    MappedTransport, Mapping, PortMapClient, PortMapConfig, PortMapEvent, ProtocolOutcome,
};
use crate::rendezvous::{
    client::{self, MappedCheck},
    wire::method,
};

/// How long connects wait at start for the router's first answer, so the first
/// introduction already carries the mapped candidate (a router that maps answers
/// within milliseconds; one that does not costs this once).
pub const PORT_MAPPING_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// How long connects wait for the gateway's check of a new mapped candidate (its
/// probe and our answer take a round trip or two), so the introduction carries it;
/// a gateway that does not check (an older one) costs this once per mapping.
pub const MAPPED_CHECK_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the gateway's check of our mapped candidate stands.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct MappedCheckState {
    /// Until when connects wait for the verdict (`None`: it came, or the wait is
    /// over).
    pub(super) hold: Option<Instant>,
    /// The external endpoint the gateway verified last.
    verified: Option<SocketAddr>,
    /// The external endpoint the gateway could not reach: not announced again
    /// (until the mapping moves).
    withdrawn: Option<SocketAddr>,
}

/// Where to ask for the mapping, found by the driver (the sans-IO agent knows no
/// routes): the default router, and this host's address toward it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapTarget {
    /// The default router (where PCP and NAT-PMP servers listen, port 5351).
    pub router: IpAddr,
    /// This host's address toward the router (PCP's client address).
    pub client: IpAddr,
    /// The agent socket's local port (the port mapped); 0 in a configuration given
    /// to `gateway`'s `PeerClient`, which fills in its socket's port.
    pub port: u16,
}

impl Agent {
    /// Starts the clients the configuration asks for (UDP, and TCP for the TCP
    /// punching port), each with its own PCP nonce.
    pub(super) fn start_port_mapping(&mut self, now: Instant) {
        if let Some(target) = self.config.port_mapping {
            let nonce: [u8; 12] = self.rng.random();
            self.portmap = Some(PortMapClient::new(
                now,
                PortMapConfig::udp(target.router, target.client, target.port),
                nonce,
                self.config.upnp,
            ));
            self.portmap_hold = Some(now + PORT_MAPPING_HOLD);
        }
        if let Some(target) = self.config.tcp_port_mapping {
            let nonce: [u8; 12] = self.rng.random();
            self.tcp_portmap = Some(PortMapClient::new(
                now,
                PortMapConfig {
                    transport: MappedTransport::Tcp,
                    ..PortMapConfig::udp(target.router, target.client, target.port)
                },
                nonce,
                self.config.upnp,
            ));
            self.tcp_portmap_hold = Some(now + PORT_MAPPING_HOLD);
        }
        self.drain_port_mapping(now);
    }

    /// The client for `transport`, if configured.
    fn portmap_client(&mut self, transport: MappedTransport) -> Option<&mut PortMapClient> {
        match transport {
            MappedTransport::Udp => self.portmap.as_mut(),
            MappedTransport::Tcp => self.tcp_portmap.as_mut(),
        }
    }

    /// A datagram on the agent's socket: `true` when it was the router's answer to
    /// a port-mapping client (nothing else sees it). Offered to both clients: each
    /// takes what answers its own requests (see the module documentation).
    pub(super) fn port_mapping_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> bool {
        let mut taken = false;
        for client in [&mut self.portmap, &mut self.tcp_portmap]
            .into_iter()
            .flatten()
        {
            taken |= client.handle_datagram(now, from, datagram);
        }
        if taken {
            self.drain_port_mapping(now);
        }
        taken
    }

    /// The client's timers (retransmissions, refreshes, give-ups).
    pub(super) fn port_mapping_timeout(&mut self, now: Instant) {
        if self.portmap_hold.is_some_and(|at| at <= now) {
            self.portmap_hold = None;
        }
        if self.tcp_portmap_hold.is_some_and(|at| at <= now) {
            self.tcp_portmap_hold = None;
        }
        if self.mapped_check.hold.is_some_and(|at| at <= now) {
            self.mapped_check.hold = None;
        }
        for client in [&mut self.portmap, &mut self.tcp_portmap]
            .into_iter()
            .flatten()
        {
            if client.poll_timeout().is_some_and(|at| at <= now) {
                client.handle_timeout(now);
            }
        }
        self.drain_port_mapping(now);
    }

    /// The driver's UPnP-IGD attempt ended (see [`PortMapClient::handle_upnp_mapping`]):
    /// `false` when the agent did not take the mapping (no client, or PCP or NAT-PMP
    /// won), and the driver must delete it.
    pub fn handle_upnp_mapping(
        &mut self,
        now: Instant,
        result: Result<Mapping, ProtocolOutcome>,
    ) -> bool {
        self.handle_upnp_mapping_of(now, MappedTransport::Udp, result)
    }

    /// [`Self::handle_upnp_mapping`] for the UDP or the TCP mapping's client.
    pub fn handle_upnp_mapping_of(
        &mut self,
        now: Instant,
        transport: MappedTransport,
        result: Result<Mapping, ProtocolOutcome>,
    ) -> bool {
        let Some(client) = self.portmap_client(transport) else {
            return false;
        };
        let taken = client.handle_upnp_mapping(now, result);
        self.drain_port_mapping(now);
        taken
    }

    /// The driver's renewal of the UPnP lease the agent holds ended (see
    /// [`PortMapClient::handle_upnp_renewal`]): a failure loses the mapping, and
    /// the agent re-registers at once without the mapped candidate.
    pub fn handle_upnp_renewal(&mut self, now: Instant, result: Result<Mapping, ProtocolOutcome>) {
        self.handle_upnp_renewal_of(now, MappedTransport::Udp, result);
    }

    /// [`Self::handle_upnp_renewal`] for the UDP or the TCP mapping's client.
    pub fn handle_upnp_renewal_of(
        &mut self,
        now: Instant,
        transport: MappedTransport,
        result: Result<Mapping, ProtocolOutcome>,
    ) {
        if let Some(client) = self.portmap_client(transport) {
            client.handle_upnp_renewal(now, result);
        }
        self.drain_port_mapping(now);
    }

    /// Deletes the mappings (on exit): [`PortMapEvent::Closed`] follows once the
    /// router answered or the bounded retries ran out; at once when there is no
    /// client or no PCP/NAT-PMP mapping. A UPnP mapping is the driver's to delete.
    /// The TCP mapping's client (if any) says its own
    /// [`AgentEvent::TcpPortMapping`]`(Closed)`; without one, nothing.
    pub fn close_port_mapping(&mut self, now: Instant) {
        match &mut self.portmap {
            Some(client) => client.close(now),
            None => self
                .events
                .push_back(AgentEvent::PortMapping(PortMapEvent::Closed)),
        }
        if let Some(client) = &mut self.tcp_portmap {
            client.close(now);
        }
        self.drain_port_mapping(now);
    }

    /// Whether a TCP mapping is asked for (then [`Self::close_port_mapping`] ends
    /// with an [`AgentEvent::TcpPortMapping`]`(Closed)` too).
    pub fn has_tcp_port_mapping(&self) -> bool {
        self.tcp_portmap.is_some()
    }

    /// The agent is about to exit: deletes the port mapping (see
    /// [`Self::close_port_mapping`]) and releases the TURN allocation (a Refresh
    /// with lifetime 0, sent once: a killed agent would otherwise hold it until it
    /// expires). The driver sends what follows, waits a little for
    /// [`PortMapEvent::Closed`], and exits.
    pub fn shut_down(&mut self, now: Instant) {
        self.close_port_mapping(now);
        self.turn.close(now);
        self.drain_turn(now);
    }

    /// The mapped candidate the Register announces: the mapping's external
    /// endpoint, unless the gateway found it unreachable.
    pub(super) fn announced_mapped(&self) -> Option<SocketAddr> {
        self.mapped
            .filter(|&m| self.mapped_check.withdrawn != Some(m))
    }

    /// A Mapped-Check indication signed for us: the gateway's probe of our mapped
    /// candidate (answered through our socket, echoing its token, while we
    /// announce one), or its verdict that the candidate did not answer.
    pub(super) fn mapped_check_indication(&mut self, now: Instant, datagram: &[u8]) {
        let password = &self.config.credentials.password;
        match client::parse_mapped_check(datagram, password) {
            Some(MappedCheck::Probe { token }) if self.announced_mapped().is_some() => {
                let tid: [u8; 12] = self.rng.random();
                let payload = client::mapped_check(
                    tid,
                    &self.config.credentials,
                    self.nonce.as_deref(),
                    &token,
                );
                self.pending
                    .insert(tid, PendingRequest::new(method::MAPPED_CHECK, now));
                self.send_to_server(payload);
            }
            Some(MappedCheck::Unreachable { external }) if self.mapped == Some(external) => {
                self.mapped_check.hold = None;
                if self.mapped_check.withdrawn != Some(external) {
                    self.mapped_check.withdrawn = Some(external);
                    self.next_register = now;
                    self.events.push_back(AgentEvent::MappedCandidate {
                        external,
                        verified: false,
                    });
                }
            }
            _ => {}
        }
    }

    /// The gateway accepted our answer to its probe: the candidate is introduced.
    pub(super) fn mapped_verified(&mut self) {
        self.mapped_check.hold = None;
        let Some(external) = self.announced_mapped() else {
            return;
        };
        if self.mapped_check.verified != Some(external) {
            self.mapped_check.verified = Some(external);
            self.events.push_back(AgentEvent::MappedCandidate {
                external,
                verified: true,
            });
        }
    }

    /// The mapping held now, if any.
    pub fn port_mapping(&self) -> Option<Mapping> {
        self.portmap.as_ref().and_then(PortMapClient::mapping)
    }

    /// The UDP or TCP mapping held now, if any.
    pub fn port_mapping_of(&self, transport: MappedTransport) -> Option<Mapping> {
        match transport {
            MappedTransport::Udp => self.port_mapping(),
            MappedTransport::Tcp => self.tcp_portmap.as_ref().and_then(PortMapClient::mapping),
        }
    }

    /// Moves the client's datagrams to the agent's socket and acts on its events: a
    /// new or moved external endpoint (or a lost one) re-registers at once, so the
    /// gateway hands the current candidate to the next introduction.
    fn drain_port_mapping(&mut self, now: Instant) {
        self.drain_tcp_port_mapping(now);
        let Some(client) = &mut self.portmap else {
            return;
        };
        while let Some(transmit) = client.poll_transmit() {
            self.outgoing.push_back(transmit);
        }
        while let Some(event) = client.poll_event() {
            let mapped = external_after(&event, self.mapped);
            if ends_hold(&event) {
                self.portmap_hold = None;
            }
            if mapped != self.mapped {
                let new = mapped.is_some();
                self.mapped = mapped;
                if !self.stopped && !matches!(event, PortMapEvent::Closed) {
                    self.next_register = now;
                }
                self.mapped_check.verified = None;
                if let Some(external) = mapped
                    && self.mapped_check.withdrawn != Some(external)
                {
                    // The gateway checks it before introducing it: connects
                    // wait for its verdict (a round trip), at most a bound.
                    self.mapped_check.hold = Some(now + MAPPED_CHECK_HOLD);
                }
                if new {
                    // A relayed path may go direct through the new mapping: try
                    // the upgrade now rather than at the next upgrade interval.
                    for session in self.sessions.values_mut() {
                        if session.state == SessionState::Up && session.path_relayed {
                            session.upgrade_at = now;
                            if let Some(at) = self.wanted.get_mut(&session.peer_id) {
                                *at = now;
                            }
                        }
                    }
                }
            }
            self.events.push_back(AgentEvent::PortMapping(event));
        }
    }

    /// [`Self::drain_port_mapping`] for the TCP client: its external endpoint is
    /// the Register's TCP mapped candidate (re-registered at once when it changes;
    /// no check by the gateway, so no hold for one).
    fn drain_tcp_port_mapping(&mut self, now: Instant) {
        let Some(client) = &mut self.tcp_portmap else {
            return;
        };
        while let Some(transmit) = client.poll_transmit() {
            self.outgoing.push_back(transmit);
        }
        while let Some(event) = client.poll_event() {
            let mapped = external_after(&event, self.tcp_mapped);
            if ends_hold(&event) {
                self.tcp_portmap_hold = None;
            }
            if mapped != self.tcp_mapped {
                self.tcp_mapped = mapped;
                if !self.stopped && !matches!(event, PortMapEvent::Closed) {
                    self.next_register = now;
                }
            }
            self.events.push_back(AgentEvent::TcpPortMapping(event));
        }
    }
}

/// The external endpoint a port-mapping client's `event` leaves the agent with,
/// from `current`: a new or refreshed mapping's, none once lost or closed, the same
/// when the router answered nothing (a mapping held keeps being announced).
fn external_after(event: &PortMapEvent, current: Option<SocketAddr>) -> Option<SocketAddr> {
    match event {
        PortMapEvent::Mapped(m) | PortMapEvent::Refreshed(m) => Some(m.external),
        PortMapEvent::Lost { .. } | PortMapEvent::Closed => None,
        PortMapEvent::Unavailable(_) => current,
    }
}

/// Whether `event` settles the first request, so Connects held for it may go.
fn ends_hold(event: &PortMapEvent) -> bool {
    matches!(
        event,
        PortMapEvent::Mapped(_) | PortMapEvent::Unavailable(_)
    )
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;
    use crate::{
        agent::AgentConfig,
        portmap::{MappingProtocol, wire},
        rendezvous::{
            client::PeerCredentials,
            wire::{CandidateKind, attr, decode_candidate},
        },
        stun::{Class, Message, MessageType, MessageWriter},
    };

    const SERVER: &str = "192.0.2.10:3478";
    const ROUTER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1));
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2));

    fn router() -> SocketAddr {
        SocketAddr::new(ROUTER, wire::SERVER_PORT)
    }

    fn agent(now: Instant, mapping: bool) -> Agent {
        agent_with(now, mapping, false)
    }

    /// [`agent`], with the driver's UPnP-IGD attempt out when `upnp`.
    fn agent_with(now: Instant, mapping: bool, upnp: bool) -> Agent {
        let creds = PeerCredentials {
            username: "1900000000:alice".into(),
            password: "pw".into(),
        };
        let mut config = AgentConfig::new(SERVER.parse().expect("addr"), creds);
        config.discover = false;
        config.host_candidates = vec![SocketAddr::new(CLIENT, 4500)];
        config.port_mapping = mapping.then_some(PortMapTarget {
            router: ROUTER,
            client: CLIENT,
            port: 4500,
        });
        config.upnp = upnp;
        Agent::new(config, now, 7)
    }

    /// Everything sent: (to router?, payload), after running due timers.
    fn step(agent: &mut Agent, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        if agent.poll_timeout().is_some_and(|at| at <= now) {
            agent.handle_timeout(now);
        }
        std::iter::from_fn(|| agent.poll_transmit())
            .map(|t| (t.to, t.payload))
            .collect()
    }

    /// The mapped candidates of the Registers among `sent`, one entry per Register.
    fn registered_mapped(sent: &[(SocketAddr, Vec<u8>)]) -> Vec<Vec<SocketAddr>> {
        sent.iter()
            .filter(|(to, _)| *to == SERVER.parse().expect("addr"))
            .filter_map(|(_, payload)| {
                let message = Message::parse(payload).ok()?;
                if message.message_type().method != crate::rendezvous::wire::method::REGISTER {
                    return None;
                }
                let tid = message.transaction_id();
                Some(
                    message
                        .attributes()
                        .filter_map(Result::ok)
                        .filter(|a| a.ty == attr::CANDIDATE)
                        .filter_map(|a| decode_candidate(a.value, tid))
                        .filter(|c| c.kind == CandidateKind::Mapped)
                        .map(|c| c.addr)
                        .collect(),
                )
            })
            .collect()
    }

    fn to_router(sent: &[(SocketAddr, Vec<u8>)]) -> Vec<Vec<u8>> {
        sent.iter()
            .filter(|(to, _)| *to == router())
            .map(|(_, p)| p.clone())
            .collect()
    }

    fn pcp_announce_answer() -> Vec<u8> {
        let mut answer = wire::pcp_announce_request(CLIENT).to_vec();
        answer[1] = 0x80;
        answer[3] = 0;
        answer[8..12].copy_from_slice(&10u32.to_be_bytes());
        answer
    }

    /// The router's PCP answer to the MAP `request`, granting `external`.
    fn pcp_grant(request: &[u8], external: SocketAddr, lifetime: u32) -> Vec<u8> {
        let mut answer = request.to_vec();
        answer[1] |= 0x80;
        answer[3] = 0;
        answer[4..8].copy_from_slice(&lifetime.to_be_bytes());
        answer[8..12].copy_from_slice(&11u32.to_be_bytes());
        answer[12..24].fill(0);
        answer[42..44].copy_from_slice(&external.port().to_be_bytes());
        let IpAddr::V4(v4) = external.ip() else {
            panic!("v4 only here")
        };
        answer[44..60].copy_from_slice(&v4.to_ipv6_mapped().octets());
        answer
    }

    fn port_mapping_events(agent: &mut Agent) -> Vec<PortMapEvent> {
        std::iter::from_fn(|| agent.poll_event())
            .filter_map(|e| match e {
                AgentEvent::PortMapping(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// Grants `external` by PCP at `t0`; returns the datagrams sent after the grant.
    fn granted(agent: &mut Agent, t0: Instant, external: SocketAddr) -> Vec<(SocketAddr, Vec<u8>)> {
        let first = step(agent, t0);
        assert_eq!(to_router(&first).len(), 2, "PCP ANNOUNCE and NAT-PMP probe");
        assert_eq!(registered_mapped(&first), [vec![]], "nothing mapped yet");
        agent.handle_datagram(t0, router(), &pcp_announce_answer());
        let map = to_router(&step(agent, t0));
        assert_eq!(map.len(), 1, "the PCP MAP");
        let t1 = t0 + Duration::from_millis(20);
        agent.handle_datagram(t1, router(), &pcp_grant(&map[0], external, 60));
        step(agent, t1)
    }

    #[test]
    fn a_granted_mapping_is_announced_in_the_next_register() {
        let t0 = Instant::now();
        let mut agent = agent(t0, true);
        let external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        let after = granted(&mut agent, t0, external);
        assert_eq!(registered_mapped(&after), [vec![external]], "re-registered");
        assert_eq!(
            port_mapping_events(&mut agent),
            [PortMapEvent::Mapped(Mapping {
                protocol: MappingProtocol::Pcp,
                external,
                lifetime: Duration::from_secs(60),
            })]
        );
        assert_eq!(agent.port_mapping().map(|m| m.external), Some(external));
        // The router's answers are the client's: no peer or server logic saw them.
        assert!(agent.sessions.is_empty());
    }

    #[test]
    fn a_lost_mapping_leaves_the_register() {
        let t0 = Instant::now();
        let mut agent = agent(t0, true);
        let external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        granted(&mut agent, t0, external);
        port_mapping_events(&mut agent);
        // The router falls silent: the refresh at 30 s goes unanswered.
        let mut registers = Vec::new();
        let mut lost_at = None;
        for ms in (100..40_000).step_by(50) {
            let t = t0 + Duration::from_millis(ms);
            let sent = step(&mut agent, t);
            let events = port_mapping_events(&mut agent);
            if events.iter().any(
                |e| matches!(e, PortMapEvent::Lost { mapping, .. } if mapping.external == external),
            ) {
                lost_at = Some(ms);
            }
            registers.extend(registered_mapped(&sent).into_iter().map(|m| (ms, m)));
        }
        let lost_at = lost_at.expect("the mapping was lost");
        assert!((30_000..35_000).contains(&lost_at), "{lost_at}");
        let (first_after, mapped) = registers
            .iter()
            .find(|(ms, _)| *ms >= lost_at)
            .expect("a Register after the loss");
        assert_eq!(*first_after, lost_at, "at once");
        assert!(mapped.is_empty(), "{mapped:?}");
        assert!(
            registers
                .iter()
                .filter(|(ms, _)| *ms < lost_at)
                .all(|(_, m)| m == &vec![external])
        );
        assert_eq!(agent.port_mapping(), None);
    }

    /// How many Connects are among `sent`.
    fn connects(sent: &[(SocketAddr, Vec<u8>)]) -> usize {
        sent.iter()
            .filter_map(|(_, p)| Message::parse(p).ok())
            .filter(|m| m.message_type().method == crate::rendezvous::wire::method::CONNECT)
            .count()
    }

    /// A Mapped-Check indication signed for the agent: a probe (with `token`) or
    /// the "unreachable" verdict.
    fn mapped_check(external: SocketAddr, token: Option<[u8; 16]>) -> Vec<u8> {
        // What the gateway sends (signed with this test agent's password).
        crate::rendezvous::server::mapped_notice([9; 12], external, token.as_ref(), "pw")
    }

    /// A signed success answer to transaction `tid`.
    fn signed_success(tid: [u8; 12]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut writer = MessageWriter::new(
            &mut out,
            MessageType {
                method: method::MAPPED_CHECK,
                class: Class::Success,
            },
            tid,
        );
        writer.message_integrity_sha256(b"pw");
        writer.finish_with_fingerprint();
        out
    }

    /// Delivers the gateway's probe of `external` (from its discovery socket) and
    /// returns the transaction of the agent's answer, checked to echo the token.
    fn answer_probe(agent: &mut Agent, now: Instant, external: SocketAddr) -> [u8; 12] {
        let token = [7u8; 16];
        let discovery: SocketAddr = "192.0.2.10:3479".parse().expect("addr");
        agent.handle_datagram(now, discovery, &mapped_check(external, Some(token)));
        let sent = step(agent, now);
        let answers: Vec<&Vec<u8>> = sent
            .iter()
            .filter(|(to, _)| *to == SERVER.parse().expect("addr"))
            .map(|(_, p)| p)
            .collect();
        assert_eq!(answers.len(), 1, "one answer, to the service socket");
        let message = Message::parse(answers[0]).expect("stun");
        assert_eq!(message.message_type().method, method::MAPPED_CHECK);
        assert_eq!(message.message_type().class, Class::Request);
        let echoed = message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::MAPPED_TOKEN)
            .map(|a| a.value.to_vec());
        assert_eq!(echoed.as_deref(), Some(&token[..]));
        message.transaction_id()
    }

    #[test]
    fn a_mapping_the_gateway_cannot_reach_is_withdrawn_and_said() {
        let t0 = Instant::now();
        let mut agent = agent(t0, true);
        agent.connect("bob", t0);
        let external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        let after = granted(&mut agent, t0, external);
        assert_eq!(registered_mapped(&after), [vec![external]]);
        assert_eq!(connects(&after), 0, "held for the gateway's check");
        // A forged verdict (not signed with our password) changes nothing.
        let mut forged = mapped_check(external, None);
        let at = forged.len() - 13;
        forged[at] ^= 1;
        let t1 = t0 + Duration::from_millis(100);
        agent.handle_datagram(t1, SERVER.parse().expect("addr"), &forged);
        assert!(registered_mapped(&step(&mut agent, t1)).is_empty());
        // The gateway's verdict: re-registered without it, connects released.
        agent.handle_datagram(
            t1,
            SERVER.parse().expect("addr"),
            &mapped_check(external, None),
        );
        let sent = step(&mut agent, t1);
        assert_eq!(registered_mapped(&sent), [vec![]], "withdrawn at once");
        assert_eq!(connects(&sent), 1, "released by the verdict");
        assert!(std::iter::from_fn(|| agent.poll_event()).any(|e| e
            == AgentEvent::MappedCandidate {
                external,
                verified: false
            }));
        // Later probes of it are not answered; later Registers leave it out.
        let discovery: SocketAddr = "192.0.2.10:3479".parse().expect("addr");
        agent.handle_datagram(t1, discovery, &mapped_check(external, Some([1; 16])));
        assert!(step(&mut agent, t1).is_empty());
        for ms in (200..40_000).step_by(500) {
            let sent = step(&mut agent, t0 + Duration::from_millis(ms));
            assert!(registered_mapped(&sent).iter().all(Vec::is_empty));
        }
    }

    #[test]
    fn without_the_gateways_verdict_connects_wait_two_seconds_at_most() {
        let t0 = Instant::now();
        let mut agent = agent(t0, true);
        agent.connect("bob", t0);
        let external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        granted(&mut agent, t0, external);
        let mut first_connect = None;
        for ms in (20..5_000).step_by(10) {
            let sent = step(&mut agent, t0 + Duration::from_millis(ms));
            if connects(&sent) > 0 && first_connect.is_none() {
                first_connect = Some(ms);
            }
        }
        let hold = u64::try_from(MAPPED_CHECK_HOLD.as_millis()).expect("ms");
        assert_eq!(first_connect, Some(20 + hold));
    }

    #[test]
    fn a_failed_upnp_renewal_withdraws_the_mapped_candidate() {
        let t0 = Instant::now();
        let mut agent = agent_with(t0, true, true);
        let external: SocketAddr = "198.51.100.2:4500".parse().expect("addr");
        let upnp = Mapping {
            protocol: MappingProtocol::Upnp,
            external,
            lifetime: Duration::from_secs(3600),
        };
        step(&mut agent, t0);
        assert!(agent.handle_upnp_mapping(t0, Ok(upnp)));
        assert_eq!(registered_mapped(&step(&mut agent, t0)), [vec![external]]);
        port_mapping_events(&mut agent);
        let t1 = t0 + Duration::from_secs(1800);
        agent.handle_upnp_renewal(t1, Ok(upnp));
        assert_eq!(
            port_mapping_events(&mut agent),
            [PortMapEvent::Refreshed(upnp)]
        );
        let t2 = t1 + Duration::from_secs(1800);
        agent.handle_upnp_renewal(t2, Err(ProtocolOutcome::NoAnswer));
        let sent = step(&mut agent, t2);
        assert_eq!(registered_mapped(&sent), [vec![]], "withdrawn at once");
        assert_eq!(
            port_mapping_events(&mut agent),
            [PortMapEvent::Lost {
                mapping: upnp,
                outcome: ProtocolOutcome::NoAnswer
            }]
        );
        assert_eq!(agent.port_mapping(), None);
    }

    #[test]
    fn connects_wait_for_the_routers_first_answer_at_most_a_second() {
        let t0 = Instant::now();
        // A router that answers: the Connect follows the Register with the mapping.
        let mut agent = agent(t0, true);
        agent.connect("bob", t0);
        let external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        let first = step(&mut agent, t0);
        assert_eq!(connects(&first), 0, "held");
        agent.handle_datagram(t0, router(), &pcp_announce_answer());
        let map = to_router(&step(&mut agent, t0));
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(connects(&step(&mut agent, t1)), 0, "still held");
        agent.handle_datagram(t1, router(), &pcp_grant(&map[0], external, 60));
        let sent = step(&mut agent, t1);
        assert_eq!(registered_mapped(&sent), [vec![external]]);
        assert_eq!(connects(&sent), 0, "held for the gateway's check");
        // The gateway's probe reaches us; our answer's acceptance releases it.
        let answer = answer_probe(&mut agent, t1, external);
        agent.handle_datagram(t1, SERVER.parse().expect("addr"), &signed_success(answer));
        let sent = step(&mut agent, t1);
        assert_eq!(connects(&sent), 1, "released by the verdict");
        assert!(std::iter::from_fn(|| agent.poll_event()).any(|e| e
            == AgentEvent::MappedCandidate {
                external,
                verified: true
            }));

        // A silent router: the Connect goes after a second, not after its retries.
        let mut silent = self::tests::agent(t0, true);
        silent.connect("bob", t0);
        let mut first_connect = None;
        for ms in (0..5_000).step_by(10) {
            let sent = step(&mut silent, t0 + Duration::from_millis(ms));
            if connects(&sent) > 0 && first_connect.is_none() {
                first_connect = Some(ms);
            }
        }
        assert_eq!(first_connect, Some(1_000));
    }

    #[test]
    fn without_port_mapping_nothing_goes_to_a_router() {
        let t0 = Instant::now();
        let mut agent = agent(t0, false);
        for ms in (0..20_000).step_by(50) {
            let sent = step(&mut agent, t0 + Duration::from_millis(ms));
            assert!(
                sent.iter().all(|(to, _)| to.port() != wire::SERVER_PORT),
                "{sent:?}"
            );
        }
        // A router's datagram is not taken either.
        agent.handle_datagram(t0, router(), &pcp_announce_answer());
        assert!(port_mapping_events(&mut agent).is_empty());
        assert!(!agent.handle_upnp_mapping(
            t0,
            Ok(Mapping {
                protocol: MappingProtocol::Upnp,
                external: "198.51.100.2:1".parse().expect("addr"),
                lifetime: Duration::from_secs(60),
            })
        ));
    }

    #[test]
    fn close_deletes_the_mapping_and_says_closed() {
        let t0 = Instant::now();
        let mut agent = agent(t0, true);
        let external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        granted(&mut agent, t0, external);
        port_mapping_events(&mut agent);
        let t1 = t0 + Duration::from_secs(1);
        agent.close_port_mapping(t1);
        let delete = to_router(&step(&mut agent, t1));
        assert_eq!(delete.len(), 1);
        assert_eq!(delete[0][4..8], [0, 0, 0, 0], "lifetime 0: delete");
        agent.handle_datagram(t1, router(), &pcp_grant(&delete[0], external, 0));
        assert_eq!(port_mapping_events(&mut agent), [PortMapEvent::Closed]);
    }

    /// An agent with UDP port mapping of 4500 and TCP port mapping of 4600 (TCP
    /// punching on, reflexive TCP candidate 198.51.100.2:41000).
    fn tcp_agent(now: Instant) -> Agent {
        let creds = PeerCredentials {
            username: "1900000000:alice".into(),
            password: "pw".into(),
        };
        let mut config = AgentConfig::new(SERVER.parse().expect("addr"), creds);
        config.discover = false;
        config.host_candidates = vec![SocketAddr::new(CLIENT, 4500)];
        config.tcp_candidates = vec!["198.51.100.2:41000".parse().expect("addr")];
        config.port_mapping = Some(PortMapTarget {
            router: ROUTER,
            client: CLIENT,
            port: 4500,
        });
        config.tcp_port_mapping = Some(PortMapTarget {
            router: ROUTER,
            client: CLIENT,
            port: 4600,
        });
        Agent::new(config, now, 7)
    }

    /// The candidates of kind `kind` of the Registers among `sent`.
    fn registered_of(sent: &[(SocketAddr, Vec<u8>)], kind: CandidateKind) -> Vec<Vec<SocketAddr>> {
        sent.iter()
            .filter(|(to, _)| *to == SERVER.parse().expect("addr"))
            .filter_map(|(_, payload)| {
                let message = Message::parse(payload).ok()?;
                if message.message_type().method != crate::rendezvous::wire::method::REGISTER {
                    return None;
                }
                let tid = message.transaction_id();
                Some(
                    message
                        .attributes()
                        .filter_map(Result::ok)
                        .filter(|a| a.ty == attr::CANDIDATE)
                        .filter_map(|a| decode_candidate(a.value, tid))
                        .filter(|c| c.kind == kind)
                        .map(|c| c.addr)
                        .collect(),
                )
            })
            .collect()
    }

    /// Port-mapping events split by transport: (UDP's, TCP's).
    fn events_by_transport(agent: &mut Agent) -> (Vec<PortMapEvent>, Vec<PortMapEvent>) {
        let (mut udp, mut tcp) = (Vec::new(), Vec::new());
        while let Some(event) = agent.poll_event() {
            match event {
                AgentEvent::PortMapping(e) => udp.push(e),
                AgentEvent::TcpPortMapping(e) => tcp.push(e),
                _ => {}
            }
        }
        (udp, tcp)
    }

    #[test]
    fn two_clients_on_one_socket_keep_their_own_pcp_answers() {
        let t0 = Instant::now();
        let mut agent = tcp_agent(t0);
        let first = to_router(&step(&mut agent, t0));
        assert_eq!(first.len(), 4, "each client probes PCP and NAT-PMP");
        // One ANNOUNCE answer serves both clients: each asks for its MAP.
        agent.handle_datagram(t0, router(), &pcp_announce_answer());
        let maps = to_router(&step(&mut agent, t0));
        assert_eq!(maps.len(), 2, "{maps:?}");
        let by_protocol = |p: u8| {
            maps.iter()
                .find(|m| m[36] == p)
                .cloned()
                .unwrap_or_else(|| panic!("no MAP for protocol {p}"))
        };
        let (udp_map, tcp_map) = (by_protocol(17), by_protocol(6));
        assert_ne!(udp_map[24..36], tcp_map[24..36], "each has its own nonce");
        assert_eq!(u16::from_be_bytes([tcp_map[40], tcp_map[41]]), 4600);
        // The TCP grant first: only the TCP client takes it.
        let tcp_external: SocketAddr = "198.51.100.2:40000".parse().expect("addr");
        let t1 = t0 + Duration::from_millis(20);
        agent.handle_datagram(t1, router(), &pcp_grant(&tcp_map, tcp_external, 60));
        let sent = step(&mut agent, t1);
        assert_eq!(
            registered_of(&sent, CandidateKind::TcpMapped),
            [vec![tcp_external]]
        );
        assert_eq!(registered_of(&sent, CandidateKind::Mapped), [vec![]]);
        let tcp_mapping = Mapping {
            protocol: MappingProtocol::Pcp,
            external: tcp_external,
            lifetime: Duration::from_secs(60),
        };
        assert_eq!(
            events_by_transport(&mut agent),
            (vec![], vec![PortMapEvent::Mapped(tcp_mapping)])
        );
        // The UDP grant: only the UDP client takes it; the TCP one is kept.
        let udp_external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        agent.handle_datagram(t1, router(), &pcp_grant(&udp_map, udp_external, 60));
        let sent = step(&mut agent, t1);
        assert_eq!(
            registered_of(&sent, CandidateKind::Mapped),
            [vec![udp_external]]
        );
        assert_eq!(
            registered_of(&sent, CandidateKind::TcpMapped),
            [vec![tcp_external]]
        );
        let (udp, tcp) = events_by_transport(&mut agent);
        assert!(tcp.is_empty(), "{tcp:?}");
        assert!(matches!(&udp[..], [PortMapEvent::Mapped(m)] if m.external == udp_external));
        assert_eq!(
            agent.port_mapping_of(MappedTransport::Tcp),
            Some(tcp_mapping)
        );
        assert_eq!(
            agent
                .port_mapping_of(MappedTransport::Udp)
                .map(|m| m.external),
            Some(udp_external)
        );
        // The TCP candidate follows the reflexive one (the splice's target first).
        let message = sent
            .iter()
            .filter(|(to, _)| *to == SERVER.parse().expect("addr"))
            .find_map(|(_, p)| Message::parse(p).ok())
            .expect("a Register");
        let tid = message.transaction_id();
        let kinds: Vec<CandidateKind> = message
            .attributes()
            .filter_map(Result::ok)
            .filter(|a| a.ty == attr::CANDIDATE)
            .filter_map(|a| decode_candidate(a.value, tid))
            .map(|c| c.kind)
            .collect();
        assert_eq!(
            kinds[..3],
            [
                CandidateKind::TcpServerReflexive,
                CandidateKind::TcpMapped,
                CandidateKind::Mapped
            ]
        );
    }

    /// A NAT-PMP answer to `request` (a MAP), granting `external_port`.
    fn nat_pmp_grant(request: &[u8], external_port: u16, lifetime: u32) -> Vec<u8> {
        let mut answer = vec![0, request[1] | 0x80, 0, 0];
        answer.extend_from_slice(&100u32.to_be_bytes());
        answer.extend_from_slice(&request[4..6]);
        answer.extend_from_slice(&external_port.to_be_bytes());
        answer.extend_from_slice(&lifetime.to_be_bytes());
        answer
    }

    #[test]
    fn two_clients_on_one_socket_keep_their_own_nat_pmp_answers() {
        let t0 = Instant::now();
        let mut agent = tcp_agent(t0);
        step(&mut agent, t0);
        // A NAT-PMP router: the external address answers both clients' probes.
        let mut address = vec![0, 128, 0, 0];
        address.extend_from_slice(&100u32.to_be_bytes());
        address.extend_from_slice(&[198, 51, 100, 2]);
        agent.handle_datagram(t0, router(), &address);
        let maps = to_router(&step(&mut agent, t0));
        assert_eq!(maps.len(), 2, "{maps:?}");
        let by_opcode = |op: u8| {
            maps.iter()
                .find(|m| m.len() == 12 && m[1] == op)
                .cloned()
                .unwrap_or_else(|| panic!("no NAT-PMP MAP with opcode {op}"))
        };
        let (udp_map, tcp_map) = (by_opcode(1), by_opcode(2));
        assert_eq!(u16::from_be_bytes([tcp_map[4], tcp_map[5]]), 4600);
        // The UDP answer first: the TCP client is not fooled by it.
        let t1 = t0 + Duration::from_millis(20);
        agent.handle_datagram(t1, router(), &nat_pmp_grant(&udp_map, 30000, 60));
        let (udp, tcp) = events_by_transport(&mut agent);
        assert!(tcp.is_empty(), "{tcp:?}");
        assert!(matches!(&udp[..], [PortMapEvent::Mapped(m)] if m.external.port() == 30000));
        agent.handle_datagram(t1, router(), &nat_pmp_grant(&tcp_map, 40000, 60));
        let sent = step(&mut agent, t1);
        let (udp, tcp) = events_by_transport(&mut agent);
        assert!(udp.is_empty(), "{udp:?}");
        let tcp_external: SocketAddr = "198.51.100.2:40000".parse().expect("addr");
        assert_eq!(
            tcp,
            [PortMapEvent::Mapped(Mapping {
                protocol: MappingProtocol::NatPmp,
                external: tcp_external,
                lifetime: Duration::from_secs(60),
            })]
        );
        assert_eq!(
            registered_of(&sent, CandidateKind::TcpMapped),
            [vec![tcp_external]]
        );
        assert_eq!(
            agent
                .port_mapping_of(MappedTransport::Udp)
                .map(|m| m.external.port()),
            Some(30000)
        );
    }

    #[test]
    fn a_lost_tcp_mapping_leaves_the_register_and_close_deletes_both() {
        let t0 = Instant::now();
        let mut agent = tcp_agent(t0);
        step(&mut agent, t0);
        agent.handle_datagram(t0, router(), &pcp_announce_answer());
        let maps = to_router(&step(&mut agent, t0));
        let tcp_map = maps.iter().find(|m| m[36] == 6).expect("TCP MAP").clone();
        let udp_map = maps.iter().find(|m| m[36] == 17).expect("UDP MAP").clone();
        let tcp_external: SocketAddr = "198.51.100.2:40000".parse().expect("addr");
        let udp_external: SocketAddr = "198.51.100.2:30000".parse().expect("addr");
        agent.handle_datagram(t0, router(), &pcp_grant(&tcp_map, tcp_external, 60));
        // The UDP mapping lives long (its refresh is not due in this test).
        agent.handle_datagram(t0, router(), &pcp_grant(&udp_map, udp_external, 7200));
        step(&mut agent, t0);
        events_by_transport(&mut agent);
        // The router falls silent: the TCP refresh at 30 s goes unanswered.
        let mut lost_at = None;
        let mut after = Vec::new();
        for ms in (100..40_000).step_by(50) {
            let sent = step(&mut agent, t0 + Duration::from_millis(ms));
            let (udp, tcp) = events_by_transport(&mut agent);
            assert!(udp.is_empty(), "{udp:?}");
            if tcp.iter().any(|e| matches!(e, PortMapEvent::Lost { .. })) {
                lost_at = Some(ms);
            }
            if lost_at.is_some() {
                after.extend(registered_of(&sent, CandidateKind::TcpMapped));
                assert!(
                    registered_of(&sent, CandidateKind::Mapped)
                        .iter()
                        .all(|m| m == &vec![udp_external])
                );
            }
        }
        let lost_at = lost_at.expect("the TCP mapping was lost");
        assert!((30_000..35_000).contains(&lost_at), "{lost_at}");
        assert_eq!(after.first(), Some(&vec![]), "re-registered without it");
        assert!(after.iter().all(Vec::is_empty));
        assert_eq!(agent.port_mapping_of(MappedTransport::Tcp), None);
        // Close: the UDP mapping is deleted; the TCP client (asking again) ends too.
        let t1 = t0 + Duration::from_secs(41);
        agent.close_port_mapping(t1);
        let deletes = to_router(&step(&mut agent, t1));
        assert_eq!(deletes.len(), 1, "{deletes:?}");
        assert_eq!(deletes[0][36], 17);
        agent.handle_datagram(t1, router(), &pcp_grant(&deletes[0], udp_external, 0));
        let (udp, tcp) = events_by_transport(&mut agent);
        assert_eq!(udp, [PortMapEvent::Closed]);
        assert_eq!(tcp, [PortMapEvent::Closed]);
    }

    #[test]
    fn a_tcp_upnp_mapping_is_the_tcp_clients_only() {
        let t0 = Instant::now();
        // The clients are made at start: an agent whose driver also tries UPnP.
        let mut config = tcp_agent(t0).config.clone();
        config.upnp = true;
        let mut agent = Agent::new(config, t0, 7);
        step(&mut agent, t0);
        let external: SocketAddr = "198.51.100.2:4600".parse().expect("addr");
        let upnp = Mapping {
            protocol: MappingProtocol::Upnp,
            external,
            lifetime: Duration::from_secs(3600),
        };
        assert!(agent.handle_upnp_mapping_of(t0, MappedTransport::Tcp, Ok(upnp)));
        let sent = step(&mut agent, t0);
        assert_eq!(
            registered_of(&sent, CandidateKind::TcpMapped),
            [vec![external]]
        );
        assert_eq!(registered_of(&sent, CandidateKind::Mapped), [vec![]]);
        assert_eq!(agent.port_mapping(), None);
        assert_eq!(
            events_by_transport(&mut agent),
            (vec![], vec![PortMapEvent::Mapped(upnp)])
        );
        // A failed renewal withdraws it.
        agent.handle_upnp_renewal_of(
            t0 + Duration::from_secs(1800),
            MappedTransport::Tcp,
            Err(ProtocolOutcome::NoAnswer),
        );
        let sent = step(&mut agent, t0 + Duration::from_secs(1800));
        assert_eq!(registered_of(&sent, CandidateKind::TcpMapped), [vec![]]);
    }
}
