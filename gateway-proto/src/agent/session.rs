//! One punch session per introduction: waits for the scheduled start, probes every
//! candidate pair (after the low-TTL opener), holds the first path that works both
//! ways, keeps it alive with probes, and notices when it goes silent.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Agent, AgentConfig, AgentEvent, birthday::Birthday, relay_leg::RelayLeg};
use crate::{
    earliest,
    rendezvous::{
        client::{self, Probe, Role},
        wire::{CandidateKind, NatClass, SessionOutcome},
    },
    stun::{Class, Message, attr as stun_attr},
};

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SessionState {
    /// Introduced; probing starts at the scheduled instant.
    Waiting,
    /// Probing the candidates (and birthday punching, if any).
    Probing,
    /// Punching is over without a path; only the relay leg may still find one.
    Relaying,
    /// A path works both ways.
    Up,
    /// Over without a path (or the path died, or a newer one replaced it).
    Failed,
}

/// One attempt at a path to a peer, for one introduction.
#[derive(Debug)]
pub(super) struct Session {
    /// A TCP-Seq from the other side was passed on (the gateway sends each twice).
    pub(super) tcp_seq_seen: bool,
    pub(super) intro_id: u64,
    pub(super) peer_id: String,
    pub(super) key: [u8; 16],
    pub(super) candidates: Vec<SocketAddr>,
    pub(super) introduced_at: Instant,
    pub(super) start_at: Instant,
    pub(super) next_probe: Instant,
    pub(super) probes_sent: u32,
    pub(super) state: SessionState,
    pub(super) path: Option<SocketAddr>,
    pub(super) last_heard: Instant,
    /// Round trip of the latest answered probe on the path.
    pub(super) rtt: Duration,
    pub(super) role: Role,
    pub(super) relay: RelayLeg,
    pub(super) relay_started: Option<Instant>,
    /// Peers seen through our own allocation (their addresses at the relay).
    pub(super) relay_peers: Vec<SocketAddr>,
    /// Whether `path` goes through the relay (ours or theirs).
    pub(super) path_relayed: bool,
    /// When a relayed path next tries to become direct.
    pub(super) upgrade_at: Instant,
    /// The outcome report is sent once per session.
    pub(super) reported: bool,
    /// The other side's server-reflexive endpoint, from the introduction.
    pub(super) peer_reflexive: Option<SocketAddr>,
    /// Birthday punching of this attempt.
    pub(super) birthday: Birthday,
    /// The socket the path uses (0: the agent's own).
    pub(super) path_socket: u32,
    /// Peer-reflexive addresses learnt on extra sockets (a birthday hit), probed from
    /// that socket every round like the candidates are from ours.
    pub(super) socket_candidates: Vec<(u32, SocketAddr)>,
}

impl Session {
    /// When this session next needs [`Agent::handle_timeout`]: the start, the next
    /// probe round, the give-up deadline of its state, or its birthday step.
    pub(super) fn next_timeout(&self, config: &AgentConfig) -> Option<Instant> {
        match self.state {
            SessionState::Waiting => Some(self.start_at),
            SessionState::Probing => earliest([
                Some(self.next_probe),
                Some(self.start_at + config.punch_timeout),
                self.birthday.next_timeout(),
            ]),
            SessionState::Relaying => Some(
                self.next_probe
                    .min(self.relay_started.unwrap_or(self.start_at) + config.relay_timeout),
            ),
            SessionState::Up => earliest([
                Some(self.next_probe),
                Some(self.last_heard + config.path_timeout),
                (self.path_relayed && self.role == Role::Initiator).then_some(self.upgrade_at),
            ]),
            SessionState::Failed => None,
        }
    }
}

impl Agent {
    /// The newest session to `peer_id` with a path up.
    pub(super) fn up_session(&self, peer_id: &str) -> Option<&Session> {
        self.sessions
            .values()
            .filter(|s| s.peer_id == peer_id && s.state == SessionState::Up)
            .max_by_key(|s| s.introduced_at)
    }

    /// A data datagram: passed on when it arrived on an up path (the same peer
    /// address, socket and relay leg), dropped otherwise.
    pub(super) fn handle_data(
        &mut self,
        now: Instant,
        socket: u32,
        from: SocketAddr,
        datagram: &[u8],
        via_turn: bool,
    ) {
        let peer = self.sessions.values_mut().find(|s| {
            s.state == SessionState::Up
                && s.path == Some(from)
                && s.path_socket == socket
                && (s.path_relayed && matches!(s.relay, RelayLeg::Local { .. })) == via_turn
        });
        if let Some(session) = peer {
            session.last_heard = now;
            let peer_id = session.peer_id.clone();
            self.events.push_back(AgentEvent::Data {
                peer_id,
                payload: datagram[1..].to_vec(),
            });
        }
    }

    /// Runs session `id`'s timers: its birthday step, the start (with the opener),
    /// probe rounds, keepalives, and the give-up deadlines.
    pub(super) fn session_timeout(&mut self, id: u64, now: Instant) {
        self.birthday_step(now, id);
        let config = self.config.clone();
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        match session.state {
            SessionState::Waiting if now >= session.start_at => {
                session.state = SessionState::Probing;
                session.next_probe = now;
                if config.open_ttl > 0 {
                    // The opener: one probe per candidate with a TTL that passes our
                    // own NAT (creating our mappings) and expires before the other's,
                    // then real probes a little later. The other side's probes then
                    // find our mappings already there, instead of reaching a router
                    // that might claim the port for itself.
                    session.next_probe = now + config.open_lead;
                    let targets = session.candidates.clone();
                    for to in targets {
                        self.send_probe_with_ttl(now, id, to, Some(config.open_ttl));
                    }
                    return;
                }
            }
            SessionState::Up
                if now.saturating_duration_since(session.last_heard) >= config.path_timeout =>
            {
                session.state = SessionState::Failed;
                let peer_id = session.peer_id.clone();
                self.events.push_back(AgentEvent::PathDown {
                    peer_id: peer_id.clone(),
                });
                if let Some(at) = self.wanted.get_mut(&peer_id) {
                    *at = now;
                }
                return;
            }
            _ => {}
        }
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        match session.state {
            SessionState::Probing => {
                if now >= session.start_at + config.punch_timeout
                    || session.probes_sent >= config.probe_budget
                {
                    if now >= session.start_at + config.punch_timeout {
                        let (peer_id, probes, intro_id) = (
                            session.peer_id.clone(),
                            session.probes_sent + session.birthday.sent,
                            session.intro_id,
                        );
                        self.events.push_back(AgentEvent::PunchFailed {
                            peer_id: peer_id.clone(),
                            probes,
                        });
                        if config.relay && self.turn.usable(now) {
                            if let Some(session) = self.sessions.get_mut(&id) {
                                session.state = SessionState::Relaying;
                                session.next_probe = now;
                            }
                            self.start_relay(now, id);
                        } else {
                            if let Some(session) = self.sessions.get_mut(&id) {
                                session.state = SessionState::Failed;
                            }
                            // The next attempt at this peer waits, longer each time.
                            self.back_off_peer(now, &peer_id, super::refusal::MAX_CONNECT_RETRY);
                            self.report(
                                now,
                                intro_id,
                                SessionOutcome::Failed,
                                Duration::ZERO,
                                probes,
                            );
                        }
                    } else {
                        // Out of probes: wait for the deadline (birthday punching, if
                        // any, goes on at its own pace) without spinning.
                        session.next_probe = now + config.probe_interval;
                    }
                    return;
                }
                if now >= session.next_probe {
                    // One round: every candidate once, and the relay leg if any.
                    let targets = session.candidates.clone();
                    let on_sockets = session.socket_candidates.clone();
                    let quiet_toward = session.birthday.quiet_toward;
                    session.next_probe = now + config.probe_interval;
                    for to in targets {
                        if Some(to) == quiet_toward {
                            self.send_probe_with_ttl(now, id, to, Some(config.open_ttl));
                        } else {
                            self.send_probe(now, id, to);
                        }
                    }
                    for (socket, to) in on_sockets {
                        self.send_probe_on(now, id, socket, to, None, false);
                    }
                    self.probe_relay_leg(now, id);
                }
            }
            SessionState::Relaying => {
                let started = session.relay_started.unwrap_or(now);
                if now >= started + config.relay_timeout {
                    session.state = SessionState::Failed;
                    let (intro_id, probes, peer_id) = (
                        session.intro_id,
                        session.probes_sent + session.birthday.sent,
                        session.peer_id.clone(),
                    );
                    // Neither punching nor the relay worked: the next attempt at
                    // this peer waits, longer each time (no tight loop of
                    // introduced, punch-failed, relay-fallback).
                    self.back_off_peer(now, &peer_id, super::refusal::MAX_CONNECT_RETRY);
                    self.report(
                        now,
                        intro_id,
                        SessionOutcome::Failed,
                        Duration::ZERO,
                        probes,
                    );
                    return;
                }
                if now >= session.next_probe {
                    session.next_probe = now + config.probe_interval * 4;
                    self.probe_relay_leg(now, id);
                }
            }
            SessionState::Up if now >= session.next_probe => {
                session.next_probe = now + config.path_keepalive;
                let via_turn =
                    session.path_relayed && matches!(session.relay, RelayLeg::Local { .. });
                let socket = session.path_socket;
                if let Some(to) = session.path {
                    self.send_probe_on(now, id, socket, to, None, via_turn);
                }
            }
            _ => {}
        }
    }

    /// One probe from our own socket, with the socket's TTL.
    fn send_probe(&mut self, now: Instant, id: u64, to: SocketAddr) {
        self.send_probe_via(now, id, to, None, false);
    }

    /// One probe from our own socket, with IP TTL `ttl` (the opener's) when set.
    fn send_probe_with_ttl(&mut self, now: Instant, id: u64, to: SocketAddr, ttl: Option<u8>) {
        self.send_probe_via(now, id, to, ttl, false);
    }

    /// One probe from our own socket, plain or (`via_turn`) through our allocation.
    pub(super) fn send_probe_via(
        &mut self,
        now: Instant,
        id: u64,
        to: SocketAddr,
        ttl: Option<u8>,
        via_turn: bool,
    ) {
        self.send_probe_on(now, id, 0, to, ttl, via_turn);
    }

    /// One probe request from one of our sockets (counted against the probe budget).
    pub(super) fn send_probe_on(
        &mut self,
        now: Instant,
        id: u64,
        socket: u32,
        to: SocketAddr,
        ttl: Option<u8>,
        via_turn: bool,
    ) {
        let tid = self.tid();
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.probes_sent += 1;
        let payload = client::probe_request(tid, id, &session.key);
        self.probe_tids.insert(tid, (id, now));
        self.emit_on(socket, to, payload, ttl, via_turn);
    }

    /// An introduction from the gateway: a new session (replacing older attempts to
    /// the same peer), its birthday plan, and the relay leg at once when punching
    /// cannot work.
    pub(super) fn introduced(&mut self, now: Instant, mut intro: client::Introduction) {
        if self.sessions.contains_key(&intro.intro_id) {
            return;
        }
        // A peer chooses its candidates: never let it aim our probes (or SYNs) at our
        // own loopback, a link-local neighbour, a multicast group or nowhere.
        let own = &self.config.host_candidates;
        intro
            .candidates
            .retain(|c| candidate_acceptable(c.addr.ip(), own));
        // A newer introduction to the same peer replaces older attempts (but not a
        // path in use, nor a relay leg still being set up).
        let sockets = &mut self.sockets;
        self.sessions.retain(|_, s| {
            let keep = s.peer_id != intro.peer_id
                || matches!(s.state, SessionState::Up | SessionState::Relaying);
            if !keep {
                sockets.release(s.birthday.sockets.drain(..));
            }
            keep
        });
        let start_at = now + intro.start_delay;
        let peer_reflexive = intro
            .candidates
            .iter()
            .find(|c| c.kind == CandidateKind::ServerReflexive)
            .map(|c| c.addr);
        let peer_predicted = intro
            .candidates
            .iter()
            .any(|c| c.kind == CandidateKind::Predicted);
        let birthday = Birthday::plan(
            &self.config,
            !self.discovery.predicted.is_empty(),
            (intro.peer_nat, peer_predicted, peer_reflexive),
            start_at,
            super::birthday_after(
                &self.config,
                intro.start_delay,
                Duration::from_millis(u64::from(self.rtt_ms)),
            ),
        );
        self.events.push_back(AgentEvent::Introduced {
            peer_id: intro.peer_id.clone(),
            role: intro.role,
        });
        if !self.config.tcp_candidates.is_empty() {
            self.events.push_back(AgentEvent::TcpIntroduced {
                peer_id: intro.peer_id.clone(),
                intro_id: intro.intro_id,
                candidates: intro
                    .candidates
                    .iter()
                    .filter(|c| c.kind.is_tcp())
                    .map(|c| c.addr)
                    .collect(),
                start_at,
            });
        }
        self.sessions.insert(
            intro.intro_id,
            Session {
                tcp_seq_seen: false,
                intro_id: intro.intro_id,
                peer_id: intro.peer_id,
                key: intro.probe_key,
                candidates: intro
                    .candidates
                    .iter()
                    .filter(|c| !c.kind.is_tcp())
                    .map(|c| c.addr)
                    .collect(),
                introduced_at: now,
                start_at,
                next_probe: start_at,
                probes_sent: 0,
                state: SessionState::Waiting,
                path: None,
                last_heard: now,
                rtt: Duration::ZERO,
                role: intro.role,
                relay: RelayLeg::None,
                relay_started: None,
                relay_peers: Vec::new(),
                path_relayed: false,
                upgrade_at: now,
                reported: false,
                peer_reflexive,
                birthday,
                path_socket: 0,
                socket_candidates: Vec::new(),
            },
        );
        // Both sides map per destination: punching cannot work (without prediction,
        // which an announced predicted candidate would show), so the relay leg starts
        // at once, in parallel with the punch attempt.
        // (Behind one NAT, the host candidates may still meet on the LAN.)
        let same_nat = intro.candidates.iter().any(|c| {
            c.kind == CandidateKind::ServerReflexive
                && self.discovery.primary.map(|p| p.ip()) == Some(c.addr.ip())
        });
        // A mapped candidate (ours or theirs) is endpoint-independent: punching can
        // work through it, so the relay waits for the punch timeout as usual.
        let mapped = self.mapped.is_some()
            || intro
                .candidates
                .iter()
                .any(|c| c.kind == CandidateKind::Mapped);
        let hopeless = !same_nat
            && !mapped
            && self.config.nat == NatClass::AddressAndPortDependent
            && intro.peer_nat == NatClass::AddressAndPortDependent
            && self.discovery.predicted.is_empty()
            && !intro
                .candidates
                .iter()
                .any(|c| c.kind == CandidateKind::Predicted);
        // On a stream the gateway is all we reach for sure (UDP to it failed): the
        // relay leg starts at once, in parallel with the punch attempt, and its offer
        // lets the other side reach us through it.
        let on_stream = self.link.is_stream();
        if self.config.relay && (hopeless || on_stream) && self.turn.usable(now) {
            self.start_relay(now, intro.intro_id);
        }
    }

    /// A probe (request or response) from a peer: answer a request (and probe back
    /// at once), and bring the path up on the first valid response.
    pub(super) fn handle_peer_message(
        &mut self,
        now: Instant,
        socket: u32,
        from: SocketAddr,
        message: &Message<'_>,
        datagram: &[u8],
        via_turn: bool,
    ) {
        let id = match message.message_type().class {
            Class::Request => message
                .attributes()
                .filter_map(Result::ok)
                .find(|a| a.ty == stun_attr::USERNAME)
                .and_then(|a| std::str::from_utf8(a.value).ok())
                .and_then(|u| u64::from_str_radix(u, 16).ok()),
            Class::Success => self
                .probe_tids
                .get(&message.transaction_id())
                .map(|&(id, _)| id),
            _ => None,
        };
        let Some(id) = id else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        match client::parse_probe(datagram, &session.key) {
            Some(Probe::Request { transaction_id, .. }) => {
                // Answer to where it came from (a peer-reflexive candidate), and probe
                // that address too if it is new.
                let response = client::probe_response(transaction_id, from, &session.key);
                let relayed = via_turn || session.relay == RelayLeg::Remote(from);
                if session.state != SessionState::Up {
                    session.last_heard = now;
                }
                if via_turn {
                    if matches!(session.relay, RelayLeg::Local { .. })
                        && !session.relay_peers.contains(&from)
                    {
                        session.relay_peers.push(from);
                    }
                } else if socket != 0 {
                    if !session.socket_candidates.contains(&(socket, from)) {
                        session.socket_candidates.push((socket, from));
                    }
                } else if !relayed && !session.candidates.contains(&from) {
                    session.candidates.insert(0, from);
                }
                if session.state == SessionState::Waiting {
                    session.state = SessionState::Probing;
                    session.start_at = session.start_at.min(now);
                }
                let state = session.state;
                self.emit_on(socket, from, response, None, via_turn);
                // A triggered check (as in ICE): the other side's probe just got
                // through, so a probe back to where it came from will too; do not wait
                // for the next round. Bounded by the probes the other side sends.
                if matches!(state, SessionState::Probing | SessionState::Relaying) {
                    self.send_probe_on(now, id, socket, from, None, via_turn);
                }
            }
            Some(Probe::Response { transaction_id, .. }) => {
                let rtt = self
                    .probe_tids
                    .remove(&transaction_id)
                    .map(|(_, sent)| now.saturating_duration_since(sent))
                    .unwrap_or_default();
                let relayed = via_turn || session.relay == RelayLeg::Remote(from);
                let upgrade = session.state == SessionState::Up && session.path_relayed && !relayed;
                if session.state == SessionState::Up && !upgrade {
                    // Keepalive answer on the path (or a relayed answer while direct).
                    if session.path == Some(from) {
                        session.rtt = rtt;
                        session.last_heard = now;
                    }
                    return;
                }
                session.rtt = rtt;
                session.last_heard = now;
                session.state = SessionState::Up;
                session.path = Some(from);
                session.path_socket = socket;
                session.path_relayed = relayed;
                session.upgrade_at = now + self.config.upgrade_interval;
                session.next_probe = now + self.config.path_keepalive;
                let elapsed = now.saturating_duration_since(session.introduced_at);
                let (peer_id, probes) = (
                    session.peer_id.clone(),
                    session.probes_sent + session.birthday.sent,
                );
                // A newer path to the same peer retires older ones (silently: the
                // data moves over, nothing went down).
                let introduced_at = session.introduced_at;
                for other in self.sessions.values_mut() {
                    if other.peer_id == peer_id
                        && other.intro_id != id
                        && other.state == SessionState::Up
                        && other.introduced_at < introduced_at
                    {
                        other.state = SessionState::Failed;
                    }
                }
                self.path_came_up(&peer_id);
                self.events.push_back(AgentEvent::PathUp {
                    peer_id,
                    remote: from,
                    relayed,
                    elapsed,
                    probes,
                    rtt,
                });
                let outcome = if relayed {
                    SessionOutcome::Relayed
                } else {
                    SessionOutcome::Direct
                };
                self.report(now, id, outcome, elapsed, probes);
            }
            None => {}
        }
    }
}

/// Whether a peer's candidate at `ip` may be probed, given our own host candidates:
/// multicast, broadcast and unspecified addresses never; loopback and link-local
/// ones only when we are on such an address ourselves (two agents on one host, or on
/// one link), as a peer elsewhere can only mean to aim us at our own machine or LAN.
pub(super) fn candidate_acceptable(ip: std::net::IpAddr, own: &[SocketAddr]) -> bool {
    use std::net::IpAddr;
    let ip = ip.to_canonical();
    let link_local = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    let never = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if never {
        return false;
    }
    let own_ips = || own.iter().map(|a| a.ip().to_canonical());
    if ip.is_loopback() {
        return own_ips().any(|o| o.is_loopback());
    }
    if link_local(ip) {
        return own_ips().any(link_local);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::{RendezvousEvent as Event, client::PeerCredentials};
    use crate::sim::agents::*;

    #[test]
    fn two_agents_punch_exchange_data_and_report() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::Registered { .. })));
        assert!(sim.has(1, |e| matches!(e, AgentEvent::Registered { .. })));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::PathUp { peer_id, remote, .. } if peer_id == "bob" && *remote == addr("198.51.100.6:5000"))));
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::PathUp { peer_id, .. } if peer_id == "alice")
        ));
        // Time to direct: introduction + start delay (5 ms margin, RTTs ~20 ms) +
        // one probe round trip; well under 100 ms on this 10 ms-latency network.
        let elapsed = sim.events.iter().find_map(|(i, e)| match e {
            AgentEvent::PathUp { elapsed, .. } if *i == 0 => Some(*elapsed),
            _ => None,
        });
        assert!(
            elapsed.expect("elapsed") < Duration::from_millis(100),
            "{elapsed:?}"
        );
        // The path's RTT is the network's: 10 ms each way on this simulated network.
        let rtt = sim.events.iter().find_map(|(i, e)| match e {
            AgentEvent::PathUp { rtt, .. } if *i == 0 => Some(*rtt),
            _ => None,
        });
        let rtt = rtt.expect("rtt");
        assert!(
            (Duration::from_millis(20)..=Duration::from_millis(22)).contains(&rtt),
            "{rtt:?}"
        );
        assert!(sim.agents[0].1.send_data("bob", b"hello bob"));
        sim.run_for(Duration::from_millis(50));
        assert!(sim.has(1, |e| matches!(e, AgentEvent::Data { peer_id, payload } if peer_id == "alice" && payload == b"hello bob")));
        let outcomes: Vec<&Event> = sim
            .server_events
            .iter()
            .filter(|e| matches!(e, Event::Outcome { .. }))
            .collect();
        assert_eq!(outcomes.len(), 1, "{:?}", sim.server_events);
        assert!(matches!(outcomes[0], Event::Outcome { direct: true, .. }));
    }

    #[test]
    fn each_side_opens_its_mappings_with_low_ttl_probes_first() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        // One opener per candidate (each side has one: the other's reflexive address),
        // with the default TTL, and the punch still succeeds without them arriving.
        assert_eq!(
            sim.openers,
            vec![
                (0, addr("198.51.100.6:5000"), 2),
                (1, addr("198.51.100.2:4000"), 2)
            ]
        );
        assert!(sim.agents[0].1.path("bob").is_some());
    }

    #[test]
    fn blocked_paths_fail_within_budget_and_report_failure_without_relay() {
        let mut sim = Sim::with_relay(true, false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(6));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::PunchFailed { .. })));
        let probes = sim.events.iter().find_map(|(i, e)| match e {
            AgentEvent::PunchFailed { probes, .. } if *i == 0 => Some(*probes),
            _ => None,
        });
        assert!(
            probes.expect("probes")
                <= AgentConfig::new(
                    sim.server_addr,
                    PeerCredentials {
                        username: String::new(),
                        password: String::new()
                    }
                )
                .probe_budget
        );
        assert!(
            sim.server_events
                .iter()
                .any(|e| matches!(e, Event::Outcome { direct: false, .. }))
        );
        assert!(!sim.agents[0].1.send_data("bob", b"x"), "no path, no send");
    }

    #[test]
    fn a_dead_path_is_detected_and_repunched() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        assert!(sim.agents[0].1.path("bob").is_some());
        sim.drop_p2p = true;
        sim.run_for(Duration::from_secs(10));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::PathDown { .. })));
        sim.drop_p2p = false;
        sim.run_for(Duration::from_secs(7));
        let down_at = sim
            .events
            .iter()
            .position(|(i, e)| *i == 0 && matches!(e, AgentEvent::PathDown { .. }))
            .expect("path down");
        assert!(
            sim.events[down_at..]
                .iter()
                .any(|(i, e)| *i == 0 && matches!(e, AgentEvent::Introduced { .. })),
            "re-punch asked for a new introduction after the path died"
        );
        assert!(sim.agents[0].1.path("bob").is_some(), "path back up");
    }

    #[test]
    fn peers_cannot_aim_the_agent_at_its_own_host_or_link() {
        let public: Vec<SocketAddr> = vec!["198.51.100.2:4000".parse().expect("addr")];
        let on_loopback: Vec<SocketAddr> = vec!["127.0.0.1:4000".parse().expect("addr")];
        let ip = |t: &str| t.parse::<std::net::IpAddr>().expect("ip");
        for never in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(!candidate_acceptable(ip(never), &public), "{never}");
            assert!(!candidate_acceptable(ip(never), &on_loopback), "{never}");
        }
        for local in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.1.1",
            "fe80::1",
        ] {
            assert!(!candidate_acceptable(ip(local), &public), "{local}");
        }
        assert!(candidate_acceptable(ip("127.0.0.1"), &on_loopback));
        assert!(candidate_acceptable(ip("203.0.113.9"), &public));
        assert!(
            candidate_acceptable(ip("10.0.0.7"), &public),
            "a LAN peer behind one NAT"
        );
    }
}
