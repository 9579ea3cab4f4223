//! The peer agent's state machine: registers with the gateway and keeps the NAT
//! mapping alive, asks for and accepts introductions, probes every candidate pair at
//! the scheduled instant, holds the first path that works both ways, keeps it alive,
//! re-punches when it dies, and reports outcomes.
//!
//! Sans-IO like the server: the driver passes the time and datagrams in, and polls
//! datagrams to send, the next timer, and events. One UDP socket carries everything
//! (rendezvous, probes and data), so the mapping the gateway saw is the one punched;
//! the exception is birthday punching toward a random-port endpoint-dependent NAT,
//! where the agent asks the driver for many short-lived extra sockets ([`Transmit`]'s
//! `socket`), and a path found on one of them stays on it.
//!
//! This module holds the [`Agent`] itself: its configuration, events, public API,
//! registration and connects, and the demultiplexing of incoming datagrams. The
//! sub-machines, each with its own state and its own next deadline, live apart:
//! - `discovery`: NAT mapping and filtering discovery (RFC 5780 ideas), port
//!   prediction;
//! - `session`: one punch session per introduction: probes, path up and down;
//! - `birthday`: birthday punching toward a random-port NAT, and the extra sockets;
//! - `relay_leg`: the TURN fallback through our allocation, relay offers, upgrades;
//! - `report`: outcome reports, TCP reports and TCP-Seq requests to the gateway;
//! - `refusal`: refusals in words, what the agent does next, and the retry
//!   schedules (backoff, wrong credentials end the agent);
//! - `port_mapping`: the mapping of our socket's port asked of the default router
//!   (PCP, NAT-PMP; UPnP-IGD through the driver), announced as a mapped candidate,
//!   and with TCP punching on the TCP mapping of the punching port (a TCP candidate);
//! - `transport`: UDP, then TCP, then TLS to the gateway when it answers nothing, and
//!   back to UDP when a background retry gets through;
//! - `failover`: the heartbeat to the current gateway node and the move to the next
//!   one when it falls silent (only with two or more servers configured);
//! - `sim` (tests only): the simulated networks every agent test runs on.
mod birthday;
mod discovery;
mod failover;
mod port_mapping;
mod refusal;
mod relay_leg;
mod report;
mod session;
mod transport;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use self::{
    birthday::ExtraSockets,
    discovery::Discovery,
    failover::{FromServer, Servers},
    relay_leg::{RelayLeg, TurnAllocation},
    report::{Report, TcpSeqRequest},
    session::{Session, SessionState},
    transport::ServerLink,
};
pub use self::{
    birthday::{
        BIRTHDAY_AFTER_MAX, BirthdayRole, MAX_BIRTHDAY_PROBES, MAX_BIRTHDAY_SOCKETS,
        birthday_after, birthday_role,
    },
    discovery::{FilterTest, classify_filtering, classify_mapping, predict_ports},
    failover::ServerChangeReason,
    port_mapping::PortMapTarget,
    refusal::{NextStep, method_name, reason as refusal_reason},
    transport::TransportChangeReason,
};
use crate::{
    Transmit, Transport, earliest,
    portmap::{PortMapClient, PortMapEvent},
    rendezvous::{
        client::{self, PeerCredentials, Role},
        wire::{CLUSTER_UNAVAILABLE, Candidate, CandidateKind, FilteringClass, NatClass, method},
    },
    stun::{self, Class, Message},
};

/// First byte of a data datagram on a punched path (outside STUN's 0x00..=0x3F and
/// TURN ChannelData's 0x40..=0x7F, so the three never collide).
pub const DATA_MARKER: u8 = 0xD7;

/// Tunables of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The gateway's UDP address: the first server, where the agent registers first
    /// (and the node the `discovery` endpoints belong to).
    pub server: SocketAddr,
    /// Further gateway nodes, in order after `server`, to fail over to when the
    /// current one falls silent (round-robin). Empty (the default): one server, no
    /// heartbeat, the datagrams of a single-node agent. See [`Self::servers`].
    pub fallback_servers: Vec<SocketAddr>,
    /// With two or more servers: how often a STUN Binding heartbeat goes to the
    /// current server (any datagram from it counts as an answer); at least 10 ms.
    pub heartbeat: Duration,
    /// With two or more servers: move to the next one when the current server has
    /// answered nothing for this long (at least `heartbeat`; keep it a few
    /// heartbeats long, so one lost answer does not move the agent).
    pub failover_after: Duration,
    /// This peer's credentials.
    pub credentials: PeerCredentials,
    /// Host candidates to announce (the local socket's addresses).
    pub host_candidates: Vec<SocketAddr>,
    /// The NAT class this peer believes it is behind (reported for metrics); replaced
    /// by what discovery measures when `discovery` is set.
    pub nat: NatClass,
    /// Other endpoints of the gateway answering Binding (its discovery port, its second
    /// address) used to classify this peer's NAT mapping (RFC 5780 ideas). Empty (the
    /// default): the endpoints the gateway names in its Register answer, when
    /// `discover` is on.
    pub discovery: Vec<SocketAddr>,
    /// Classify this peer's NAT with the endpoints the gateway names in its Register
    /// answer (DISCOVERY-ENDPOINT) when `discovery` is empty. On by default (`gateway
    /// peer --no-discover` turns it off); a gateway that names none (an older one, or
    /// `server.discovery = false`) leaves the class as configured.
    pub discover: bool,
    /// Before the mapping tests, measure the NAT's filtering with RFC 5780
    /// CHANGE-REQUEST tests to `server` (needs `discovery`). Off by default: behind a
    /// router that accepts unsolicited packets itself, an answer it swallowed from a
    /// discovery endpoint holds that endpoint's port in its connection table, and the
    /// mapping test to the same endpoint then gets another port (a false
    /// address-and-port-dependent mapping). Use it with a gateway whose CHANGE-REQUEST
    /// answers leave from endpoints that are not in `discovery`.
    pub filtering: bool,
    /// How many next ports to predict (and announce) when discovery finds a NAT that
    /// allocates ports sequentially per destination; 0 turns prediction off.
    pub prediction_window: u16,
    /// How often to refresh the registration (NAT mappings must not expire).
    pub keepalive: Duration,
    /// Gap between two probe rounds.
    pub probe_interval: Duration,
    /// TTL of the opener probes sent at the scheduled start (enough hops to pass this
    /// host's own NAT, too few to reach the other's); 0 disables the opener.
    pub open_ttl: u8,
    /// Delay between the opener and the first real probes.
    pub open_lead: Duration,
    /// Most probes one introduction may cause from this side.
    pub probe_budget: u32,
    /// Give up punching this long after the scheduled start.
    pub punch_timeout: Duration,
    /// Keepalive probe interval on an established path.
    pub path_keepalive: Duration,
    /// A path silent this long is down.
    pub path_timeout: Duration,
    /// Fall back to the gateway's TURN relay when punching fails (or cannot work:
    /// both sides behind address-and-port-dependent mapping), transparently to the
    /// data, and keep trying to upgrade to a direct path.
    pub relay: bool,
    /// Give up on the relay path this long after the fallback started.
    pub relay_timeout: Duration,
    /// While relayed, try a direct path again this often.
    pub upgrade_interval: Duration,
    /// Birthday punching, when this side maps address-and-port-dependently with
    /// unpredictable ports and the other endpoint-independently: how many extra
    /// sockets (each gets its own random public port) to open toward the other side;
    /// 0 turns birthday punching off on this side.
    pub birthday_sockets: u16,
    /// Birthday punching, when the other side is the random-port one: how many
    /// probes to random ports of its public address to send at most.
    pub birthday_probes: u32,
    /// Birthday probes per second at most (the sweep's pace).
    pub birthday_rate: u32,
    /// How long after the scheduled start an attempt that has no path yet begins the
    /// birthday sweep (the cheap direct probes go first; the random-port side opens
    /// its mappings a probe interval earlier). `None` (the default): about one RTT to
    /// the peer plus a margin, as the start alignment tells it, at most 500 ms
    /// ([`birthday_after`]); `Some`: this fixed delay.
    pub birthday_after: Option<Duration>,
    /// This peer's TCP server-reflexive endpoints (learnt by the driver with a STUN
    /// Binding over TCP to the gateway), announced as TCP candidates. Non-empty turns
    /// TCP punching on: every introduction then also yields
    /// [`AgentEvent::TcpIntroduced`].
    pub tcp_candidates: Vec<SocketAddr>,
    /// Ask the default router for a UDP mapping of the agent's socket port (PCP and
    /// NAT-PMP here, UPnP-IGD by the driver when `upnp`) and announce the granted
    /// endpoint as a [`CandidateKind::Mapped`] candidate. `None` (the default): no
    /// port-mapping traffic at all.
    pub port_mapping: Option<PortMapTarget>,
    /// With TCP punching on (`tcp_candidates`): also ask the router for a TCP
    /// mapping of the TCP punching port (`port`: the local port the TCP reflexive
    /// endpoint was learnt from; same protocols, a second client with its own PCP
    /// nonce on the agent's UDP socket) and announce the granted endpoint as a
    /// [`CandidateKind::TcpMapped`] candidate, which the other side's TCP punch
    /// connects to. `None` (the default): no TCP mapping asked.
    pub tcp_port_mapping: Option<PortMapTarget>,
    /// With `port_mapping`: the driver also tries UPnP-IGD and reports through
    /// [`Agent::handle_upnp_mapping`] (the client waits for it before saying no
    /// protocol gave a mapping).
    pub upnp: bool,
    /// Fall back to TCP (same address as `server`), then TLS (`server_tls`), when
    /// the gateway answers nothing over UDP for `transport_wait`; UDP is retried in
    /// the background. On by default (`gateway peer --udp-only` turns it off).
    pub transport_fallback: bool,
    /// The gateway's TURN-over-TLS endpoint (`turns:`, typically port 443), tried
    /// after TCP; `None`: no TLS fallback. The driver verifies the certificate.
    pub server_tls: Option<SocketAddr>,
    /// How long a transport may stay unanswered before the next one is tried.
    pub transport_wait: Duration,
    /// While on TCP or TLS, how often UDP is tried again in the background.
    pub udp_retry_interval: Duration,
}

impl AgentConfig {
    /// Defaults for everything but the server and the credentials.
    pub fn new(server: SocketAddr, credentials: PeerCredentials) -> Self {
        Self {
            server,
            fallback_servers: Vec::new(),
            heartbeat: Duration::from_secs(1),
            failover_after: Duration::from_millis(2_500),
            credentials,
            host_candidates: Vec::new(),
            nat: NatClass::Unknown,
            discovery: Vec::new(),
            discover: true,
            filtering: false,
            prediction_window: 6,
            keepalive: Duration::from_secs(15),
            probe_interval: Duration::from_millis(50),
            open_ttl: 2,
            open_lead: Duration::from_millis(10),
            probe_budget: 200,
            punch_timeout: Duration::from_secs(5),
            path_keepalive: Duration::from_secs(2),
            path_timeout: Duration::from_secs(8),
            relay: true,
            relay_timeout: Duration::from_secs(10),
            upgrade_interval: Duration::from_secs(30),
            birthday_sockets: 256,
            birthday_probes: 2048,
            birthday_rate: 1000,
            birthday_after: None,
            tcp_candidates: Vec::new(),
            port_mapping: None,
            tcp_port_mapping: None,
            upnp: false,
            transport_fallback: true,
            server_tls: None,
            transport_wait: Duration::from_secs(3),
            udp_retry_interval: Duration::from_secs(30),
        }
    }

    /// This config with `servers` as its gateway nodes, in failover order: the first
    /// becomes `server`, the rest `fallback_servers` (unchanged when `servers` is
    /// empty), so a caller with a list of nodes need not split it.
    #[must_use]
    pub fn with_servers(mut self, servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut servers = servers.into_iter();
        if let Some(first) = servers.next() {
            self.server = first;
            self.fallback_servers = servers.collect();
        }
        self
    }

    /// Every gateway node, in failover order: `server`, then `fallback_servers`, each
    /// address once (a repeated one keeps its first place).
    pub fn servers(&self) -> Vec<SocketAddr> {
        let mut servers = vec![self.server];
        for &server in &self.fallback_servers {
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
        servers
    }
}

/// What happened, for the driver's status output and for library users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// The gateway confirmed the registration; `mapped` is our public endpoint.
    /// Announced on the first registration, when the public endpoint moves, and on
    /// the first registration with a new node after [`AgentEvent::ServerChanged`].
    Registered {
        /// The server-reflexive address.
        mapped: SocketAddr,
    },
    /// Discovery classified this peer's NAT mapping and filtering.
    NatClassified {
        /// The mapping class, as reported to the gateway from now on.
        class: NatClass,
        /// The filtering class (RFC 5780 CHANGE-REQUEST tests; not sent to the gateway).
        filtering: FilteringClass,
        /// Whether the NAT kept the local port.
        port_preserved: bool,
    },
    /// The gateway (or its relay) refused a request. Said once per refusal; the
    /// retries behind it back off (see `NextStep`), so a driver printing every one
    /// never prints several a second.
    Refused {
        /// The method refused (rendezvous or TURN; [`method_name`] names it).
        method: u16,
        /// The STUN error code.
        code: u16,
        /// What the code means for this agent, in words ([`refusal_reason`]).
        reason: &'static str,
        /// What the agent does next; [`NextStep::Stop`]: it has stopped.
        next: NextStep,
    },
    /// The gateway has answered nothing for `silent` (only with a single server:
    /// with several, [`AgentEvent::ServerChanged`] says it). Said after
    /// `refusal::NO_ANSWER_AFTER`, then each time the silence doubles; the Register
    /// keeps going with backoff.
    NoAnswer {
        /// The server.
        server: SocketAddr,
        /// How long since the first request it did not answer.
        silent: Duration,
        /// When the next Register goes, from now.
        retry_in: Duration,
    },
    /// An introduction arrived; probing starts after its delay.
    Introduced {
        /// The other side.
        peer_id: String,
        /// Our role.
        role: Role,
    },
    /// An introduction arrived and TCP punching is on: the driver runs its TCP
    /// attempt (see `super::tcp_punch`) from `start_at`.
    TcpIntroduced {
        /// The other side.
        peer_id: String,
        /// The introduction (outcome reports name it).
        intro_id: u64,
        /// The other side's TCP candidates (empty: it announced none).
        candidates: Vec<SocketAddr>,
        /// The scheduled start, the same instant as the UDP probes'.
        start_at: Instant,
    },
    /// The other side of an introduction sent, through the gateway, the initial
    /// sequence number of its low-TTL SYN (TCP technique 3).
    TcpSeq {
        /// The other side.
        peer_id: String,
        /// The introduction.
        intro_id: u64,
        /// The initial sequence number of its SYN.
        isn: u32,
        /// The endpoint of ours it sent that SYN to, if it said.
        expected: Option<SocketAddr>,
    },
    /// The gateway refused our TCP-Seq for an introduction (e.g.
    /// [`super::rendezvous::TCP_FORGE_DISABLED`]: it does not forge SYN-ACKs); a
    /// technique waiting on it can give up at once.
    TcpSeqRefused {
        /// The introduction.
        intro_id: u64,
        /// The error code.
        code: u16,
    },
    /// A path works both ways: direct (punched), or through the relay. A relayed
    /// path that gets upgraded to a direct one is announced again.
    PathUp {
        /// The other side.
        peer_id: String,
        /// Its address as seen from here (through the relay: the address the relay
        /// sees it at, or the other side's relayed address).
        remote: SocketAddr,
        /// Whether the path goes through the TURN relay.
        relayed: bool,
        /// From introduction to the first valid probe response.
        elapsed: Duration,
        /// Probes sent.
        probes: u32,
        /// Round trip of the probe that proved the path.
        rtt: Duration,
    },
    /// Birthday punching starts: the other side's NAT picks a random port per
    /// destination (or ours does), so one side opens many mappings and the other
    /// probes many random ports until one pair meets.
    Birthday {
        /// The other side.
        peer_id: String,
        /// Which half this side plays.
        role: BirthdayRole,
        /// Extra sockets (role `Sockets`) or probes (role `Probes`) at most.
        budget: u32,
        /// How long after the aligned start this half began (see
        /// [`AgentConfig::birthday_after`]), for the logs that time it.
        after: Duration,
    },
    /// The relay fallback starts (punching failed or cannot work).
    RelayFallback {
        /// The other side.
        peer_id: String,
    },
    /// Our TURN allocation exists (we relay for the sessions that need it).
    RelayAllocated {
        /// The relayed address the other side sends to.
        relayed: SocketAddr,
    },
    /// Punching gave up.
    PunchFailed {
        /// The other side.
        peer_id: String,
        /// Probes sent.
        probes: u32,
    },
    /// The agent moved to another gateway node (the current one fell silent) and
    /// registers there at once; a [`AgentEvent::Registered`] follows once it answers.
    ServerChanged {
        /// The node given up.
        from: SocketAddr,
        /// The node now used (the next in [`AgentConfig::servers`], round-robin).
        to: SocketAddr,
        /// Why.
        reason: ServerChangeReason,
    },
    /// The agent speaks to the gateway over another transport now (UDP, TCP or
    /// TLS) and registers over it at once; a [`AgentEvent::Registered`] follows once
    /// it answers.
    TransportChanged {
        /// The gateway node (its UDP and TCP address).
        server: SocketAddr,
        /// The transport given up.
        from: Transport,
        /// The transport used from now on.
        to: Transport,
        /// Where messages go over it (the TLS endpoint for TLS).
        to_addr: SocketAddr,
        /// Why.
        reason: TransportChangeReason,
    },
    /// An established path went silent.
    PathDown {
        /// The other side.
        peer_id: String,
    },
    /// The port-mapping client reported: a mapping granted, refreshed or lost, none
    /// available (each protocol's outcome), or the mapping deleted at close.
    PortMapping(PortMapEvent),
    /// The same for the TCP mapping of the TCP punching port
    /// (`AgentConfig::tcp_port_mapping`); its `Closed` comes separately at close.
    TcpPortMapping(PortMapEvent),
    /// The gateway checked our mapped candidate `external` (a probe to it, answered
    /// through our socket): `verified`, introductions carry it; otherwise it did
    /// not reach us there, and we no longer announce it.
    MappedCandidate {
        /// The mapping's external endpoint.
        external: SocketAddr,
        /// Whether the gateway's probe got through.
        verified: bool,
    },
    /// Application data from a peer.
    Data {
        /// The sender.
        peer_id: String,
        /// The payload, without the marker byte.
        payload: Vec<u8>,
    },
}

/// A request to the gateway awaiting its answer, kept to act on the answer (or to
/// resend it with a fresh nonce).
#[derive(Debug)]
struct PendingRequest {
    method: u16,
    sent_at: Instant,
    target: Option<String>,
    /// For an outcome report: what it reported, to resend with a fresh nonce.
    report: Option<Report>,
    /// For a TCP-Seq: what it said, to resend once with a fresh nonce.
    tcp_seq: Option<TcpSeqRequest>,
}

impl PendingRequest {
    /// A request of `method` sent at `sent_at`, with nothing to resend.
    fn new(method: u16, sent_at: Instant) -> Self {
        Self {
            method,
            sent_at,
            target: None,
            report: None,
            tcp_seq: None,
        }
    }
}

/// The peer agent: one per punch socket, driven by the caller's I/O loop, so the
/// punching logic runs (and is tested) without sockets or clocks.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    rng: StdRng,
    next_register: Instant,
    /// Wait before resending an unanswered Register (doubles up to the keepalive).
    register_retry: Duration,
    /// The gateway's latest nonce (every authenticated answer brings a fresh one).
    nonce: Option<String>,
    rtt_ms: u32,
    pending: HashMap<[u8; 12], PendingRequest>,
    /// Our outstanding probes: transaction → (introduction, when sent).
    probe_tids: HashMap<[u8; 12], (u64, Instant)>,
    sessions: HashMap<u64, Session>,
    wanted: HashMap<String, Instant>,
    outgoing: VecDeque<Transmit>,
    events: VecDeque<AgentEvent>,
    discovery: Discovery,
    /// Our TURN allocation on the gateway, made on the first fallback.
    turn: TurnAllocation,
    /// When discovery classified our NAT, and whether a Register sent since then (so
    /// carrying the class and any predicted ports) was answered: connects wait for
    /// that, or a lost Register would leave introductions with a stale class.
    classified_at: Option<Instant>,
    class_registered: bool,
    /// The extra sockets of birthday punching: numbering and release.
    sockets: ExtraSockets,
    /// The gateway nodes, the current one, its liveness and the heartbeat.
    servers: Servers,
    /// The transport toward the gateway (UDP, TCP, TLS) and the UDP retry.
    link: ServerLink,
    /// Unauthenticated 401 answers in a row (wrong credentials; see
    /// `refusal::FATAL_CREDENTIAL_REFUSALS`).
    credential_refusals: u32,
    /// Wrong credentials: the agent sends nothing more and has no timers.
    stopped: bool,
    /// Per wanted peer, the wait before the next attempt after a 404 or a failed
    /// attempt (doubling; back to the start once a path is up).
    connect_retry: HashMap<String, Duration>,
    /// Peers whose address the relay refused (said once).
    relay_denied: HashSet<String>,
    /// Since when the current server has answered nothing (None: it answered last),
    /// and when to say so next.
    unanswered_since: Option<Instant>,
    silence_report_at: Option<Instant>,
    /// The discovery endpoints the first server named in its first Register answer.
    advertised_discovery: Vec<SocketAddr>,
    /// Whether any Register was answered (until then, with `discover` on, connects
    /// wait: the answer may name discovery endpoints).
    registered_once: bool,
    /// The port-mapping client (with `AgentConfig::port_mapping`).
    portmap: Option<PortMapClient>,
    /// The external endpoint of the mapping held now, announced in Register.
    mapped: Option<SocketAddr>,
    /// Until when connects wait for the router's first answer (`None`: it came, or
    /// the wait is over, or no port mapping).
    portmap_hold: Option<Instant>,
    /// The gateway's check of our mapped candidate (`port_mapping.rs`).
    mapped_check: port_mapping::MappedCheckState,
    /// The TCP port-mapping client (with `AgentConfig::tcp_port_mapping`).
    tcp_portmap: Option<PortMapClient>,
    /// The external endpoint of the TCP mapping held now, announced in Register.
    tcp_mapped: Option<SocketAddr>,
    /// Until when connects wait for the router's first answer to the TCP client.
    tcp_portmap_hold: Option<Instant>,
}

/// First retransmission of an unanswered Register (RFC 8489's RTO default).
const FIRST_REGISTER_RETRY: Duration = Duration::from_millis(500);

use self::refusal::{CONNECT_RETRY, FATAL_CREDENTIAL_REFUSALS, NO_ANSWER_AFTER};
const MAX_PROBE_TIDS: usize = 16_384;

impl Agent {
    /// Creates an agent that registers at once.
    pub fn new(config: AgentConfig, now: Instant, seed: u64) -> Self {
        let mut agent = Self {
            servers: Servers::new(&config, now),
            link: ServerLink::new(now),
            config,
            rng: StdRng::seed_from_u64(seed),
            next_register: now,
            register_retry: FIRST_REGISTER_RETRY,
            nonce: None,
            rtt_ms: 0,
            pending: HashMap::new(),
            probe_tids: HashMap::new(),
            sessions: HashMap::new(),
            wanted: HashMap::new(),
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            discovery: Discovery::default(),
            turn: TurnAllocation::default(),
            classified_at: None,
            class_registered: false,
            sockets: ExtraSockets::new(),
            credential_refusals: 0,
            stopped: false,
            connect_retry: HashMap::new(),
            relay_denied: HashSet::new(),
            unanswered_since: None,
            silence_report_at: None,
            advertised_discovery: Vec::new(),
            registered_once: false,
            portmap: None,
            mapped: None,
            portmap_hold: None,
            mapped_check: port_mapping::MappedCheckState::default(),
            tcp_portmap: None,
            tcp_mapped: None,
            tcp_portmap_hold: None,
        };
        agent.start_port_mapping(now);
        agent
    }

    /// The endpoints discovery tests the mapping with: the configured ones, else
    /// (with `discover` on) those the gateway named.
    pub(super) fn discovery_endpoints(&self) -> &[SocketAddr] {
        if !self.config.discovery.is_empty() {
            &self.config.discovery
        } else if self.config.discover {
            &self.advertised_discovery
        } else {
            &[]
        }
    }

    /// Whether the agent has stopped for good (the gateway refused its credentials):
    /// it sends nothing more, has no timers, and its driver should end.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The next wait before asking for `peer` again, and the one after it (doubled,
    /// at most `cap`).
    fn back_off_peer(&mut self, now: Instant, peer: &str, cap: Duration) -> Duration {
        let wait = self
            .connect_retry
            .get(peer)
            .copied()
            .unwrap_or(CONNECT_RETRY);
        if let Some(at) = self.wanted.get_mut(peer) {
            *at = (*at).max(now + wait);
            self.connect_retry
                .insert(peer.to_owned(), refusal::next_connect_retry(wait, cap));
        }
        wait
    }

    /// A path to `peer` is up: its next failure starts the backoff afresh.
    fn path_came_up(&mut self, peer: &str) {
        self.connect_retry.remove(peer);
        self.relay_denied.remove(peer);
    }

    /// Says once (per silence, then each time it doubles) that the single server
    /// answers nothing.
    fn silence_timeout(&mut self, now: Instant) {
        let (Some(since), Some(at)) = (self.unanswered_since, self.silence_report_at) else {
            return;
        };
        if now < at || !self.config.fallback_servers.is_empty() {
            return;
        }
        let silent = now.saturating_duration_since(since);
        self.silence_report_at = Some(now + silent.max(NO_ANSWER_AFTER));
        self.events.push_back(AgentEvent::NoAnswer {
            server: self.servers.current(),
            silent,
            retry_in: self.next_register.saturating_duration_since(now),
        });
    }

    /// Asks the gateway to introduce us to `peer_id`, and keeps asking (re-punching)
    /// whenever no path to it is up.
    pub fn connect(&mut self, peer_id: &str, now: Instant) {
        if self.stopped {
            return;
        }
        self.wanted.insert(peer_id.to_owned(), now);
    }

    /// The established path to `peer_id`, if any.
    pub fn path(&self, peer_id: &str) -> Option<SocketAddr> {
        self.up_session(peer_id).and_then(|s| s.path)
    }

    /// Whether the established path to `peer_id` goes through the relay.
    pub fn path_relayed(&self, peer_id: &str) -> Option<bool> {
        self.up_session(peer_id).map(|s| s.path_relayed)
    }

    /// The configuration it runs with (tests rebuild agents from it).
    #[cfg(test)]
    pub(crate) fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The gateway node the agent uses now (`AgentConfig::server` until a failover).
    pub fn current_server(&self) -> SocketAddr {
        self.servers.current()
    }

    /// Our TURN relayed address, once allocated.
    pub fn relayed_address(&self) -> Option<SocketAddr> {
        self.turn.relayed_address()
    }

    /// Round trip on the established path to `peer_id` (from keepalive probes).
    pub fn path_rtt(&self, peer_id: &str) -> Option<Duration> {
        self.up_session(peer_id).map(|s| s.rtt)
    }

    /// Queues application data for `peer_id`; false when no path is up.
    pub fn send_data(&mut self, peer_id: &str, payload: &[u8]) -> bool {
        let Some(session) = self.up_session(peer_id) else {
            return false;
        };
        let Some(path) = session.path else {
            return false;
        };
        let via_turn = session.path_relayed && matches!(session.relay, RelayLeg::Local { .. });
        let socket = session.path_socket;
        let mut datagram = Vec::with_capacity(payload.len() + 1);
        datagram.push(DATA_MARKER);
        datagram.extend_from_slice(payload);
        self.emit_on(socket, path, datagram, None, via_turn);
        true
    }

    /// Queues a datagram to a peer from one of our sockets (plain), or through our
    /// TURN allocation (always from our own socket).
    fn emit_on(
        &mut self,
        socket: u32,
        to: SocketAddr,
        payload: Vec<u8>,
        ttl: Option<u8>,
        via_turn: bool,
    ) {
        if !via_turn {
            self.outgoing
                .push_back(Transmit::udp(to, payload).on_socket(socket).with_ttl(ttl));
            return;
        }
        if let Some(wrapped) = self.turn.wrap(to, &payload) {
            self.send_to_server(wrapped);
        }
    }

    /// Queues a message to the gateway's service endpoint: from our own socket over
    /// UDP, or framed on the stream in use (see `transport`).
    fn send_to_server(&mut self, payload: Vec<u8>) {
        let (to, transport) = self.server_endpoint();
        self.outgoing
            .push_back(Transmit::udp(to, payload).over(transport));
    }

    /// The next datagram to send. Its `socket` is 0 for the agent's own socket; any
    /// other number names an extra socket (birthday punching) that the driver opens on
    /// first use, bound to the same address with an ephemeral port, and closes when
    /// [`Self::poll_released_socket`] says so.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outgoing.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// The next extra socket the driver may close (its attempt is over, or its path
    /// moved elsewhere).
    pub fn poll_released_socket(&mut self) -> Option<u32> {
        self.sockets.poll_released()
    }

    /// When [`Self::handle_timeout`] must next run (`None`: no timer is pending): the
    /// earliest deadline of the registration, the connect retries and the
    /// sub-machines.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let portmap = earliest(
            [&self.portmap, &self.tcp_portmap]
                .into_iter()
                .map(|c| c.as_ref().and_then(PortMapClient::poll_timeout)),
        );
        if self.stopped {
            return portmap;
        }
        earliest(
            [
                portmap,
                self.portmap_hold,
                self.tcp_portmap_hold,
                self.mapped_check.hold,
                Some(self.next_register),
                self.next_connect(),
                self.discovery.next_timeout(),
                self.turn.next_timeout(),
                self.servers.next_timeout(&self.config),
                self.transport_next_timeout(),
                self.silence_report_at,
            ]
            .into_iter()
            .chain(self.sessions.values().map(|s| s.next_timeout(&self.config))),
        )
    }

    /// A fresh STUN transaction id.
    fn tid(&mut self) -> [u8; 12] {
        self.rng.random()
    }

    fn send_register(&mut self, now: Instant) {
        let tid = self.tid();
        // TCP candidates first: the Register's cap must not drop them; the mapped
        // one next, so the introduction's cap keeps it before the host candidates.
        let candidates: Vec<Candidate> = self
            .config
            .tcp_candidates
            .iter()
            .map(|&addr| Candidate {
                kind: CandidateKind::TcpServerReflexive,
                addr,
            })
            .chain(self.tcp_mapped.map(|addr| Candidate {
                kind: CandidateKind::TcpMapped,
                addr,
            }))
            .chain(self.announced_mapped().map(|addr| Candidate {
                kind: CandidateKind::Mapped,
                addr,
            }))
            .chain(self.config.host_candidates.iter().map(|&addr| Candidate {
                kind: CandidateKind::Host,
                addr,
            }))
            .chain(self.discovery.predicted.iter().map(|&addr| Candidate {
                kind: CandidateKind::Predicted,
                addr,
            }))
            .collect();
        let payload = client::register_with_candidates(
            tid,
            &self.config.credentials,
            self.nonce.as_deref(),
            &candidates,
            self.config.nat,
            self.rtt_ms,
        );
        self.pending
            .insert(tid, PendingRequest::new(method::REGISTER, now));
        self.send_to_server(payload);
        if self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
            self.silence_report_at = Some(now + NO_ANSWER_AFTER);
        }
        // Until answered, resend with backoff (a lost Register must not wait for the
        // next keepalive); the answer moves this to the keepalive schedule.
        self.next_register = now + self.register_retry.min(self.config.keepalive);
        self.register_retry = (self.register_retry * 2).min(self.config.keepalive);
    }

    /// Runs timers: keepalives, connect retries, probe rounds, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.port_mapping_timeout(now);
        if self.stopped {
            return;
        }
        self.discovery_timeout(now);
        // A failover first, so the Register below goes to the new node at once.
        self.failover_timeout(now);
        self.transport_timeout(now);
        if now >= self.next_register {
            self.send_register(now);
        }
        self.silence_timeout(now);
        self.pending
            .retain(|_, p| now.saturating_duration_since(p.sent_at) < Duration::from_secs(10));
        self.turn.handle_timeout(now);
        self.drain_turn(now);
        if !self.connects_held() {
            self.connect_due(now);
        }
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            self.session_timeout(id, now);
        }
        self.release_idle_sockets();
        // Forget failed sessions after a while so memory stays bounded.
        self.sessions.retain(|_, s| {
            s.state != SessionState::Failed
                || now.saturating_duration_since(s.start_at) < Duration::from_secs(60)
        });
        if self.probe_tids.len() > MAX_PROBE_TIDS {
            self.probe_tids.clear();
        }
    }

    /// When [`Self::connect_due`] next has something to do: the earliest retry of a
    /// wanted peer without a path (or with a relayed one due for an upgrade). A
    /// wanted peer with a direct path up has no timer (its session's path timeout
    /// brings the retry back), or the agent would be woken again and again for
    /// nothing.
    fn next_connect(&self) -> Option<Instant> {
        if self.connects_held() {
            return None;
        }
        self.wanted
            .iter()
            .filter_map(|(peer, &at)| match self.up_session(peer) {
                None => Some(at),
                Some(s) if s.path_relayed => Some(at.max(s.upgrade_at)),
                Some(_) => None,
            })
            .min()
    }

    /// Whether connects wait: until discovery has classified our NAT (so the
    /// introduction, and the gateway's metrics, carry the right class), and after a
    /// failover until the new node confirmed our Register (it would refuse a Connect
    /// from a peer it does not know).
    fn connects_held(&self) -> bool {
        let classified = self.discovery.done && self.class_registered;
        let learning = self.config.discover && !self.registered_once;
        let discovering = (learning || !self.discovery_endpoints().is_empty()) && !classified;
        discovering
            || self.servers.awaiting_registration
            || self.portmap_hold.is_some()
            || self.tcp_portmap_hold.is_some()
            || self.mapped_check.hold.is_some()
    }

    /// Asks for an introduction to every wanted peer that is due: no path is up, or
    /// (upgrade) the path is relayed and due for another try at a direct one.
    fn connect_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .wanted
            .iter()
            .filter(|(peer, at)| {
                **at <= now
                    && self
                        .up_session(peer)
                        .is_none_or(|s| s.path_relayed && now >= s.upgrade_at)
            })
            .map(|(peer, _)| peer.clone())
            .collect();
        for peer in &due {
            let interval = self.config.upgrade_interval;
            if let Some(session) = self
                .sessions
                .values_mut()
                .filter(|s| s.peer_id == *peer && s.state == SessionState::Up)
                .max_by_key(|s| s.introduced_at)
            {
                session.upgrade_at = now + interval;
            }
        }
        for peer in due {
            let probing = self.sessions.values().any(|s| {
                s.peer_id == peer
                    && (matches!(s.state, SessionState::Waiting | SessionState::Probing)
                        // A relay leg waits, unless the other side never answered at
                        // all: then it likely lost the introduction, so ask again.
                        || (s.state == SessionState::Relaying && s.last_heard > s.introduced_at))
            });
            if !probing {
                let tid = self.tid();
                let payload =
                    client::connect(tid, &self.config.credentials, self.nonce.as_deref(), &peer);
                self.pending.insert(
                    tid,
                    PendingRequest {
                        target: Some(peer.clone()),
                        ..PendingRequest::new(method::CONNECT, now)
                    },
                );
                self.send_to_server(payload);
            }
            self.wanted.insert(peer, now + CONNECT_RETRY);
        }
    }

    /// Handles one datagram received on the agent's own socket.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if self.port_mapping_datagram(now, from, datagram) {
            return;
        }
        if self.stopped {
            return;
        }
        if from == self.servers.current() {
            // Over UDP: on a stream, this is the background retry getting through.
            self.heard_over(now, Transport::Udp);
            self.unanswered_since = None;
            self.silence_report_at = None;
        }
        if self.servers.heard(now, from) == FromServer::Former {
            // A node we left (it may be back): not ours any more, and not a peer.
            return;
        }
        if self.turn.server() == Some((from, Transport::Udp))
            && self.turn.is_turn_datagram(datagram)
        {
            self.handle_turn_datagram(now, from, datagram);
        } else {
            self.handle_peer_datagram(now, 0, from, datagram, false);
        }
        self.release_idle_sockets();
    }

    /// Handles one datagram received on socket `socket` (0: the agent's own; other
    /// numbers: the extra sockets of [`Transmit::socket`], which carry only peer
    /// probes and data).
    pub fn handle_datagram_on(
        &mut self,
        now: Instant,
        socket: u32,
        from: SocketAddr,
        datagram: &[u8],
    ) {
        if socket == 0 {
            self.handle_datagram(now, from, datagram);
            return;
        }
        let ours = self
            .sessions
            .values()
            .any(|s| s.birthday.sockets.contains(&socket));
        if ours && !self.servers.contains(from) {
            self.handle_peer_datagram(now, socket, from, datagram, false);
            self.release_idle_sockets();
        }
    }

    /// A datagram from a peer, directly or (`via_turn`) through our allocation, or
    /// from the gateway: data, discovery answers, the gateway's messages, probes.
    fn handle_peer_datagram(
        &mut self,
        now: Instant,
        socket: u32,
        from: SocketAddr,
        datagram: &[u8],
        via_turn: bool,
    ) {
        if datagram.first() == Some(&DATA_MARKER) {
            self.handle_data(now, socket, from, datagram, via_turn);
            return;
        }
        let Ok(message) = Message::parse(datagram) else {
            return;
        };
        let ty = message.message_type();
        if ty.method == method::MAPPED_CHECK && ty.class == Class::Indication {
            // Signed for us by the gateway: its probe (from wherever) or verdict.
            if socket == 0 && !via_turn {
                self.mapped_check_indication(now, datagram);
            }
            return;
        }
        if ty.method == stun::method::BINDING
            && !via_turn
            && self.filter_response(now, from, &message, datagram)
        {
            return;
        }
        if from == self.servers.current() && !via_turn {
            if socket == 0 {
                self.handle_server_message(now, &message, datagram);
            }
            return;
        }
        if self.mapping_response(now, from, &message, datagram) {
            return;
        }
        if ty.method == stun::method::BINDING {
            self.handle_peer_message(now, socket, from, &message, datagram, via_turn);
        }
    }

    fn handle_server_message(&mut self, now: Instant, message: &Message<'_>, datagram: &[u8]) {
        let ty = message.message_type();
        if ty.method == method::RELAY_OFFER && ty.class == Class::Indication {
            if let Some(offer) =
                client::parse_relay_offer(datagram, &self.config.credentials.password)
            {
                self.relay_offered(now, offer);
            }
            return;
        }
        if ty.method == method::TCP_SEQ && ty.class == Class::Indication {
            if let Some(seq) = client::parse_tcp_seq(datagram, &self.config.credentials.password) {
                self.tcp_seq_received(seq);
            }
            return;
        }
        if ty.method == method::INTRODUCTION && ty.class == Class::Indication {
            if let Some(intro) =
                client::parse_introduction(datagram, &self.config.credentials.password)
            {
                self.introduced(now, intro);
            }
            return;
        }
        let Some(response) = client::parse_response(datagram, &self.config.credentials.password)
        else {
            return;
        };
        let Some(request) = self.pending.remove(&response.transaction_id) else {
            return;
        };
        if response.nonce.is_some() || response.result.is_ok() {
            // Authenticated: our credentials are good.
            self.credential_refusals = 0;
        }
        if let Some(nonce) = response.nonce {
            let fresh_challenge = matches!(response.result, Err(401 | 438));
            self.nonce = Some(nonce);
            if fresh_challenge {
                // Not a refusal: the gateway wants its nonce echoed. Resend now.
                match request.method {
                    method::REGISTER => {
                        // The challenge's round trip is a measurement too: the
                        // Register that answers it carries it, so the gateway aligns
                        // this peer's first introductions on its real RTT (not 0
                        // until the first keepalive).
                        self.rtt_ms = round_trip_ms(now, request.sent_at);
                        self.send_register(now)
                    }
                    method::CONNECT => {
                        if let Some(target) = request.target {
                            self.wanted.insert(target, now);
                        }
                    }
                    method::TCP_SEQ => self.resend_tcp_seq(now, request.tcp_seq),
                    method::OUTCOME => self.resend_report(now, request.report),
                    _ => {}
                }
                return;
            }
        }
        match response.result {
            Ok(()) if request.method == method::REGISTER => {
                self.rtt_ms = round_trip_ms(now, request.sent_at);
                let interval = match response.lifetime {
                    Some(lifetime) => self.config.keepalive.min(lifetime / 3),
                    None => self.config.keepalive,
                };
                self.register_retry = FIRST_REGISTER_RETRY;
                if std::mem::take(&mut self.servers.awaiting_registration) {
                    // Registered with the new node: ask for every wanted peer there.
                    for at in self.wanted.values_mut() {
                        *at = now;
                    }
                }
                if self
                    .classified_at
                    .is_some_and(|classified| request.sent_at >= classified)
                {
                    self.class_registered = true;
                }
                // Keep an earlier deliberate re-register (e.g. after discovery).
                if self.next_register > now {
                    self.next_register = request.sent_at + interval;
                }
                if !self.registered_once
                    && self.servers.current() == self.config.server
                    && self.config.discovery.is_empty()
                {
                    // The endpoints belong to the first node; learnt once. An
                    // unspecified address is the server's (as this peer reaches it).
                    let server = self.config.server;
                    self.advertised_discovery = response
                        .discovery
                        .into_iter()
                        .filter(|e| e.is_ipv4() == server.is_ipv4())
                        .map(|e| {
                            if e.ip().is_unspecified() {
                                SocketAddr::new(server.ip(), e.port())
                            } else {
                                e
                            }
                        })
                        .filter(|&e| e != server)
                        .collect();
                }
                self.registered_once = true;
                if let Some(mapped) = response.mapped {
                    self.registered(now, mapped);
                }
            }
            Ok(()) if request.method == method::MAPPED_CHECK => self.mapped_verified(),
            Ok(()) => {}
            // A late answer to a probe already settled (or replaced): its verdict
            // comes on its own.
            Err(_) if request.method == method::MAPPED_CHECK => {}
            Err(code) => self.refused(now, request, code),
        }
    }

    /// An error answer from the gateway to `request`: act on it (register again,
    /// back off, or stop for good) and say so once.
    fn refused(&mut self, now: Instant, request: PendingRequest, code: u16) {
        let next = match code {
            401 => {
                // Unauthenticated (a challenge carries a nonce we could verify, and
                // is handled before): the gateway derives another key from our
                // username. Retrying cannot help.
                // Said once, when the agent stops (the retry before is quiet).
                self.credential_refusals += 1;
                if self.credential_refusals < FATAL_CREDENTIAL_REFUSALS {
                    return;
                }
                self.stop();
                NextStep::Stop
            }
            403 => {
                // Not registered (e.g. the gateway restarted): register now.
                self.next_register = now;
                NextStep::RegisterAgain
            }
            _ => match &request.target {
                // The other side is not registered yet: keep asking, less and
                // less often (it may come any moment).
                Some(target) if code == 404 => NextStep::RetryIn(self.back_off_peer(
                    now,
                    &target.clone(),
                    refusal::MAX_UNKNOWN_PEER_RETRY,
                )),
                // Its node cannot be reached for now: the gateway's own trouble,
                // over as soon as its cluster store is back; ask again each second
                // (the status line is said once).
                Some(target) if code == CLUSTER_UNAVAILABLE => {
                    self.wanted.insert(target.clone(), now + CONNECT_RETRY);
                    NextStep::RetryIn(CONNECT_RETRY)
                }
                _ if request.method == method::REGISTER => {
                    NextStep::RetryIn(self.next_register.saturating_duration_since(now))
                }
                _ => NextStep::Continue,
            },
        };
        if let Some(seq) = request.tcp_seq {
            self.events.push_back(AgentEvent::TcpSeqRefused {
                intro_id: seq.intro_id,
                code,
            });
        }
        self.events.push_back(AgentEvent::Refused {
            method: request.method,
            code,
            reason: refusal_reason(request.method, code),
            next,
        });
    }

    /// Wrong credentials: nothing more is sent, every timer is off.
    fn stop(&mut self) {
        self.stopped = true;
        self.wanted.clear();
        self.pending.clear();
        self.outgoing.clear();
        self.unanswered_since = None;
        self.silence_report_at = None;
    }
}

/// Milliseconds from `sent_at` to `now` (a request's round trip), saturating.
fn round_trip_ms(now: Instant, sent_at: Instant) -> u32 {
    u32::try_from(now.saturating_duration_since(sent_at).as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::agents::*;

    #[test]
    fn unanswered_registers_are_resent_with_backoff() {
        let now = Instant::now();
        let creds = PeerCredentials {
            username: "1900000000:alice".into(),
            password: "pw".into(),
        };
        let mut config = AgentConfig::new(addr("192.0.2.10:3478"), creds);
        // (Over one transport: the fallback to TCP after 3 s is `transport`'s test.)
        config.transport_fallback = false;
        let mut agent = Agent::new(config, now, 1);
        let mut sent_at = Vec::new();
        for ms in (0..4_000).step_by(10) {
            let t = now + Duration::from_millis(ms);
            if agent.poll_timeout().is_some_and(|at| at <= t) {
                agent.handle_timeout(t);
            }
            while agent.poll_transmit().is_some() {
                sent_at.push(ms);
            }
        }
        // 0, 0.5 s, then 1 s later, then 2 s later: RFC 8489-style doubling.
        assert_eq!(sent_at, vec![0, 500, 1_500, 3_500]);
    }

    #[test]
    fn an_agent_with_a_path_up_sleeps_until_its_next_deadline() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_secs(3));
        assert!(sim.agents[0].1.path("bob").is_some());
        // The connect retry of a peer with a direct path up is no timer: a deadline
        // in the past would make the driver spin while the path is up.
        for (_, agent) in &sim.agents {
            let next = agent.poll_timeout().expect("keepalives");
            assert!(next > sim.now, "{:?}", sim.now.checked_duration_since(next));
        }
    }

    #[test]
    fn the_register_that_answers_the_challenge_carries_the_measured_rtt() {
        // The first Register has nothing measured (RTT 0) and is challenged (401 with
        // a nonce); the one that answers the challenge is the first the gateway
        // accepts, and the gateway aligns introductions on the RTT it carries. It
        // must be the challenge's round trip (2 x the sim's one-way latency), not 0
        // until the first keepalive.
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(300));
        let rtts: Vec<u32> = sim
            .sent
            .iter()
            .filter(|d| {
                d.agent == 0 && d.stun() == Some((method::REGISTER, crate::stun::Class::Request))
            })
            .map(|d| {
                let message = Message::parse(&d.payload).expect("a Register");
                message
                    .attributes()
                    .filter_map(Result::ok)
                    .find(|a| a.ty == crate::rendezvous::wire::attr::RTT)
                    .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
                    .map(u32::from_be_bytes)
                    .expect("every Register carries an RTT")
            })
            .collect();
        let round_trip = u32::try_from((LATENCY * 2).as_millis()).expect("ms");
        assert!(rtts.len() >= 2, "{rtts:?}");
        assert_eq!(rtts[0], 0, "nothing measured yet: {rtts:?}");
        assert!(
            rtts[1..].iter().all(|&rtt| rtt.abs_diff(round_trip) <= 1),
            "every Register after the challenge carries about {round_trip} ms: {rtts:?}"
        );
    }

    #[test]
    fn garbage_from_anyone_changes_nothing() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(50));
        let agent = &mut sim.agents[0].1;
        for bytes in [
            &b""[..],
            b"\xd7data from a stranger",
            &[0u8; 20],
            &[0xff; 100],
        ] {
            agent.handle_datagram(sim.now, addr("203.0.113.66:1"), bytes);
        }
        assert!(
            agent
                .poll_event()
                .is_none_or(|e| matches!(e, AgentEvent::Registered { .. }))
        );
        assert!(agent.sessions.is_empty());
    }
}
