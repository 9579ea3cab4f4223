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
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    binding::ChangeRequest,
    rendezvous::{
        Candidate, CandidateKind, FilteringClass, NatClass, SessionOutcome, TcpTechnique,
        client::{self, PeerCredentials, Probe, Role},
        method,
    },
    stun::{self, Class, Message, attr as stun_attr},
    turn::{
        self,
        client::{
            Client as TurnClient, ClientConfig as TurnClientConfig, Request as TurnRequest,
            TurnClientEvent as TurnEvent,
        },
    },
};

/// First byte of a data datagram on a punched path (outside STUN's 0x00..=0x3F and
/// TURN ChannelData's 0x40..=0x7F, so the three never collide).
pub const DATA_MARKER: u8 = 0xD7;

/// Tunables of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The gateway's UDP address.
    pub server: SocketAddr,
    /// This peer's credentials.
    pub credentials: PeerCredentials,
    /// Host candidates to announce (the local socket's addresses).
    pub host_candidates: Vec<SocketAddr>,
    /// The NAT class this peer believes it is behind (reported for metrics); replaced
    /// by what discovery measures when `discovery` is set.
    pub nat: NatClass,
    /// Other endpoints of the gateway answering Binding (its discovery port, its second
    /// address) used to classify this peer's NAT mapping (RFC 5780 ideas).
    pub discovery: Vec<SocketAddr>,
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
    /// How long after the scheduled start an attempt that has no path yet begins
    /// birthday punching (the cheap direct probes go first).
    pub birthday_after: Duration,
    /// This peer's TCP server-reflexive endpoints (learnt by the driver with a STUN
    /// Binding over TCP to the gateway), announced as TCP candidates. Non-empty turns
    /// TCP punching on: every introduction then also yields
    /// [`AgentEvent::TcpIntroduced`].
    pub tcp_candidates: Vec<SocketAddr>,
}

/// Most extra sockets one birthday attempt may use (file descriptors are finite).
pub const MAX_BIRTHDAY_SOCKETS: u16 = 512;
/// Most birthday probes one attempt may send.
pub const MAX_BIRTHDAY_PROBES: u32 = 8192;
/// The ports an endpoint-dependent NAT picks random mappings from (Linux's default
/// for sources above 1023, and what most NATs use).
const BIRTHDAY_PORTS: std::ops::RangeInclusive<u16> = 1024..=65_535;
/// The random-port side refreshes its extra sockets' mappings this often.
const BIRTHDAY_REFRESH: Duration = Duration::from_secs(1);

impl AgentConfig {
    /// Defaults for everything but the server and the credentials.
    pub fn new(server: SocketAddr, credentials: PeerCredentials) -> Self {
        Self {
            server,
            credentials,
            host_candidates: Vec::new(),
            nat: NatClass::Unknown,
            discovery: Vec::new(),
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
            birthday_after: Duration::from_millis(500),
            tcp_candidates: Vec::new(),
        }
    }
}

/// What happened, for the driver's status output and for library users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// The gateway confirmed the registration; `mapped` is our public endpoint.
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
    /// The gateway refused a request.
    Refused {
        /// The method refused.
        method: u16,
        /// The STUN error code.
        code: u16,
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
    /// An established path went silent.
    PathDown {
        /// The other side.
        peer_id: String,
    },
    /// Application data from a peer.
    Data {
        /// The sender.
        peer_id: String,
        /// The payload, without the marker byte.
        payload: Vec<u8>,
    },
}

/// Which half of birthday punching a side plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BirthdayRole {
    /// Behind a random-port endpoint-dependent NAT: many extra sockets, each sending
    /// toward the other side's public endpoint, so the NAT holds many mappings (each
    /// admitting that endpoint) on random ports.
    Sockets,
    /// Behind an endpoint-independent NAT (or none): probes from the one mapping to
    /// random ports of the other side's public address, until one hits a mapping.
    Probes,
}

impl BirthdayRole {
    /// Name for status lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sockets => "sockets",
            Self::Probes => "probes",
        }
    }
}

/// The birthday half this side plays for a NAT pair, if any: only when one side
/// maps address-and-port-dependently without predictable ports and the other maps
/// endpoint-independently (or not at all). Both sides compute it from the same
/// classes, so they agree.
pub fn birthday_role(
    own: NatClass,
    own_predicted: bool,
    peer: NatClass,
    peer_predicted: bool,
) -> Option<BirthdayRole> {
    let independent = |c: NatClass| matches!(c, NatClass::EndpointIndependent | NatClass::None);
    if own == NatClass::AddressAndPortDependent && !own_predicted && independent(peer) {
        Some(BirthdayRole::Sockets)
    } else if independent(own) && peer == NatClass::AddressAndPortDependent && !peer_predicted {
        Some(BirthdayRole::Probes)
    } else {
        None
    }
}

/// A datagram for the driver to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The socket to send from: 0 is the agent's own; any other number names an
    /// extra socket (birthday punching) that the driver opens on first use, bound to
    /// the same address with an ephemeral port, and closes when
    /// [`Agent::poll_released_socket`] says so.
    pub socket: u32,
    /// Destination.
    pub to: SocketAddr,
    /// Bytes.
    pub payload: Vec<u8>,
    /// IP TTL for this datagram only (the low-TTL opener); `None` = the socket's.
    pub ttl: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionState {
    Waiting,
    Probing,
    /// Punching is over without a path; only the relay leg may still find one.
    Relaying,
    Up,
    Failed,
}

/// A session's relay leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelayLeg {
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

#[derive(Debug)]
struct Session {
    /// A TCP-Seq from the other side was passed on (the gateway sends each twice).
    tcp_seq_seen: bool,
    intro_id: u64,
    peer_id: String,
    key: [u8; 16],
    candidates: Vec<SocketAddr>,
    introduced_at: Instant,
    start_at: Instant,
    next_probe: Instant,
    probes_sent: u32,
    state: SessionState,
    path: Option<SocketAddr>,
    last_heard: Instant,
    /// Round trip of the latest answered probe on the path.
    rtt: Duration,
    role: Role,
    relay: RelayLeg,
    relay_started: Option<Instant>,
    /// Peers seen through our own allocation (their addresses at the relay).
    relay_peers: Vec<SocketAddr>,
    /// Whether `path` goes through the relay (ours or theirs).
    path_relayed: bool,
    /// When a relayed path next tries to become direct.
    upgrade_at: Instant,
    /// The outcome report is sent once per session.
    reported: bool,
    /// The other side's server-reflexive endpoint, from the introduction.
    peer_reflexive: Option<SocketAddr>,
    /// Birthday punching of this attempt.
    birthday: Birthday,
    /// The socket the path uses (0: the agent's own).
    path_socket: u32,
    /// Peer-reflexive addresses learnt on extra sockets (a birthday hit), probed from
    /// that socket every round like the candidates are from ours.
    socket_candidates: Vec<(u32, SocketAddr)>,
}

/// Birthday punching state of one attempt.
#[derive(Debug, Default)]
struct Birthday {
    /// Our half, if the NAT pair calls for it.
    role: Option<BirthdayRole>,
    /// When it began.
    started: Option<Instant>,
    /// Extra sockets this attempt holds.
    sockets: Vec<u32>,
    /// Next refresh of the extra sockets' mappings (role `Sockets`), or next slice of
    /// the sweep (role `Probes`): the pace does not depend on how often timers run.
    next_refresh: Option<Instant>,
    /// Ports probed so far (role `Probes`).
    probed: HashSet<u16>,
    /// The same ports in the order probed, and how far a second pass over them got
    /// (mappings the other side opened late, e.g. on a loaded host, were passed over
    /// by the first pass).
    order: Vec<u16>,
    repeated: usize,
    /// Birthday datagrams sent.
    sent: u32,
    /// The other side's reflexive address when our own socket must probe it only with
    /// the opener's TTL (role `Sockets` toward a NAT): a full-TTL datagram from a port
    /// the other side has not sent to is dropped by a port-dependent filter anyway,
    /// and a router that accepts unsolicited packets to itself keeps a conntrack
    /// entry for it; when the sweep later reaches that port, the other NAT must give
    /// the sweep's flow another public port, and Linux NATs then reuse that port for
    /// every later flow of the socket, so the rest of the sweep misses every mapping.
    quiet_toward: Option<SocketAddr>,
}

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

/// A TCP-Seq as sent, kept to resend it once with a fresh nonce.
#[derive(Clone, Copy, Debug)]
struct TcpSeqRequest {
    intro_id: u64,
    isn: u32,
    expected: Option<SocketAddr>,
    /// Ask the gateway to forge the SYN-ACKs (technique 4) instead of forwarding.
    forge: bool,
    resent: bool,
}

/// An outcome report as sent, kept to resend it once with a fresh nonce.
#[derive(Clone, Copy, Debug)]
struct Report {
    intro_id: u64,
    /// Set for a TCP punching report.
    technique: Option<TcpTechnique>,
    outcome: SessionOutcome,
    elapsed: Duration,
    probes: u32,
    resent: bool,
}

/// The agent.
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
    turn: Option<TurnClient>,
    /// When our allocation last failed: no fallback is tried for a minute after.
    turn_failed_at: Option<Instant>,
    /// When discovery classified our NAT, and whether a Register sent since then (so
    /// carrying the class and any predicted ports) was answered: connects wait for
    /// that, or a lost Register would leave introductions with a stale class.
    classified_at: Option<Instant>,
    class_registered: bool,
    /// Next extra socket number (birthday punching).
    next_socket: u32,
    /// Extra sockets the driver may close.
    released_sockets: VecDeque<u32>,
}

/// State of NAT mapping discovery.
#[derive(Debug, Default)]
struct Discovery {
    primary: Option<SocketAddr>,
    /// Transaction → (gateway endpoint, order sent).
    pending: HashMap<[u8; 12], (SocketAddr, usize)>,
    /// (order sent, gateway endpoint, seen as).
    results: Vec<(usize, SocketAddr, SocketAddr)>,
    /// Predicted next public endpoints (sequential port allocation).
    predicted: Vec<SocketAddr>,
    sent_at: Option<Instant>,
    done: bool,
    /// How many times the unanswered mapping tests were sent again.
    mapping_resends: u32,
    /// The filtering tests, run before the mapping tests: their answers must meet a
    /// NAT that has seen this socket talk to nothing but the gateway's service port
    /// (a Binding to a discovery endpoint would open the very filter under test).
    filter: FilterTests,
}

/// State of the RFC 5780 filtering tests.
#[derive(Debug, Default)]
struct FilterTests {
    /// Change port, then change IP and port: (transaction, outcome so far).
    tests: [([u8; 12], Option<FilterTest>); 2],
    started: Option<Instant>,
    transmissions: u32,
    done: bool,
    class: FilteringClass,
}

/// How long discovery waits for answers before classifying with what it has.
const DISCOVERY_WAIT: Duration = Duration::from_secs(1);
/// Unanswered mapping tests are sent again this long after the last sending...
const MAPPING_RESEND_AFTER: Duration = Duration::from_millis(250);
/// ...this many times (within `DISCOVERY_WAIT`).
const MAPPING_RESENDS: u32 = 2;
/// How long the filtering tests wait for answers from the other endpoints.
const FILTER_WAIT: Duration = Duration::from_secs(1);
/// Transmissions of each unanswered filtering test (spread over [`FILTER_WAIT`]).
const FILTER_TRANSMISSIONS: u32 = 3;

/// What came of one RFC 5780 filtering test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterTest {
    /// The answer from the other endpoint got through.
    Answered,
    /// Nothing got through in time.
    Unanswered,
    /// The gateway cannot serve this change (420) or refused the request.
    Unsupported,
}

/// Classifies a NAT's filtering behaviour (RFC 4787 §5, tests of RFC 5780 §4.4) from
/// the two CHANGE-REQUEST tests sent to the gateway's service endpoint: an answer
/// from another port of the same address (`change_port`) and from another address
/// and port (`change_address`). Where a test could not run and the other leaves two
/// classes possible, the stricter is assumed (what punching must plan for).
pub fn classify_filtering(change_port: FilterTest, change_address: FilterTest) -> FilteringClass {
    use FilterTest::{Answered, Unanswered, Unsupported};
    match (change_address, change_port) {
        (Answered, _) => FilteringClass::EndpointIndependent,
        // Endpoint-independent or address-dependent: the stricter.
        (Unsupported, Answered) | (Unanswered, Answered) => FilteringClass::AddressDependent,
        (Unanswered | Unsupported, Unanswered) | (Unanswered, Unsupported) => {
            FilteringClass::AddressAndPortDependent
        }
        (Unsupported, Unsupported) => FilteringClass::Unknown,
    }
}

/// Classifies a NAT's mapping behaviour from the public addresses one socket was seen
/// with: `primary` by the gateway's main endpoint `server`, and `others` as
/// (gateway endpoint, seen as) pairs. `local` is the socket's own address when known.
///
/// Another port of the same address tells endpoint-independent from
/// address-and-port-dependent; another address tells endpoint-independent from
/// address-dependent. With only another address and a change, the stricter class is
/// assumed (what punching must plan for).
pub fn classify_mapping(
    local: Option<SocketAddr>,
    server: SocketAddr,
    primary: SocketAddr,
    others: &[(SocketAddr, SocketAddr)],
) -> NatClass {
    if local == Some(primary) {
        return NatClass::None;
    }
    let mut port_test = None;
    let mut address_test = None;
    for &(endpoint, seen) in others {
        if endpoint.ip() == server.ip() && endpoint.port() != server.port() {
            port_test = Some(seen == primary);
        } else if endpoint.ip() != server.ip() {
            address_test = Some(seen == primary);
        }
    }
    match (port_test, address_test) {
        (Some(false), _) => NatClass::AddressAndPortDependent,
        (Some(true), Some(false)) => NatClass::AddressDependent,
        (None, Some(false)) => NatClass::AddressAndPortDependent,
        (Some(true), _) | (None, Some(true)) => NatClass::EndpointIndependent,
        (None, None) => NatClass::Unknown,
    }
}

/// Predicts the next public endpoints of an endpoint-dependent NAT that allocates
/// ports with a constant step: `allocated` are the public endpoints one socket got, in
/// the order its mappings were created. Returns nothing unless at least two steps were
/// seen, all equal, non-zero and at most 64.
pub fn predict_ports(allocated: &[SocketAddr], window: u16) -> Vec<SocketAddr> {
    let Some(&last) = allocated.last() else {
        return Vec::new();
    };
    if allocated.len() < 3 || allocated.iter().any(|a| a.ip() != last.ip()) {
        return Vec::new();
    }
    let steps: Vec<i32> = allocated
        .windows(2)
        .map(|w| i32::from(w[1].port().wrapping_sub(w[0].port()) as i16))
        .collect();
    let step = steps[0];
    if step == 0 || step.abs() > 64 || steps.iter().any(|&s| s != step) {
        return Vec::new();
    }
    (1..=i32::from(window))
        .filter_map(|k| {
            let port = (i32::from(last.port()) + k * step).rem_euclid(65_536);
            let port = u16::try_from(port).ok()?;
            (port >= 1024).then(|| SocketAddr::new(last.ip(), port))
        })
        .collect()
}

/// First retransmission of an unanswered Register (RFC 8489's RTO default).
const FIRST_REGISTER_RETRY: Duration = Duration::from_millis(500);

const CONNECT_RETRY: Duration = Duration::from_secs(1);
/// After a failed allocation, the relay fallback waits this long before trying again.
const RELAY_RETRY_AFTER: Duration = Duration::from_secs(60);
const MAX_PROBE_TIDS: usize = 16_384;

impl Agent {
    /// Creates an agent that registers at once.
    pub fn new(config: AgentConfig, now: Instant, seed: u64) -> Self {
        Self {
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
            turn: None,
            turn_failed_at: None,
            classified_at: None,
            class_registered: false,
            next_socket: 1,
            released_sockets: VecDeque::new(),
        }
    }

    /// Asks the gateway to introduce us to `peer_id`, and keeps asking (re-punching)
    /// whenever no path to it is up.
    pub fn connect(&mut self, peer_id: &str, now: Instant) {
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

    /// Our TURN relayed address, once allocated.
    pub fn relayed_address(&self) -> Option<SocketAddr> {
        self.turn.as_ref().and_then(TurnClient::relayed_address)
    }

    /// Round trip on the established path to `peer_id` (from keepalive probes).
    pub fn path_rtt(&self, peer_id: &str) -> Option<Duration> {
        self.up_session(peer_id).map(|s| s.rtt)
    }

    fn up_session(&self, peer_id: &str) -> Option<&Session> {
        self.sessions
            .values()
            .filter(|s| s.peer_id == peer_id && s.state == SessionState::Up)
            .max_by_key(|s| s.introduced_at)
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
            self.outgoing.push_back(Transmit {
                socket,
                to,
                payload,
                ttl,
            });
            return;
        }
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let mut wrapped = Vec::with_capacity(payload.len() + 48);
        match turn.encode_send(to, &payload, &mut wrapped) {
            Ok(_) => self.outgoing.push_back(Transmit {
                socket: 0,
                to: self.config.server,
                payload: wrapped,
                ttl: None,
            }),
            Err(e) => tracing::debug!(error = %e, %to, "cannot relay to peer"),
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outgoing.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Instant {
        let mut at = self.next_register;
        for session in self.sessions.values() {
            let t = match session.state {
                SessionState::Waiting => session.start_at,
                SessionState::Probing => session
                    .next_probe
                    .min(session.start_at + self.config.punch_timeout)
                    .min(session.birthday.next_refresh.unwrap_or(session.next_probe)),
                SessionState::Relaying => session.next_probe.min(
                    session.relay_started.unwrap_or(session.start_at) + self.config.relay_timeout,
                ),
                SessionState::Up => session
                    .next_probe
                    .min(session.last_heard + self.config.path_timeout)
                    .min(if session.path_relayed && session.role == Role::Initiator {
                        session.upgrade_at
                    } else {
                        session.last_heard + self.config.path_timeout
                    }),
                SessionState::Failed => continue,
            };
            at = at.min(t);
        }
        if let Some(t) = self.turn.as_ref().and_then(TurnClient::poll_timeout) {
            at = at.min(t);
        }
        for since in self.wanted.values() {
            at = at.min(*since);
        }
        if let (Some(sent), false) = (self.discovery.sent_at, self.discovery.done) {
            at = at.min(sent + DISCOVERY_WAIT);
            if let Some(resend) = self.mapping_resend_at() {
                at = at.min(resend);
            }
        }
        if let Some(t) = self.filter_timer() {
            at = at.min(t);
        }
        at
    }

    fn tid(&mut self) -> [u8; 12] {
        self.rng.random()
    }

    fn send_register(&mut self, now: Instant) {
        let tid = self.tid();
        // TCP candidates first: the Register's cap must not drop them.
        let candidates: Vec<Candidate> = self
            .config
            .tcp_candidates
            .iter()
            .map(|&addr| Candidate {
                kind: CandidateKind::TcpServerReflexive,
                addr,
            })
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
        self.pending.insert(
            tid,
            PendingRequest {
                method: method::REGISTER,
                sent_at: now,
                target: None,
                report: None,
                tcp_seq: None,
            },
        );
        self.outgoing.push_back(Transmit {
            socket: 0,
            to: self.config.server,
            payload,
            ttl: None,
        });
        // Until answered, resend with backoff (a lost Register must not wait for the
        // next keepalive); the answer moves this to the keepalive schedule.
        self.next_register = now + self.register_retry.min(self.config.keepalive);
        self.register_retry = (self.register_retry * 2).min(self.config.keepalive);
    }

    /// Runs timers: keepalives, connect retries, probe rounds, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.filter_timer().is_some_and(|t| now >= t) {
            self.filter_timeout(now);
        }
        if self.mapping_resend_at().is_some_and(|at| now >= at) {
            self.resend_mapping_tests();
        }
        if let (Some(sent), false) = (self.discovery.sent_at, self.discovery.done)
            && now >= sent + DISCOVERY_WAIT
        {
            self.finish_discovery(now);
        }
        if now >= self.next_register {
            self.send_register(now);
        }
        self.pending
            .retain(|_, p| now.saturating_duration_since(p.sent_at) < Duration::from_secs(10));
        // Connect only once discovery has classified our NAT, so the introduction
        // (and the gateway's metrics) carry the right class.
        let classified = self.discovery.done && self.class_registered;
        let discovering = !self.config.discovery.is_empty() && !classified;
        if let Some(turn) = self.turn.as_mut() {
            turn.handle_timeout(now);
        }
        self.drain_turn(now);
        // Connect when no path is up, or (upgrade) when the path is relayed and due
        // for another try at a direct one.
        let due: Vec<String> = self
            .wanted
            .iter()
            .filter(|(peer, at)| {
                !discovering
                    && **at <= now
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
                        method: method::CONNECT,
                        sent_at: now,
                        target: Some(peer.clone()),
                        report: None,
                        tcp_seq: None,
                    },
                );
                self.outgoing.push_back(Transmit {
                    socket: 0,
                    to: self.config.server,
                    payload,
                    ttl: None,
                });
            }
            self.wanted.insert(peer, now + CONNECT_RETRY);
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

    fn session_timeout(&mut self, id: u64, now: Instant) {
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
                        if config.relay && self.relay_usable(now) {
                            if let Some(session) = self.sessions.get_mut(&id) {
                                session.state = SessionState::Relaying;
                                session.next_probe = now;
                            }
                            self.start_relay(now, id);
                        } else {
                            if let Some(session) = self.sessions.get_mut(&id) {
                                session.state = SessionState::Failed;
                            }
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
                    let (intro_id, probes) = (
                        session.intro_id,
                        session.probes_sent + session.birthday.sent,
                    );
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

    /// Whether a relay fallback may be tried: not within a minute of a failed
    /// allocation (the gateway may have no relay, or refuse us).
    fn relay_usable(&self, now: Instant) -> bool {
        self.turn_failed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= RELAY_RETRY_AFTER)
    }

    /// Starts a session's relay leg: the initiator relays through its own allocation
    /// (made now if needed) and offers the relayed address; the responder waits for
    /// that offer.
    fn start_relay(&mut self, now: Instant, id: u64) {
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
        if session.role == Role::Responder {
            session.relay = RelayLeg::AwaitingOffer;
            return;
        }
        session.relay = RelayLeg::Local { offered: false };
        if self.turn.is_none() {
            let credentials = &self.config.credentials;
            let mut client = TurnClient::new(
                TurnClientConfig::new(
                    self.config.server,
                    credentials.username.clone(),
                    credentials.password.clone(),
                ),
                self.rng.random(),
            );
            if client.allocate(now).is_ok() {
                self.turn = Some(client);
            }
            self.drain_turn(now);
        } else {
            self.offer_relays(now);
        }
    }

    /// Once allocated: permissions for every candidate IP of the sessions relaying
    /// through us, and the offer of our relayed address to the other side.
    fn offer_relays(&mut self, now: Instant) {
        let Some(relayed) = self.turn.as_ref().and_then(TurnClient::relayed_address) else {
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
            let ips: Vec<IpAddr> = session.candidates.iter().map(SocketAddr::ip).collect();
            if let Some(turn) = self.turn.as_mut() {
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
            self.pending.insert(
                tid,
                PendingRequest {
                    method: method::RELAY_OFFER,
                    sent_at: now,
                    target: None,
                    report: None,
                    tcp_seq: None,
                },
            );
            self.outgoing.push_back(Transmit {
                socket: 0,
                to: self.config.server,
                payload,
                ttl: None,
            });
        }
        self.drain_turn(now);
    }

    /// Moves the TURN client's control datagrams out and acts on its events.
    fn drain_turn(&mut self, now: Instant) {
        let mut allocated = false;
        let mut failed = false;
        if let Some(turn) = self.turn.as_mut() {
            while let Some(transmit) = turn.poll_transmit() {
                self.outgoing.push_back(Transmit {
                    socket: 0,
                    to: transmit.to,
                    payload: transmit.payload,
                    ttl: None,
                });
            }
            while let Some(event) = turn.poll_event() {
                match event {
                    TurnEvent::Allocated { relayed, .. } => {
                        allocated = true;
                        self.events
                            .push_back(AgentEvent::RelayAllocated { relayed });
                    }
                    TurnEvent::Failed {
                        request: TurnRequest::Allocate | TurnRequest::Refresh,
                        failure,
                    } => {
                        tracing::warn!(%failure, "TURN allocation failed; no relay fallback");
                        failed = true;
                    }
                    _ => {}
                }
            }
        }
        if failed {
            self.turn = None;
            self.turn_failed_at = Some(now);
        }
        if allocated {
            self.offer_relays(now);
        }
    }

    /// One probe on the relay leg: to the other side's relayed address, or through
    /// our allocation to the peers seen there.
    fn probe_relay_leg(&mut self, now: Instant, id: u64) {
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

    /// Starts discovery: the filtering tests first, then (see
    /// [`Self::finish_filter_tests`]) the mapping tests.
    fn start_discovery(&mut self, now: Instant, primary: SocketAddr) {
        self.discovery.primary = Some(primary);
        let tests = [(self.tid(), None), (self.tid(), None)];
        self.discovery.filter.tests = tests;
        self.discovery.filter.started = Some(now);
        if self.config.filtering {
            self.send_filter_tests(None);
        } else {
            self.finish_filter_tests(now);
        }
    }

    /// Sends the filtering tests still without an outcome (or only test `only`).
    fn send_filter_tests(&mut self, only: Option<usize>) {
        if only.is_none() {
            self.discovery.filter.transmissions += 1;
        }
        for (i, (tid, outcome)) in self.discovery.filter.tests.into_iter().enumerate() {
            if outcome.is_some() || only.is_some_and(|o| o != i) {
                continue;
            }
            let change = ChangeRequest {
                change_ip: i == 1,
                change_port: true,
            };
            let payload = client::change_request(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                change,
            );
            self.outgoing.push_back(Transmit {
                socket: 0,
                to: self.config.server,
                payload,
                ttl: None,
            });
        }
    }

    /// When the filtering tests next need attention (a retransmission or the end).
    fn filter_timer(&self) -> Option<Instant> {
        let filter = &self.discovery.filter;
        let started = filter.started.filter(|_| !filter.done)?;
        let sent = filter.transmissions.min(FILTER_TRANSMISSIONS);
        Some(started + FILTER_WAIT * sent / FILTER_TRANSMISSIONS)
    }

    fn filter_timeout(&mut self, now: Instant) {
        if self.discovery.filter.transmissions < FILTER_TRANSMISSIONS {
            self.send_filter_tests(None);
        } else {
            self.finish_filter_tests(now);
        }
    }

    /// An answer to a filtering test, from the gateway (an error) or from the endpoint
    /// the test asked for. Returns false when `message` belongs to no filtering test.
    fn filter_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        message: &Message<'_>,
        datagram: &[u8],
    ) -> bool {
        let filter = &self.discovery.filter;
        let tid = message.transaction_id();
        let Some(index) = filter
            .tests
            .iter()
            .position(|(t, outcome)| *t == tid && outcome.is_none())
            .filter(|_| filter.started.is_some() && !filter.done)
        else {
            return false;
        };
        let Some(response) = client::parse_response(datagram, &self.config.credentials.password)
        else {
            return true;
        };
        let server = self.config.server;
        let outcome = match response.result {
            Ok(()) => {
                // Only an answer from the endpoint asked for tells anything.
                let other_address = from.ip() != server.ip();
                if from.port() == server.port() || other_address != (index == 1) {
                    return true;
                }
                FilterTest::Answered
            }
            Err(_) if from != server => return true,
            Err(401 | 438) if response.nonce.is_some() && response.nonce != self.nonce => {
                // A fresh nonce to echo: ask again at once.
                self.nonce = response.nonce;
                self.send_filter_tests(Some(index));
                return true;
            }
            Err(_) => FilterTest::Unsupported,
        };
        self.discovery.filter.tests[index].1 = Some(outcome);
        if self.discovery.filter.tests.iter().all(|(_, o)| o.is_some()) {
            self.finish_filter_tests(now);
        }
        true
    }

    /// Classifies the filtering, then sends the mapping tests.
    fn finish_filter_tests(&mut self, now: Instant) {
        let filter = &mut self.discovery.filter;
        filter.done = true;
        if !self.config.filtering {
            // Not asked for: the mapping tests at once, filtering unknown.
            self.send_mapping_tests(now);
            return;
        }
        let [port, address] = filter
            .tests
            .map(|(_, outcome)| outcome.unwrap_or(FilterTest::Unanswered));
        filter.class = classify_filtering(port, address);
        tracing::debug!(
            ?port,
            ?address,
            class = filter.class.as_str(),
            "NAT filtering"
        );
        self.send_mapping_tests(now);
    }

    /// When the unanswered mapping tests are next sent again (a lost Binding would
    /// otherwise leave the class unknown, or wrong).
    fn mapping_resend_at(&self) -> Option<Instant> {
        let discovery = &self.discovery;
        let sent = discovery.sent_at.filter(|_| !discovery.done)?;
        (discovery.mapping_resends < MAPPING_RESENDS && !discovery.pending.is_empty())
            .then(|| sent + MAPPING_RESEND_AFTER * (discovery.mapping_resends + 1))
    }

    /// Sends every unanswered mapping test again, with its transaction id.
    fn resend_mapping_tests(&mut self) {
        self.discovery.mapping_resends += 1;
        let pending: Vec<([u8; 12], SocketAddr)> = self
            .discovery
            .pending
            .iter()
            .map(|(tid, (endpoint, _))| (*tid, *endpoint))
            .collect();
        for (tid, endpoint) in pending {
            self.send_binding_request(tid, endpoint);
        }
    }

    /// A plain Binding request (a mapping test) from our own socket.
    fn send_binding_request(&mut self, tid: [u8; 12], to: SocketAddr) {
        let mut request = Vec::new();
        super::binding::binding_request(tid, &mut request);
        self.outgoing.push_back(Transmit {
            socket: 0,
            to,
            payload: request,
            ttl: None,
        });
    }

    fn send_mapping_tests(&mut self, now: Instant) {
        self.discovery.sent_at = Some(now);
        for (order, endpoint) in self.config.discovery.clone().into_iter().enumerate() {
            let tid = self.tid();
            self.discovery.pending.insert(tid, (endpoint, order));
            self.send_binding_request(tid, endpoint);
        }
    }

    fn finish_discovery(&mut self, now: Instant) {
        self.discovery.done = true;
        self.discovery.pending.clear();
        let Some(primary) = self.discovery.primary else {
            // Nothing classified: nothing to wait for before connecting.
            self.class_registered = true;
            return;
        };
        let local = self.config.host_candidates.first().copied();
        self.discovery.results.sort_by_key(|r| r.0);
        let seen: Vec<(SocketAddr, SocketAddr)> = self
            .discovery
            .results
            .iter()
            .map(|&(_, endpoint, seen)| (endpoint, seen))
            .collect();
        let class = classify_mapping(local, self.config.server, primary, &seen);
        if matches!(
            class,
            NatClass::AddressAndPortDependent | NatClass::AddressDependent
        ) {
            let allocated: Vec<SocketAddr> = std::iter::once(primary)
                .chain(seen.iter().map(|&(_, s)| s))
                .collect();
            self.discovery.predicted = predict_ports(&allocated, self.config.prediction_window);
            if !self.discovery.predicted.is_empty() {
                tracing::debug!(predicted = ?self.discovery.predicted, "sequential port allocation");
                self.next_register = now;
            }
        }
        tracing::debug!(?local, %primary, results = ?self.discovery.results, class = class.as_str(), "NAT discovery");
        let port_preserved = local.is_some_and(|l| l.port() == primary.port());
        self.events.push_back(AgentEvent::NatClassified {
            class,
            filtering: self.discovery.filter.class,
            port_preserved,
        });
        self.config.nat = class;
        // Tell the gateway at once, so introductions carry the class (and any
        // predicted ports); connects wait until it confirmed.
        self.next_register = now;
        self.classified_at = Some(now);
        self.class_registered = false;
    }

    fn send_probe(&mut self, now: Instant, id: u64, to: SocketAddr) {
        self.send_probe_via(now, id, to, None, false);
    }

    fn send_probe_with_ttl(&mut self, now: Instant, id: u64, to: SocketAddr, ttl: Option<u8>) {
        self.send_probe_via(now, id, to, ttl, false);
    }

    fn send_probe_via(
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
    fn send_probe_on(
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

    /// One birthday probe request (counted against the birthday budget instead).
    fn send_birthday_probe(
        &mut self,
        now: Instant,
        id: u64,
        socket: u32,
        to: SocketAddr,
        ttl: Option<u8>,
    ) {
        let tid = self.tid();
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.birthday.sent += 1;
        let payload = client::probe_request(tid, id, &session.key);
        self.probe_tids.insert(tid, (id, now));
        self.emit_on(socket, to, payload, ttl, false);
    }

    /// One step of birthday punching for a session still probing: start it once the
    /// cheap probes had their chance, then (role `Sockets`) refresh every extra
    /// socket's mapping, or (role `Probes`) send the next slice of the sweep.
    fn birthday_step(&mut self, now: Instant, id: u64) {
        let config = &self.config;
        let (sockets_budget, probes_budget, rate, after, interval, open_ttl) = (
            config.birthday_sockets.min(MAX_BIRTHDAY_SOCKETS),
            config.birthday_probes.min(MAX_BIRTHDAY_PROBES),
            config.birthday_rate.max(1),
            config.birthday_after,
            config.probe_interval,
            config.open_ttl,
        );
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let (Some(role), Some(target)) = (session.birthday.role, session.peer_reflexive) else {
            return;
        };
        // The sockets side goes first, so its mappings exist when the sweep arrives.
        let begin = match role {
            BirthdayRole::Sockets => session.start_at + after / 2,
            BirthdayRole::Probes => session.start_at + after,
        };
        if now < begin || session.state != SessionState::Probing {
            return;
        }
        if session.birthday.started.is_none() {
            session.birthday.started = Some(now);
            let budget = match role {
                BirthdayRole::Sockets => u32::from(sockets_budget),
                BirthdayRole::Probes => probes_budget,
            };
            self.events.push_back(AgentEvent::Birthday {
                peer_id: session.peer_id.clone(),
                role,
                budget,
            });
            if role == BirthdayRole::Sockets {
                let first = self.next_socket;
                self.next_socket = self.next_socket.saturating_add(u32::from(sockets_budget));
                session.birthday.sockets = (first..first + u32::from(sockets_budget)).collect();
            }
        }
        match role {
            BirthdayRole::Sockets => {
                if session.birthday.next_refresh.is_some_and(|at| now < at) {
                    return;
                }
                session.birthday.next_refresh = Some(now + BIRTHDAY_REFRESH);
                // With the opener's TTL the probes create the mappings and die before
                // the other side's NAT, which could otherwise answer them (RST, ICMP)
                // or claim the ports for itself.
                let ttl = (open_ttl > 0).then_some(open_ttl);
                for socket in session.birthday.sockets.clone() {
                    self.send_birthday_probe(now, id, socket, target, ttl);
                }
            }
            BirthdayRole::Probes => {
                if session.birthday.next_refresh.is_some_and(|at| now < at) {
                    return;
                }
                session.birthday.next_refresh = Some(now + interval);
                let per_round = u64::from(rate) * interval.as_millis().max(1) as u64 / 1000;
                let per_round = usize::try_from(per_round.max(1)).unwrap_or(usize::MAX);
                let birthday = &mut session.birthday;
                let remaining = (probes_budget as usize).saturating_sub(birthday.order.len());
                let ports: Vec<u16> = if remaining > 0 {
                    let count = per_round.min(remaining);
                    let first = birthday.order.len();
                    while birthday.order.len() < first + count {
                        let port = self.rng.random_range(BIRTHDAY_PORTS);
                        if port != target.port() && birthday.probed.insert(port) {
                            birthday.order.push(port);
                        }
                    }
                    birthday.order[first..].to_vec()
                } else {
                    // The first pass is over without a path: once more over the same
                    // ports, in the same order (at most twice the budget in all).
                    let from = birthday.repeated;
                    let to = (from + per_round).min(birthday.order.len());
                    birthday.repeated = to;
                    birthday.order[from..to].to_vec()
                };
                for port in ports {
                    self.send_birthday_probe(now, id, 0, SocketAddr::new(target.ip(), port), None);
                }
            }
        }
    }

    /// Hands back extra sockets no attempt needs any more: all of an attempt's once
    /// it is over, all but the path's once it is up.
    fn release_idle_sockets(&mut self) {
        for session in self.sessions.values_mut() {
            if session.birthday.sockets.is_empty()
                || matches!(session.state, SessionState::Waiting | SessionState::Probing)
            {
                continue;
            }
            let keep = (session.state == SessionState::Up).then_some(session.path_socket);
            for socket in session.birthday.sockets.drain(..) {
                if Some(socket) == keep {
                    continue;
                }
                self.released_sockets.push_back(socket);
            }
            if let Some(socket) = keep.filter(|&s| s != 0) {
                session.birthday.sockets.push(socket);
            }
        }
    }

    /// The next extra socket the driver may close (its attempt is over, or its path
    /// moved elsewhere).
    pub fn poll_released_socket(&mut self) -> Option<u32> {
        self.released_sockets.pop_front()
    }

    fn report(
        &mut self,
        now: Instant,
        intro_id: u64,
        outcome: SessionOutcome,
        elapsed: Duration,
        probes: u32,
    ) {
        match self.sessions.get_mut(&intro_id) {
            Some(session) if session.reported => return,
            Some(session) => session.reported = true,
            None => {}
        }
        self.send_report(
            now,
            Report {
                intro_id,
                technique: None,
                outcome,
                elapsed,
                probes,
                resent: false,
            },
        );
    }

    fn send_report(&mut self, now: Instant, report: Report) {
        let Report {
            intro_id,
            technique,
            outcome,
            elapsed,
            probes,
            ..
        } = report;
        let tid = self.tid();
        let ms = u32::try_from(elapsed.as_millis()).unwrap_or(u32::MAX);
        let payload = match technique {
            Some(technique) => client::tcp_outcome(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                intro_id,
                client::TcpReport {
                    technique,
                    connected: outcome == SessionOutcome::Direct,
                    elapsed_ms: ms,
                    attempts: probes,
                },
            ),
            None => client::outcome(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                intro_id,
                outcome,
                ms,
                probes,
            ),
        };
        // Pending only so a stale-nonce answer can resend it (once: a report is
        // not worth more than one retry); the clock starts at the last send.
        self.pending.insert(
            tid,
            PendingRequest {
                method: method::OUTCOME,
                sent_at: now,
                target: None,
                report: Some(report),
                tcp_seq: None,
            },
        );
        self.outgoing.push_back(Transmit {
            socket: 0,
            to: self.config.server,
            payload,
            ttl: None,
        });
    }

    /// Reports how a TCP punching technique did in introduction `intro_id` (the
    /// driver calls this once per technique it tried; the gateway counts the first
    /// report of each technique).
    pub fn report_tcp(
        &mut self,
        now: Instant,
        intro_id: u64,
        technique: TcpTechnique,
        connected: bool,
        elapsed: Duration,
        attempts: u32,
    ) {
        self.send_report(
            now,
            Report {
                intro_id,
                technique: Some(technique),
                outcome: if connected {
                    SessionOutcome::Direct
                } else {
                    SessionOutcome::Failed
                },
                elapsed,
                probes: attempts,
                resent: false,
            },
        );
    }

    /// Sends the initial sequence number `isn` of our low-TTL SYN toward `expected`
    /// (the other side's TCP candidate) to the other side of introduction
    /// `intro_id`, through the gateway (TCP-Seq; TCP technique 3). The gateway
    /// forwards it once per side per introduction. With `forge` (technique 4) the
    /// gateway forwards nothing and forges the SYN-ACKs into both NATs once both
    /// sides' numbers are in; a gateway that does not forge refuses it
    /// ([`AgentEvent::TcpSeqRefused`]).
    pub fn send_tcp_seq(
        &mut self,
        now: Instant,
        intro_id: u64,
        isn: u32,
        expected: Option<SocketAddr>,
        forge: bool,
    ) {
        self.send_tcp_seq_request(
            now,
            TcpSeqRequest {
                intro_id,
                isn,
                expected,
                forge,
                resent: false,
            },
        );
    }

    fn send_tcp_seq_request(&mut self, now: Instant, request: TcpSeqRequest) {
        let tid = self.tid();
        let payload = client::tcp_seq(
            tid,
            &self.config.credentials,
            self.nonce.as_deref(),
            request.intro_id,
            request.isn,
            request.expected,
            request.forge,
        );
        self.pending.insert(
            tid,
            PendingRequest {
                method: method::TCP_SEQ,
                sent_at: now,
                target: None,
                report: None,
                tcp_seq: Some(request),
            },
        );
        self.outgoing.push_back(Transmit {
            socket: 0,
            to: self.config.server,
            payload,
            ttl: None,
        });
    }

    /// Handles one datagram received on the agent's own socket.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if from == self.config.server && self.is_turn_datagram(datagram) {
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
        if ours && from != self.config.server {
            self.handle_peer_datagram(now, socket, from, datagram, false);
            self.release_idle_sockets();
        }
    }

    /// Whether a datagram from the gateway belongs to our TURN client (ChannelData,
    /// Data indications and TURN responses) rather than to the rendezvous.
    fn is_turn_datagram(&self, datagram: &[u8]) -> bool {
        self.turn.is_some()
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

    fn handle_turn_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let peer_data = turn
            .handle_datagram(now, from, datagram)
            .map(|d| (d.peer, d.data.to_vec()));
        self.drain_turn(now);
        if let Some((peer, data)) = peer_data {
            // A peer reached us through our allocation: talk back on a channel.
            if let Some(turn) = self.turn.as_mut()
                && turn.channel(peer).is_none()
                && let Err(e) = turn.bind_channel(now, peer)
            {
                tracing::debug!(error = %e, %peer, "cannot bind a channel");
            }
            self.drain_turn(now);
            self.handle_peer_datagram(now, 0, peer, &data, true);
        }
    }

    /// A datagram from a peer, directly or (`via_turn`) through our allocation.
    fn handle_peer_datagram(
        &mut self,
        now: Instant,
        socket: u32,
        from: SocketAddr,
        datagram: &[u8],
        via_turn: bool,
    ) {
        if datagram.first() == Some(&DATA_MARKER) {
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
            return;
        }
        let Ok(message) = Message::parse(datagram) else {
            return;
        };
        let ty = message.message_type();
        if ty.method == stun::method::BINDING
            && !via_turn
            && self.filter_response(now, from, &message, datagram)
        {
            return;
        }
        if from == self.config.server && !via_turn {
            if socket == 0 {
                self.handle_server_message(now, &message, datagram);
            }
            return;
        }
        if ty.method == stun::method::BINDING
            && ty.class == Class::Success
            && let Some(&(endpoint, order)) = self.discovery.pending.get(&message.transaction_id())
        {
            if endpoint == from
                && let Some(seen) =
                    super::binding::parse_binding_success(datagram, message.transaction_id())
            {
                self.discovery.pending.remove(&message.transaction_id());
                self.discovery.results.push((order, endpoint, seen));
                if self.discovery.pending.is_empty() {
                    self.finish_discovery(now);
                }
            }
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
            if let Some(seq) = client::parse_tcp_seq(datagram, &self.config.credentials.password)
                && let Some(session) = self.sessions.get_mut(&seq.intro_id)
                && session.peer_id == seq.peer_id
                && !std::mem::replace(&mut session.tcp_seq_seen, true)
            {
                self.events.push_back(AgentEvent::TcpSeq {
                    peer_id: seq.peer_id,
                    intro_id: seq.intro_id,
                    isn: seq.isn,
                    expected: seq.expected,
                });
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
        if let Some(nonce) = response.nonce {
            let fresh_challenge = matches!(response.result, Err(401 | 438));
            self.nonce = Some(nonce);
            if fresh_challenge {
                // Not a refusal: the gateway wants its nonce echoed. Resend now.
                match request.method {
                    method::REGISTER => self.send_register(now),
                    method::CONNECT => {
                        if let Some(target) = request.target {
                            self.wanted.insert(target, now);
                        }
                    }
                    method::TCP_SEQ => {
                        if let Some(seq) = request.tcp_seq.filter(|s| !s.resent) {
                            self.send_tcp_seq_request(
                                now,
                                TcpSeqRequest {
                                    resent: true,
                                    ..seq
                                },
                            );
                        }
                    }
                    method::OUTCOME => {
                        if let Some(report) = request.report.filter(|r| !r.resent) {
                            self.send_report(
                                now,
                                Report {
                                    resent: true,
                                    ..report
                                },
                            );
                        }
                    }
                    _ => {}
                }
                return;
            }
        }
        match response.result {
            Ok(()) if request.method == method::REGISTER => {
                let rtt = now.saturating_duration_since(request.sent_at);
                self.rtt_ms = u32::try_from(rtt.as_millis()).unwrap_or(u32::MAX);
                let interval = match response.lifetime {
                    Some(lifetime) => self.config.keepalive.min(lifetime / 3),
                    None => self.config.keepalive,
                };
                self.register_retry = FIRST_REGISTER_RETRY;
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
                if let Some(mapped) = response.mapped {
                    // Refreshes are silent unless the public address moved.
                    if self.discovery.primary != Some(mapped) {
                        self.events.push_back(AgentEvent::Registered { mapped });
                        if self.discovery.done {
                            self.discovery.primary = Some(mapped);
                        }
                    }
                    if self.discovery.filter.started.is_none() {
                        self.discovery.primary = Some(mapped);
                        if !self.config.discovery.is_empty() {
                            self.start_discovery(now, mapped);
                        }
                    }
                }
            }
            Ok(()) => {}
            Err(code) => {
                if code == 403 {
                    // Not registered (e.g. the gateway restarted): register now.
                    self.next_register = now;
                }
                if let Some(target) = request.target
                    && code == 404
                {
                    // The other side is not registered yet: keep asking.
                    self.wanted.insert(target, now + CONNECT_RETRY);
                }
                if let Some(seq) = request.tcp_seq {
                    self.events.push_back(AgentEvent::TcpSeqRefused {
                        intro_id: seq.intro_id,
                        code,
                    });
                }
                self.events.push_back(AgentEvent::Refused {
                    method: request.method,
                    code,
                });
            }
        }
    }

    fn introduced(&mut self, now: Instant, intro: client::Introduction) {
        if self.sessions.contains_key(&intro.intro_id) {
            return;
        }
        // A newer introduction to the same peer replaces older attempts (but not a
        // path in use, nor a relay leg still being set up).
        let released = &mut self.released_sockets;
        self.sessions.retain(|_, s| {
            let keep = s.peer_id != intro.peer_id
                || matches!(s.state, SessionState::Up | SessionState::Relaying);
            if !keep {
                released.extend(s.birthday.sockets.drain(..));
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
        let mut birthday = Birthday {
            role: birthday_role(
                self.config.nat,
                !self.discovery.predicted.is_empty(),
                intro.peer_nat,
                peer_predicted,
            )
            .filter(|role| match role {
                BirthdayRole::Sockets => self.config.birthday_sockets > 0,
                BirthdayRole::Probes => self.config.birthday_probes > 0,
            })
            .filter(|_| peer_reflexive.is_some()),
            ..Birthday::default()
        };
        if birthday.role == Some(BirthdayRole::Sockets)
            && intro.peer_nat != NatClass::None
            && self.config.open_ttl > 0
        {
            birthday.quiet_toward = peer_reflexive;
        }
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
            c.kind == super::rendezvous::CandidateKind::ServerReflexive
                && self.discovery.primary.map(|p| p.ip()) == Some(c.addr.ip())
        });
        let hopeless = !same_nat
            && self.config.nat == NatClass::AddressAndPortDependent
            && intro.peer_nat == NatClass::AddressAndPortDependent
            && self.discovery.predicted.is_empty()
            && !intro
                .candidates
                .iter()
                .any(|c| c.kind == super::rendezvous::CandidateKind::Predicted);
        if self.config.relay && hopeless && self.relay_usable(now) {
            self.start_relay(now, intro.intro_id);
        }
    }

    /// The other side offers its relayed address for a session: probe it.
    fn relay_offered(&mut self, now: Instant, offer: client::RelayOffer) {
        let Some(session) = self.sessions.get_mut(&offer.intro_id) else {
            return;
        };
        if session.peer_id != offer.peer_id || matches!(session.relay, RelayLeg::Local { .. }) {
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

    fn handle_peer_message(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        credentials::SharedSecret,
        peer_policy::PeerPolicy,
        rendezvous::{Event, RendezvousConfig, RendezvousServer},
        turn::server::{TurnConfig, TurnHandled, TurnServer, TurnServerEvent},
    };

    const NOW_UNIX: u64 = 1_800_000_000;
    use std::cell::RefCell;

    /// Relay addresses handed out by the simulated gateway.
    #[derive(Default)]
    struct SimRelaySockets {
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
                        let relay = SocketAddr::from(([192, 0, 2, 10], 50_000 + self.next));
                        self.open.push(relay);
                        turn.handle_relay_opened(now, request, Ok((relay, None)));
                    }
                    TurnServerEvent::CloseRelay(relay) => self.open.retain(|r| *r != relay),
                    _ => {}
                }
            }
        }
    }
    const LATENCY: Duration = Duration::from_millis(10);

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// Two agents and a server (rendezvous and TURN relay) on a virtual network with
    /// fixed latency; `drop_p2p` drops everything between the peers (as two symmetric
    /// NATs would), never what goes through the relay.
    struct Sim {
        now: Instant,
        server: RendezvousServer,
        turn: TurnServer,
        relays: SimRelaySockets,
        server_addr: SocketAddr,
        agents: Vec<(SocketAddr, Agent)>,
        in_flight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
        drop_p2p: bool,
        events: Vec<(usize, AgentEvent)>,
        server_events: Vec<Event>,
        /// Low-TTL openers sent (they expire in the network: never delivered).
        openers: Vec<(usize, SocketAddr, u8)>,
    }

    impl Sim {
        fn new(drop_p2p: bool) -> Self {
            Self::with_relay(drop_p2p, true)
        }

        fn with_relay(drop_p2p: bool, relay: bool) -> Self {
            let secret = SharedSecret::new(b"sim secret");
            let now = Instant::now();
            let server_addr = addr("192.0.2.10:3478");
            let mut agents = Vec::new();
            for (name, at) in [("alice", "198.51.100.2:4000"), ("bob", "198.51.100.6:5000")] {
                let issued = secret.issue(name, NOW_UNIX + 3600).expect("issue");
                let creds = PeerCredentials {
                    username: issued.username,
                    password: issued.password,
                };
                let mut config = AgentConfig::new(server_addr, creds);
                config.relay = relay;
                agents.push((addr(at), Agent::new(config, now, 1)));
            }
            let policy = PeerPolicy::new(
                vec!["198.51.100.0/24".parse().expect("range")],
                Vec::new(),
                Vec::new(),
            );
            Self {
                now,
                turn: TurnServer::new(TurnConfig::default(), secret.clone(), [5; 32], 600, policy),
                relays: SimRelaySockets::default(),
                server: RendezvousServer::new(secret, RendezvousConfig::default(), 3),
                server_addr,
                agents,
                in_flight: Vec::new(),
                drop_p2p,
                events: Vec::new(),
                server_events: Vec::new(),
                openers: Vec::new(),
            }
        }

        fn run_for(&mut self, duration: Duration) {
            let end = self.now + duration;
            while self.now < end {
                for i in 0..self.agents.len() {
                    let (from, agent) = &mut self.agents[i];
                    if agent.poll_timeout() <= self.now {
                        agent.handle_timeout(self.now);
                    }
                    while let Some(t) = agent.poll_transmit() {
                        if let Some(ttl) = t.ttl {
                            self.openers.push((i, t.to, ttl));
                            continue;
                        }
                        self.in_flight
                            .push((self.now + LATENCY, *from, t.to, t.payload));
                    }
                    while let Some(e) = agent.poll_event() {
                        self.events.push((i, e));
                    }
                }
                let (due, later): (Vec<_>, Vec<_>) = self
                    .in_flight
                    .drain(..)
                    .partition(|(at, ..)| *at <= self.now);
                self.in_flight = later;
                for (_, from, to, payload) in due {
                    if to == self.server_addr && self.relay_input(from, &payload) {
                        continue;
                    }
                    if self.relays.open.contains(&to) {
                        // A peer sent to a relayed address: up to the allocation's client.
                        if let Ok(target) =
                            self.turn.data_from_peer(self.now, to, from, payload.len())
                        {
                            let mut out = Vec::new();
                            match target.channel {
                                Some(channel) => {
                                    crate::turn::encode_channel_data(channel, &payload, &mut out)
                                }
                                None => self.turn.data_indication(from, &payload, &mut out),
                            }
                            self.in_flight.push((
                                self.now + LATENCY,
                                self.server_addr,
                                target.client.addr,
                                out,
                            ));
                        }
                        continue;
                    }
                    if to == self.server_addr {
                        let mut out = Vec::new();
                        self.server
                            .handle(self.now, NOW_UNIX, from, None, &payload, &mut out);
                        self.server_events.extend(self.server.drain_events());
                        for t in out {
                            self.in_flight.push((
                                self.now + LATENCY,
                                self.server_addr,
                                t.to,
                                t.payload,
                            ));
                        }
                    } else if let from_peer = self.agents.iter().any(|(a, _)| *a == from)
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

        /// The gateway's TURN side: true when it took the datagram.
        fn relay_input(&mut self, from: SocketAddr, payload: &[u8]) -> bool {
            if crate::turn::is_channel_data(payload) {
                if let Ok(message) = crate::turn::ChannelData::parse(payload)
                    && let Ok((relay, peer)) = self.turn.channel_data_from_client(
                        self.now,
                        from,
                        message.channel,
                        message.data.len(),
                    )
                {
                    self.in_flight
                        .push((self.now + LATENCY, relay, peer, message.data.to_vec()));
                }
                return true;
            }
            let Ok(message) = Message::parse(payload) else {
                return false;
            };
            if !TurnServer::is_turn_method(message.message_type().method) {
                return false;
            }
            let handled = self
                .turn
                .handle_stun(self.now, NOW_UNIX, from, None, &message);
            self.relays.serve(self.now, &mut self.turn);
            if let TurnHandled::Relay { relay, peer, data } = handled {
                self.in_flight
                    .push((self.now + LATENCY, relay, peer, data.to_vec()));
            }
            while let Some(reply) = self.turn.poll_transmit() {
                self.in_flight.push((
                    self.now + LATENCY,
                    self.server_addr,
                    reply.to,
                    reply.payload,
                ));
            }
            true
        }

        fn has(&self, agent: usize, f: impl Fn(&AgentEvent) -> bool) -> bool {
            self.events.iter().any(|(i, e)| *i == agent && f(e))
        }
    }

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

    #[test]
    fn tcp_candidates_reach_the_other_side_apart_from_the_udp_probes_and_outcomes_are_reported() {
        let mut sim = Sim::new(false);
        let tcp = [addr("198.51.100.2:4100"), addr("198.51.100.6:5100")];
        for (i, candidate) in tcp.iter().enumerate() {
            sim.agents[i].1.config.tcp_candidates = vec![*candidate];
        }
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let introduced = |i: usize| {
            sim.events.iter().find_map(|(j, e)| match e {
                AgentEvent::TcpIntroduced {
                    intro_id,
                    candidates,
                    start_at,
                    ..
                } if *j == i => Some((*intro_id, candidates.clone(), *start_at)),
                _ => None,
            })
        };
        let (intro_a, cands_a, start_a) = introduced(0).expect("alice's TCP introduction");
        let (intro_b, cands_b, start_b) = introduced(1).expect("bob's TCP introduction");
        assert_eq!(intro_a, intro_b);
        assert_eq!(cands_a, vec![tcp[1]]);
        assert_eq!(cands_b, vec![tcp[0]]);
        let skew = start_a.max(start_b) - start_a.min(start_b);
        assert!(skew <= Duration::from_millis(2), "{skew:?}");
        for (i, (_, agent)) in sim.agents.iter().enumerate() {
            for session in agent.sessions.values() {
                assert!(
                    !session.candidates.contains(&tcp[1 - i]),
                    "a TCP candidate is never probed over UDP"
                );
            }
        }
        assert!(sim.agents[0].1.path("bob").is_some(), "UDP still punches");
        let now = sim.now;
        sim.agents[0].1.report_tcp(
            now,
            intro_a,
            TcpTechnique::LowTtl,
            true,
            Duration::from_millis(200),
            2,
        );
        sim.run_for(Duration::from_millis(50));
        assert!(sim.server_events.iter().any(|e| matches!(
            e,
            Event::TcpOutcome {
                technique: TcpTechnique::LowTtl,
                success: true,
                ..
            }
        )));
    }

    #[test]
    fn tcp_seq_reaches_the_other_side_through_the_gateway_once() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let intro = sim.agents[0]
            .1
            .sessions
            .keys()
            .next()
            .copied()
            .expect("an introduction");
        let expected = addr("198.51.100.6:5100");
        let now = sim.now;
        sim.agents[0]
            .1
            .send_tcp_seq(now, intro, 0x1234_5678, Some(expected), false);
        // A second one is refused by the gateway and never reaches bob.
        sim.agents[0]
            .1
            .send_tcp_seq(now, intro, 99, Some(expected), false);
        sim.run_for(Duration::from_millis(50));
        let received: Vec<_> = sim
            .events
            .iter()
            .filter_map(|(i, e)| match e {
                AgentEvent::TcpSeq {
                    peer_id,
                    intro_id,
                    isn,
                    expected,
                } => Some((*i, peer_id.clone(), *intro_id, *isn, *expected)),
                _ => None,
            })
            .collect();
        assert_eq!(
            received,
            vec![(1, "alice".to_string(), intro, 0x1234_5678, Some(expected))]
        );
    }

    #[test]
    fn a_forge_request_to_a_gateway_that_does_not_forge_is_reported_refused() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let intro = sim.agents[0]
            .1
            .sessions
            .keys()
            .next()
            .copied()
            .expect("an introduction");
        let now = sim.now;
        sim.agents[0]
            .1
            .send_tcp_seq(now, intro, 7, Some(addr("198.51.100.6:5100")), true);
        sim.run_for(Duration::from_millis(50));
        let refused: Vec<_> = sim
            .events
            .iter()
            .filter_map(|(i, e)| match e {
                AgentEvent::TcpSeqRefused { intro_id, code } => Some((*i, *intro_id, *code)),
                AgentEvent::TcpSeq { .. } => panic!("nothing may be forwarded: {e:?}"),
                _ => None,
            })
            .collect();
        assert_eq!(
            refused,
            vec![(0, intro, super::super::rendezvous::TCP_FORGE_DISABLED)]
        );
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
    fn sequential_ports_are_predicted_and_irregular_ones_are_not() {
        let at = |port: u16| SocketAddr::from(([198, 51, 100, 2], port));
        assert_eq!(
            predict_ports(&[at(30000), at(30001), at(30002)], 3),
            vec![at(30003), at(30004), at(30005)]
        );
        assert_eq!(
            predict_ports(&[at(40000), at(40002), at(40004)], 2),
            vec![at(40006), at(40008)]
        );
        assert_eq!(
            predict_ports(&[at(65534), at(65535), at(0)], 2),
            vec![at(1), at(2)]
                .into_iter()
                .filter(|a| a.port() >= 1024)
                .collect::<Vec<_>>()
        );
        assert!(
            predict_ports(&[at(30000), at(30001), at(30005)], 3).is_empty(),
            "uneven"
        );
        assert!(
            predict_ports(&[at(30000), at(41000), at(52000)], 3).is_empty(),
            "too far apart: random"
        );
        assert!(
            predict_ports(&[at(30000), at(30001)], 3).is_empty(),
            "one step proves nothing"
        );
        assert!(
            predict_ports(&[at(30000), at(30000), at(30000)], 3).is_empty(),
            "EIM needs none"
        );
    }

    #[test]
    fn unanswered_registers_are_resent_with_backoff() {
        let now = Instant::now();
        let creds = PeerCredentials {
            username: "1900000000:alice".into(),
            password: "pw".into(),
        };
        let mut agent = Agent::new(AgentConfig::new(addr("192.0.2.10:3478"), creds), now, 1);
        let mut sent_at = Vec::new();
        for ms in (0..4_000).step_by(10) {
            let t = now + Duration::from_millis(ms);
            if agent.poll_timeout() <= t {
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
    fn filtering_classes() {
        use FilterTest::{Answered, Unanswered, Unsupported};
        let cases = [
            (Answered, Answered, FilteringClass::EndpointIndependent),
            // A lost change-port answer does not hide an answer from another address.
            (Unanswered, Answered, FilteringClass::EndpointIndependent),
            (Answered, Unanswered, FilteringClass::AddressDependent),
            (
                Unanswered,
                Unanswered,
                FilteringClass::AddressAndPortDependent,
            ),
            // Without an endpoint on another address: EIF or ADF, the stricter.
            (Answered, Unsupported, FilteringClass::AddressDependent),
            // The change-port answer was filtered: port-dependent, whatever else.
            (
                Unanswered,
                Unsupported,
                FilteringClass::AddressAndPortDependent,
            ),
            // ADF or APDF: the stricter.
            (
                Unsupported,
                Unanswered,
                FilteringClass::AddressAndPortDependent,
            ),
            (Unsupported, Answered, FilteringClass::EndpointIndependent),
            (Unsupported, Unsupported, FilteringClass::Unknown),
        ];
        for (port, address, class) in cases {
            assert_eq!(
                classify_filtering(port, address),
                class,
                "port {port:?} address {address:?}"
            );
        }
    }

    /// How a simulated NAT in front of the agent filters inbound datagrams.
    #[derive(Clone, Copy, Debug)]
    enum SimFilter {
        Independent,
        Address,
        AddressAndPort,
    }

    /// One agent behind an endpoint-independent-mapping NAT with `filter` (port
    /// preserved or not), a gateway with a discovery socket on another port and one on
    /// another address; runs discovery and returns the classification event and the
    /// time it took.
    fn discover_behind(
        filter: SimFilter,
        preserve: bool,
        unauthenticated_gateway: bool,
        alternates: Vec<SocketAddr>,
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
        config.discovery = vec![addr("192.0.2.10:3479"), addr("192.0.2.11:3478")];
        config.filtering = true;
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
            if agent.poll_timeout() <= now {
                agent.handle_timeout(now);
            }
            // Deliver instantly, until nobody has anything more to say.
            while let Some(transmit) = agent.poll_transmit() {
                contacted.push(transmit.to);
                let mut inbound: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
                if transmit.to == server_addr || transmit.to == addr("192.0.2.11:3478") {
                    let mut out = Vec::new();
                    server.handle(
                        now,
                        NOW_UNIX,
                        public,
                        Some(transmit.to.ip()),
                        &transmit.payload,
                        &mut out,
                    );
                    inbound.extend(out.into_iter().map(|t| (transmit.to, t.payload)));
                    for r in server.drain_redirected() {
                        inbound.push((alternates[r.endpoint], r.transmit.payload));
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

    #[test]
    fn discovery_classifies_filtering_before_opening_other_filters() {
        let both = vec![addr("192.0.2.10:3479"), addr("192.0.2.11:3479")];
        for (filter, preserve, expected) in [
            (
                SimFilter::Independent,
                true,
                FilteringClass::EndpointIndependent,
            ),
            (SimFilter::Address, false, FilteringClass::AddressDependent),
            (
                SimFilter::AddressAndPort,
                true,
                FilteringClass::AddressAndPortDependent,
            ),
        ] {
            let (event, took) = discover_behind(filter, preserve, false, both.clone());
            assert_eq!(
                event,
                Some(AgentEvent::NatClassified {
                    class: NatClass::EndpointIndependent,
                    filtering: expected,
                    port_preserved: preserve,
                }),
                "{filter:?}"
            );
            // Answered at once when both answers get in; otherwise after the wait
            // (three transmissions), then the mapping tests.
            let bound = if matches!(filter, SimFilter::Independent) {
                Duration::from_millis(50)
            } else {
                FILTER_WAIT + Duration::from_millis(50)
            };
            assert!(took <= bound, "{filter:?} took {took:?}");
        }
    }

    #[test]
    fn filtering_without_the_gateway_support_is_unknown_or_the_stricter_class() {
        // A gateway with no discovery sockets: every test gets 420 at once.
        let (event, took) = discover_behind(SimFilter::Independent, true, false, Vec::new());
        assert!(
            matches!(
                event,
                Some(AgentEvent::NatClassified {
                    filtering: FilteringClass::Unknown,
                    ..
                })
            ),
            "{event:?}"
        );
        assert!(took < Duration::from_millis(50), "{took:?}");
        // Only another port: a full cone reads as the stricter address-dependent.
        let (event, _) = discover_behind(
            SimFilter::Independent,
            true,
            false,
            vec![addr("192.0.2.10:3479")],
        );
        assert!(
            matches!(
                event,
                Some(AgentEvent::NatClassified {
                    filtering: FilteringClass::AddressDependent,
                    ..
                })
            ),
            "{event:?}"
        );
    }

    #[test]
    fn mapping_classes() {
        let server = addr("192.0.2.10:3478");
        let other_port = addr("192.0.2.10:3479");
        let other_ip = addr("192.0.2.11:3478");
        let seen = addr("198.51.100.2:4000");
        let other = addr("198.51.100.2:4001");
        let local = Some(addr("10.0.1.2:4000"));
        assert_eq!(
            classify_mapping(Some(seen), server, seen, &[]),
            NatClass::None
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[(other_port, seen), (other_ip, seen)]),
            NatClass::EndpointIndependent
        );
        assert_eq!(
            classify_mapping(
                local,
                server,
                seen,
                &[(other_port, seen), (other_ip, other)]
            ),
            NatClass::AddressDependent
        );
        assert_eq!(
            classify_mapping(
                local,
                server,
                seen,
                &[(other_port, other), (other_ip, other)]
            ),
            NatClass::AddressAndPortDependent
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[(other_ip, other)]),
            NatClass::AddressAndPortDependent
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[(other_ip, seen)]),
            NatClass::EndpointIndependent
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[]),
            NatClass::Unknown
        );
    }

    #[test]
    fn birthday_roles_follow_the_nat_pair() {
        use NatClass::{AddressAndPortDependent as Apdm, EndpointIndependent as Eim};
        assert_eq!(
            birthday_role(Apdm, false, Eim, false),
            Some(BirthdayRole::Sockets)
        );
        assert_eq!(
            birthday_role(Eim, false, Apdm, false),
            Some(BirthdayRole::Probes)
        );
        assert_eq!(
            birthday_role(NatClass::None, false, Apdm, false),
            Some(BirthdayRole::Probes)
        );
        assert_eq!(
            birthday_role(Apdm, false, Apdm, false),
            None,
            "both dependent"
        );
        assert_eq!(
            birthday_role(Eim, false, Eim, false),
            None,
            "plain punching"
        );
        assert_eq!(
            birthday_role(Apdm, true, Eim, false),
            None,
            "predicted ports"
        );
        assert_eq!(
            birthday_role(Eim, false, Apdm, true),
            None,
            "predicted ports"
        );
        assert_eq!(birthday_role(NatClass::Unknown, false, Apdm, false), None);
    }

    /// A NAT for the birthday simulation: endpoint-independent with preserved ports, or
    /// a random port per (socket, destination); both filter by address and port.
    struct SimNat {
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
    fn birthday_run(bob_sockets: u16) -> BirthdayRun {
        birthday_run_with(bob_sockets, NatClass::EndpointIndependent)
    }

    /// [`birthday_run`] with alice's side of class `alice_nat`: endpoint-independent,
    /// or `None` (a public host).
    fn birthday_run_with(bob_sockets: u16, alice_nat: NatClass) -> BirthdayRun {
        let secret = SharedSecret::new(b"sim secret");
        let mut now = Instant::now();
        let server_addr = addr("192.0.2.10:3478");
        let mut server = RendezvousServer::new(secret.clone(), RendezvousConfig::default(), 3);
        let mut nats = [
            SimNat::new("198.51.100.2", true),
            SimNat::new("198.51.100.6", false),
        ];
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
            Agent::new(config, now, 11)
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
        while now < end {
            for (i, agent) in agents.iter_mut().enumerate() {
                if agent.poll_timeout() <= now {
                    agent.handle_timeout(now);
                }
                let mut sweep_round = 0;
                let bob_registered = nats[1].mappings.get(&(0, Some(server_addr))).copied();
                while let Some(t) = agent.poll_transmit() {
                    if i == 0 && t.to.ip() == nats[1].public && Some(t.to.port()) != bob_registered
                    {
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
                        in_flight.push((now + LATENCY, from, t.to, t.payload));
                    }
                }
                sweep_round_max = sweep_round_max.max(sweep_round);
                while let Some(e) = agent.poll_event() {
                    if i == 0 && matches!(e, AgentEvent::PunchFailed { .. }) {
                        alice_failed_at.get_or_insert(now);
                    }
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
            let (due, later): (Vec<_>, Vec<_>) =
                in_flight.drain(..).partition(|(at, ..)| *at <= now);
            in_flight = later;
            for (_, from, to, payload) in due {
                if to == server_addr {
                    let mut out = Vec::new();
                    server.handle(now, NOW_UNIX, from, None, &payload, &mut out);
                    for t in out {
                        in_flight.push((now + LATENCY, server_addr, t.to, t.payload));
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
        }
    }

    /// What [`birthday_run`] saw.
    struct BirthdayRun {
        events: Vec<(usize, AgentEvent)>,
        /// The sockets bob's data left from.
        data_sockets: Vec<u32>,
        /// Extra sockets bob released.
        released: usize,
        /// Most datagrams alice sent toward bob's address in one timer run.
        sweep_round_max: u32,
        /// The ports alice probed on bob's address, other than his registered one.
        swept: Vec<(Instant, u16)>,
        /// When alice's first punch attempt gave up.
        alice_failed_at: Option<Instant>,
        /// Unsolicited datagrams from bob that reached alice's mapped ports before the
        /// path was up.
        unsolicited_at_alice: usize,
    }

    #[test]
    fn birthday_punching_meets_a_random_port_nat_and_keeps_the_path_on_its_socket() {
        let BirthdayRun {
            events,
            data_sockets,
            released,
            sweep_round_max,
            ..
        } = birthday_run(256);
        let has = |agent: usize, f: &dyn Fn(&AgentEvent) -> bool| {
            events.iter().any(|(i, e)| *i == agent && f(e))
        };
        assert!(has(1, &|e| matches!(
            e,
            AgentEvent::Birthday {
                role: BirthdayRole::Sockets,
                budget: 256,
                ..
            }
        )));
        assert!(has(0, &|e| matches!(
            e,
            AgentEvent::Birthday {
                role: BirthdayRole::Probes,
                budget: 2048,
                ..
            }
        )));
        for agent in 0..2 {
            assert!(
                has(agent, &|e| matches!(
                    e,
                    AgentEvent::PathUp { relayed: false, .. }
                )),
                "agent {agent}: {events:?}"
            );
        }
        // The data went both ways, bob's from the extra socket that met a probe.
        assert!(has(
            1,
            &|e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"to bob")
        ));
        assert!(has(
            0,
            &|e| matches!(e, AgentEvent::Data { payload, .. } if payload == b"to alice")
        ));
        assert_eq!(data_sockets.len(), 1);
        assert!(data_sockets[0] >= 1, "bob's path is on an extra socket");
        // Every other extra socket went back to the driver.
        assert_eq!(released, 255);
        // The sweep kept its pace: 1000/s in 50 ms rounds, plus the few plain probes.
        assert!(sweep_round_max <= 50 + 5, "{sweep_round_max}");
    }

    #[test]
    fn the_sockets_side_sends_nothing_unsolicited_toward_a_nat() {
        // Bob's own socket probes alice's reflexive address only with the opener's
        // TTL: nothing of his reaches her NAT before she has sent to that port, so a
        // router there that accepts unsolicited packets keeps no entry that would
        // remap her sweep.
        let run = birthday_run(256);
        assert!(
            run.events
                .iter()
                .any(|(i, e)| *i == 0 && matches!(e, AgentEvent::PathUp { relayed: false, .. })),
            "{:?}",
            run.events
        );
        assert_eq!(run.unsolicited_at_alice, 0);
    }

    #[test]
    fn toward_a_public_host_the_sockets_side_keeps_its_quick_full_ttl_probes() {
        // A peer without NAT takes any datagram: bob's first full-TTL probe meets her
        // before any birthday half starts, as plain punching does.
        let run = birthday_run_with(256, NatClass::None);
        assert!(run.unsolicited_at_alice > 0);
        let started = run
            .events
            .iter()
            .position(|(_, e)| matches!(e, AgentEvent::Introduced { .. }))
            .expect("introduced");
        let up = run
            .events
            .iter()
            .position(|(i, e)| *i == 0 && matches!(e, AgentEvent::PathUp { relayed: false, .. }))
            .expect("path up");
        assert!(
            !run.events[started..up]
                .iter()
                .any(|(_, e)| matches!(e, AgentEvent::Birthday { .. })),
            "the path came before either birthday half: {:?}",
            run.events
        );
    }

    #[test]
    fn without_birthday_sockets_the_random_port_pair_gets_no_path() {
        let BirthdayRun {
            events,
            swept,
            alice_failed_at,
            ..
        } = birthday_run(0);
        // The first attempt's probes to bob's address: plain ones to his candidates
        // every round, and the sweep, which probes each port twice at most: 2048
        // distinct ports, then the same once more in order.
        let failed_at = alice_failed_at.expect("the first attempt gave up");
        let first_attempt: Vec<u16> = swept
            .iter()
            .filter(|(at, _)| *at < failed_at)
            .map(|&(_, port)| port)
            .collect();
        let mut times: HashMap<u16, usize> = HashMap::new();
        for port in &first_attempt {
            *times.entry(*port).or_default() += 1;
        }
        let swept: Vec<u16> = first_attempt
            .into_iter()
            .filter(|port| times[port] <= 2)
            .collect();
        assert_eq!(swept.len(), 2 * 2048, "{}", swept.len());
        let (first, second) = swept.split_at(2048);
        assert_eq!(first, second);
        assert_eq!(first.iter().collect::<HashSet<_>>().len(), 2048);
        assert!(
            !events
                .iter()
                .any(|(_, e)| matches!(e, AgentEvent::PathUp { .. })),
            "{events:?}"
        );
        assert!(
            events.iter().any(|(i, e)| *i == 0
                && matches!(e, AgentEvent::PunchFailed { probes, .. } if *probes <= 200 + 2 * 2048)),
            "{events:?}"
        );
    }

    #[test]
    fn lost_mapping_tests_are_sent_again_and_connects_wait_for_the_class_register() {
        let secret = SharedSecret::new(b"sim secret");
        let server_addr = addr("192.0.2.10:3478");
        let discovery = addr("192.0.2.10:3479");
        let me = addr("198.51.100.2:4000");
        let mut server = RendezvousServer::new(secret.clone(), RendezvousConfig::default(), 3);
        let issued = secret.issue("alice", NOW_UNIX + 3600).expect("issue");
        let mut config = AgentConfig::new(
            server_addr,
            PeerCredentials {
                username: issued.username,
                password: issued.password,
            },
        );
        config.discovery = vec![discovery];
        let start = Instant::now();
        let mut agent = Agent::new(config, start, 5);
        agent.connect("bob", start);
        let mut now = start;
        let mut tests_sent = Vec::new();
        let mut drop_next_register_after_classified = true;
        let mut connect_before_class_ack = false;
        let mut connects = 0;
        while now < start + Duration::from_secs(3) {
            if agent.poll_timeout() <= now {
                agent.handle_timeout(now);
            }
            while let Some(t) = agent.poll_transmit() {
                if t.to == discovery {
                    // The discovery endpoint is unreachable: every test is lost.
                    tests_sent.push(now);
                    continue;
                }
                let method = Message::parse(&t.payload)
                    .map(|m| m.message_type().method)
                    .ok();
                if method == Some(method::CONNECT) {
                    connects += 1;
                    connect_before_class_ack |= !agent.class_registered;
                }
                if method == Some(method::REGISTER)
                    && agent.classified_at.is_some()
                    && std::mem::take(&mut drop_next_register_after_classified)
                {
                    // The Register carrying the class is lost too.
                    continue;
                }
                let mut out = Vec::new();
                server.handle(now, NOW_UNIX, me, None, &t.payload, &mut out);
                for answer in out {
                    agent.handle_datagram(now, server_addr, &answer.payload);
                }
            }
            now += Duration::from_millis(5);
        }
        // One sending and two more, 250 ms apart, then classification without them.
        assert_eq!(tests_sent.len(), 3, "{tests_sent:?}");
        assert!(tests_sent[1] - tests_sent[0] >= MAPPING_RESEND_AFTER);
        assert!(agent.discovery.done);
        assert!(agent.class_registered, "the resent Register was answered");
        assert!(connects > 0, "connects start once the class is registered");
        assert!(
            !connect_before_class_ack,
            "a connect went out before the class was registered"
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
