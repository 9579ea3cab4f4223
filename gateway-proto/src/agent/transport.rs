//! How the agent reaches its gateway: UDP first, then TCP to the same address, then
//! TLS to `AgentConfig::server_tls` (RFC 8656 `turns:`), each after a bounded wait
//! (`AgentConfig::transport_wait`) in which the gateway answered nothing, or at once
//! when the driver reports that the stream could not be opened or closed before the
//! gateway ever answered on it. After TLS (or TCP when no TLS endpoint is set) the
//! cycle starts again with UDP, so an agent started while the network was down finds
//! its way once it is back.
//!
//! On a stream every message to the gateway (rendezvous and TURN) travels framed on
//! that one connection, which the driver opens on the first [`Transmit`] carrying its
//! transport. The relay leg is then a TURN allocation over the same stream (a UDP
//! relayed address), and a side on a stream cannot send plain datagrams to the other
//! side's relayed address: it relays through its own allocation whatever its role, and
//! offers its relayed address to the other side (see `relay_leg`).
//!
//! UDP is retried in the background: every `AgentConfig::udp_retry_interval` a STUN
//! Binding request goes to the gateway over UDP; the first datagram the gateway sends
//! back over UDP moves the agent back to UDP (a registration over UDP keeps the NAT
//! mapping the punches use). An allocation made on a stream stays on it until it is
//! released or the stream closes.
//!
//! With several gateway nodes the node failover (`failover`) runs first: the transport
//! moves on when a whole round of nodes was silent.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Agent, AgentEvent, FIRST_REGISTER_RETRY};
use crate::{Transmit, Transport};

/// The shortest wait before giving up on a transport, whatever the config says.
const MIN_TRANSPORT_WAIT: Duration = Duration::from_millis(100);

/// The longest wait on one transport once whole rounds of them went unanswered.
const MAX_TRANSPORT_WAIT: Duration = Duration::from_secs(60);

/// The shortest interval of the background UDP retry.
const MIN_UDP_RETRY: Duration = Duration::from_millis(100);

/// Why the agent changed the transport it speaks to the gateway with (the reason of
/// [`AgentEvent::TransportChanged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportChangeReason {
    /// The gateway answered nothing over the old transport for `silent`.
    NoAnswer {
        /// How long it had been silent.
        silent: Duration,
    },
    /// The driver could not open the stream, or it closed before the gateway answered
    /// anything on it.
    StreamFailed,
    /// The gateway answered the background UDP retry: back to UDP.
    UdpAnswered,
}

/// The transport in use toward the gateway, and the background UDP retry.
#[derive(Debug)]
pub(super) struct ServerLink {
    /// The transport in use.
    pub(super) transport: Transport,
    /// Whether the gateway answered anything over `transport` since it became current.
    answered: bool,
    /// When `transport` became current.
    since: Instant,
    /// When the next background UDP retry goes (only while on a stream).
    next_udp_retry: Option<Instant>,
    /// Transports given up in a row without any answer: every full round of them
    /// doubles the wait (a gateway that is down is not hammered, nor the log).
    silent_changes: u32,
}

impl ServerLink {
    /// UDP, as every agent starts.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            transport: Transport::Udp,
            answered: false,
            since: now,
            next_udp_retry: None,
            silent_changes: 0,
        }
    }

    /// Whether the agent speaks to the gateway over a stream (TCP or TLS) now.
    pub(super) fn is_stream(&self) -> bool {
        self.transport.is_stream()
    }
}

impl Agent {
    /// Where messages to the gateway go now, and over what: the current node over UDP
    /// or TCP, or the TLS endpoint over TLS.
    pub(super) fn server_endpoint(&self) -> (SocketAddr, Transport) {
        match (self.link.transport, self.config.server_tls) {
            (Transport::Tls, Some(tls)) => (tls, Transport::Tls),
            (transport, _) => (self.servers.current(), transport),
        }
    }

    /// The transport the agent speaks to the gateway with now.
    pub fn server_transport(&self) -> Transport {
        self.link.transport
    }

    /// Whether the agent still needs its connection of `transport` (TCP or TLS): it
    /// speaks to the gateway over it, or its TURN allocation lives on it. A driver
    /// closes the others (after a move back to UDP, say).
    pub fn uses_stream(&self, transport: Transport) -> bool {
        transport.is_stream()
            && (self.link.transport == transport
                || self.turn.server().is_some_and(|(_, t)| t == transport))
    }

    /// The transport after `from` in the fallback order (UDP, TCP, TLS when an
    /// endpoint is configured, then UDP again).
    fn next_transport(&self, from: Transport) -> Transport {
        match from {
            Transport::Udp => Transport::Tcp,
            Transport::Tcp if self.config.server_tls.is_some() => Transport::Tls,
            Transport::Tcp | Transport::Tls => Transport::Udp,
        }
    }

    /// When the current transport is given up if the gateway stays silent (single
    /// server only: with several, a silent round of the failover decides): after
    /// `transport_wait` of silence, or three times that on a transport the gateway
    /// answered before (a lost keepalive or two must not move a working agent).
    fn transport_give_up_at(&self) -> Option<Instant> {
        if !self.config.transport_fallback || !self.config.fallback_servers.is_empty() {
            return None;
        }
        let since = self.unanswered_since?.max(self.link.since);
        let rounds = self.link.silent_changes / self.transport_count();
        let wait = (self.config.transport_wait.max(MIN_TRANSPORT_WAIT) * (1 << rounds.min(5)))
            .min(MAX_TRANSPORT_WAIT.max(self.config.transport_wait));
        Some(since + if self.link.answered { wait * 3 } else { wait })
    }

    /// How many transports the fallback cycles through (UDP, TCP, and TLS when an
    /// endpoint is configured).
    fn transport_count(&self) -> u32 {
        if self.config.server_tls.is_some() {
            3
        } else {
            2
        }
    }

    /// When [`Agent::handle_timeout`] must run for the transport: the end of the
    /// allowed silence, or the next background UDP retry.
    pub(super) fn transport_next_timeout(&self) -> Option<Instant> {
        crate::earliest([self.transport_give_up_at(), self.link.next_udp_retry])
    }

    /// The transport's timers: give up a silent transport; retry UDP in the
    /// background while on a stream.
    pub(super) fn transport_timeout(&mut self, now: Instant) {
        if let Some(at) = self.transport_give_up_at()
            && now >= at
        {
            let to = self.next_transport(self.link.transport);
            let since = self.unanswered_since.unwrap_or(now).max(self.link.since);
            let silent = now.saturating_duration_since(since);
            self.change_transport(now, to, TransportChangeReason::NoAnswer { silent });
        }
        if let Some(at) = self.link.next_udp_retry
            && now >= at
        {
            let interval = self.config.udp_retry_interval.max(MIN_UDP_RETRY);
            self.link.next_udp_retry = Some(now + interval);
            let tid = self.tid();
            let mut request = Vec::new();
            crate::binding::binding_request(tid, &mut request);
            self.outgoing
                .push_back(Transmit::udp(self.servers.current(), request));
        }
    }

    /// A whole round of gateway nodes was silent (failover with several nodes): the
    /// next node is tried over the next transport.
    pub(super) fn silent_round(&mut self, now: Instant, silent: Duration) {
        if self.config.transport_fallback && !self.link.answered {
            let to = self.next_transport(self.link.transport);
            self.change_transport(now, to, TransportChangeReason::NoAnswer { silent });
        }
    }

    /// Moves to `to`: forgets the requests sent over the old transport, re-registers
    /// at once over the new one (connects wait for that answer), gives up discovery
    /// when leaving UDP (its tests are UDP), and says so.
    pub(super) fn change_transport(
        &mut self,
        now: Instant,
        to: Transport,
        reason: TransportChangeReason,
    ) {
        let (server, from) = self.server_endpoint();
        let server = if from == Transport::Tls {
            self.servers.current()
        } else {
            server
        };
        if from == to {
            // Stay (e.g. TCP with no TLS endpoint after a closed stream): register again.
            self.link.answered = false;
            self.link.since = now;
            self.unanswered_since = None;
            self.next_register = now;
            self.register_retry = FIRST_REGISTER_RETRY;
            return;
        }
        let silent_changes = match reason {
            TransportChangeReason::UdpAnswered => 0,
            _ if self.link.answered => 1,
            _ => self.link.silent_changes + 1,
        };
        self.link = ServerLink {
            transport: to,
            answered: false,
            since: now,
            next_udp_retry: to
                .is_stream()
                .then(|| now + self.config.udp_retry_interval.max(MIN_UDP_RETRY)),
            silent_changes,
        };
        self.pending.clear();
        self.unanswered_since = None;
        self.silence_report_at = None;
        self.register_retry = FIRST_REGISTER_RETRY;
        self.next_register = now;
        self.servers.awaiting_registration = true;
        self.servers.announce_registration = true;
        if to.is_stream() {
            self.abandon_discovery(now);
        }
        let (to_addr, _) = self.server_endpoint();
        tracing::info!(%server, from = from.as_str(), to = to.as_str(), %to_addr, ?reason, "gateway transport changed");
        self.events.push_back(AgentEvent::TransportChanged {
            server,
            from,
            to,
            to_addr,
            reason,
        });
    }

    /// Something came from the gateway over `transport`: the transport works.
    pub(super) fn heard_over(&mut self, now: Instant, transport: Transport) {
        if transport == self.link.transport {
            self.link.answered = true;
            self.link.silent_changes = 0;
        } else if transport == Transport::Udp && self.link.is_stream() {
            // The background retry got through (or a late UDP answer): UDP works again.
            self.change_transport(now, Transport::Udp, TransportChangeReason::UdpAnswered);
            self.link.answered = true;
        }
    }

    /// A frame from the gateway on one of our streams (the driver opened it when a
    /// [`Transmit`] carried that transport): rendezvous messages, and our TURN
    /// client's answers and relayed data when the allocation lives on that stream.
    pub fn handle_stream_frame(
        &mut self,
        now: Instant,
        transport: Transport,
        from: SocketAddr,
        frame: &[u8],
    ) {
        if self.stopped || !transport.is_stream() {
            return;
        }
        if transport == self.link.transport {
            self.unanswered_since = None;
            self.silence_report_at = None;
            let current = self.servers.current();
            self.servers.heard(now, current);
        }
        self.heard_over(now, transport);
        if self.turn.server() == Some((from, transport)) && self.turn.is_turn_datagram(frame) {
            self.handle_turn_datagram(now, from, frame);
            return;
        }
        let Ok(message) = crate::stun::Message::parse(frame) else {
            return;
        };
        self.handle_server_message(now, &message, frame);
    }

    /// The driver could not open the stream of `transport`, or it closed. Our
    /// allocation on it is gone with it; when it is the transport in use, the next
    /// transport is tried at once if the gateway never answered on this one, else the
    /// same one again (the driver opens a new connection for the next message).
    pub fn handle_stream_closed(&mut self, now: Instant, transport: Transport) {
        if self.stopped || !transport.is_stream() {
            return;
        }
        if self.turn.server().is_some_and(|(_, t)| t == transport) {
            self.drop_allocation(now);
        }
        if transport != self.link.transport || !self.config.transport_fallback {
            return;
        }
        if self.link.answered {
            self.change_transport(now, transport, TransportChangeReason::StreamFailed);
        } else {
            let to = self.next_transport(transport);
            self.change_transport(now, to, TransportChangeReason::StreamFailed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{rendezvous::RendezvousHandled, sim::agents::*};

    /// Agent `i`'s transport changes, in order: (instant, from, to, reason).
    fn changes(sim: &Sim, i: usize) -> Vec<(Instant, Transport, Transport, TransportChangeReason)> {
        sim.timed_events
            .iter()
            .filter_map(|(at, agent, e)| match e {
                AgentEvent::TransportChanged {
                    from, to, reason, ..
                } if *agent == i => Some((*at, *from, *to, *reason)),
                _ => None,
            })
            .collect()
    }

    /// Both agents got a relayed path, and data goes both ways over it.
    fn relayed_both_ways(sim: &mut Sim) {
        for i in 0..2 {
            assert!(
                sim.has(i, |e| matches!(e, AgentEvent::PathUp { relayed: true, .. })),
                "agent {i}: {:?}",
                sim.events
            );
        }
        let now = sim.now;
        let _ = now;
        assert!(sim.agents[0].1.send_data("bob", b"from alice"));
        assert!(sim.agents[1].1.send_data("alice", b"from bob"));
        sim.run_for(Duration::from_millis(200));
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"from alice")
        ));
        assert!(sim.has(
            0,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"from bob")
        ));
    }

    #[test]
    fn a_site_without_udp_falls_back_to_tcp_and_is_relayed() {
        let mut sim = Sim::new(false);
        sim.udp_blocked[0] = true;
        let start = sim.now;
        sim.agents[0].1.connect("bob", start);
        sim.run_for(Duration::from_secs(12));
        let seen = changes(&sim, 0);
        assert_eq!(seen.len(), 1, "{seen:?}");
        let (at, from, to, reason) = seen[0];
        assert_eq!((from, to), (Transport::Udp, Transport::Tcp));
        assert!(
            matches!(reason, TransportChangeReason::NoAnswer { silent } if silent >= Duration::from_secs(3))
        );
        // After the bounded wait, not before and not much after.
        let waited = at.duration_since(start);
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
            "{waited:?}"
        );
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tcp);
        assert!(changes(&sim, 1).is_empty(), "bob keeps UDP");
        // The gateway's sweep counts the registrations by transport: bob on UDP,
        // alice on TCP (the sim runs no server timers: one sweep here).
        let now = sim.now;
        sim.nodes[0].server.handle_timeout(now, NOW_UNIX);
        assert_eq!(sim.nodes[0].server.peers_by_transport(), [1, 1, 0]);
        // Registered over TCP: the gateway answered a Register that came on a stream.
        assert!(sim.has(0, |e| matches!(e, AgentEvent::Registered { .. })));
        relayed_both_ways(&mut sim);
        // Alice relays through her own allocation (made over TCP); bob reaches it
        // with plain datagrams.
        assert!(sim.agents[0].1.relayed_address().is_some());
        assert_eq!(
            sim.agents[0].1.turn.server(),
            Some((sim.server_addr, Transport::Tcp))
        );
        assert!(sim.agents[0].1.uses_stream(Transport::Tcp));
        assert!(!sim.agents[0].1.uses_stream(Transport::Tls));
    }

    #[test]
    fn a_responder_without_udp_relays_through_its_own_allocation() {
        let mut sim = Sim::new(false);
        sim.udp_blocked[1] = true;
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        // Alice (UDP) initiates; bob, the responder, is on TCP after 3 s.
        sim.run_for(Duration::from_secs(4));
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(8));
        assert_eq!(sim.agents[1].1.server_transport(), Transport::Tcp);
        relayed_both_ways(&mut sim);
        assert!(sim.agents[1].1.relayed_address().is_some(), "bob allocated");
    }

    #[test]
    fn two_sites_without_udp_meet_through_two_allocations() {
        let mut sim = Sim::new(false);
        // Each relays through its own allocation to the other's relayed address: the
        // relay must allow its own address as a peer (operators allow it so).
        sim.relay_also_allows("192.0.2.0/24");
        sim.udp_blocked = vec![true, true];
        let start = sim.now;
        sim.agents[0].1.connect("bob", start);
        sim.run_for(Duration::from_secs(12));
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tcp);
        assert_eq!(sim.agents[1].1.server_transport(), Transport::Tcp);
        relayed_both_ways(&mut sim);
        assert_eq!(sim.nodes[0].open_relays(), 2);
    }

    #[test]
    fn tls_comes_after_tcp_when_tcp_is_blocked_too() {
        let mut sim = Sim::new(false);
        let tls = sim.nodes[0].tls_addr;
        sim.reconfigure(0, |c| c.server_tls = Some(tls));
        sim.udp_blocked[0] = true;
        sim.tcp_blocked[0] = true;
        let start = sim.now;
        sim.agents[0].1.connect("bob", start);
        sim.run_for(Duration::from_secs(15));
        let seen: Vec<(Transport, Transport)> =
            changes(&sim, 0).iter().map(|c| (c.1, c.2)).collect();
        assert_eq!(
            seen,
            [
                (Transport::Udp, Transport::Tcp),
                (Transport::Tcp, Transport::Tls)
            ]
        );
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tls);
        assert!(sim.sent.iter().any(|d| d.agent == 0 && d.to == tls));
        relayed_both_ways(&mut sim);
    }

    #[test]
    fn without_a_tls_endpoint_the_cycle_returns_to_udp() {
        let mut sim = Sim::new(false);
        sim.udp_blocked[0] = true;
        sim.tcp_blocked[0] = true;
        sim.run_for(Duration::from_secs(13));
        let seen: Vec<(Transport, Transport)> =
            changes(&sim, 0).iter().map(|c| (c.1, c.2)).collect();
        assert_eq!(
            seen,
            [
                (Transport::Udp, Transport::Tcp),
                (Transport::Tcp, Transport::Udp),
                (Transport::Udp, Transport::Tcp)
            ]
        );
    }

    #[test]
    fn a_dead_gateway_is_tried_less_often_each_round() {
        let mut sim = Sim::new(false);
        sim.nodes[0].silent = true;
        let start = sim.now;
        sim.run_for(Duration::from_secs(60));
        let at: Vec<u64> = changes(&sim, 0)
            .iter()
            .map(|c| c.0.duration_since(start).as_secs())
            .collect();
        // 3 s per transport for the first round (UDP, TCP), 6 s the next, then 12 s.
        assert_eq!(at, vec![3, 6, 12, 18, 30, 42], "{at:?}");
    }

    #[test]
    fn a_stream_that_cannot_open_moves_on_at_once() {
        let mut sim = Sim::new(false);
        let tls = sim.nodes[0].tls_addr;
        sim.reconfigure(0, |c| c.server_tls = Some(tls));
        sim.udp_blocked[0] = true;
        sim.tcp_blocked[0] = true;
        sim.run_for(Duration::from_millis(3_050));
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tcp);
        // The driver says the TCP connection was refused: TLS next, without waiting.
        let now = sim.now;
        sim.agents[0].1.handle_stream_closed(now, Transport::Tcp);
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tls);
        sim.run_for(Duration::from_millis(100));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::Registered { .. })));
    }

    #[test]
    fn udp_is_preferred_again_once_the_background_retry_gets_through() {
        let mut sim = Sim::new(false);
        sim.reconfigure(0, |c| c.udp_retry_interval = Duration::from_secs(5));
        sim.udp_blocked[0] = true;
        sim.run_for(Duration::from_secs(4));
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tcp);
        // The site lets UDP through again: the next retry (5 s after the fallback)
        // gets an answer and the agent registers over UDP.
        sim.udp_blocked[0] = false;
        let unblocked = sim.now;
        sim.run_for(Duration::from_secs(6));
        let seen = changes(&sim, 0);
        let back = seen.last().expect("changes");
        assert_eq!((back.1, back.2), (Transport::Tcp, Transport::Udp));
        assert_eq!(back.3, TransportChangeReason::UdpAnswered);
        assert!(back.0 > unblocked);
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Udp);
        // No allocation on the TCP connection: the driver may close it.
        assert!(!sim.agents[0].1.uses_stream(Transport::Tcp));
        let alice = sim.agents[0].0;
        assert!(sim.handled.iter().any(|(at, _, from, h)| *at > back.0
            && *from == alice
            && *h == RendezvousHandled::Registered));
        // And a punch works again from there: direct.
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(3));
        assert!(sim.has(0, |e| matches!(
            e,
            AgentEvent::PathUp { relayed: false, .. }
        )));
    }

    #[test]
    fn with_several_nodes_a_silent_round_moves_to_tcp() {
        // Alice knows two nodes; her site drops UDP. The failover tries node 1, then
        // node 0 again (2.5 s each): that round was silent, so TCP comes next, and
        // she registers over it with the node she is on.
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[0, 1]]);
        sim.udp_blocked[0] = true;
        let start = sim.now;
        sim.run_for(Duration::from_secs(8));
        let seen = changes(&sim, 0);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!((seen[0].1, seen[0].2), (Transport::Udp, Transport::Tcp));
        let waited = seen[0].0.duration_since(start);
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        assert_eq!(sim.agents[0].1.server_transport(), Transport::Tcp);
        assert!(sim.has(0, |e| matches!(e, AgentEvent::Registered { .. })));
        assert!(changes(&sim, 1).is_empty(), "bob keeps UDP");
    }

    #[test]
    fn a_working_udp_agent_never_leaves_udp() {
        let mut sim = Sim::new(false);
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(40));
        assert!(changes(&sim, 0).is_empty() && changes(&sim, 1).is_empty());
        assert!(sim.sent.iter().all(|d| d.to.port() != 443));
    }

    #[test]
    fn fallback_off_keeps_udp_and_says_no_answer() {
        let mut sim = Sim::new(false);
        sim.reconfigure(0, |c| c.transport_fallback = false);
        sim.udp_blocked[0] = true;
        sim.run_for(Duration::from_secs(8));
        assert!(changes(&sim, 0).is_empty());
        assert!(sim.has(0, |e| matches!(e, AgentEvent::NoAnswer { .. })));
    }
}
