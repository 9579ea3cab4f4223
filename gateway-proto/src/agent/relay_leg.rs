//! The TURN fallback: when punching fails (or cannot work), the initiator relays
//! through its own allocation on the gateway (`turn::client`) and offers the relayed
//! address to the other side, which probes it with plain datagrams; the relayed path
//! carries the data transparently, and a later introduction upgrades it to a direct
//! one.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::Rng;

use super::{Agent, AgentEvent, NextStep, PendingRequest, refusal_reason, session::SessionState};
use crate::{
    Transmit, Transport,
    rendezvous::{
        client::{self, Role},
        wire::{SessionOutcome, method},
    },
    stun::{self, Message},
    turn::{
        self,
        client::{
            Client as TurnClient, ClientConfig as TurnClientConfig, Request as TurnRequest,
            TurnClientEvent as TurnEvent,
        },
    },
};

/// After a failed allocation, the relay fallback waits this long before trying again.
const RELAY_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A session's relay leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RelayLeg {
    /// No fallback (yet).
    None,
    /// We (the initiator) relay through our own allocation; `offered` once the other
    /// side was told our relayed address.
    Local { offered: bool },
    /// The other side relays: we wait for its offer.
    AwaitingOffer,
    /// The other side's relayed address: we reach it with plain datagrams.
    Remote(SocketAddr),
}

/// Our TURN allocation on the gateway, shared by every session relaying through us.
#[derive(Debug, Default)]
pub(super) struct TurnAllocation {
    /// The TURN client, made on the first fallback (dropped when the allocation
    /// failed).
    client: Option<TurnClient>,
    /// When our allocation last failed: no fallback is tried for a minute after.
    failed_at: Option<Instant>,
    /// Where the allocation lives: the gateway endpoint and the transport it was
    /// made over (a stream's allocation lives as long as that connection).
    server: Option<(SocketAddr, Transport)>,
}

impl TurnAllocation {
    /// When the TURN client next needs its timers run (refreshes, retransmissions).
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.client.as_ref().and_then(TurnClient::poll_timeout)
    }

    /// Runs the TURN client's timers.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        if let Some(turn) = self.client.as_mut() {
            turn.handle_timeout(now);
        }
    }

    /// Whether a relay fallback may be tried: not within a minute of a failed
    /// allocation (the gateway may have no relay, or refuse us).
    pub(super) fn usable(&self, now: Instant) -> bool {
        self.failed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= RELAY_RETRY_AFTER)
    }

    /// Releases the allocation (if any) at exit.
    pub(super) fn close(&mut self, now: Instant) {
        if let Some(turn) = self.client.as_mut() {
            turn.close(now);
        }
    }

    /// The gateway endpoint and transport our allocation was made over.
    pub(super) fn server(&self) -> Option<(SocketAddr, Transport)> {
        self.client.as_ref().and(self.server)
    }

    /// Our relayed address, once allocated.
    pub(super) fn relayed_address(&self) -> Option<SocketAddr> {
        self.client.as_ref().and_then(TurnClient::relayed_address)
    }

    /// `payload` for peer `to`, wrapped to go through our allocation (a Send
    /// indication or ChannelData to the gateway); `None` without an allocation or
    /// permission.
    pub(super) fn wrap(&mut self, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        let turn = self.client.as_mut()?;
        let mut wrapped = Vec::with_capacity(payload.len() + 48);
        match turn.encode_send(to, payload, &mut wrapped) {
            Ok(_) => Some(wrapped),
            Err(e) => {
                tracing::debug!(error = %e, %to, "cannot relay to peer");
                None
            }
        }
    }

    /// Whether a datagram from the gateway belongs to our TURN client (ChannelData,
    /// Data indications and TURN responses) rather than to the rendezvous.
    pub(super) fn is_turn_datagram(&self, datagram: &[u8]) -> bool {
        self.client.is_some()
            && (turn::is_channel_data(datagram)
                || (Message::looks_like_stun(datagram)
                    && matches!(
                        stun::MessageType::from_bits(u16::from_be_bytes([
                            datagram[0],
                            datagram[1]
                        ]))
                        .method,
                        turn::method::ALLOCATE
                            | turn::method::REFRESH
                            | turn::method::DATA
                            | turn::method::CREATE_PERMISSION
                            | turn::method::CHANNEL_BIND
                    )))
    }
}

impl Agent {
    /// A failover: our allocation lived on the node given up, which is gone, so it is
    /// dropped (a later fallback allocates on the new node, which may relay even if
    /// the old one refused). Paths through it are down now, as when a path dies
    /// (wanted peers are connected again through the new node); attempts still
    /// punching lose the relay leg and may start a new one.
    pub(super) fn drop_allocation(&mut self, now: Instant) {
        self.turn = TurnAllocation::default();
        // (peer, whether its path was up)
        let mut lost = Vec::new();
        for session in self.sessions.values_mut() {
            if !matches!(session.relay, RelayLeg::Local { .. }) {
                continue;
            }
            match session.state {
                SessionState::Up if session.path_relayed => {
                    session.state = SessionState::Failed;
                    lost.push((session.peer_id.clone(), true));
                }
                SessionState::Relaying => {
                    session.state = SessionState::Failed;
                    lost.push((session.peer_id.clone(), false));
                }
                SessionState::Waiting | SessionState::Probing => {
                    session.relay = RelayLeg::None;
                    session.relay_started = None;
                    session.relay_peers.clear();
                }
                _ => {}
            }
        }
        for (peer_id, was_up) in lost {
            if let Some(at) = self.wanted.get_mut(&peer_id) {
                *at = now;
            }
            if was_up {
                self.events.push_back(AgentEvent::PathDown { peer_id });
            }
        }
    }

    /// Starts a session's relay leg: the initiator relays through its own allocation
    /// (made now if needed) and offers the relayed address; the responder waits for
    /// that offer.
    pub(super) fn start_relay(&mut self, now: Instant, id: u64) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if session.relay != RelayLeg::None {
            return;
        }
        session.relay_started = Some(now);
        self.events.push_back(AgentEvent::RelayFallback {
            peer_id: session.peer_id.clone(),
        });
        // A side on a stream (no UDP to the gateway) cannot send plain datagrams to
        // the other side's relayed address: it relays through its own allocation,
        // whatever its role, and offers its relayed address too.
        if session.role == Role::Responder && !self.link.is_stream() {
            session.relay = RelayLeg::AwaitingOffer;
            return;
        }
        session.relay = RelayLeg::Local { offered: false };
        if self.turn.client.is_none() {
            let (server, transport) = self.server_endpoint();
            let credentials = &self.config.credentials;
            let mut client = TurnClient::new(
                TurnClientConfig::new(
                    server,
                    credentials.username.clone(),
                    credentials.password.clone(),
                ),
                self.rng.random(),
            );
            if client.allocate(now).is_ok() {
                self.turn.client = Some(client);
                self.turn.server = Some((server, transport));
            }
            self.drain_turn(now);
        } else {
            self.offer_relays(now);
        }
    }

    /// Once allocated: permissions for every candidate IP of the sessions relaying
    /// through us, and the offer of our relayed address to the other side.
    fn offer_relays(&mut self, now: Instant) {
        let Some(relayed) = self.turn.relayed_address() else {
            return;
        };
        let waiting: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.relay == (RelayLeg::Local { offered: false }))
            .map(|s| s.intro_id)
            .collect();
        for id in waiting {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            session.relay = RelayLeg::Local { offered: true };
            // The other side's candidates, and its relayed address when it offered one
            // (both sides relay through their own allocations).
            let ips: Vec<IpAddr> = session
                .candidates
                .iter()
                .chain(&session.relay_peers)
                .map(SocketAddr::ip)
                .collect();
            if let Some(turn) = self.turn.client.as_mut() {
                for ip in ips {
                    if let Err(e) = turn.create_permission(now, ip) {
                        tracing::debug!(error = %e, %ip, "no relay permission");
                    }
                }
            }
            let tid = self.tid();
            let payload = client::relay_offer(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                id,
                relayed,
            );
            self.pending
                .insert(tid, PendingRequest::new(method::RELAY_OFFER, now));
            self.send_to_server(payload);
        }
        self.drain_turn(now);
    }

    /// Moves the TURN client's control datagrams out and acts on its events.
    pub(super) fn drain_turn(&mut self, now: Instant) {
        let mut allocated = false;
        let mut failed = false;
        let mut denied = Vec::new();
        let transport = self.turn.server.map_or(Transport::Udp, |(_, t)| t);
        if let Some(turn) = self.turn.client.as_mut() {
            while let Some(transmit) = turn.poll_transmit() {
                self.outgoing
                    .push_back(Transmit::udp(transmit.to, transmit.payload).over(transport));
            }
            while let Some(event) = turn.poll_event() {
                match event {
                    TurnEvent::Allocated { relayed, .. } => {
                        allocated = true;
                        self.events
                            .push_back(AgentEvent::RelayAllocated { relayed });
                    }
                    TurnEvent::Failed {
                        request: request @ (TurnRequest::Allocate | TurnRequest::Refresh),
                        failure,
                    } => {
                        tracing::warn!(%failure, "TURN allocation failed; no relay fallback");
                        failed = true;
                        if let Some(code) = failure.code() {
                            let method = match request {
                                TurnRequest::Refresh => turn::method::REFRESH,
                                _ => turn::method::ALLOCATE,
                            };
                            self.events.push_back(AgentEvent::Refused {
                                method,
                                code,
                                reason: refusal_reason(method, code),
                                next: NextStep::NoRelayFor(RELAY_RETRY_AFTER),
                            });
                        }
                    }
                    TurnEvent::Failed {
                        request: TurnRequest::CreatePermission { peer },
                        failure,
                    } if failure.code() == Some(403) => denied.push(peer),
                    _ => {}
                }
            }
        }
        if failed {
            self.turn.client = None;
            self.turn.failed_at = Some(now);
        }
        if allocated {
            self.offer_relays(now);
        }
        for ip in denied {
            self.relay_denied_peer(now, ip);
        }
    }

    /// The relay refused a permission for `ip` (its peer policy denies the address).
    /// When that is the other side's public address, the relay leg of every session
    /// toward it cannot work: end them now, say so once per peer, and back off the
    /// next attempt (instead of introduced, punch-failed, relay-fallback in a loop).
    fn relay_denied_peer(&mut self, now: Instant, ip: IpAddr) {
        let hit: Vec<(u64, String, u32)> = self
            .sessions
            .values()
            .filter(|s| {
                matches!(s.relay, RelayLeg::Local { .. })
                    && s.state == SessionState::Relaying
                    && s.peer_reflexive.is_some_and(|a| a.ip() == ip)
            })
            .map(|s| {
                (
                    s.intro_id,
                    s.peer_id.clone(),
                    s.probes_sent + s.birthday.sent,
                )
            })
            .collect();
        for (id, peer_id, probes) in hit {
            if let Some(session) = self.sessions.get_mut(&id) {
                session.state = SessionState::Failed;
            }
            self.report(now, id, SessionOutcome::Failed, Duration::ZERO, probes);
            let slow = self
                .connect_retry
                .get(&peer_id)
                .copied()
                .unwrap_or_default()
                .max(super::refusal::RELAY_DENIED_RETRY);
            self.connect_retry.insert(peer_id.clone(), slow);
            let wait = self.back_off_peer(now, &peer_id, super::refusal::MAX_CONNECT_RETRY);
            if self.relay_denied.insert(peer_id) {
                let method = turn::method::CREATE_PERMISSION;
                self.events.push_back(AgentEvent::Refused {
                    method,
                    code: 403,
                    reason: refusal_reason(method, 403),
                    next: NextStep::PeerRetryIn(wait),
                });
            }
        }
    }

    /// One probe on the relay leg: to the other side's relayed address, or through
    /// our allocation to the peers seen there.
    pub(super) fn probe_relay_leg(&mut self, now: Instant, id: u64) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        match session.relay {
            RelayLeg::Remote(relayed) => self.send_probe_via(now, id, relayed, None, false),
            RelayLeg::Local { offered: true } => {
                for to in session.relay_peers.clone() {
                    self.send_probe_via(now, id, to, None, true);
                }
            }
            _ => {}
        }
    }

    /// The other side offers its relayed address for a session: probe it.
    pub(super) fn relay_offered(&mut self, now: Instant, offer: client::RelayOffer) {
        let Some(session) = self.sessions.get_mut(&offer.intro_id) else {
            return;
        };
        if session.peer_id != offer.peer_id {
            return;
        }
        if matches!(session.relay, RelayLeg::Local { .. }) || self.link.is_stream() {
            // We relay through our own allocation (we are on a stream, or both sides
            // relay): reach the offered address through it.
            self.start_relay(now, offer.intro_id);
            self.relay_through_ours(now, offer.intro_id, offer.relayed);
            return;
        }
        if session.relay == RelayLeg::None {
            session.relay_started = Some(now);
            self.events.push_back(AgentEvent::RelayFallback {
                peer_id: session.peer_id.clone(),
            });
        }
        session.relay = RelayLeg::Remote(offer.relayed);
        if session.state == SessionState::Failed {
            session.state = SessionState::Relaying;
        }
        session.next_probe = now;
        self.probe_relay_leg(now, offer.intro_id);
    }

    /// The other side offered its relayed address while we relay through our own
    /// allocation (both sides relay: one of them, or both, has no UDP to the
    /// gateway): permit its address on our allocation and probe it through ours.
    fn relay_through_ours(&mut self, now: Instant, id: u64, relayed: SocketAddr) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if !matches!(session.relay, RelayLeg::Local { .. }) {
            return;
        }
        if !session.relay_peers.contains(&relayed) {
            session.relay_peers.push(relayed);
        }
        if session.state == SessionState::Failed {
            session.state = SessionState::Relaying;
        }
        session.next_probe = now;
        if let Some(turn) = self.turn.client.as_mut()
            && let Err(e) = turn.create_permission(now, relayed.ip())
        {
            tracing::debug!(error = %e, %relayed, "no relay permission");
        }
        self.drain_turn(now);
        self.probe_relay_leg(now, id);
    }

    /// A datagram from the gateway for our TURN client: its own answers, or a peer's
    /// datagram relayed to us (then handled as from that peer, and answered on a
    /// channel).
    pub(super) fn handle_turn_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Some(turn) = self.turn.client.as_mut() else {
            return;
        };
        let peer_data = turn
            .handle_datagram(now, from, datagram)
            .map(|d| (d.peer, d.data.to_vec()));
        self.drain_turn(now);
        if let Some((peer, data)) = peer_data {
            // A peer reached us through our allocation: talk back on a channel.
            if let Some(turn) = self.turn.client.as_mut()
                && turn.channel(peer).is_none()
                && let Err(e) = turn.bind_channel(now, peer)
            {
                tracing::debug!(error = %e, %peer, "cannot bind a channel");
            }
            self.drain_turn(now);
            self.handle_peer_datagram(now, 0, peer, &data, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::RendezvousEvent as Event;
    use crate::sim::agents::*;

    #[test]
    fn shutting_down_releases_the_allocation_at_once() {
        let mut sim = Sim::new(true);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(7));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::PathUp { relayed: true, .. })));
        assert_eq!(sim.nodes[0].open_relays(), 1, "alice's allocation");
        // A killed agent's allocation would stay until it expires (10 minutes).
        let now = sim.now;
        sim.agents[0].1.shut_down(now);
        sim.run_for(Duration::from_millis(200));
        assert_eq!(sim.nodes[0].open_relays(), 0, "released by the exit");
        // No port mapping configured: the close says so at once.
        assert!(sim.has(0, |e| matches!(
            e,
            AgentEvent::PortMapping(crate::portmap::PortMapEvent::Closed)
        )));
    }

    #[test]
    fn blocked_pair_falls_back_to_the_relay_then_upgrades_to_direct() {
        let mut sim = Sim::new(true);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        // Punching gives up after 5 s; the relay leg then comes up.
        sim.run_for(Duration::from_secs(7));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::PunchFailed { .. })));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::RelayAllocated { .. })));
        // Alice relays through her allocation and sees bob at his own address; bob
        // talks to alice's relayed address.
        assert!(sim.has(0, |e| matches!(e, AgentEvent::PathUp { relayed: true, remote, .. } if *remote == addr("198.51.100.6:5000"))));
        let relayed = sim.agents[0].1.relayed_address().expect("allocated");
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::PathUp { relayed: true, remote, .. } if *remote == relayed)
        ));
        assert_eq!(sim.agents[0].1.path_relayed("bob"), Some(true));
        // Data both ways through the relay.
        assert!(sim.agents[0].1.send_data("bob", b"via relay"));
        assert!(sim.agents[1].1.send_data("alice", b"and back"));
        sim.run_for(Duration::from_millis(100));
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"via relay")
        ));
        assert!(sim.has(
            0,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"and back")
        ));
        // The gateway hears one outcome for the introduction: relayed.
        assert!(
            sim.server_events.iter().any(|e| matches!(
                e,
                Event::Outcome {
                    direct: false,
                    relayed: true,
                    ..
                }
            )),
            "{:?}",
            sim.server_events
        );
        // The relayed path stays up (keepalives through the relay)...
        sim.run_for(Duration::from_secs(10));
        assert!(!sim.has(0, |e| matches!(e, AgentEvent::PathDown { .. })));
        // ...and once the peers can reach each other, a background attempt upgrades it.
        sim.drop_p2p = false;
        sim.run_for(Duration::from_secs(25));
        assert!(sim.has(0, |e| matches!(
            e,
            AgentEvent::PathUp { relayed: false, .. }
        )));
        assert_eq!(sim.agents[0].1.path_relayed("bob"), Some(false));
        assert!(sim.agents[0].1.send_data("bob", b"direct now"));
        sim.run_for(Duration::from_millis(100));
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"direct now")
        ));
    }
}
