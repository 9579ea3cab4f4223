//! The rendezvous server's state machine (see `docs/protocol.md`): registration,
//! connect requests, introductions with synchronised start times, outcome reports,
//! relay offers, TCP-Seq forwarding and CHANGE-REQUEST answers. Sans-IO: the caller
//! passes the time, the datagram and its source to [`RendezvousServer::handle_datagram`]
//! and takes datagrams to send with [`RendezvousServer::poll_transmit`] and events
//! (metrics, SYN-ACKs to forge, cluster work) with [`RendezvousServer::poll_event`].
//! Across several nodes (see [`super::cluster`]) the cluster half lives in
//! `server/cluster.rs`.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use self::{
    auth::{Authenticated, error_reply, try_alternate_reply},
    cluster::{ClusterState, RemoteSide, ReplyTo},
};
use super::{
    cluster::{ClusterRequest, CrossNodeOutcome, start_delays},
    forge::{ForgePair, ForgedSynAck},
    wire::{
        Candidate, CandidateKind, MAX_CANDIDATES, NatClass, SessionOutcome, TcpTechnique, attr,
        decode_candidate, encode_candidate, method, read_u32, read_u64,
    },
};
use crate::{
    Transmit, Transport,
    binding::{self, BindingService},
    budget::{ReplyBudget, ReplyBudgetConfig},
    credentials::SharedSecret,
    drain::{DRAINING_REASON, Draining, TRY_ALTERNATE_REASON},
    earliest,
    nonce::NonceIssuer,
    stun::{
        Class, DecodeError, Message, MessageType, MessageWriter, attr as stun_attr,
        method as stun_method,
    },
};

mod auth;
mod cluster;
mod discovery;
mod forward;
mod mapped;
#[cfg(test)]
pub(crate) use mapped::mapped_notice;

pub use discovery::{DiscoveryEndpoints, discovery_index, discovery_socket};
pub use mapped::{MAPPED_PROBE_INTERVAL, MAPPED_PROBE_TRIES};

/// Whom a registered peer may be introduced to (`auth.connect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectPolicy {
    /// Any registered peer (whoever holds a credential can learn any peer's
    /// endpoints by connecting to it: one trust domain).
    #[default]
    Any,
    /// Only peers of the same group (`group/name` peer ids; a peer id without a
    /// group connects to nobody). A Connect across groups gets 404, as for a peer
    /// that does not exist, so groups cannot be probed.
    SameGroup,
}

impl ConnectPolicy {
    /// Whether `initiator` may be introduced to `target`.
    pub fn allows(self, initiator: &str, target: &str) -> bool {
        match self {
            Self::Any => true,
            Self::SameGroup => {
                let group = crate::credentials::peer_group;
                group(initiator).is_some() && group(initiator) == group(target)
            }
        }
    }
}

/// Signed error answers per second in all (each source gets at most its own
/// bucket's worth: see [`crate::budget`]).
const SIGNED_ERRORS_PER_SECOND: u32 = 20_000;

/// A per-budget key from the nonce key (each budget hashes sources its own way).
fn budget_key(nonce_key: &[u8; 32], which: u8) -> [u8; 16] {
    let mut key = [0u8; 16];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = nonce_key[i] ^ nonce_key[16 + i] ^ which;
    }
    key
}

/// Introductions remembered for outcome reports, relay offers and TCP-Seq (the
/// oldest is forgotten first): bounds the memory they take.
pub const MAX_REMEMBERED_INTRODUCTIONS: usize = 65_536;

/// How long an introduction is remembered: its outcome reports, TCP-Seq and relay
/// offers come within seconds (the TCP techniques' windows within half a minute), a
/// later attempt is a new introduction. So a busy gateway's memory returns to its
/// baseline once the churn stops (a 30-minute soak saw it grow with every
/// introduction while they were kept by count alone).
pub const INTRODUCTION_MEMORY: Duration = Duration::from_secs(120);

/// What became of one datagram: a bounded metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RendezvousHandled {
    /// Handled by the plain Binding service.
    Binding(binding::Outcome),
    /// A registration was created or refreshed.
    Registered,
    /// An introduction was made.
    Introduced,
    /// An outcome report was accepted.
    OutcomeAccepted,
    /// A relay offer was forwarded to the other side.
    RelayOffered,
    /// A TCP-Seq (initial sequence number) was forwarded to the other side.
    TcpSeqForwarded,
    /// A TCP-Seq asking for forged SYN-ACKs was kept until the other side's arrives.
    TcpForgeQueued,
    /// A TCP-Seq completed a pair: the SYN-ACKs for both NATs were forged.
    TcpSynAckForged,
    /// A TCP-Seq asked for forged SYN-ACKs, which this gateway does not do.
    TcpForgeDisabled,
    /// 400: a required attribute missing or malformed.
    BadRequest,
    /// 401: bad credentials or integrity.
    Unauthorized,
    /// 401/438 with a fresh NONCE: authenticated, but without a nonce valid for the
    /// sender's address (first contact, an expired nonce, or a replay from elsewhere).
    StaleNonce,
    /// 403: the sender is not registered from this address.
    Forbidden,
    /// 404: unknown peer or introduction.
    NotFound,
    /// 429: too many connects.
    RateLimited,
    /// The registry is full.
    Full,
    /// A CHANGE-REQUEST was answered (from the endpoint it asked for).
    ChangeAnswered,
    /// A Connect whose target is not registered here waits while the cluster
    /// locates it (answered later; only with [`RendezvousServer::enable_cluster`]).
    Locating,
    /// 503 "Cluster Unavailable": a Connect whose target is not registered here,
    /// while the cluster is down or too many Connects wait.
    ClusterUnavailable,
    /// A Register of a peer not registered here while the server drains: 300 Try
    /// Alternate with ALTERNATE-SERVER, or 503 "Draining" without an alternate.
    Draining,
    /// A peer's answer to the probe of its mapped candidate was accepted.
    MappedChecked,
}

impl RendezvousHandled {
    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            RendezvousHandled::Binding(outcome) => outcome.as_str(),
            RendezvousHandled::Registered => "registered",
            RendezvousHandled::Introduced => "introduced",
            RendezvousHandled::OutcomeAccepted => "outcome_accepted",
            RendezvousHandled::RelayOffered => "relay_offered",
            RendezvousHandled::TcpSeqForwarded => "tcp_seq_forwarded",
            RendezvousHandled::TcpForgeQueued => "tcp_forge_queued",
            RendezvousHandled::TcpSynAckForged => "tcp_synack_forged",
            RendezvousHandled::TcpForgeDisabled => "tcp_forge_disabled",
            RendezvousHandled::BadRequest => "bad_request",
            RendezvousHandled::Unauthorized => "unauthorized",
            RendezvousHandled::StaleNonce => "stale_nonce",
            RendezvousHandled::Forbidden => "forbidden",
            RendezvousHandled::NotFound => "not_found",
            RendezvousHandled::RateLimited => "rate_limited",
            RendezvousHandled::Full => "full",
            RendezvousHandled::ChangeAnswered => "change_request_answered",
            RendezvousHandled::Locating => "locating",
            RendezvousHandled::ClusterUnavailable => "cluster_unavailable",
            RendezvousHandled::Draining => "draining",
            RendezvousHandled::MappedChecked => "mapped_checked",
        }
    }

    /// Every label value.
    pub const ALL_LABELS: [&'static str; 26] = [
        "binding_success",
        "unknown_attribute",
        "not_stun",
        "malformed",
        "unhandled",
        "throttled",
        "registered",
        "introduced",
        "outcome_accepted",
        "relay_offered",
        "tcp_seq_forwarded",
        "tcp_forge_queued",
        "tcp_synack_forged",
        "tcp_forge_disabled",
        "bad_request",
        "unauthorized",
        "stale_nonce",
        "forbidden",
        "not_found",
        "rate_limited",
        "full",
        "change_request_answered",
        "locating",
        "cluster_unavailable",
        "draining",
        "mapped_checked",
    ];
}

/// What the driver should know about besides the datagrams to send: what metrics
/// count, the SYN-ACKs to forge, and the cluster's work.
#[derive(Clone, Debug, PartialEq)]
pub enum RendezvousEvent {
    /// An introduction was sent to both sides.
    Introduced {
        /// The initiator's NAT class.
        initiator_nat: NatClass,
        /// The responder's NAT class.
        responder_nat: NatClass,
    },
    /// The first outcome report of an introduction.
    Outcome {
        /// The initiator's NAT class.
        initiator_nat: NatClass,
        /// The responder's NAT class.
        responder_nat: NatClass,
        /// Whether a direct path was established.
        direct: bool,
        /// Punching failed but the sides reached each other through the relay.
        relayed: bool,
        /// Time from introduction to first two-way exchange, as reported.
        time_to_direct: Duration,
        /// Probes the reporter sent.
        probes: u32,
        /// Whether the introduction carried a verified mapped (port-mapping)
        /// candidate of either side.
        mapped: bool,
    },
    /// The first report of a TCP punching technique's outcome in an introduction.
    TcpOutcome {
        /// The initiator's NAT class.
        initiator_nat: NatClass,
        /// The responder's NAT class.
        responder_nat: NatClass,
        /// The technique.
        technique: TcpTechnique,
        /// Whether it produced a connection.
        success: bool,
    },
    /// A SYN-ACK to craft and inject (server-assisted TCP splicing, only when
    /// [`RendezvousServer::set_tcp_forge`] enabled it).
    ForgeSynAck(ForgedSynAck),
    /// Work for the cluster driver (only with [`RendezvousServer::enable_cluster`]):
    /// store a registration, locate a peer, send a message to another node.
    Cluster(ClusterRequest),
    /// What became of a cross-node Connect, for metrics (on the initiator's node).
    CrossNode(CrossNodeOutcome),
    /// The check of a peer's new mapped candidate ended: it answered (`verified`,
    /// so introductions carry it) or stayed silent (dropped; the peer was told).
    MappedCandidate {
        /// Whether the probe was answered.
        verified: bool,
    },
}

/// Tunables of the rendezvous server: the limits that bound its memory, its work per
/// peer and what unauthenticated traffic can make it send.
#[derive(Clone, Copy, Debug)]
pub struct RendezvousConfig {
    /// A registration not refreshed for this long is forgotten.
    pub lifetime: Duration,
    /// Most registrations held at once.
    pub max_peers: usize,
    /// Most Connect requests one peer may make per second.
    pub max_connects_per_second: u32,
    /// Added to the slower side's one-way delay when scheduling the start.
    pub start_margin: Duration,
    /// Most error replies to unauthenticated requests per second, all sources
    /// together; each source (IPv4 address, IPv6 /64) also gets at most 100 at once
    /// and 50 per second, in a table of fixed size (see [`crate::budget`]).
    pub max_error_replies_per_second: u32,
    /// Most Binding answers per second, all sources together, with the same
    /// per-source limits: a Binding answer is twice its request, so this bounds
    /// what spoofed requests can reflect.
    pub max_binding_replies_per_second: u32,
    /// Unauthenticated replies (Binding answers, errors) and signed nonce errors per
    /// second to one source (IPv4 address, IPv6 /64), bursts of twice that; 0: no
    /// reply budget at all.
    pub replies_per_source: u32,
    /// Whom a peer may Connect to: anyone registered, or only peers of its own
    /// group (`group/name` peer ids).
    pub connect_policy: ConnectPolicy,
    /// Lifetime of the nonces that bind signed requests to the sender's address.
    /// Every success response carries a fresh one, so a peer that keeps its
    /// registration alive never sees one expire.
    pub nonce_lifetime: Duration,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(60),
            max_peers: 2_000_000,
            max_connects_per_second: 20,
            start_margin: Duration::from_millis(5),
            max_error_replies_per_second: 1_000,
            max_binding_replies_per_second: 100_000,
            replies_per_source: crate::budget::DEFAULT_PER_SOURCE,
            connect_policy: ConnectPolicy::Any,
            nonce_lifetime: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug)]
struct PeerRecord {
    addr: SocketAddr,
    local: Option<IpAddr>,
    /// What it registered over: what is sent to it later (introductions, relay
    /// offers) goes the same way (a peer registered over TCP or TLS gets them on
    /// its connection).
    transport: Transport,
    expiry_unix: u64,
    host_candidates: Box<[Candidate]>,
    nat: NatClass,
    rtt_ms: u32,
    /// Milliseconds since the server's epoch (wrapping; 32 bits keep records small).
    last_seen_ms: u32,
    /// When it last registered (Unix seconds; 32 bits last until 2106): the cluster
    /// shares it so the latest registration of a peer wins.
    registered_unix: u32,
    /// Start of the current connect-rate window, same clock.
    window_start_ms: u32,
    connects_in_window: u32,
    /// Which accepted secret its credentials derive from (0 the current one): what
    /// signs what is sent to it.
    secret: u8,
}

#[derive(Clone, Debug)]
struct IntroRecord {
    sides: [Box<str>; 2],
    nats: [NatClass; 2],
    reported: [bool; 2],
    /// TCP outcome reports seen: bit `2 * (technique - 1) + side`.
    tcp_reported: u8,
    /// TCP-Seq messages forwarded, per side (at most one each).
    tcp_seq_sent: [bool; 2],
    /// Server-assisted splicing: a side's half, kept until the other's arrives.
    forge: ForgePair,
    /// The side registered on another node, for an introduction across nodes.
    remote: Option<Box<RemoteSide>>,
    /// Whether either side's verified mapped candidate was introduced.
    mapped: bool,
}

impl IntroRecord {
    /// A fresh record of an introduction between `sides`.
    fn new(
        sides: [Box<str>; 2],
        nats: [NatClass; 2],
        remote: Option<RemoteSide>,
        mapped: bool,
    ) -> Self {
        Self {
            mapped,
            sides,
            nats,
            reported: [false; 2],
            tcp_reported: 0,
            tcp_seq_sent: [false; 2],
            forge: ForgePair::default(),
            remote: remote.map(Box::new),
        }
    }

    /// Applies side `side`'s outcome report: refused when that side already
    /// reported (per technique for TCP reports); the metrics event when it is the
    /// introduction's first (per technique).
    fn count(&mut self, side: usize, report: Report) -> Result<Option<RendezvousEvent>, Refusal> {
        let already = (RendezvousHandled::NotFound, 404, "Already Reported");
        let Report {
            outcome,
            ms,
            probes,
            technique,
        } = report;
        if let Some(technique) = technique {
            // TCP outcomes: once per side per technique, counted on the first.
            let shift = 2 * (technique as u8 - 1);
            let bit = 1u8 << (shift + side as u8);
            if self.tcp_reported & bit != 0 {
                return Err(already);
            }
            let first = self.tcp_reported & (0b11 << shift) == 0;
            self.tcp_reported |= bit;
            Ok(first.then_some(RendezvousEvent::TcpOutcome {
                initiator_nat: self.nats[0],
                responder_nat: self.nats[1],
                technique,
                success: outcome == SessionOutcome::Direct,
            }))
        } else {
            if self.reported[side] {
                return Err(already);
            }
            let first = !self.reported.iter().any(|&r| r);
            self.reported[side] = true;
            Ok(first.then_some(RendezvousEvent::Outcome {
                initiator_nat: self.nats[0],
                responder_nat: self.nats[1],
                direct: outcome == SessionOutcome::Direct,
                relayed: outcome == SessionOutcome::Relayed,
                time_to_direct: Duration::from_millis(u64::from(ms)),
                probes,
                mapped: self.mapped,
            }))
        }
    }
}

/// One side's outcome report, as its Outcome request (or another node) says it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Report {
    outcome: SessionOutcome,
    ms: u32,
    probes: u32,
    technique: Option<TcpTechnique>,
}

/// The other side of an introduction, as the recipient's Introduction describes it.
pub(super) struct IntroPeer<'a> {
    id: &'a str,
    addr: SocketAddr,
    candidates: &'a [Candidate],
    nat: NatClass,
}

/// Why a request was refused: its metrics label, error code and reason phrase.
pub(super) type Refusal = (RendezvousHandled, u16, &'static str);

/// The remembered introduction `intro_id` and which of its two sides `peer_id` is;
/// 404 when the introduction is unknown (forgotten) or the peer is not a side of it
/// registered here (the side on another node of a cross-node introduction speaks to
/// its own node).
fn intro_side<'a>(
    intros: &'a mut HashMap<u64, IntroRecord>,
    intro_id: u64,
    peer_id: &str,
) -> Result<(&'a mut IntroRecord, usize), Refusal> {
    let unknown = (RendezvousHandled::NotFound, 404, "Unknown Introduction");
    let record = intros.get_mut(&intro_id).ok_or(unknown)?;
    let side = record
        .sides
        .iter()
        .position(|s| **s == *peer_id)
        .filter(|&side| record.remote.as_ref().is_none_or(|r| r.side != side))
        .ok_or(unknown)?;
    Ok((record, side))
}

/// The rendezvous server: registers peers and introduces them to each other so
/// they can punch a direct path (one instance serves every peer of a gateway).
#[derive(Debug)]
pub struct RendezvousServer {
    secret: SharedSecret,
    config: RendezvousConfig,
    peers: HashMap<Box<str>, PeerRecord>,
    intros: HashMap<u64, IntroRecord>,
    /// Introduction ids, oldest first, with when a sweep first saw each (stamped at
    /// the next `handle_timeout`, so remembering one needs no clock).
    intro_order: VecDeque<(u64, Option<Instant>)>,
    rng: StdRng,
    /// Datagrams for the driver ([`RendezvousServer::poll_transmit`]).
    transmits: VecDeque<Transmit>,
    /// Events for the driver ([`RendezvousServer::poll_event`]).
    events: VecDeque<RendezvousEvent>,
    next_sweep: Option<Instant>,
    nonces: NonceIssuer,
    /// Error replies to unauthenticated requests.
    error_budget: ReplyBudget,
    /// Signed errors to signed requests without a valid nonce (per source only in
    /// effect: anyone with a credential could otherwise reflect them).
    signed_error_budget: ReplyBudget,
    /// Binding answers.
    binding_budget: ReplyBudget,
    /// Origin of the records' 32-bit millisecond clock: the first `now` seen (the
    /// core never reads a clock itself).
    epoch: Option<Instant>,
    /// The service and discovery endpoints, for CHANGE-REQUEST.
    alternates: binding::Alternates,
    /// Serve CHANGE-REQUEST without credentials (amplifies; off by default).
    change_unauthenticated: bool,
    /// The Binding endpoints told to peers in Register answers (none by default).
    discovery_endpoints: DiscoveryEndpoints,
    /// Forge SYN-ACKs for server-assisted TCP splicing (off by default).
    tcp_forge: bool,
    /// This node's part in a cluster ([`Self::enable_cluster`]; none by default).
    cluster: Option<ClusterState>,
    /// Where this gateway's relay hands out allocations: a Relay-Offer must name one
    /// ([`Self::set_relay_endpoints`]; none by default, so offers are refused).
    relay_endpoints: Option<RelayEndpoints>,
    /// Refusing new registrations ([`Self::set_draining`]).
    draining: Option<Draining>,
    /// The transport of the request being handled (UDP between requests): a
    /// registration remembers it, and only a request over the same transport from
    /// the registered address speaks for a registered peer.
    request_transport: Transport,
    /// The peer registered over each open stream connection (the latest one, when
    /// a connection registered several), so [`Self::connection_closed`] finds it
    /// without a walk over the registry. Entries leave when the driver reports the
    /// connection closed, so there are never more than connections.
    stream_peers: HashMap<(SocketAddr, Transport), Box<str>>,
    /// Registered peers by transport (udp, tcp, tls) at the last sweep.
    by_transport: [usize; 3],
    /// The checks of peers' mapped candidates (`server/mapped.rs`).
    mapped: mapped::MappedChecks,
}

/// The transport addresses this gateway's relay allocates on: its relay addresses
/// and port range. A Relay-Offer naming anything else is refused, so a peer cannot
/// aim the other side's agent at an arbitrary address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEndpoints {
    /// The relay's addresses (as clients see them).
    pub addresses: Vec<IpAddr>,
    /// The relay's port range.
    pub ports: std::ops::RangeInclusive<u16>,
}

impl RelayEndpoints {
    /// True when `addr` could be an allocation of this relay.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.ports.contains(&addr.port())
            && self
                .addresses
                .iter()
                .any(|a| a.to_canonical() == addr.ip().to_canonical())
    }
}

impl RendezvousServer {
    /// Creates a server; `seed` feeds the generator of introduction ids and probe keys
    /// (the daemon passes OS randomness; tests pass a constant).
    pub fn new(secret: SharedSecret, config: RendezvousConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let nonce_key: [u8; 32] = rng.random();
        let nonce_lifetime = u32::try_from(config.nonce_lifetime.as_secs()).unwrap_or(u32::MAX);
        Self {
            nonces: NonceIssuer::new(nonce_key, nonce_lifetime),
            secret,
            config,
            peers: HashMap::new(),
            intros: HashMap::new(),
            intro_order: VecDeque::new(),
            rng,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_sweep: None,
            error_budget: ReplyBudget::new(
                ReplyBudgetConfig::new(
                    config.replies_per_source,
                    config.max_error_replies_per_second,
                ),
                budget_key(&nonce_key, 1),
            ),
            signed_error_budget: ReplyBudget::new(
                ReplyBudgetConfig::new(config.replies_per_source, SIGNED_ERRORS_PER_SECOND),
                budget_key(&nonce_key, 2),
            ),
            binding_budget: ReplyBudget::new(
                ReplyBudgetConfig::new(
                    config.replies_per_source,
                    config.max_binding_replies_per_second,
                ),
                budget_key(&nonce_key, 3),
            ),
            epoch: None,
            alternates: binding::Alternates::default(),
            change_unauthenticated: false,
            discovery_endpoints: DiscoveryEndpoints::default(),
            tcp_forge: false,
            cluster: None,
            relay_endpoints: None,
            draining: None,
            request_transport: Transport::Udp,
            stream_peers: HashMap::new(),
            by_transport: [0; 3],
            mapped: mapped::MappedChecks::default(),
        }
    }

    /// Replaces the accepted secrets (a configuration reload, a secret rotation):
    /// requests are checked against the new set from now on. Registrations and
    /// introductions stay; what is sent to a registered peer stays signed with the
    /// secret its credentials derive from while that secret is still accepted (a
    /// peer whose secret was dropped fails its next refresh and must get new
    /// credentials).
    pub fn set_secret(&mut self, secret: SharedSecret) {
        let moved: Vec<u8> = (0..self.secret.len())
            .map(|i| {
                self.secret
                    .position_in(i, &secret)
                    .and_then(|p| u8::try_from(p).ok())
                    .unwrap_or(0)
            })
            .collect();
        for peer in self.peers.values_mut() {
            peer.secret = moved.get(usize::from(peer.secret)).copied().unwrap_or(0);
        }
        self.secret = secret;
    }

    /// Starts (`Some`) or ends (`None`) draining. While draining, a Register from a
    /// peer id not registered here is refused after authentication: 300 Try
    /// Alternate with ALTERNATE-SERVER (RFC 8489 §10) when [`Draining::alternate`]
    /// names another node, else 503 "Draining". Refreshes of existing
    /// registrations, Connects, outcomes, relay offers and TCP-Seq go on as before,
    /// so registered peers stay introducible until they leave.
    pub fn set_draining(&mut self, draining: Option<Draining>) {
        self.draining = draining;
    }

    /// Whether new registrations are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Enables CHANGE-REQUEST (RFC 5780) answers from the given endpoints; by default
    /// none exist and CHANGE-REQUEST gets 420. With `unauthenticated`, requests without
    /// credentials are served too (a reflection and amplification risk: see
    /// `docs/operations.md`); otherwise they get 401. An answer that must leave from
    /// discovery endpoint `i` (its index in `alternates`) comes out of
    /// [`Self::poll_transmit`] with socket number [`discovery_socket`]`(i)`.
    pub fn set_alternates(&mut self, alternates: binding::Alternates, unauthenticated: bool) {
        self.alternates = alternates;
        self.change_unauthenticated = unauthenticated;
    }

    /// The Binding endpoints every Register answer tells the peer about
    /// (DISCOVERY-ENDPOINT), so agents classify their NAT by default; empty (the
    /// default) tells nothing, and agents then behave as with an older gateway.
    pub fn set_discovery_endpoints(&mut self, endpoints: DiscoveryEndpoints) {
        self.discovery_endpoints = endpoints;
    }

    /// Enables server-assisted TCP splicing (technique 4): for a TCP-Seq with
    /// TCP-FORGE from both sides of an introduction, the core asks the driver to forge
    /// the SYN-ACK each side's NAT expects ([`RendezvousEvent::ForgeSynAck`]). That
    /// needs source-address spoofing and injects packets into the peers' flows: lab
    /// only. Off by default; such requests then get [`TCP_FORGE_DISABLED`].
    pub fn set_tcp_forge(&mut self, enabled: bool) {
        self.tcp_forge = enabled;
    }

    /// Changes whom peers may Connect to (a reload); introductions already made
    /// stand.
    pub fn set_connect_policy(&mut self, policy: ConnectPolicy) {
        self.config.connect_policy = policy;
    }

    /// Accepts Relay-Offers for allocations on `endpoints` (the relay of this
    /// gateway); `None` refuses every offer (no relay here).
    pub fn set_relay_endpoints(&mut self, endpoints: Option<RelayEndpoints>) {
        self.relay_endpoints = endpoints;
    }

    /// Registered peers, for the gauge of registered peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Registered peers by the transport they registered over, `[udp, tcp, tls]`,
    /// as the last sweep of the registry counted them (at most a second old while
    /// any peer is registered): agents on TCP or TLS are the ones whose networks drop
    /// UDP. Counted during the sweep, so it costs nothing more.
    pub fn peers_by_transport(&self) -> [usize; 3] {
        self.by_transport
    }

    /// The driver's report that the stream connection of `addr` over `transport`
    /// (TCP or TLS) closed: the peer registered over it is forgotten (nothing can
    /// reach it there any more, and an introduction to it would send the other side
    /// punching at nobody), unless it registered from elsewhere since. Returns
    /// whether one was.
    pub fn connection_closed(&mut self, addr: SocketAddr, transport: Transport) -> bool {
        let Some(peer_id) = self.stream_peers.remove(&(addr, transport)) else {
            return false;
        };
        let on_it = self
            .peers
            .get(&peer_id)
            .is_some_and(|p| p.addr == addr && p.transport == transport);
        if on_it {
            self.peers.remove(&peer_id);
        }
        on_it
    }

    /// The next datagram to send, in the order the core made them. Socket
    /// [`MAIN_SOCKET`] (0) is the service socket the requests came in on; a
    /// CHANGE-REQUEST answer that must leave from discovery endpoint `i` has socket
    /// [`discovery_socket`]`(i)` = `i + 1`. The queue grows only while datagrams are
    /// handled: a driver that drains it after each received batch bounds it by the
    /// batch.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event (introductions and outcomes for metrics, SYN-ACKs to forge), in
    /// the order they happened; bounded like [`Self::poll_transmit`].
    pub fn poll_event(&mut self) -> Option<RendezvousEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] should next run: the registry sweep, and the
    /// deadline of the oldest Connect waiting for the cluster.
    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest([
            self.next_sweep,
            self.cluster.as_ref().and_then(ClusterState::next_deadline),
            self.intro_order
                .front()
                .and_then(|(_, seen)| *seen)
                .map(|seen| seen + INTRODUCTION_MEMORY),
            self.mapped.next_timeout(),
        ])
    }

    /// Forgets registrations that were not refreshed in time or whose credentials
    /// expired; answers 503 to Connects that waited [`super::LOCATE_TIMEOUT`] for
    /// the cluster (replies and events then wait in the queues).
    pub fn handle_timeout(&mut self, now: Instant, now_unix: u64) {
        // The registry is swept when the sweep is due (once a second while anyone is
        // registered), not on every other deadline (a waiting Connect's, a mapped
        // candidate's check, an introduction's memory): a walk over every peer each
        // time would make those timers cost O(peers).
        if self.next_sweep.is_none_or(|at| at <= now) {
            let lifetime_ms = u32::try_from(self.config.lifetime.as_millis()).unwrap_or(u32::MAX);
            let now_ms = self.clock_ms(now);
            let mut by_transport = [0; 3];
            self.peers.retain(|_, peer| {
                let keep = now_ms.wrapping_sub(peer.last_seen_ms) < lifetime_ms
                    && peer.expiry_unix > now_unix;
                if keep {
                    by_transport[match peer.transport {
                        Transport::Udp => 0,
                        Transport::Tcp => 1,
                        Transport::Tls => 2,
                    }] += 1;
                }
                keep
            });
            self.by_transport = by_transport;
            self.next_sweep = (!self.peers.is_empty()).then(|| now + Duration::from_secs(1));
            shrink_when_sparse(&mut self.peers);
            self.mapped.retain_registered(&self.peers);
        }
        self.mapped_timeout(now);
        self.expire_intros(now);
        self.expire_parked(now);
    }

    /// Stamps introductions made since the last call with `now` and forgets those
    /// older than [`INTRODUCTION_MEMORY`].
    fn expire_intros(&mut self, now: Instant) {
        for (_, seen) in self.intro_order.iter_mut().rev() {
            if seen.is_some() {
                break;
            }
            *seen = Some(now);
        }
        while let Some(&(id, Some(seen))) = self.intro_order.front() {
            if now.saturating_duration_since(seen) < INTRODUCTION_MEMORY {
                break;
            }
            self.intro_order.pop_front();
            self.intros.remove(&id);
        }
        shrink_when_sparse(&mut self.intros);
        if self.intro_order.capacity() > 64
            && self.intro_order.len() < self.intro_order.capacity() / 4
        {
            self.intro_order.shrink_to_fit();
        }
    }

    /// Handles one datagram from `from`, received on local address `local` (when
    /// known): queues the replies ([`Self::poll_transmit`]) and events
    /// ([`Self::poll_event`]) and returns what became of it, a bounded metrics label.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
    ) -> RendezvousHandled {
        self.handle_message(now, now_unix, from, Transport::Udp, local, datagram)
    }

    /// [`Self::handle_datagram`] for a message that came over `transport`: one
    /// STUN message framed on a TCP or TLS connection from `from` (RFC 8656 §3.1
    /// framing, the same messages as over UDP). The answers go back over the same
    /// transport, and a peer that registers this way gets everything later sent to
    /// it (introductions, relay offers, TCP-Seq) over it too, while the driver keeps
    /// its connection.
    pub fn handle_message(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        transport: Transport,
        local: Option<IpAddr>,
        datagram: &[u8],
    ) -> RendezvousHandled {
        self.request_transport = transport;
        let start = self.transmits.len();
        let handled = self.handle_request(now, now_unix, from, local, datagram);
        if transport.is_stream() {
            // Every answer made for this request goes to its sender, on its
            // connection (indications to other peers carry their own transport).
            for transmit in self.transmits.iter_mut().skip(start) {
                if transmit.to == from && is_response(&transmit.payload) {
                    transmit.transport = transport;
                }
            }
        }
        self.request_transport = Transport::Udp;
        handled
    }

    fn handle_request(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
    ) -> RendezvousHandled {
        let message = match Message::parse(datagram) {
            Ok(message) => message,
            Err(DecodeError::NotStun | DecodeError::TooShort) => {
                return RendezvousHandled::Binding(binding::Outcome::NotStun);
            }
            Err(_) => return RendezvousHandled::Binding(binding::Outcome::Malformed),
        };
        let ty = message.message_type();
        if ty.class == Class::Request
            && ty.method == stun_method::BINDING
            && let Some(change) = binding::ChangeRequest::find(&message)
        {
            return self.change_request(now, now_unix, from, local, message, change);
        }
        if ty.class != Class::Request
            || !matches!(
                ty.method,
                method::REGISTER
                    | method::CONNECT
                    | method::OUTCOME
                    | method::RELAY_OFFER
                    | method::TCP_SEQ
                    | method::MAPPED_CHECK
            )
        {
            let mut reply = Vec::new();
            let mut outcome = BindingService.handle(from, datagram, &mut reply);
            if !reply.is_empty() && !self.binding_budget.allow(now, from.ip()) {
                reply.clear();
                outcome = binding::Outcome::Throttled;
            }
            if !reply.is_empty() {
                self.transmits
                    .push_back(Transmit::udp(from, reply).from_local(local));
            }
            return RendezvousHandled::Binding(outcome);
        }
        let auth = match self.authenticate(message, from, now_unix) {
            Ok(auth) => auth,
            Err(handled) => {
                let (code, reason) = match handled {
                    RendezvousHandled::BadRequest => (400, "Bad Request"),
                    _ => (401, "Unauthorized"),
                };
                if self.take_error_budget(now, from) {
                    self.transmits
                        .push_back(error_reply(&message, code, reason, None, from, local));
                }
                return handled;
            }
        };
        // Signed requests must echo a nonce issued to this address: a captured
        // request replayed from elsewhere (or later) changes nothing. The answer is
        // authenticated and carries the nonce to use.
        if !self.nonce_echoed(now, &auth, from, local, now_unix) {
            return RendezvousHandled::StaleNonce;
        }
        let result = match ty.method {
            method::REGISTER => self.register(now, now_unix, from, local, &auth),
            method::CONNECT => self.connect(now, from, local, &auth),
            method::RELAY_OFFER => self.relay_offer(from, &auth).map(|(h, r)| (h, Some(r))),
            method::TCP_SEQ => self.tcp_seq(from, &auth).map(|(h, r)| (h, Some(r))),
            method::MAPPED_CHECK => self.mapped_answer(&auth),
            _ => self.outcome(&auth),
        };
        match result {
            Ok((handled, reply)) => {
                // A Connect waiting for the cluster is answered later.
                if let Some(reply) = reply {
                    self.transmits
                        .push_back(Transmit::udp(from, reply).from_local(local));
                }
                handled
            }
            Err((handled, code, reason)) => {
                let signed = Some((auth.password.as_str(), auth.next_nonce.as_str()));
                let reply = match self.draining.and_then(|d| d.alternate) {
                    Some(alternate) if code == 300 => {
                        try_alternate_reply(&message, alternate, signed, from, local)
                    }
                    _ => error_reply(&message, code, reason, signed, from, local),
                };
                self.transmits.push_back(reply);
                handled
            }
        }
    }

    /// `now` on the records' wrapping 32-bit millisecond clock.
    fn clock_ms(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        // Truncation is the point: differences are taken with wrapping_sub.
        now.saturating_duration_since(epoch).as_millis() as u32
    }

    /// Creates or refreshes the sender's registration (address, host candidates, NAT
    /// class, RTT); answers with its reflexive address, the lifetime and the next nonce.
    /// In a cluster, the registration is also stored for the other nodes.
    fn register(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        auth: &Authenticated<'_>,
    ) -> Result<(RendezvousHandled, Option<Vec<u8>>), Refusal> {
        let tid = auth.message.transaction_id();
        let now_ms = self.clock_ms(now);
        let registered_unix = u32::try_from(now_unix).unwrap_or(u32::MAX);
        let mut hosts = Vec::new();
        let mut mapped = None;
        let mut nat = NatClass::Unknown;
        let mut rtt_ms = 0;
        for attribute in auth.message.attributes().filter_map(Result::ok) {
            match attribute.ty {
                attr::CANDIDATE if hosts.len() < MAX_CANDIDATES => {
                    // Host and predicted candidates; a peer cannot claim to be
                    // server-reflexive (only the gateway knows that address).
                    // A TCP reflexive candidate must be on the address the gateway
                    // sees the peer at (else a peer could aim the other side's SYNs
                    // at any third party).
                    if let Some(c) = decode_candidate(attribute.value, tid)
                        && c.kind != CandidateKind::ServerReflexive
                        && (!c.kind.is_tcp()
                            || c.addr.ip().to_canonical() == from.ip().to_canonical())
                    {
                        if c.kind == CandidateKind::Mapped {
                            // Introduced only once checked (`server/mapped.rs`).
                            mapped = mapped.or(Some(c.addr));
                        } else {
                            hosts.push(c);
                        }
                    }
                }
                attr::NAT_CLASS => {
                    nat = NatClass::from_u8(attribute.value.first().copied().unwrap_or(0))
                }
                attr::RTT => rtt_ms = read_u32(attribute.value).unwrap_or(0).min(10_000),
                _ => {}
            }
        }
        if let Some(draining) = self.draining
            && !self.peers.contains_key(auth.peer_id.as_str())
        {
            return Err(match draining.alternate {
                Some(_) => (RendezvousHandled::Draining, 300, TRY_ALTERNATE_REASON),
                None => (RendezvousHandled::Draining, 503, DRAINING_REASON),
            });
        }
        if !self.peers.contains_key(auth.peer_id.as_str())
            && self.peers.len() >= self.config.max_peers
        {
            return Err((RendezvousHandled::Full, 503, "Registry Full"));
        }
        if let Some(addr) =
            self.mapped_on_register(now, &auth.peer_id, mapped, &auth.password, local)
        {
            let verified = Candidate {
                kind: CandidateKind::Mapped,
                addr,
            };
            hosts.insert(0, verified);
            hosts.truncate(MAX_CANDIDATES);
        }
        let record = self
            .peers
            .entry(auth.peer_id.clone().into_boxed_str())
            .or_insert_with(|| PeerRecord {
                addr: from,
                local,
                transport: Transport::Udp,
                expiry_unix: auth.expiry_unix,
                host_candidates: Box::new([]),
                nat,
                rtt_ms,
                last_seen_ms: now_ms,
                registered_unix,
                window_start_ms: now_ms,
                connects_in_window: 0,
                secret: auth.secret,
            });
        record.secret = auth.secret;
        record.addr = from;
        record.local = local;
        record.transport = self.request_transport;
        if self.request_transport.is_stream() {
            self.stream_peers.insert(
                (from, self.request_transport),
                auth.peer_id.clone().into_boxed_str(),
            );
        }
        record.expiry_unix = auth.expiry_unix;
        record.host_candidates = hosts.into_boxed_slice();
        record.nat = nat;
        record.rtt_ms = rtt_ms;
        record.last_seen_ms = now_ms;
        record.registered_unix = registered_unix;
        if let Some(cluster) = &self.cluster {
            let entry = cluster.entry(&auth.peer_id, record);
            self.events
                .push_back(RendezvousEvent::Cluster(ClusterRequest::Store(entry)));
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + Duration::from_secs(1));
        }
        let mut reply = Vec::with_capacity(128);
        let mut writer = MessageWriter::new(
            &mut reply,
            MessageType {
                method: method::REGISTER,
                class: Class::Success,
            },
            tid,
        );
        let lifetime = u32::try_from(self.config.lifetime.as_secs()).unwrap_or(u32::MAX);
        writer
            .xor_mapped_address(from)
            .attribute(attr::LIFETIME, &lifetime.to_be_bytes());
        for endpoint in self.discovery_endpoints.for_request(local, from) {
            let (value, len) = crate::binding::address_value(endpoint);
            writer.attribute(attr::DISCOVERY_ENDPOINT, &value[..len]);
        }
        writer
            .attribute(stun_attr::NONCE, auth.next_nonce.as_bytes())
            .message_integrity_sha256(auth.password.as_bytes());
        writer.finish_with_fingerprint();
        Ok((RendezvousHandled::Registered, Some(reply)))
    }

    /// Introduces the sender to the peer it names: an Introduction to each side (twice)
    /// timed so both start probing together; answers with the introduction id.
    /// Rate-limited per peer. In a cluster, a target not registered here is located
    /// first (the answer waits: see `server/cluster.rs`).
    fn connect(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<IpAddr>,
        auth: &Authenticated<'_>,
    ) -> Result<(RendezvousHandled, Option<Vec<u8>>), Refusal> {
        let target = auth
            .message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::PEER_ID)
            .and_then(|a| std::str::from_utf8(a.value).ok())
            .ok_or((RendezvousHandled::BadRequest, 400, "Bad Request"))?
            .to_owned();
        let max_connects = self.config.max_connects_per_second;
        let now_ms = self.clock_ms(now);
        let initiator = self
            .peers
            .get_mut(auth.peer_id.as_str())
            .filter(|p| p.addr == from && p.transport == self.request_transport)
            .ok_or((RendezvousHandled::Forbidden, 403, "Not Registered Here"))?;
        if now_ms.wrapping_sub(initiator.window_start_ms) >= 1_000 {
            initiator.window_start_ms = now_ms;
            initiator.connects_in_window = 0;
        }
        if initiator.connects_in_window >= max_connects {
            return Err((RendezvousHandled::RateLimited, 429, "Too Many Connects"));
        }
        initiator.connects_in_window += 1;
        initiator.last_seen_ms = now_ms;
        let initiator = initiator.clone();
        let not_found = (RendezvousHandled::NotFound, 404, "Peer Not Found");
        if target == auth.peer_id || !self.config.connect_policy.allows(&auth.peer_id, &target) {
            return Err(not_found);
        }
        match self.peers.get(target.as_str()).cloned() {
            Some(responder) => {
                let intro_id = self.introduce_local(&auth.peer_id, &initiator, &target, &responder);
                let tid = auth.message.transaction_id();
                let reply =
                    cluster::connect_success(tid, &auth.password, &auth.next_nonce, intro_id);
                Ok((RendezvousHandled::Introduced, Some(reply)))
            }
            None if self.cluster.is_some() => {
                let reply_to = ReplyTo::new(from, self.request_transport, local, auth);
                self.park_connect(now, &auth.peer_id, target, reply_to)
            }
            None => Err(not_found),
        }
    }

    /// Introduces two peers both registered here: each gets its Introduction (twice),
    /// timed so both start probing together; the introduction is remembered and
    /// counted. Returns its id.
    fn introduce_local(
        &mut self,
        initiator_id: &str,
        initiator: &PeerRecord,
        responder_id: &str,
        responder: &PeerRecord,
    ) -> u64 {
        let intro_id: u64 = self.rng.random();
        let probe_key: [u8; 16] = self.rng.random();
        let margin = u32::try_from(self.config.start_margin.as_millis()).unwrap_or(5);
        let (initiator_delay, responder_delay) =
            start_delays(initiator.rtt_ms / 2, responder.rtt_ms / 2, margin);
        let shared = (intro_id, probe_key);
        let responder_side = IntroPeer {
            id: responder_id,
            addr: responder.addr,
            candidates: &responder.host_candidates,
            nat: responder.nat,
        };
        self.push_introduction(
            initiator_id,
            initiator,
            &responder_side,
            shared,
            initiator_delay,
            0,
        );
        let initiator_side = IntroPeer {
            id: initiator_id,
            addr: initiator.addr,
            candidates: &initiator.host_candidates,
            nat: initiator.nat,
        };
        self.push_introduction(
            responder_id,
            responder,
            &initiator_side,
            shared,
            responder_delay,
            1,
        );
        let sides = [initiator_id.into(), responder_id.into()];
        let nats = [initiator.nat, responder.nat];
        let mapped =
            has_mapped(&initiator.host_candidates) || has_mapped(&responder.host_candidates);
        self.remember_intro(intro_id, IntroRecord::new(sides, nats, None, mapped));
        self.events.push_back(RendezvousEvent::Introduced {
            initiator_nat: initiator.nat,
            responder_nat: responder.nat,
        });
        intro_id
    }

    /// Queues `recipient`'s Introduction to `other` (twice), signed with the
    /// recipient's password: the other's candidates (server-reflexive first, then
    /// TCP, then host and predicted), the probe key, the START-DELAY and the role
    /// (0 initiator, 1 responder).
    fn push_introduction(
        &mut self,
        recipient_id: &str,
        recipient: &PeerRecord,
        other: &IntroPeer<'_>,
        (intro_id, probe_key): (u64, [u8; 16]),
        delay_ms: u32,
        role: u8,
    ) {
        let password = self.password_for(recipient_id, recipient);
        let tid: [u8; 12] = self.rng.random();
        let mut payload = Vec::with_capacity(256);
        let mut writer = MessageWriter::new(
            &mut payload,
            MessageType {
                method: method::INTRODUCTION,
                class: Class::Indication,
            },
            tid,
        );
        writer
            .attribute(attr::INTRO_ID, &intro_id.to_be_bytes())
            .attribute(attr::PEER_ID, other.id.as_bytes());
        let reflexive = Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: other.addr,
        };
        // TCP candidates right after the reflexive one, so the cap never drops
        // them (agents that predate them ignore the unknown kind). Only the node a
        // peer registered on knows its reflexive address: another kind of
        // candidate never claims it.
        let announced = other
            .candidates
            .iter()
            .filter(|c| c.kind != CandidateKind::ServerReflexive);
        let tcp = announced.clone().filter(|c| c.kind.is_tcp());
        let hosts = announced.filter(|c| !c.kind.is_tcp());
        for candidate in std::iter::once(reflexive)
            .chain(tcp.chain(hosts).copied())
            .take(MAX_CANDIDATES)
        {
            let (value, len) = encode_candidate(candidate, tid);
            writer.attribute(attr::CANDIDATE, &value[..len]);
        }
        writer
            .attribute(attr::PROBE_KEY, &probe_key)
            .attribute(attr::START_DELAY, &delay_ms.to_be_bytes())
            .attribute(attr::ROLE, &[role])
            .attribute(attr::NAT_CLASS, &[other.nat as u8])
            .message_integrity_sha256(password.as_bytes());
        writer.finish_with_fingerprint();
        // Sent twice: a lost introduction costs a whole punch attempt, a duplicate
        // costs one datagram (the agent ignores an introduction it already has).
        forward::push_twice(
            &mut self.transmits,
            (recipient.addr, recipient.transport),
            recipient.local,
            payload,
        );
    }

    /// The password of registered peer `id`, which signs what is sent to it.
    fn password_for(&self, id: &str, record: &PeerRecord) -> String {
        let username = format!("{}:{id}", record.expiry_unix);
        self.secret
            .password_with(usize::from(record.secret), &username)
    }

    /// Remembers an introduction, forgetting the oldest beyond
    /// [`MAX_REMEMBERED_INTRODUCTIONS`].
    fn remember_intro(&mut self, id: u64, record: IntroRecord) {
        if self.intro_order.len() >= MAX_REMEMBERED_INTRODUCTIONS
            && let Some((oldest, _)) = self.intro_order.pop_front()
        {
            self.intros.remove(&oldest);
        }
        self.intros.insert(id, record);
        self.intro_order.push_back((id, None));
    }

    /// Accepts each side's first outcome report of an introduction (per technique for
    /// TCP reports); the first of the two sides' is the one counted. A report for an
    /// introduction owned by another node (the initiator's) is answered here and
    /// counted there.
    fn outcome(
        &mut self,
        auth: &Authenticated<'_>,
    ) -> Result<(RendezvousHandled, Option<Vec<u8>>), Refusal> {
        let mut intro_id = None;
        let mut report = None;
        let mut technique = None;
        for attribute in auth.message.attributes().filter_map(Result::ok) {
            match attribute.ty {
                attr::INTRO_ID => intro_id = read_u64(attribute.value),
                attr::TECHNIQUE => {
                    technique = Some(
                        attribute
                            .value
                            .first()
                            .copied()
                            .and_then(TcpTechnique::from_u8)
                            .ok_or((RendezvousHandled::BadRequest, 400, "Bad Request"))?,
                    );
                }
                attr::OUTCOME if attribute.value.len() == 9 => {
                    let outcome = SessionOutcome::from_u8(attribute.value[0]);
                    let ms = read_u32(&attribute.value[1..5]).unwrap_or(0);
                    let probes = read_u32(&attribute.value[5..9]).unwrap_or(0);
                    report = Some((outcome, ms, probes));
                }
                _ => {}
            }
        }
        let (Some(intro_id), Some((outcome, ms, probes))) = (intro_id, report) else {
            return Err((RendezvousHandled::BadRequest, 400, "Bad Request"));
        };
        let report = Report {
            outcome,
            ms,
            probes,
            technique,
        };
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        let counted = record.count(side, report)?;
        match record.remote.as_deref() {
            // The initiator's node owns the introduction: it counts.
            Some(remote) if remote.side == 0 => {
                let send = cluster::outcome_to_owner(remote, intro_id, side, report);
                self.events.push_back(RendezvousEvent::Cluster(send));
            }
            _ => self.events.extend(counted),
        }
        Ok((
            RendezvousHandled::OutcomeAccepted,
            Some(auth::signed_success(
                method::OUTCOME,
                auth.message.transaction_id(),
                auth,
            )),
        ))
    }
}

/// Whether `candidates` hold a (verified) mapped candidate.
fn has_mapped(candidates: &[Candidate]) -> bool {
    candidates.iter().any(|c| c.kind == CandidateKind::Mapped)
}

/// True for a STUN success or error response (what answers a request, and so goes
/// to the requester).
fn is_response(payload: &[u8]) -> bool {
    payload.len() >= 2 && payload[0] & 0x01 == 0x01
}

#[cfg(test)]
impl RendezvousServer {
    /// The nonce the server would give `from` (what an agent learns on first contact).
    pub(crate) fn issue_nonce(&self, from: SocketAddr, now_unix: u64) -> String {
        self.nonces.issue(from, now_unix)
    }
}

/// Gives a map's memory back once churn left it mostly empty (a hash map keeps its
/// largest capacity otherwise).
fn shrink_when_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests;
