//! The simulated networks every agent test runs on: a gateway (the real rendezvous
//! and TURN cores, on one node or several independent ones that can go silent) and
//! agents on a virtual network with fixed latency ([`Sim`]); NATs
//! with configurable mapping and filtering ([`SimNat`], [`SimFilter`]); and the runs
//! built on them for discovery ([`discover_behind`]) and birthday punching
//! ([`birthday_run`]).
use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::agent::{Agent, AgentConfig, AgentEvent, DATA_MARKER};
use crate::{
    Transport,
    credentials::SharedSecret,
    peer_policy::PeerPolicy,
    rendezvous::{
        NatClass, RelayEndpoints, RendezvousConfig, RendezvousEvent as Event, RendezvousHandled,
        RendezvousServer, client::PeerCredentials, discovery_index,
    },
    stun::Message,
    turn::server::{ClientAddr, TurnConfig, TurnHandled, TurnServer, TurnServerEvent},
};

pub(crate) const NOW_UNIX: u64 = 1_800_000_000;

/// Relay addresses handed out by one simulated gateway node (on its own IP).
struct SimRelaySockets {
    ip: IpAddr,
    open: Vec<SocketAddr>,
    next: u16,
}

impl SimRelaySockets {
    /// Opens and closes relay sockets as the relay core asks, as a driver would.
    fn serve(&mut self, now: Instant, turn: &mut TurnServer) {
        while let Some(event) = turn.poll_event() {
            match event {
                TurnServerEvent::OpenRelay { request, .. } => {
                    self.next += 1;
                    let relay = SocketAddr::new(self.ip, 50_000 + self.next);
                    self.open.push(relay);
                    turn.handle_relay_opened(now, request, Ok((relay, None)));
                }
                TurnServerEvent::CloseRelay(relay) => self.open.retain(|r| *r != relay),
                _ => {}
            }
        }
    }
}

pub(crate) const LATENCY: Duration = Duration::from_millis(10);

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// One simulated gateway node: its own rendezvous and TURN cores (own nonce keys, no
/// shared registry) at `addr`, relay addresses on the same IP. A `silent` node
/// neither receives nor sends anything (it died, or its network did).
pub(crate) struct SimNode {
    pub(crate) addr: SocketAddr,
    /// Its TURN-over-TLS endpoint (the same cores, port 443).
    pub(crate) tls_addr: SocketAddr,
    pub(crate) server: RendezvousServer,
    turn: TurnServer,
    relays: SimRelaySockets,
    pub(crate) silent: bool,
}

impl SimNode {
    /// The address a reply over `transport` comes from (the TLS listener for TLS).
    fn source(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tls => self.tls_addr,
            _ => self.addr,
        }
    }

    /// How many relay sockets (one per allocation) this node has open.
    pub(crate) fn open_relays(&self) -> usize {
        self.relays.open.len()
    }

    /// Node `index` at 192.0.2.(10 + 10 * index):3478.
    fn new(index: u8, secret: &SharedSecret) -> Self {
        let ip = IpAddr::from([192, 0, 2, 10 + 10 * index]);
        let policy = PeerPolicy::new(
            vec!["198.51.100.0/24".parse().expect("range")],
            Vec::new(),
            Vec::new(),
        );
        let mut server = RendezvousServer::new(
            secret.clone(),
            RendezvousConfig::default(),
            3 + u64::from(index),
        );
        server.set_relay_endpoints(Some(RelayEndpoints {
            addresses: vec![ip],
            ports: 1..=65535,
        }));
        Self {
            addr: SocketAddr::new(ip, 3478),
            tls_addr: SocketAddr::new(ip, 443),
            server,
            turn: TurnServer::new(
                TurnConfig::default(),
                secret.clone(),
                [5 + index; 32],
                600,
                policy,
            ),
            relays: SimRelaySockets {
                ip,
                open: Vec::new(),
                next: 0,
            },
            silent: false,
        }
    }
}

/// One datagram an agent sent, as the network saw it leave.
#[derive(Clone, Debug)]
pub(crate) struct Sent {
    pub(crate) at: Instant,
    pub(crate) agent: usize,
    pub(crate) to: SocketAddr,
    pub(crate) payload: Vec<u8>,
}

impl Sent {
    /// The STUN method and class, if the datagram is STUN.
    pub(crate) fn stun(&self) -> Option<(u16, crate::stun::Class)> {
        let message = Message::parse(&self.payload).ok()?;
        let ty = message.message_type();
        Some((ty.method, ty.class))
    }
}

/// Two agents and a gateway (rendezvous and TURN relay, on one node or several
/// independent ones) on a virtual network with fixed latency; `drop_p2p` drops
/// everything between the peers (as two symmetric NATs would), never what goes
/// through the relay.
pub(crate) struct Sim {
    pub(crate) now: Instant,
    pub(crate) nodes: Vec<SimNode>,
    /// The first node's address.
    pub(crate) server_addr: SocketAddr,
    pub(crate) agents: Vec<(SocketAddr, Agent)>,
    /// (arrival, from, to, payload, transport): streams are modelled as reliable
    /// message pipes with the same latency.
    in_flight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>, Transport)>,
    pub(crate) drop_p2p: bool,
    /// Per agent: its network drops every UDP datagram it sends or would receive (a
    /// site that blocks UDP).
    pub(crate) udp_blocked: Vec<bool>,
    /// Per agent: its network drops its TCP connections (TLS still passes).
    pub(crate) tcp_blocked: Vec<bool>,
    pub(crate) events: Vec<(usize, AgentEvent)>,
    /// Every agent event with its instant (`events` without the instants is kept for
    /// the tests that need no time).
    pub(crate) timed_events: Vec<(Instant, usize, AgentEvent)>,
    /// The rendezvous events of every node.
    pub(crate) server_events: Vec<Event>,
    /// What each node's rendezvous core made of each datagram: (instant, node,
    /// sender, outcome).
    pub(crate) handled: Vec<(Instant, usize, SocketAddr, RendezvousHandled)>,
    /// Low-TTL openers sent (they expire in the network: never delivered).
    pub(crate) openers: Vec<(usize, SocketAddr, u8)>,
    /// Every other datagram the agents sent.
    pub(crate) sent: Vec<Sent>,
}

impl Sim {
    pub(crate) fn new(drop_p2p: bool) -> Self {
        Self::with_relay(drop_p2p, true)
    }

    pub(crate) fn with_relay(drop_p2p: bool, relay: bool) -> Self {
        Self::cluster(drop_p2p, relay, &[&[0], &[0]])
    }

    /// Alice and bob with a gateway of as many independent nodes as `servers`
    /// names: `servers[i]` lists agent i's nodes in its failover order (node n is
    /// at 192.0.2.(10 + 10 n):3478).
    pub(crate) fn cluster(drop_p2p: bool, relay: bool, servers: &[&[u8]; 2]) -> Self {
        let secret = SharedSecret::new(b"sim secret");
        let now = Instant::now();
        let count = servers
            .iter()
            .flat_map(|s| s.iter())
            .max()
            .map_or(1, |&n| n + 1);
        let nodes: Vec<SimNode> = (0..count).map(|i| SimNode::new(i, &secret)).collect();
        let mut agents = Vec::new();
        for ((name, at), order) in [("alice", "198.51.100.2:4000"), ("bob", "198.51.100.6:5000")]
            .into_iter()
            .zip(servers)
        {
            let issued = secret.issue(name, NOW_UNIX + 3600).expect("issue");
            let creds = PeerCredentials {
                username: issued.username,
                password: issued.password,
            };
            let mut config = AgentConfig::new(nodes[usize::from(order[0])].addr, creds)
                .with_servers(order.iter().map(|&n| nodes[usize::from(n)].addr));
            config.relay = relay;
            agents.push((addr(at), Agent::new(config, now, 1)));
        }
        Self {
            now,
            server_addr: nodes[0].addr,
            nodes,
            agents,
            in_flight: Vec::new(),
            drop_p2p,
            udp_blocked: vec![false; 2],
            tcp_blocked: vec![false; 2],
            events: Vec::new(),
            timed_events: Vec::new(),
            server_events: Vec::new(),
            handled: Vec::new(),
            openers: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// Every node's relay allows only peers in `allowed` (the rest of the agents'
    /// TEST-NET range is special-purpose, so its peer policy denies it).
    pub(crate) fn relay_allows_only(&mut self, allowed: &str) {
        for node in &mut self.nodes {
            node.turn.set_policy(PeerPolicy::new(
                vec![allowed.parse().expect("range")],
                Vec::new(),
                Vec::new(),
            ));
        }
    }

    /// Agent `i` again from the start, with its configuration changed by `change`.
    pub(crate) fn reconfigure(&mut self, i: usize, change: impl FnOnce(&mut AgentConfig)) {
        let mut config = self.agents[i].1.config().clone();
        change(&mut config);
        self.agents[i].1 = Agent::new(config, self.now, 1 + i as u64);
    }

    /// Every node's relay also allows peers in `range` (e.g. the nodes' own
    /// addresses, for two clients that both relay).
    pub(crate) fn relay_also_allows(&mut self, range: &str) {
        for node in &mut self.nodes {
            node.turn.set_policy(PeerPolicy::new(
                vec![
                    "198.51.100.0/24".parse().expect("range"),
                    range.parse().expect("range"),
                ],
                Vec::new(),
                Vec::new(),
            ));
        }
    }

    /// Every node's relay lets each user hold `per_user` allocations at most.
    pub(crate) fn relay_quota(&mut self, per_user: usize) {
        for node in &mut self.nodes {
            node.turn.set_config(TurnConfig {
                max_allocations_per_user: per_user,
                ..TurnConfig::default()
            });
        }
    }

    /// The index of the node at `addr`, if one is there.
    pub(crate) fn node_at(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    pub(crate) fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            for i in 0..self.agents.len() {
                let (from, agent) = &mut self.agents[i];
                if agent.poll_timeout().is_some_and(|at| at <= self.now) {
                    agent.handle_timeout(self.now);
                }
                while let Some(t) = agent.poll_transmit() {
                    if let Some(ttl) = t.ttl {
                        self.openers.push((i, t.to, ttl));
                        continue;
                    }
                    self.sent.push(Sent {
                        at: self.now,
                        agent: i,
                        to: t.to,
                        payload: t.payload.clone(),
                    });
                    let blocked = match t.transport {
                        Transport::Udp => self.udp_blocked[i],
                        Transport::Tcp => self.tcp_blocked[i],
                        Transport::Tls => false,
                    };
                    if !blocked {
                        self.in_flight.push((
                            self.now + LATENCY,
                            *from,
                            t.to,
                            t.payload,
                            t.transport,
                        ));
                    }
                }
                while let Some(e) = agent.poll_event() {
                    self.timed_events.push((self.now, i, e.clone()));
                    self.events.push((i, e));
                }
            }
            let (due, later): (Vec<_>, Vec<_>) = self
                .in_flight
                .drain(..)
                .partition(|(at, ..)| *at <= self.now);
            self.in_flight = later;
            for (_, from, to, payload, transport) in due {
                let node_at = match transport {
                    Transport::Tls => self.nodes.iter().position(|n| n.tls_addr == to),
                    _ => self.node_at(to),
                };
                if let Some(n) = node_at {
                    let client = ClientAddr {
                        addr: from,
                        transport,
                    };
                    if !self.nodes[n].silent && !self.relay_input(n, client, &payload) {
                        let node = &mut self.nodes[n];
                        let handled = node
                            .server
                            .handle_message(self.now, NOW_UNIX, from, transport, None, &payload);
                        self.handled.push((self.now, n, from, handled));
                        self.server_events
                            .extend(std::iter::from_fn(|| node.server.poll_event()));
                        while let Some(t) = node.server.poll_transmit() {
                            let source = node.source(t.transport);
                            self.in_flight.push((
                                self.now + LATENCY,
                                source,
                                t.to,
                                t.payload,
                                t.transport,
                            ));
                        }
                    }
                    continue;
                }
                if transport.is_stream() {
                    // From a node to an agent, on the agent's connection.
                    if let Some((_, agent)) = self.agents.iter_mut().find(|(a, _)| *a == to) {
                        agent.handle_stream_frame(self.now, transport, from, &payload);
                    }
                    continue;
                }
                if let Some(node) = self.nodes.iter_mut().find(|n| n.relays.open.contains(&to)) {
                    // A peer sent to a relayed address: up to the allocation's client.
                    if !node.silent
                        && let Ok(target) =
                            node.turn.data_from_peer(self.now, to, from, payload.len())
                    {
                        let mut out = Vec::new();
                        match target.channel {
                            Some(channel) => {
                                crate::turn::encode_channel_data(channel, &payload, &mut out)
                            }
                            None => node.turn.data_indication(from, &payload, &mut out),
                        }
                        if target.client.transport.is_stream() {
                            // Padded to four on a stream (RFC 8656 §12.5).
                            out.resize(out.len().next_multiple_of(4), 0);
                        }
                        self.in_flight.push((
                            self.now + LATENCY,
                            node.source(target.client.transport),
                            target.client.addr,
                            out,
                            target.client.transport,
                        ));
                    }
                    continue;
                }
                let blocked = |a: SocketAddr| {
                    self.agents
                        .iter()
                        .position(|(x, _)| *x == a)
                        .is_some_and(|i| self.udp_blocked[i])
                };
                if blocked(from) || blocked(to) {
                    continue;
                }
                if let from_peer = self.agents.iter().any(|(a, _)| *a == from)
                    && let Some((_, agent)) = self.agents.iter_mut().find(|(a, _)| *a == to)
                {
                    if self.drop_p2p && from_peer {
                        continue;
                    }
                    agent.handle_datagram(self.now, from, &payload);
                }
            }
            self.now += Duration::from_millis(1);
        }
    }

    /// Node `n`'s TURN side: true when it took the datagram.
    fn relay_input(&mut self, n: usize, from: ClientAddr, payload: &[u8]) -> bool {
        let node = &mut self.nodes[n];
        if crate::turn::is_channel_data(payload) {
            if let Ok(message) = crate::turn::ChannelData::parse(payload)
                && let Ok((relay, peer)) = node.turn.channel_data_from_client(
                    self.now,
                    from,
                    message.channel,
                    message.data.len(),
                )
            {
                self.in_flight.push((
                    self.now + LATENCY,
                    relay,
                    peer,
                    message.data.to_vec(),
                    Transport::Udp,
                ));
            }
            return true;
        }
        let Ok(message) = Message::parse(payload) else {
            return false;
        };
        if !TurnServer::is_turn_method(message.message_type().method) {
            return false;
        }
        let handled = node
            .turn
            .handle_stun(self.now, NOW_UNIX, from, None, &message);
        node.relays.serve(self.now, &mut node.turn);
        if let TurnHandled::Relay { relay, peer, data } = handled {
            self.in_flight.push((
                self.now + LATENCY,
                relay,
                peer,
                data.to_vec(),
                Transport::Udp,
            ));
        }
        while let Some(reply) = node.turn.poll_transmit() {
            self.in_flight.push((
                self.now + LATENCY,
                node.source(reply.transport),
                reply.to,
                reply.payload,
                reply.transport,
            ));
        }
        true
    }

    pub(crate) fn has(&self, agent: usize, f: impl Fn(&AgentEvent) -> bool) -> bool {
        self.events.iter().any(|(i, e)| *i == agent && f(e))
    }
}

/// How a simulated NAT in front of the agent filters inbound datagrams.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SimFilter {
    Independent,
    Address,
    AddressAndPort,
}

/// One agent behind an endpoint-independent-mapping NAT with `filter` (port
/// preserved or not), a gateway with a discovery socket on another port and one on
/// another address; runs discovery and returns the classification event and the
/// time it took.
pub(crate) fn discover_behind(
    filter: SimFilter,
    preserve: bool,
    unauthenticated_gateway: bool,
    alternates: Vec<SocketAddr>,
) -> (Option<AgentEvent>, Duration) {
    discover_behind_with(filter, preserve, unauthenticated_gateway, alternates, None)
}

/// [`discover_behind`], with the agent told its discovery endpoints by the gateway's
/// Register answer instead of configured (`told`: the agent's `discover` flag) when
/// `told` is given.
pub(crate) fn discover_behind_with(
    filter: SimFilter,
    preserve: bool,
    unauthenticated_gateway: bool,
    alternates: Vec<SocketAddr>,
    told: Option<bool>,
) -> (Option<AgentEvent>, Duration) {
    use crate::binding::{Alternates, BindingService};
    let secret = SharedSecret::new(b"sim secret");
    let issued = secret.issue("alice", NOW_UNIX + 3600).expect("issue");
    let server_addr = addr("192.0.2.10:3478");
    let mut server = RendezvousServer::new(secret, RendezvousConfig::default(), 3);
    server.set_alternates(
        Alternates::new(addr("0.0.0.0:3478"), alternates.clone()),
        unauthenticated_gateway,
    );
    let mut config = AgentConfig::new(
        server_addr,
        PeerCredentials {
            username: issued.username,
            password: issued.password,
        },
    );
    match told {
        None => {
            config.discovery = vec![addr("192.0.2.10:3479"), addr("192.0.2.11:3478")];
            config.filtering = true;
        }
        Some(discover) => {
            config.discover = discover;
            server.set_discovery_endpoints(crate::rendezvous::DiscoveryEndpoints {
                service_port: 3478,
                service_wildcard: true,
                sockets: vec![addr("0.0.0.0:3479")],
                other_addresses: vec![
                    "192.0.2.10".parse().expect("ip"),
                    "192.0.2.11".parse().expect("ip"),
                ],
            });
        }
    }
    let local = addr("10.0.0.2:4000");
    config.host_candidates = vec![local];
    let public = if preserve {
        addr("198.51.100.2:4000")
    } else {
        addr("198.51.100.2:61000")
    };
    let start = Instant::now();
    let mut agent = Agent::new(config, start, 1);
    let mut contacted: Vec<SocketAddr> = Vec::new();
    for ms in (0..5_000).step_by(5) {
        let now = start + Duration::from_millis(ms);
        if agent.poll_timeout().is_some_and(|at| at <= now) {
            agent.handle_timeout(now);
        }
        // Deliver instantly, until nobody has anything more to say.
        while let Some(transmit) = agent.poll_transmit() {
            contacted.push(transmit.to);
            let mut inbound: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
            if transmit.to == server_addr || transmit.to == addr("192.0.2.11:3478") {
                server.handle_datagram(
                    now,
                    NOW_UNIX,
                    public,
                    Some(transmit.to.ip()),
                    &transmit.payload,
                );
                while let Some(t) = server.poll_transmit() {
                    // Socket 0 is the service socket; others are discovery sockets.
                    match discovery_index(t.socket) {
                        None => inbound.push((transmit.to, t.payload)),
                        Some(endpoint) => inbound.push((alternates[endpoint], t.payload)),
                    }
                }
            } else if alternates.contains(&transmit.to) || transmit.to.port() == 3479 {
                let mut reply = Vec::new();
                BindingService.handle(public, &transmit.payload, &mut reply);
                inbound.push((transmit.to, reply));
            }
            for (from, payload) in inbound {
                let admitted = match filter {
                    SimFilter::Independent => true,
                    SimFilter::Address => contacted.iter().any(|c| c.ip() == from.ip()),
                    SimFilter::AddressAndPort => contacted.contains(&from),
                };
                if admitted && !payload.is_empty() {
                    agent.handle_datagram(now, from, &payload);
                }
            }
        }
        while let Some(event) = agent.poll_event() {
            if matches!(event, AgentEvent::NatClassified { .. }) {
                return (Some(event), now - start);
            }
        }
    }
    (None, Duration::from_secs(5))
}

/// A NAT for the birthday simulation: endpoint-independent with preserved ports, or
/// a random port per (socket, destination); both filter by address and port.
pub(crate) struct SimNat {
    public: IpAddr,
    independent: bool,
    /// No NAT at all: a public host that takes any datagram.
    open: bool,
    mappings: HashMap<(u32, Option<SocketAddr>), u16>,
    sockets: HashMap<u16, u32>,
    sent_to: HashSet<(u16, SocketAddr)>,
    /// Unsolicited datagrams that reached one of its mapped ports: a router that
    /// accepts them keeps a conntrack entry that later makes it remap the port.
    unsolicited: RefCell<Vec<(u16, SocketAddr)>>,
    rng: StdRng,
}

impl SimNat {
    fn new(public: &str, independent: bool) -> Self {
        Self {
            public: public.parse().expect("ip"),
            independent,
            open: false,
            mappings: HashMap::new(),
            sockets: HashMap::new(),
            sent_to: HashSet::new(),
            unsolicited: RefCell::new(Vec::new()),
            rng: StdRng::seed_from_u64(7),
        }
    }

    fn outbound(&mut self, socket: u32, to: SocketAddr) -> SocketAddr {
        let key = (socket, (!self.independent).then_some(to));
        let port = match self.mappings.get(&key) {
            Some(&port) => port,
            None => {
                let port = if self.independent {
                    4000 + u16::try_from(socket).expect("few sockets")
                } else {
                    loop {
                        let port = self.rng.random_range(1024..=65_535);
                        if !self.sockets.contains_key(&port) {
                            break port;
                        }
                    }
                };
                self.mappings.insert(key, port);
                self.sockets.insert(port, socket);
                port
            }
        };
        self.sent_to.insert((port, to));
        SocketAddr::new(self.public, port)
    }

    fn inbound(&self, to: SocketAddr, from: SocketAddr) -> Option<u32> {
        if !self.sent_to.contains(&(to.port(), from)) {
            if self.sockets.contains_key(&to.port()) {
                self.unsolicited.borrow_mut().push((to.port(), from));
            }
            if !self.open {
                return None;
            }
        }
        self.sockets.get(&to.port()).copied()
    }
}

/// Alice behind an endpoint-independent NAT, bob behind a random-port symmetric
/// one (both filtering by address and port), the real rendezvous core between
/// them; returns each side's events and the sockets bob sent data from and
/// released.
pub(crate) fn birthday_run(bob_sockets: u16) -> BirthdayRun {
    birthday_run_with(bob_sockets, NatClass::EndpointIndependent)
}

/// [`birthday_run`] with alice's side of class `alice_nat`: endpoint-independent,
/// or `None` (a public host).
pub(crate) fn birthday_run_with(bob_sockets: u16, alice_nat: NatClass) -> BirthdayRun {
    birthday_run_on(&BirthdaySetup {
        bob_sockets,
        alice_nat,
        ..BirthdaySetup::default()
    })
}

/// What a birthday run varies: bob's extra sockets, alice's NAT class, the one-way
/// latency of every link (so every RTT is twice it, as in the lab's WAN profiles)
/// and the seed of both agents and bob's NAT.
pub(crate) struct BirthdaySetup {
    pub(crate) bob_sockets: u16,
    pub(crate) alice_nat: NatClass,
    pub(crate) latency: Duration,
    pub(crate) seed: u64,
}

impl Default for BirthdaySetup {
    fn default() -> Self {
        Self {
            bob_sockets: 256,
            alice_nat: NatClass::EndpointIndependent,
            latency: LATENCY,
            seed: 0,
        }
    }
}

/// [`birthday_run`] as `setup` says.
pub(crate) fn birthday_run_on(setup: &BirthdaySetup) -> BirthdayRun {
    let BirthdaySetup {
        bob_sockets,
        alice_nat,
        latency,
        seed,
    } = *setup;
    let secret = SharedSecret::new(b"sim secret");
    let mut now = Instant::now();
    let began = now;
    let server_addr = addr("192.0.2.10:3478");
    let mut server = RendezvousServer::new(secret.clone(), RendezvousConfig::default(), 3);
    let mut nats = [
        SimNat::new("198.51.100.2", true),
        SimNat::new("198.51.100.6", false),
    ];
    nats[1].rng = StdRng::seed_from_u64(7 + seed);
    nats[0].open = alice_nat == NatClass::None;
    let mut agents: Vec<Agent> = [
        ("alice", alice_nat),
        ("bob", NatClass::AddressAndPortDependent),
    ]
    .into_iter()
    .map(|(name, nat)| {
        let issued = secret.issue(name, NOW_UNIX + 3600).expect("issue");
        let creds = PeerCredentials {
            username: issued.username,
            password: issued.password,
        };
        let mut config = AgentConfig::new(server_addr, creds);
        config.relay = false;
        config.nat = nat;
        config.birthday_sockets = bob_sockets;
        Agent::new(config, now, 11 + seed)
    })
    .collect();
    agents[0].connect("bob", now);
    let mut in_flight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)> = Vec::new();
    let mut events = Vec::new();
    let mut data_sockets = Vec::new();
    let mut released = 0;
    let mut sweep_round_max = 0;
    let mut swept = Vec::new();
    let mut alice_failed_at = None;
    let end = now + Duration::from_secs(8);
    let mut sent_data = false;
    let mut unsolicited_at_alice = None;
    let mut timed_events = Vec::new();
    let mut started_at = [None, None];
    while now < end {
        for (i, agent) in agents.iter_mut().enumerate() {
            if agent.poll_timeout().is_some_and(|at| at <= now) {
                agent.handle_timeout(now);
            }
            let mut sweep_round = 0;
            let bob_registered = nats[1].mappings.get(&(0, Some(server_addr))).copied();
            while let Some(t) = agent.poll_transmit() {
                if i == 0 && t.to.ip() == nats[1].public && Some(t.to.port()) != bob_registered {
                    swept.push((now, t.to.port()));
                }
                if i == 1 && t.payload.first() == Some(&DATA_MARKER) {
                    data_sockets.push(t.socket);
                }
                if i == 0 && t.to.ip() == nats[1].public && t.to.port() != 0 {
                    sweep_round += 1;
                }
                let from = nats[i].outbound(t.socket, t.to);
                if t.ttl.is_none() {
                    in_flight.push((now + latency, from, t.to, t.payload));
                } else {
                    // The opener goes out at the aligned start.
                    started_at[i].get_or_insert(now - began);
                }
            }
            sweep_round_max = sweep_round_max.max(sweep_round);
            while let Some(e) = agent.poll_event() {
                if i == 0 && matches!(e, AgentEvent::PunchFailed { .. }) {
                    alice_failed_at.get_or_insert(now);
                }
                timed_events.push((now - began, i, e.clone()));
                events.push((i, e));
            }
            if i == 1 {
                while agent.poll_released_socket().is_some() {
                    released += 1;
                }
            }
        }
        let both_up = agents[0].path("bob").is_some() && agents[1].path("alice").is_some();
        if both_up && !sent_data {
            sent_data = true;
            unsolicited_at_alice = Some(nats[0].unsolicited.borrow().len());
            assert!(agents[0].send_data("bob", b"to bob"));
            assert!(agents[1].send_data("alice", b"to alice"));
        }
        let (due, later): (Vec<_>, Vec<_>) = in_flight.drain(..).partition(|(at, ..)| *at <= now);
        in_flight = later;
        for (_, from, to, payload) in due {
            if to == server_addr {
                server.handle_datagram(now, NOW_UNIX, from, None, &payload);
                while let Some(t) = server.poll_transmit() {
                    in_flight.push((now + latency, server_addr, t.to, t.payload));
                }
                continue;
            }
            for (i, nat) in nats.iter().enumerate() {
                if to.ip() == nat.public
                    && let Some(socket) = nat.inbound(to, from)
                {
                    agents[i].handle_datagram_on(now, socket, from, &payload);
                }
            }
        }
        now += Duration::from_millis(1);
    }
    BirthdayRun {
        events,
        data_sockets,
        released,
        sweep_round_max,
        swept,
        alice_failed_at,
        unsolicited_at_alice: unsolicited_at_alice
            .unwrap_or_else(|| nats[0].unsolicited.borrow().len()),
        timed_events,
        started_at,
    }
}

/// What [`birthday_run`] saw.
pub(crate) struct BirthdayRun {
    pub(crate) events: Vec<(usize, AgentEvent)>,
    /// The sockets bob's data left from.
    pub(crate) data_sockets: Vec<u32>,
    /// Extra sockets bob released.
    pub(crate) released: usize,
    /// Most datagrams alice sent toward bob's address in one timer run.
    pub(crate) sweep_round_max: u32,
    /// The ports alice probed on bob's address, other than his registered one.
    pub(crate) swept: Vec<(Instant, u16)>,
    /// When alice's first punch attempt gave up.
    pub(crate) alice_failed_at: Option<Instant>,
    /// Unsolicited datagrams from bob that reached alice's mapped ports before the
    /// path was up.
    pub(crate) unsolicited_at_alice: usize,
    /// `events` with when each came, since the run began.
    pub(crate) timed_events: Vec<(Duration, usize, AgentEvent)>,
    /// When each side's first opener left (its aligned start), since the run began.
    pub(crate) started_at: [Option<Duration>; 2],
}
