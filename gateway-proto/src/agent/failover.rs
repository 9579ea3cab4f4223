//! Failover between gateway nodes. With two or more servers configured the agent
//! sends its current server a STUN Binding heartbeat every `heartbeat` (any datagram
//! from the server counts as an answer) and, when the server has answered nothing for
//! `failover_after`, moves to the next one in the list (round-robin): it forgets the
//! old node's nonce and pending requests, drops the allocation that lived there, and
//! registers with the new node at once; connects wait until it answered. A node left
//! behind is never returned to while the current one answers (no flapping). With one
//! server none of this runs: no heartbeat, the same datagrams as a single-node agent.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Agent, AgentConfig, AgentEvent, FIRST_REGISTER_RETRY};
use crate::earliest;

/// The shortest heartbeat interval used, whatever the config says (zero would send
/// heartbeats without end at one instant).
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// The heartbeat interval in use: `config.heartbeat`, at least [`MIN_HEARTBEAT`].
fn heartbeat(config: &AgentConfig) -> Duration {
    config.heartbeat.max(MIN_HEARTBEAT)
}

/// The silence that ends a node: `config.failover_after`, at least one heartbeat
/// interval (a node must have had a chance to answer).
fn failover_after(config: &AgentConfig) -> Duration {
    config.failover_after.max(heartbeat(config))
}

/// Why the agent moved to another gateway node (the reason of
/// [`AgentEvent::ServerChanged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerChangeReason {
    /// The server answered nothing, not a single datagram, for `silent`.
    NoAnswer {
        /// How long it had been silent (at least `AgentConfig::failover_after`).
        silent: Duration,
    },
}

/// Who sent a datagram, among the gateway nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FromServer {
    /// The node in use.
    Current,
    /// A configured node we left (or have not reached yet): ignored.
    Former,
    /// Not a gateway node (a peer, a discovery endpoint, a relayed address).
    Other,
}

/// The gateway nodes and the liveness of the current one.
#[derive(Debug)]
pub(super) struct Servers {
    /// [`AgentConfig::servers`]: every node in failover order, each once.
    list: Vec<SocketAddr>,
    /// Index of the node in use.
    current: usize,
    /// When the current node was last heard from (any datagram), or became current.
    heard_at: Instant,
    /// When the next heartbeat is due (`None`: one server, no heartbeat).
    next_heartbeat: Option<Instant>,
    /// A failover happened and the new node has not confirmed a Register yet:
    /// connects wait (the node would refuse a Connect from a peer it does not know).
    pub(super) awaiting_registration: bool,
    /// The next confirmed Register is announced even if our public endpoint did not
    /// move (it is the first with a new node).
    pub(super) announce_registration: bool,
}

impl Servers {
    /// The nodes of `config`, starting with the first; heartbeats only with several.
    pub(super) fn new(config: &AgentConfig, now: Instant) -> Self {
        let list = config.servers();
        let next_heartbeat = (list.len() > 1).then(|| now + heartbeat(config));
        Self {
            list,
            current: 0,
            heard_at: now,
            next_heartbeat,
            awaiting_registration: false,
            announce_registration: false,
        }
    }

    /// The node in use.
    pub(super) fn current(&self) -> SocketAddr {
        self.list[self.current]
    }

    /// Whether `addr` is one of the configured nodes.
    pub(super) fn contains(&self, addr: SocketAddr) -> bool {
        self.list.contains(&addr)
    }

    /// Notes a datagram from `from` (the current node is alive) and says who sent it.
    pub(super) fn heard(&mut self, now: Instant, from: SocketAddr) -> FromServer {
        if from == self.current() {
            self.heard_at = self.heard_at.max(now);
            FromServer::Current
        } else if self.contains(from) {
            FromServer::Former
        } else {
            FromServer::Other
        }
    }

    /// When the current node will have been silent for `failover_after` (`None`:
    /// one server, nowhere to go).
    fn failover_at(&self, config: &AgentConfig) -> Option<Instant> {
        (self.list.len() > 1).then(|| self.heard_at + failover_after(config))
    }

    /// When [`Agent::handle_timeout`] must next run for failover: the heartbeat, or
    /// the end of the current node's allowed silence.
    pub(super) fn next_timeout(&self, config: &AgentConfig) -> Option<Instant> {
        earliest([self.next_heartbeat, self.failover_at(config)])
    }
}

impl Agent {
    /// Failover's timers: move on from a silent node, then the heartbeat.
    pub(super) fn failover_timeout(&mut self, now: Instant) {
        if self
            .servers
            .failover_at(&self.config)
            .is_some_and(|at| now >= at)
        {
            self.fail_over(now);
        }
        if let Some(at) = self.servers.next_heartbeat
            && now >= at
        {
            self.servers.next_heartbeat = Some(now + heartbeat(&self.config));
            let tid = self.tid();
            let mut request = Vec::new();
            crate::binding::binding_request(tid, &mut request);
            self.send_to_server(request);
        }
    }

    /// Moves to the next node: forgets the old node's nonce and pending requests
    /// (their answers would come from the dead node), gives up our allocation there,
    /// ends discovery (it belongs to the first node), and registers at once.
    fn fail_over(&mut self, now: Instant) {
        let servers = &mut self.servers;
        let from = servers.current();
        let silent = now.saturating_duration_since(servers.heard_at);
        servers.current = (servers.current + 1) % servers.list.len();
        let round_over = servers.current == 0;
        let to = servers.current();
        servers.heard_at = now;
        servers.next_heartbeat = Some(now + heartbeat(&self.config));
        servers.awaiting_registration = true;
        servers.announce_registration = true;
        tracing::warn!(%from, %to, ?silent, "gateway node silent; failing over");
        self.nonce = None;
        self.pending.clear();
        // The RTT measured to the old node stays until the new one is measured: the
        // nodes of one gateway are usually near each other.
        self.register_retry = FIRST_REGISTER_RETRY;
        self.next_register = now;
        self.abandon_discovery(now);
        self.drop_allocation(now);
        self.events.push_back(AgentEvent::ServerChanged {
            from,
            to,
            reason: ServerChangeReason::NoAnswer { silent },
        });
        if round_over {
            // Every node was silent over this transport: the next one gets its turn.
            self.silent_round(now, silent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        rendezvous::{RendezvousHandled, wire::method},
        sim::agents::*,
        stun::{self, Class, Message},
    };

    /// Requests of STUN `method` agent `agent` sent to `to` from `since` on.
    fn requests(sim: &Sim, agent: usize, to: SocketAddr, method: u16, since: Instant) -> usize {
        sim.sent
            .iter()
            .filter(|d| d.agent == agent && d.to == to && d.at >= since)
            .filter(|d| d.stun() == Some((method, Class::Request)))
            .count()
    }

    /// Agent `agent`'s server changes, with their instants.
    fn changes(sim: &Sim, agent: usize) -> Vec<(Instant, SocketAddr, SocketAddr)> {
        sim.timed_events
            .iter()
            .filter_map(|(at, i, e)| match e {
                AgentEvent::ServerChanged { from, to, .. } if *i == agent => {
                    Some((*at, *from, *to))
                }
                _ => None,
            })
            .collect()
    }

    /// When agent `agent` first had event `f` at or after `since`.
    fn first(
        sim: &Sim,
        agent: usize,
        since: Instant,
        f: impl Fn(&AgentEvent) -> bool,
    ) -> Option<Instant> {
        sim.timed_events
            .iter()
            .find(|(at, i, e)| *i == agent && *at >= since && f(e))
            .map(|(at, ..)| *at)
    }

    #[test]
    fn one_server_sends_what_a_single_node_agent_always_sent() {
        // The counts below are those of the agent before failover existed (the same
        // scenario run on its code gave the very same datagrams, instants and sizes):
        // nothing but the registration, the connect and the outcome report goes to
        // the one server, and no heartbeat at all.
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(40));
        assert!(sim.agents[0].1.path("bob").is_some());
        let server = sim.server_addr;
        for agent in 0..2 {
            let to_server: Vec<(u16, Class)> = sim
                .sent
                .iter()
                .filter(|d| d.agent == agent && d.to == server)
                .map(|d| d.stun().expect("STUN"))
                .collect();
            let count = |m: u16| {
                to_server
                    .iter()
                    .filter(|t| **t == (m, Class::Request))
                    .count()
            };
            assert_eq!(count(stun::method::BINDING), 0, "no heartbeat");
            // Register, its retry with the nonce, then a refresh every 15 s.
            assert_eq!(count(method::REGISTER), 4, "{to_server:?}");
            let (connects, outcomes) = if agent == 0 { (1, 1) } else { (0, 1) };
            assert_eq!(count(method::CONNECT), connects, "{to_server:?}");
            assert_eq!(count(method::OUTCOME), outcomes, "{to_server:?}");
            assert_eq!(to_server.len(), 4 + connects + outcomes, "{to_server:?}");
        }
        assert!(changes(&sim, 0).is_empty() && changes(&sim, 1).is_empty());
    }

    #[test]
    fn zero_timers_do_not_spin() {
        let now = Instant::now();
        let creds = crate::rendezvous::client::PeerCredentials {
            username: "1900000000:alice".into(),
            password: "pw".into(),
        };
        let mut config = AgentConfig::new(addr("192.0.2.10:3478"), creds)
            .with_servers([addr("192.0.2.10:3478"), addr("192.0.2.20:3478")]);
        config.heartbeat = Duration::ZERO;
        config.failover_after = Duration::ZERO;
        let mut agent = Agent::new(config, now, 1);
        for ms in [0, 10, 20] {
            let t = now + Duration::from_millis(ms);
            agent.handle_timeout(t);
            assert!(agent.poll_timeout().is_some_and(|next| next > t), "{ms} ms");
        }
        let changes = std::iter::from_fn(|| agent.poll_event())
            .filter(|e| matches!(e, AgentEvent::ServerChanged { .. }))
            .count();
        assert_eq!(changes, 2, "one per 10 ms of silence");
    }

    #[test]
    fn with_two_servers_the_current_one_gets_a_heartbeat_a_second() {
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[0, 1]]);
        let start = sim.now;
        sim.run_for(Duration::from_millis(10_500));
        let (first, second) = (sim.nodes[0].addr, sim.nodes[1].addr);
        for agent in 0..2 {
            assert_eq!(
                requests(&sim, agent, first, stun::method::BINDING, start),
                10
            );
            assert_eq!(sim.sent.iter().filter(|d| d.to == second).count(), 0);
            assert!(changes(&sim, agent).is_empty(), "answered: no failover");
        }
    }

    #[test]
    fn a_silent_node_is_left_and_the_next_registers_within_5_s() {
        // Alice uses node 0 then 1; bob is registered on node 1. The nodes share
        // nothing: an introduction needs both registered on the same node.
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[1, 0]]);
        // The worst instant for the node to die: right after it answered the
        // heartbeat sent at 2 s (the answer still arrives, 10 ms later), so alice
        // hears it last at 2.02 s and waits 2.5 s from there.
        sim.run_for(Duration::from_millis(2_011));
        let (old, new) = (sim.nodes[0].addr, sim.nodes[1].addr);
        assert_eq!(sim.agents[0].1.current_server(), old);
        sim.nodes[0].silent = true;
        let died = sim.now;
        sim.run_for(Duration::from_secs(5));

        // One change, after 2.5 s of silence at the latest plus the heartbeat's gap.
        let changed = changes(&sim, 0);
        assert_eq!(changed.len(), 1, "{changed:?}");
        let (changed_at, from, to) = changed[0];
        assert_eq!((from, to), (old, new));
        assert!(
            changed_at - died <= Duration::from_millis(2_520),
            "{changed_at:?}"
        );
        assert!(sim.events.iter().any(|(i, e)| *i == 0
            && matches!(e, AgentEvent::ServerChanged {
                reason: ServerChangeReason::NoAnswer { silent }, ..
            } if *silent >= Duration::from_millis(2_500))));
        assert_eq!(sim.agents[0].1.current_server(), new);

        // The Register goes out at once, without the old node's nonce; the new node
        // wants its own (438) and gets it at once; then it registers alice.
        let registers: Vec<&Sent> = sim
            .sent
            .iter()
            .filter(|d| d.agent == 0 && d.to == new)
            .filter(|d| d.stun() == Some((method::REGISTER, Class::Request)))
            .collect();
        assert_eq!(registers.len(), 2, "one retry with the fresh nonce");
        assert_eq!(registers[0].at, changed_at);
        let has_nonce = |d: &Sent| {
            Message::parse(&d.payload)
                .expect("STUN")
                .attributes()
                .filter_map(Result::ok)
                .any(|a| a.ty == stun::attr::NONCE)
        };
        assert!(
            !has_nonce(registers[0]),
            "the old node's nonce is forgotten"
        );
        assert!(has_nonce(registers[1]));
        // At once: one round trip (and the simulator's 1 ms step).
        assert!(registers[1].at - registers[0].at <= 2 * LATENCY + Duration::from_millis(1));
        let alice = sim.agents[0].0;
        let registered = sim
            .handled
            .iter()
            .find(|(_, n, from, h)| {
                *n == 1 && *from == alice && *h == RendezvousHandled::Registered
            })
            .map(|(at, ..)| *at)
            .expect("registered with node 1");
        assert!(
            registered - died < Duration::from_secs(5),
            "{:?}",
            registered - died
        );
        let announced = first(&sim, 0, changed_at, |e| {
            matches!(e, AgentEvent::Registered { .. })
        })
        .expect("the new registration is announced");
        assert!(announced - died < Duration::from_secs(5));

        // No heartbeat nor anything else to the dead node after the change.
        assert!(sim.sent.iter().all(|d| d.to != old || d.at < changed_at));

        // Alice now reaches bob, who is registered only on node 1.
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(500));
        assert!(sim.agents[0].1.path("bob").is_some());
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::PathUp { peer_id, .. } if peer_id == "alice")
        ));
        // Bob, whose node never fell silent, stayed where he was.
        assert!(changes(&sim, 1).is_empty());
    }

    #[test]
    fn a_node_that_comes_back_is_not_flapped_to() {
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[1, 0]]);
        sim.run_for(Duration::from_secs(2));
        sim.nodes[0].silent = true;
        sim.run_for(Duration::from_secs(4));
        let (old, new) = (sim.nodes[0].addr, sim.nodes[1].addr);
        assert_eq!(sim.agents[0].1.current_server(), new);
        let back = sim.now;
        sim.nodes[0].silent = false;
        sim.run_for(Duration::from_secs(30));
        assert_eq!(
            changes(&sim, 0).len(),
            1,
            "only the silence of node 0 moved it"
        );
        assert_eq!(sim.agents[0].1.current_server(), new);
        assert!(sim.sent.iter().all(|d| d.to != old || d.at < back));
        // The heartbeat follows the current node.
        assert_eq!(requests(&sim, 0, new, stun::method::BINDING, back), 30);
    }

    #[test]
    fn with_every_node_silent_each_change_is_announced_once() {
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[0, 1]]);
        sim.run_for(Duration::from_secs(1));
        sim.nodes[0].silent = true;
        sim.nodes[1].silent = true;
        sim.run_for(Duration::from_secs(11));
        let (a, b) = (sim.nodes[0].addr, sim.nodes[1].addr);
        let changed = changes(&sim, 0);
        // Round-robin: 0 -> 1 -> 0 -> 1 -> 0, one change per 2.5 s of silence.
        let hops: Vec<(SocketAddr, SocketAddr)> = changed.iter().map(|c| (c.1, c.2)).collect();
        assert_eq!(hops, vec![(a, b), (b, a), (a, b), (b, a)]);
        for pair in changed.windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, Duration::from_millis(2_500));
        }
        assert_eq!(changes(&sim, 1).len(), 4);
    }

    #[test]
    fn a_direct_path_survives_a_failover() {
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[0, 1]]);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(500));
        let path = sim.agents[0].1.path("bob").expect("punched");
        sim.nodes[0].silent = true;
        sim.run_for(Duration::from_secs(15));
        assert_eq!(changes(&sim, 0).len(), 1);
        assert_eq!(changes(&sim, 1).len(), 1);
        assert!(!sim.has(0, |e| matches!(e, AgentEvent::PathDown { .. })));
        assert!(!sim.has(1, |e| matches!(e, AgentEvent::PathDown { .. })));
        assert_eq!(sim.agents[0].1.path("bob"), Some(path));
        let introductions = sim
            .events
            .iter()
            .filter(|(i, e)| *i == 0 && matches!(e, AgentEvent::Introduced { .. }))
            .count();
        assert_eq!(introductions, 1, "nothing to punch again");
        assert!(sim.agents[0].1.send_data("bob", b"still here"));
        sim.run_for(Duration::from_millis(50));
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"still here")
        ));
    }

    #[test]
    fn a_relayed_path_moves_to_the_new_nodes_relay() {
        let mut sim = Sim::cluster(true, true, &[&[0, 1], &[0, 1]]);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(7));
        let (old, new) = (sim.nodes[0].addr, sim.nodes[1].addr);
        let relayed = sim.agents[0].1.relayed_address().expect("allocated");
        assert_eq!(relayed.ip(), old.ip());
        assert_eq!(sim.agents[0].1.path_relayed("bob"), Some(true));
        sim.nodes[0].silent = true;
        let died = sim.now;
        sim.run_for(Duration::from_secs(20));
        // The allocation died with its node: the path is down at the change, and
        // alice asks node 1 for bob again, whose relay then carries the path.
        let (changed_at, ..) = changes(&sim, 0)[0];
        assert_eq!(
            first(&sim, 0, died, |e| matches!(e, AgentEvent::PathDown { .. })),
            Some(changed_at)
        );
        let reallocated = sim.timed_events.iter().find_map(|(at, i, e)| match e {
            AgentEvent::RelayAllocated { relayed } if *i == 0 && *at > died => Some(*relayed),
            _ => None,
        });
        assert_eq!(reallocated.map(|r| r.ip()), Some(new.ip()));
        assert!(
            first(&sim, 0, changed_at, |e| matches!(
                e,
                AgentEvent::Introduced { .. }
            ))
            .is_some()
        );
        assert!(
            first(&sim, 0, changed_at, |e| matches!(
                e,
                AgentEvent::PathUp { relayed: true, .. }
            ))
            .is_some()
        );
        assert_eq!(sim.agents[0].1.path_relayed("bob"), Some(true));
        assert!(sim.agents[0].1.send_data("bob", b"via node 1"));
        sim.run_for(Duration::from_millis(100));
        assert!(sim.has(
            1,
            |e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"via node 1")
        ));
    }

    #[test]
    fn discovery_is_not_run_again_against_the_new_node() {
        // Discovery endpoints belong to the first node (here: unanswered ones).
        let endpoint = addr("192.0.2.10:3479");
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[0, 1]]);
        sim.agents[0].1.config.discovery = vec![endpoint];
        sim.run_for(Duration::from_secs(2));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::NatClassified { .. })));
        sim.nodes[0].silent = true;
        let died = sim.now;
        sim.run_for(Duration::from_secs(10));
        assert_eq!(changes(&sim, 0).len(), 1);
        assert!(sim.sent.iter().all(|d| d.to != endpoint || d.at < died));
        let classified = sim
            .events
            .iter()
            .filter(|(i, e)| *i == 0 && matches!(e, AgentEvent::NatClassified { .. }))
            .count();
        assert_eq!(classified, 1, "the class measured once is kept");
    }

    #[test]
    fn a_first_node_dead_from_the_start_is_skipped_without_discovery() {
        let endpoint = addr("192.0.2.10:3479");
        let mut sim = Sim::cluster(false, true, &[&[0, 1], &[1]]);
        sim.agents[0].1.config.discovery = vec![endpoint];
        sim.nodes[0].silent = true;
        let start = sim.now;
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(4));
        let (changed_at, _, to) = changes(&sim, 0)[0];
        assert_eq!(to, sim.nodes[1].addr);
        assert_eq!(changed_at - start, Duration::from_millis(2_500));
        // Never started: the endpoints belong to the node that never answered.
        assert!(sim.sent.iter().all(|d| d.to != endpoint));
        assert!(!sim.has(0, |e| matches!(e, AgentEvent::NatClassified { .. })));
        // Connects do not wait for a discovery that will not run.
        assert!(sim.agents[0].1.path("bob").is_some());
    }
}
