//! The rendezvous server's state machine (see `docs/protocol.md`): registration,
//! connect requests, introductions with synchronised start times, and outcome
//! reports. Sans-IO: the caller passes the time, the datagram and its source, and
//! gets datagrams to send and events for metrics.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    binding::{self, BindingService},
    credentials::{CredentialError, SharedSecret},
    nonce::{NonceCheck, NonceIssuer},
    stun::{
        self, Class, DecodeError, Message, MessageType, MessageWriter, attr as stun_attr,
        method as stun_method,
    },
};

/// Method numbers of the rendezvous (expert-review range).
pub mod method {
    /// Register (and keepalive).
    pub const REGISTER: u16 = 0xC01;
    /// Connect: introduce me to a peer.
    pub const CONNECT: u16 = 0xC02;
    /// Introduction (indication from the gateway).
    pub const INTRODUCTION: u16 = 0xC03;
    /// Outcome report.
    pub const OUTCOME: u16 = 0xC04;
    /// Relay offer: "reach me at this TURN relayed address" (request from a side of an
    /// introduction; forwarded as an indication to the other side).
    pub const RELAY_OFFER: u16 = 0xC05;
    /// TCP-Seq: "my low-TTL SYN toward you left with this initial sequence number"
    /// (request from a side of an introduction; forwarded as an indication to the
    /// other side), for TCP technique 3 (NATBlaster-style).
    pub const TCP_SEQ: u16 = 0xC06;
}

/// Attribute types of the rendezvous.
pub mod attr {
    /// Registration lifetime in seconds (TURN's LIFETIME).
    pub const LIFETIME: u16 = 0x000D;
    /// A peer id.
    pub const PEER_ID: u16 = 0x4001;
    /// A candidate address with its kind.
    pub const CANDIDATE: u16 = 0x4002;
    /// Introduction id (u64).
    pub const INTRO_ID: u16 = 0x4003;
    /// Probe key (16 bytes).
    pub const PROBE_KEY: u16 = 0x4004;
    /// Start delay in milliseconds (u32).
    pub const START_DELAY: u16 = 0x4005;
    /// Role (u8).
    pub const ROLE: u16 = 0x4006;
    /// NAT mapping class (u8).
    pub const NAT_CLASS: u16 = 0x4007;
    /// Round-trip time in milliseconds (u32).
    pub const RTT: u16 = 0x4008;
    /// Outcome report (u8 + u32 + u32).
    pub const OUTCOME: u16 = 0x4009;
    /// TCP punching technique an Outcome report is about (u8, [`super::TcpTechnique`]).
    pub const TECHNIQUE: u16 = 0x400A;
    /// Initial sequence number of the sender's SYN (u32), in TCP-Seq.
    pub const TCP_SEQ: u16 = 0x400B;
    /// In TCP-Seq: "do not forward my sequence number; forge the SYN-ACKs into both
    /// NATs once both sides' are in" (TCP technique 4, server-assisted; u8, 1).
    pub const TCP_FORGE: u16 = 0x400C;
}

/// Error code of a TCP-Seq that asks for forged SYN-ACKs (technique 4) from a
/// gateway that does not forge (`server.tcp_forge_synack` is off, the default).
pub const TCP_FORGE_DISABLED: u16 = 501;
/// SYN-ACKs the gateway forges per introduction at most: each side's twice.
pub const MAX_FORGED_PER_INTRODUCTION: usize = 4;
/// Copies of each forged SYN-ACK (one lost copy must not cost the technique).
const FORGED_COPIES: usize = 2;
const _: () = assert!(2 * FORGED_COPIES == MAX_FORGED_PER_INTRODUCTION);

/// Most candidates accepted in, or sent out with, one message.
pub const MAX_CANDIDATES: usize = 8;
/// Introductions remembered for outcome reports.
pub const MAX_REMEMBERED_INTRODUCTIONS: usize = 65_536;

/// What a candidate address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// An address of the peer's own interface.
    Host = 0,
    /// The address the gateway saw (outside the peer's NAT).
    ServerReflexive = 1,
    /// A guessed external port of an endpoint-dependent NAT.
    Predicted = 2,
    /// A TURN relayed address (a relay offer after punching failed).
    Relayed = 3,
    /// The peer's TCP endpoint as the gateway's TCP service port saw it (learnt by
    /// the peer with a STUN Binding over TCP); the target of TCP hole punching.
    TcpServerReflexive = 4,
}

impl CandidateKind {
    /// Whether the candidate is a TCP endpoint (never probed over UDP).
    pub const fn is_tcp(self) -> bool {
        matches!(self, Self::TcpServerReflexive)
    }
}

/// A TCP hole-punching technique (the TECHNIQUE attribute's value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpTechnique {
    /// Both sides connect() to each other from their reflexive port at the same
    /// instant (a simultaneous open), retrying within RFC 5382's 6 s window.
    SimultaneousOpen = 1,
    /// Each side first sends a SYN whose TTL expires between the two NATs (opening
    /// its own mapping), then connects for real.
    LowTtl = 2,
    /// Each side sends a low-TTL SYN, captures its initial sequence number and
    /// sends it to the other side through the gateway (TCP-Seq); then both send
    /// crafted packets that complete the handshake (NATBlaster-style).
    NatBlaster = 3,
    /// Each side sends a low-TTL SYN and gives its initial sequence number to the
    /// gateway (TCP-Seq with TCP-FORGE), which forges into each NAT the SYN-ACK that
    /// NAT expects as the answer to its host's SYN (server-assisted splicing; needs
    /// source-address spoofing at the gateway, lab only, off by default).
    ServerAssisted = 4,
}

impl TcpTechnique {
    /// Every technique, in order of cost.
    pub const ALL: [Self; 4] = [
        Self::SimultaneousOpen,
        Self::LowTtl,
        Self::NatBlaster,
        Self::ServerAssisted,
    ];
    /// What `auto` tries, in this order: not server-assisted, which needs a gateway
    /// that forges (an operator's explicit, lab-only choice) and, in the lab, never
    /// connects a pair that NATBlaster does not (see docs/tcp-splicing.md).
    pub const AUTO: [Self; 3] = [Self::SimultaneousOpen, Self::LowTtl, Self::NatBlaster];

    /// Decodes the wire value.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::SimultaneousOpen),
            2 => Some(Self::LowTtl),
            3 => Some(Self::NatBlaster),
            4 => Some(Self::ServerAssisted),
            _ => None,
        }
    }

    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SimultaneousOpen => "simultaneous_open",
            Self::LowTtl => "low_ttl",
            Self::NatBlaster => "natblaster",
            Self::ServerAssisted => "server_assisted",
        }
    }

    /// The command-line name.
    pub const fn cli_name(self) -> &'static str {
        match self {
            Self::SimultaneousOpen => "simultaneous-open",
            Self::LowTtl => "low-ttl",
            Self::NatBlaster => "natblaster",
            Self::ServerAssisted => "server-assisted",
        }
    }
}

/// How a session between two peers ended up, as its outcome report says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionOutcome {
    /// A direct (punched) path.
    Direct = 0,
    /// No path at all.
    Failed = 1,
    /// Punching failed; the TURN relay carries the session.
    Relayed = 2,
}

impl SessionOutcome {
    /// Decodes the wire value; unknown values read as `Failed`.
    pub fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Direct,
            2 => Self::Relayed,
            _ => Self::Failed,
        }
    }

    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Failed => "failed",
            Self::Relayed => "relayed",
        }
    }
}

/// A candidate address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Its kind.
    pub kind: CandidateKind,
    /// The address.
    pub addr: SocketAddr,
}

/// The NAT mapping behaviour a peer measured (RFC 4787 terms); a bounded label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NatClass {
    /// Not measured.
    #[default]
    Unknown = 0,
    /// No NAT: the reflexive address is the host's own.
    None = 1,
    /// Endpoint-independent mapping.
    EndpointIndependent = 2,
    /// Address-dependent mapping.
    AddressDependent = 3,
    /// Address-and-port-dependent mapping ("symmetric").
    AddressAndPortDependent = 4,
}

impl NatClass {
    /// Every class, for pre-registering label values.
    pub const ALL: [NatClass; 5] = [
        NatClass::Unknown,
        NatClass::None,
        NatClass::EndpointIndependent,
        NatClass::AddressDependent,
        NatClass::AddressAndPortDependent,
    ];

    /// Decodes the wire value; unknown values read as `Unknown`.
    pub fn from_u8(value: u8) -> Self {
        match value {
            1 => NatClass::None,
            2 => NatClass::EndpointIndependent,
            3 => NatClass::AddressDependent,
            4 => NatClass::AddressAndPortDependent,
            _ => NatClass::Unknown,
        }
    }

    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            NatClass::Unknown => "unknown",
            NatClass::None => "none",
            NatClass::EndpointIndependent => "endpoint_independent",
            NatClass::AddressDependent => "address_dependent",
            NatClass::AddressAndPortDependent => "address_and_port_dependent",
        }
    }
}

/// The NAT filtering behaviour a peer measured (RFC 4787 terms) with RFC 5780's
/// CHANGE-REQUEST tests; a bounded label. Measured, not announced: the wire format of
/// Register does not carry it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FilteringClass {
    /// Not measured (no discovery endpoints, or the gateway cannot answer from
    /// another endpoint).
    #[default]
    Unknown,
    /// Endpoint-independent filtering: an answer from another address and port got in.
    EndpointIndependent,
    /// Address-dependent filtering: only an answer from the same address (another port)
    /// got in.
    AddressDependent,
    /// Address-and-port-dependent filtering: neither got in.
    AddressAndPortDependent,
}

impl FilteringClass {
    /// Every class, for pre-registering label values.
    pub const ALL: [FilteringClass; 4] = [
        FilteringClass::Unknown,
        FilteringClass::EndpointIndependent,
        FilteringClass::AddressDependent,
        FilteringClass::AddressAndPortDependent,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            FilteringClass::Unknown => "unknown",
            FilteringClass::EndpointIndependent => "endpoint_independent",
            FilteringClass::AddressDependent => "address_dependent",
            FilteringClass::AddressAndPortDependent => "address_and_port_dependent",
        }
    }
}

/// Encodes a CANDIDATE value: kind, reserved, then an XOR-MAPPED-ADDRESS value.
pub fn encode_candidate(candidate: Candidate, transaction_id: [u8; 12]) -> ([u8; 22], usize) {
    let mut out = [0u8; 22];
    out[0] = candidate.kind as u8;
    let address = stun::encode_xor_address(candidate.addr, transaction_id);
    let len = if candidate.addr.is_ipv4() { 8 } else { 20 };
    out[2..2 + len].copy_from_slice(&address[..len]);
    (out, 2 + len)
}

/// Decodes a CANDIDATE value.
pub fn decode_candidate(value: &[u8], transaction_id: [u8; 12]) -> Option<Candidate> {
    let kind = match value.first()? {
        0 => CandidateKind::Host,
        1 => CandidateKind::ServerReflexive,
        2 => CandidateKind::Predicted,
        3 => CandidateKind::Relayed,
        4 => CandidateKind::TcpServerReflexive,
        _ => return None,
    };
    let addr = stun::decode_xor_address(value.get(2..)?, transaction_id)?;
    Some(Candidate { kind, addr })
}

/// What became of one datagram: a bounded metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
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
}

impl Handled {
    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Handled::Binding(outcome) => outcome.as_str(),
            Handled::Registered => "registered",
            Handled::Introduced => "introduced",
            Handled::OutcomeAccepted => "outcome_accepted",
            Handled::RelayOffered => "relay_offered",
            Handled::TcpSeqForwarded => "tcp_seq_forwarded",
            Handled::TcpForgeQueued => "tcp_forge_queued",
            Handled::TcpSynAckForged => "tcp_synack_forged",
            Handled::TcpForgeDisabled => "tcp_forge_disabled",
            Handled::BadRequest => "bad_request",
            Handled::Unauthorized => "unauthorized",
            Handled::StaleNonce => "stale_nonce",
            Handled::Forbidden => "forbidden",
            Handled::NotFound => "not_found",
            Handled::RateLimited => "rate_limited",
            Handled::Full => "full",
            Handled::ChangeAnswered => "change_request_answered",
        }
    }

    /// Every label value.
    pub const ALL_LABELS: [&'static str; 21] = [
        "binding_success",
        "unknown_attribute",
        "not_stun",
        "malformed",
        "unhandled",
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
    ];
}

/// Something metrics should know about.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
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
}

/// The core's one datagram type (see [`crate::Transmit`]).
pub use crate::Transmit;

/// A SYN-ACK the gateway must forge (TCP technique 4): a raw TCP segment from `src`
/// (spoofed: the other side's public TCP endpoint) to `dst` (this side's public TCP
/// endpoint), sequence number `seq` (the other side's ISN) acknowledging `ack` (this
/// side's ISN + 1). The driver crafts and injects it; the core never does I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForgedSynAck {
    /// Source (the other side's public TCP endpoint).
    pub src: SocketAddr,
    /// Destination (this side's public TCP endpoint).
    pub dst: SocketAddr,
    /// Sequence number: the other side's initial sequence number.
    pub seq: u32,
    /// Acknowledgement number: this side's initial sequence number + 1.
    pub ack: u32,
}

/// An answer to send from another of the gateway's sockets (a CHANGE-REQUEST answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirected {
    /// Index of the discovery socket (as given to [`RendezvousServer::set_alternates`]).
    pub endpoint: usize,
    /// The datagram.
    pub transmit: Transmit,
}

/// Tunables of the rendezvous server.
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
    /// together (a global budget: keeping per-source state for unauthenticated
    /// traffic would be the memory attack itself).
    pub max_error_replies_per_second: u32,
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
            nonce_lifetime: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug)]
struct PeerRecord {
    addr: SocketAddr,
    local: Option<IpAddr>,
    expiry_unix: u64,
    host_candidates: Box<[Candidate]>,
    nat: NatClass,
    rtt_ms: u32,
    /// Milliseconds since the server's epoch (wrapping; 32 bits keep records small).
    last_seen_ms: u32,
    /// Start of the current connect-rate window, same clock.
    window_start_ms: u32,
    connects_in_window: u32,
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
    tcp_forge: [Option<ForgeHalf>; 2],
}

/// The remembered introduction `intro_id` and which of its two sides `peer_id` is;
/// 404 when the introduction is unknown (forgotten) or the peer is not a side of it.
fn intro_side<'a>(
    intros: &'a mut HashMap<u64, IntroRecord>,
    intro_id: u64,
    peer_id: &str,
) -> Result<(&'a mut IntroRecord, usize), (Handled, u16, &'static str)> {
    let unknown = (Handled::NotFound, 404, "Unknown Introduction");
    let record = intros.get_mut(&intro_id).ok_or(unknown)?;
    let side = record
        .sides
        .iter()
        .position(|s| **s == *peer_id)
        .ok_or(unknown)?;
    Ok((record, side))
}

/// One side's part of a server-assisted splice.
#[derive(Clone, Copy, Debug)]
struct ForgeHalf {
    /// The initial sequence number of its low-TTL SYN.
    isn: u32,
    /// Its public TCP endpoint (its registered TCP candidate).
    own: SocketAddr,
    /// Where its SYN went (the other side's registered TCP candidate).
    target: SocketAddr,
}

/// The rendezvous server.
#[derive(Debug)]
pub struct RendezvousServer {
    secret: SharedSecret,
    config: RendezvousConfig,
    peers: HashMap<Box<str>, PeerRecord>,
    intros: HashMap<u64, IntroRecord>,
    intro_order: VecDeque<u64>,
    rng: StdRng,
    events: Vec<Event>,
    next_sweep: Option<Instant>,
    nonces: NonceIssuer,
    error_budget: u32,
    error_window: Option<Instant>,
    /// Origin of the records' 32-bit millisecond clock: the first `now` seen (the
    /// core never reads a clock itself).
    epoch: Option<Instant>,
    /// The service and discovery endpoints, for CHANGE-REQUEST.
    alternates: binding::Alternates,
    /// Serve CHANGE-REQUEST without credentials (amplifies; off by default).
    change_unauthenticated: bool,
    /// CHANGE-REQUEST answers to send from a discovery socket.
    redirected: Vec<Redirected>,
    /// Forge SYN-ACKs for server-assisted TCP splicing (off by default).
    tcp_forge: bool,
    /// SYN-ACKs to forge, for the driver.
    forged: Vec<ForgedSynAck>,
}

/// What an authenticated request carried.
struct Authenticated<'a> {
    message: Message<'a>,
    peer_id: String,
    password: String,
    expiry_unix: u64,
    /// A fresh nonce for the sender, returned in every reply.
    next_nonce: String,
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
            events: Vec::new(),
            next_sweep: None,
            error_budget: 0,
            error_window: None,
            epoch: None,
            alternates: binding::Alternates::default(),
            change_unauthenticated: false,
            redirected: Vec::new(),
            tcp_forge: false,
            forged: Vec::new(),
        }
    }

    /// Enables CHANGE-REQUEST (RFC 5780) answers from the given endpoints; by default
    /// none exist and CHANGE-REQUEST gets 420. With `unauthenticated`, requests without
    /// credentials are served too (a reflection and amplification risk: see
    /// `docs/operations.md`); otherwise they get 401.
    pub fn set_alternates(&mut self, alternates: binding::Alternates, unauthenticated: bool) {
        self.alternates = alternates;
        self.change_unauthenticated = unauthenticated;
    }

    /// Enables server-assisted TCP splicing (technique 4): for a TCP-Seq with
    /// TCP-FORGE from both sides of an introduction, the core asks the driver to forge
    /// the SYN-ACK each side's NAT expects ([`Self::drain_forged`]). That needs
    /// source-address spoofing and injects packets into the peers' flows: lab only.
    /// Off by default; such requests then get [`TCP_FORGE_DISABLED`].
    pub fn set_tcp_forge(&mut self, enabled: bool) {
        self.tcp_forge = enabled;
    }

    /// Takes the SYN-ACKs to forge gathered since the last call.
    pub fn drain_forged(&mut self) -> std::vec::Drain<'_, ForgedSynAck> {
        self.forged.drain(..)
    }

    /// Takes the answers gathered since the last call that must leave from a
    /// discovery socket rather than the one the request came in on.
    pub fn drain_redirected(&mut self) -> std::vec::Drain<'_, Redirected> {
        self.redirected.drain(..)
    }

    /// Registered peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Takes the events gathered since the last call.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// When [`Self::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Forgets registrations that were not refreshed in time or whose credentials
    /// expired.
    pub fn handle_timeout(&mut self, now: Instant, now_unix: u64) {
        let lifetime_ms = u32::try_from(self.config.lifetime.as_millis()).unwrap_or(u32::MAX);
        let now_ms = self.clock_ms(now);
        self.peers.retain(|_, peer| {
            now_ms.wrapping_sub(peer.last_seen_ms) < lifetime_ms && peer.expiry_unix > now_unix
        });
        self.next_sweep = (!self.peers.is_empty()).then(|| now + Duration::from_secs(1));
    }

    /// Handles one datagram from `from`, received on local address `local` (when
    /// known), appending replies to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        out: &mut Vec<Transmit>,
    ) -> Handled {
        let message = match Message::parse(datagram) {
            Ok(message) => message,
            Err(DecodeError::NotStun | DecodeError::TooShort) => {
                return Handled::Binding(binding::Outcome::NotStun);
            }
            Err(_) => return Handled::Binding(binding::Outcome::Malformed),
        };
        let ty = message.message_type();
        if ty.class == Class::Request
            && ty.method == stun_method::BINDING
            && let Some(change) = binding::ChangeRequest::find(&message)
        {
            return self.change_request(now, now_unix, from, local, message, change, out);
        }
        if ty.class != Class::Request
            || !matches!(
                ty.method,
                method::REGISTER
                    | method::CONNECT
                    | method::OUTCOME
                    | method::RELAY_OFFER
                    | method::TCP_SEQ
            )
        {
            let mut reply = Vec::new();
            let outcome = BindingService.handle(from, datagram, &mut reply);
            if !reply.is_empty() {
                out.push(Transmit::udp(from, reply).from_local(local));
            }
            return Handled::Binding(outcome);
        }
        let auth = match self.authenticate(message, from, now_unix) {
            Ok(auth) => auth,
            Err(handled) => {
                let (code, reason) = match handled {
                    Handled::BadRequest => (400, "Bad Request"),
                    _ => (401, "Unauthorized"),
                };
                if self.take_error_budget(now) {
                    out.push(error_reply(&message, code, reason, None, from, local));
                }
                return handled;
            }
        };
        // Signed requests must echo a nonce issued to this address: a captured
        // request replayed from elsewhere (or later) changes nothing. The answer is
        // authenticated and carries the nonce to use.
        if !self.nonce_echoed(&auth, from, local, now_unix, out) {
            return Handled::StaleNonce;
        }
        let result = match ty.method {
            method::REGISTER => self.register(now, from, local, &auth),
            method::CONNECT => self.connect(now, from, &auth, out),
            method::RELAY_OFFER => self.relay_offer(from, &auth, out),
            method::TCP_SEQ => self.tcp_seq(from, &auth, out),
            _ => self.outcome(&auth),
        };
        match result {
            Ok((handled, reply)) => {
                out.push(Transmit::udp(from, reply).from_local(local));
                handled
            }
            Err((handled, code, reason)) => {
                out.push(error_reply(
                    &message,
                    code,
                    reason,
                    Some((&auth.password, &auth.next_nonce)),
                    from,
                    local,
                ));
                handled
            }
        }
    }

    /// A Binding request with CHANGE-REQUEST (RFC 5780): answered from the endpoint it
    /// asks for, when the sender authenticated like any rendezvous request (REST
    /// credentials, MESSAGE-INTEGRITY-SHA256, a nonce issued to its address) or the
    /// operator allowed unauthenticated ones; otherwise a small 401 and nothing from
    /// another endpoint. 420 when no endpoint can serve the change.
    #[allow(clippy::too_many_arguments)]
    fn change_request(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        message: Message<'_>,
        change: Option<binding::ChangeRequest>,
        out: &mut Vec<Transmit>,
    ) -> Handled {
        let Some(change) = change else {
            if self.take_error_budget(now) {
                out.push(error_reply(&message, 400, "Bad Request", None, from, local));
            }
            return Handled::BadRequest;
        };
        let signed = message
            .attributes()
            .filter_map(Result::ok)
            .any(|a| a.ty == stun_attr::USERNAME);
        let auth = if signed || !self.change_unauthenticated {
            match self.authenticate(message, from, now_unix) {
                Ok(auth) => Some(auth),
                Err(_) => {
                    if self.take_error_budget(now) {
                        out.push(error_reply(
                            &message,
                            401,
                            "Unauthorized",
                            None,
                            from,
                            local,
                        ));
                    }
                    return Handled::Unauthorized;
                }
            }
        } else if self.take_error_budget(now) {
            // Unauthenticated answers share the budget of unauthenticated errors: a
            // global cap on what spoofed requests can make the gateway send.
            None
        } else {
            return Handled::RateLimited;
        };
        if let Some(auth) = &auth
            && !self.nonce_echoed(auth, from, local, now_unix, out)
        {
            return Handled::StaleNonce;
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
            out.push(Transmit::udp(from, payload).from_local(local));
            return Handled::Binding(binding::Outcome::UnknownAttribute);
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
            Some(endpoint) => self.redirected.push(Redirected { endpoint, transmit }),
            None => out.push(transmit),
        }
        Handled::ChangeAnswered
    }

    /// `now` on the records' wrapping 32-bit millisecond clock.
    fn clock_ms(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        // Truncation is the point: differences are taken with wrapping_sub.
        now.saturating_duration_since(epoch).as_millis() as u32
    }

    /// Spends one unauthenticated error reply from this second's budget.
    /// Whether a signed request echoes a nonce issued to `from`; if not, answers 401
    /// (missing) or 438 (expired, or issued to another address), authenticated and
    /// with the nonce to use.
    fn nonce_echoed(
        &self,
        auth: &Authenticated<'_>,
        from: SocketAddr,
        local: Option<IpAddr>,
        now_unix: u64,
        out: &mut Vec<Transmit>,
    ) -> bool {
        let nonce = auth
            .message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == stun_attr::NONCE)
            .map(|a| self.nonces.check(a.value, from, now_unix));
        if nonce == Some(NonceCheck::Valid) {
            return true;
        }
        let (code, reason) = if nonce.is_none() {
            (401, "Nonce Required")
        } else {
            (438, "Stale Nonce")
        };
        out.push(error_reply(
            &auth.message,
            code,
            reason,
            Some((&auth.password, &auth.next_nonce)),
            from,
            local,
        ));
        false
    }

    fn take_error_budget(&mut self, now: Instant) -> bool {
        let window_over = self
            .error_window
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if window_over {
            self.error_window = Some(now);
            self.error_budget = self.config.max_error_replies_per_second;
        }
        if self.error_budget == 0 {
            return false;
        }
        self.error_budget -= 1;
        true
    }

    fn authenticate<'a>(
        &self,
        message: Message<'a>,
        from: SocketAddr,
        now_unix: u64,
    ) -> Result<Authenticated<'a>, Handled> {
        let username = message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == stun_attr::USERNAME)
            .ok_or(Handled::BadRequest)?;
        let username = std::str::from_utf8(username.value).map_err(|_| Handled::Unauthorized)?;
        let (peer_id, password) = self.secret.check(username, now_unix).map_err(|e| match e {
            CredentialError::Malformed | CredentialError::BadPeerId | CredentialError::Expired => {
                Handled::Unauthorized
            }
        })?;
        message
            .verify_integrity_sha256(password.as_bytes())
            .map_err(|_| Handled::Unauthorized)?;
        let expiry_unix = username
            .split_once(':')
            .and_then(|(e, _)| e.parse().ok())
            .ok_or(Handled::Unauthorized)?;
        Ok(Authenticated {
            message,
            peer_id: peer_id.to_owned(),
            password,
            expiry_unix,
            next_nonce: self.nonces.issue(from, now_unix),
        })
    }

    fn register(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<IpAddr>,
        auth: &Authenticated<'_>,
    ) -> Result<(Handled, Vec<u8>), (Handled, u16, &'static str)> {
        let tid = auth.message.transaction_id();
        let now_ms = self.clock_ms(now);
        let mut hosts = Vec::new();
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
                        hosts.push(c);
                    }
                }
                attr::NAT_CLASS => {
                    nat = NatClass::from_u8(attribute.value.first().copied().unwrap_or(0))
                }
                attr::RTT => rtt_ms = read_u32(attribute.value).unwrap_or(0).min(10_000),
                _ => {}
            }
        }
        if !self.peers.contains_key(auth.peer_id.as_str())
            && self.peers.len() >= self.config.max_peers
        {
            return Err((Handled::Full, 503, "Registry Full"));
        }
        let record = self
            .peers
            .entry(auth.peer_id.clone().into_boxed_str())
            .or_insert_with(|| PeerRecord {
                addr: from,
                local,
                expiry_unix: auth.expiry_unix,
                host_candidates: Box::new([]),
                nat,
                rtt_ms,
                last_seen_ms: now_ms,
                window_start_ms: now_ms,
                connects_in_window: 0,
            });
        record.addr = from;
        record.local = local;
        record.expiry_unix = auth.expiry_unix;
        record.host_candidates = hosts.into_boxed_slice();
        record.nat = nat;
        record.rtt_ms = rtt_ms;
        record.last_seen_ms = now_ms;
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
            .attribute(attr::LIFETIME, &lifetime.to_be_bytes())
            .attribute(stun_attr::NONCE, auth.next_nonce.as_bytes())
            .message_integrity_sha256(auth.password.as_bytes());
        writer.finish_with_fingerprint();
        Ok((Handled::Registered, reply))
    }

    fn connect(
        &mut self,
        now: Instant,
        from: SocketAddr,
        auth: &Authenticated<'_>,
        out: &mut Vec<Transmit>,
    ) -> Result<(Handled, Vec<u8>), (Handled, u16, &'static str)> {
        let target = auth
            .message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::PEER_ID)
            .and_then(|a| std::str::from_utf8(a.value).ok())
            .ok_or((Handled::BadRequest, 400, "Bad Request"))?
            .to_owned();
        let max_connects = self.config.max_connects_per_second;
        let now_ms = self.clock_ms(now);
        let initiator = self
            .peers
            .get_mut(auth.peer_id.as_str())
            .filter(|p| p.addr == from)
            .ok_or((Handled::Forbidden, 403, "Not Registered Here"))?;
        if now_ms.wrapping_sub(initiator.window_start_ms) >= 1_000 {
            initiator.window_start_ms = now_ms;
            initiator.connects_in_window = 0;
        }
        if initiator.connects_in_window >= max_connects {
            return Err((Handled::RateLimited, 429, "Too Many Connects"));
        }
        initiator.connects_in_window += 1;
        initiator.last_seen_ms = now_ms;
        let initiator = initiator.clone();
        let responder = self
            .peers
            .get(target.as_str())
            .filter(|_| target != auth.peer_id)
            .cloned()
            .ok_or((Handled::NotFound, 404, "Peer Not Found"))?;

        let intro_id: u64 = self.rng.random();
        let probe_key: [u8; 16] = self.rng.random();
        let slower_one_way = initiator.rtt_ms.max(responder.rtt_ms) / 2;
        let margin = u32::try_from(self.config.start_margin.as_millis()).unwrap_or(5);
        let delay = |own_rtt: u32| {
            slower_one_way
                .saturating_add(margin)
                .saturating_sub(own_rtt / 2)
        };
        let sides = [
            (
                &initiator,
                auth.peer_id.as_str(),
                &responder,
                target.as_str(),
                0u8,
            ),
            (
                &responder,
                target.as_str(),
                &initiator,
                auth.peer_id.as_str(),
                1u8,
            ),
        ];
        for (recipient, recipient_id, other, other_id, role) in sides {
            let username = format!("{}:{recipient_id}", recipient.expiry_unix);
            let password = self.secret.password(&username);
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
                .attribute(attr::PEER_ID, other_id.as_bytes());
            let reflexive = Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: other.addr,
            };
            // TCP candidates right after the reflexive one, so the cap never drops
            // them (agents that predate them ignore the unknown kind).
            let tcp = other.host_candidates.iter().filter(|c| c.kind.is_tcp());
            let hosts = other.host_candidates.iter().filter(|c| !c.kind.is_tcp());
            for candidate in std::iter::once(reflexive)
                .chain(tcp.chain(hosts).copied())
                .take(MAX_CANDIDATES)
            {
                let (value, len) = encode_candidate(candidate, tid);
                writer.attribute(attr::CANDIDATE, &value[..len]);
            }
            writer
                .attribute(attr::PROBE_KEY, &probe_key)
                .attribute(attr::START_DELAY, &delay(recipient.rtt_ms).to_be_bytes())
                .attribute(attr::ROLE, &[role])
                .attribute(attr::NAT_CLASS, &[other.nat as u8])
                .message_integrity_sha256(password.as_bytes());
            writer.finish_with_fingerprint();
            // Sent twice: a lost introduction costs a whole punch attempt, a duplicate
            // costs one datagram (the agent ignores an introduction it already has).
            out.push(Transmit::udp(recipient.addr, payload.clone()).from_local(recipient.local));
            out.push(Transmit::udp(recipient.addr, payload).from_local(recipient.local));
        }
        self.remember_intro(
            intro_id,
            IntroRecord {
                sides: [
                    auth.peer_id.clone().into_boxed_str(),
                    target.into_boxed_str(),
                ],
                nats: [initiator.nat, responder.nat],
                reported: [false; 2],
                tcp_reported: 0,
                tcp_seq_sent: [false; 2],
                tcp_forge: [None; 2],
            },
        );
        self.events.push(Event::Introduced {
            initiator_nat: initiator.nat,
            responder_nat: responder.nat,
        });
        let mut reply = Vec::with_capacity(96);
        let mut writer = MessageWriter::new(
            &mut reply,
            MessageType {
                method: method::CONNECT,
                class: Class::Success,
            },
            auth.message.transaction_id(),
        );
        writer
            .attribute(attr::INTRO_ID, &intro_id.to_be_bytes())
            .attribute(stun_attr::NONCE, auth.next_nonce.as_bytes())
            .message_integrity_sha256(auth.password.as_bytes());
        writer.finish_with_fingerprint();
        Ok((Handled::Introduced, reply))
    }

    fn remember_intro(&mut self, id: u64, record: IntroRecord) {
        if self.intro_order.len() >= MAX_REMEMBERED_INTRODUCTIONS
            && let Some(oldest) = self.intro_order.pop_front()
        {
            self.intros.remove(&oldest);
        }
        self.intros.insert(id, record);
        self.intro_order.push_back(id);
    }

    /// Forwards a side's TURN relayed address to the other side of an introduction,
    /// signed for the recipient. Only a registered side of a remembered introduction
    /// may offer, and only relayed candidates pass.
    fn relay_offer(
        &mut self,
        from: SocketAddr,
        auth: &Authenticated<'_>,
        out: &mut Vec<Transmit>,
    ) -> Result<(Handled, Vec<u8>), (Handled, u16, &'static str)> {
        let tid = auth.message.transaction_id();
        let mut intro_id = None;
        let mut relayed = None;
        for attribute in auth.message.attributes().filter_map(Result::ok) {
            match attribute.ty {
                attr::INTRO_ID => intro_id = read_u64(attribute.value),
                attr::CANDIDATE => {
                    relayed = decode_candidate(attribute.value, tid)
                        .filter(|c| c.kind == CandidateKind::Relayed)
                }
                _ => {}
            }
        }
        let (Some(intro_id), Some(relayed)) = (intro_id, relayed) else {
            return Err((Handled::BadRequest, 400, "Bad Request"));
        };
        if self
            .peers
            .get(auth.peer_id.as_str())
            .is_none_or(|p| p.addr != from)
        {
            return Err((Handled::Forbidden, 403, "Not Registered Here"));
        }
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        let other_id = record.sides[1 - side].clone();
        let other = self
            .peers
            .get(&*other_id)
            .ok_or((Handled::NotFound, 404, "Peer Not Found"))?;
        let username = format!("{}:{other_id}", other.expiry_unix);
        let password = self.secret.password(&username);
        let indication_tid: [u8; 12] = self.rng.random();
        let mut payload = Vec::with_capacity(128);
        let mut writer = MessageWriter::new(
            &mut payload,
            MessageType {
                method: method::RELAY_OFFER,
                class: Class::Indication,
            },
            indication_tid,
        );
        let (value, len) = encode_candidate(relayed, indication_tid);
        writer
            .attribute(attr::INTRO_ID, &intro_id.to_be_bytes())
            .attribute(attr::PEER_ID, auth.peer_id.as_bytes())
            .attribute(attr::CANDIDATE, &value[..len])
            .message_integrity_sha256(password.as_bytes());
        writer.finish_with_fingerprint();
        // Twice, like introductions: losing it costs the whole fallback.
        push_twice(out, other.addr, other.local, payload);
        Ok((
            Handled::RelayOffered,
            signed_success(method::RELAY_OFFER, tid, auth),
        ))
    }

    /// Forwards a side's initial sequence number (and the endpoint it expects the
    /// other side at) to the other side of an introduction, signed for the
    /// recipient. Only a registered side of a remembered introduction may send it,
    /// once per introduction; nothing else is kept.
    fn tcp_seq(
        &mut self,
        from: SocketAddr,
        auth: &Authenticated<'_>,
        out: &mut Vec<Transmit>,
    ) -> Result<(Handled, Vec<u8>), (Handled, u16, &'static str)> {
        let tid = auth.message.transaction_id();
        let (mut intro_id, mut isn, mut expected, mut forge) = (None, None, None, false);
        for attribute in auth.message.attributes().filter_map(Result::ok) {
            match attribute.ty {
                attr::INTRO_ID => intro_id = read_u64(attribute.value),
                attr::TCP_SEQ if attribute.value.len() == 4 => isn = read_u32(attribute.value),
                attr::TCP_FORGE => forge = true,
                attr::CANDIDATE => {
                    expected = decode_candidate(attribute.value, tid)
                        .filter(|c| c.kind == CandidateKind::TcpServerReflexive)
                }
                _ => {}
            }
        }
        let (Some(intro_id), Some(isn)) = (intro_id, isn) else {
            return Err((Handled::BadRequest, 400, "Bad Request"));
        };
        if forge {
            let Some(target) = expected else {
                return Err((Handled::BadRequest, 400, "Bad Request"));
            };
            return self.tcp_forge(from, auth, intro_id, isn, target.addr);
        }
        if self
            .peers
            .get(auth.peer_id.as_str())
            .is_none_or(|p| p.addr != from)
        {
            return Err((Handled::Forbidden, 403, "Not Registered Here"));
        }
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        if record.tcp_seq_sent[side] {
            return Err((Handled::NotFound, 404, "Already Sent"));
        }
        let other_id = record.sides[1 - side].clone();
        let other = self
            .peers
            .get(&*other_id)
            .ok_or((Handled::NotFound, 404, "Peer Not Found"))?;
        record.tcp_seq_sent[side] = true;
        let username = format!("{}:{other_id}", other.expiry_unix);
        let password = self.secret.password(&username);
        let indication_tid: [u8; 12] = self.rng.random();
        let mut payload = Vec::with_capacity(128);
        let mut writer = MessageWriter::new(
            &mut payload,
            MessageType {
                method: method::TCP_SEQ,
                class: Class::Indication,
            },
            indication_tid,
        );
        writer
            .attribute(attr::INTRO_ID, &intro_id.to_be_bytes())
            .attribute(attr::PEER_ID, auth.peer_id.as_bytes())
            .attribute(attr::TCP_SEQ, &isn.to_be_bytes());
        if let Some(expected) = expected {
            let (value, len) = encode_candidate(expected, indication_tid);
            writer.attribute(attr::CANDIDATE, &value[..len]);
        }
        writer.message_integrity_sha256(password.as_bytes());
        writer.finish_with_fingerprint();
        // Twice, like relay offers: losing it costs the whole technique.
        push_twice(out, other.addr, other.local, payload);
        Ok((
            Handled::TcpSeqForwarded,
            signed_success(method::TCP_SEQ, tid, auth),
        ))
    }

    /// Server-assisted splicing (technique 4): keeps a side's initial sequence number
    /// (nothing is forwarded) and, once the other side's is in, queues the two forged
    /// SYN-ACKs. Refused (no state, nothing forged) when forging is off, the sender is
    /// not registered from here or not a side of a remembered introduction, already
    /// sent one, has no TCP candidate, or names another target than the other side's
    /// TCP candidate.
    fn tcp_forge(
        &mut self,
        from: SocketAddr,
        auth: &Authenticated<'_>,
        intro_id: u64,
        isn: u32,
        target: SocketAddr,
    ) -> Result<(Handled, Vec<u8>), (Handled, u16, &'static str)> {
        if !self.tcp_forge {
            return Err((
                Handled::TcpForgeDisabled,
                TCP_FORGE_DISABLED,
                "SYN-ACK Forging Disabled",
            ));
        }
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let target = canonical(target);
        let tcp_candidate = |peer: &PeerRecord| {
            peer.host_candidates
                .iter()
                .find(|c| c.kind.is_tcp())
                .map(|c| canonical(c.addr))
        };
        let own = match self.peers.get(auth.peer_id.as_str()) {
            Some(p) if p.addr == from => tcp_candidate(p),
            _ => return Err((Handled::Forbidden, 403, "Not Registered Here")),
        };
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        if record.tcp_seq_sent[side] {
            return Err((Handled::NotFound, 404, "Already Sent"));
        }
        let other_tcp = self
            .peers
            .get(&*record.sides[1 - side])
            .and_then(tcp_candidate)
            .ok_or((Handled::NotFound, 404, "Peer Not Found"))?;
        let Some(own) = own else {
            return Err((Handled::BadRequest, 400, "No TCP Candidate"));
        };
        if target != other_tcp || own.is_ipv4() != target.is_ipv4() {
            return Err((Handled::BadRequest, 400, "Wrong Target"));
        }
        record.tcp_seq_sent[side] = true;
        let half = ForgeHalf { isn, own, target };
        let handled = match record.tcp_forge[1 - side].take() {
            // The other side's half names our endpoint as its target (both sides'
            // candidates are what they were when each half arrived).
            Some(theirs) if theirs.target == own && theirs.own == target => {
                for (to, by) in [(half, theirs), (theirs, half)] {
                    let forged = ForgedSynAck {
                        src: by.own,
                        dst: to.own,
                        seq: by.isn,
                        ack: to.isn.wrapping_add(1),
                    };
                    for _ in 0..FORGED_COPIES {
                        self.forged.push(forged);
                    }
                }
                Handled::TcpSynAckForged
            }
            // A candidate moved in between: nothing is forged, nothing kept.
            Some(_) => Handled::TcpForgeQueued,
            None => {
                record.tcp_forge[side] = Some(half);
                Handled::TcpForgeQueued
            }
        };
        Ok((
            handled,
            signed_success(method::TCP_SEQ, auth.message.transaction_id(), auth),
        ))
    }

    fn outcome(
        &mut self,
        auth: &Authenticated<'_>,
    ) -> Result<(Handled, Vec<u8>), (Handled, u16, &'static str)> {
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
                            .ok_or((Handled::BadRequest, 400, "Bad Request"))?,
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
            return Err((Handled::BadRequest, 400, "Bad Request"));
        };
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        if let Some(technique) = technique {
            // TCP outcomes: once per side per technique, counted on the first.
            let shift = 2 * (technique as u8 - 1);
            let bit = 1u8 << (shift + side as u8);
            if record.tcp_reported & bit != 0 {
                return Err((Handled::NotFound, 404, "Already Reported"));
            }
            let first = record.tcp_reported & (0b11 << shift) == 0;
            record.tcp_reported |= bit;
            if first {
                self.events.push(Event::TcpOutcome {
                    initiator_nat: record.nats[0],
                    responder_nat: record.nats[1],
                    technique,
                    success: outcome == SessionOutcome::Direct,
                });
            }
        } else {
            if record.reported[side] {
                return Err((Handled::NotFound, 404, "Already Reported"));
            }
            let first = !record.reported.iter().any(|&r| r);
            record.reported[side] = true;
            if first {
                self.events.push(Event::Outcome {
                    initiator_nat: record.nats[0],
                    responder_nat: record.nats[1],
                    direct: outcome == SessionOutcome::Direct,
                    relayed: outcome == SessionOutcome::Relayed,
                    time_to_direct: Duration::from_millis(u64::from(ms)),
                    probes,
                });
            }
        }
        let mut reply = Vec::with_capacity(64);
        let mut writer = MessageWriter::new(
            &mut reply,
            MessageType {
                method: method::OUTCOME,
                class: Class::Success,
            },
            auth.message.transaction_id(),
        );
        writer
            .attribute(stun_attr::NONCE, auth.next_nonce.as_bytes())
            .message_integrity_sha256(auth.password.as_bytes());
        writer.finish_with_fingerprint();
        Ok((Handled::OutcomeAccepted, reply))
    }
}

fn read_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

fn read_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// An error response; integrity-protected only when the requester authenticated.
/// Queues `payload` to `to` twice (a signed indication whose loss costs a technique).
fn push_twice(
    out: &mut Vec<Transmit>,
    to: SocketAddr,
    from_local: Option<IpAddr>,
    payload: Vec<u8>,
) {
    out.push(Transmit::udp(to, payload.clone()).from_local(from_local));
    out.push(Transmit::udp(to, payload).from_local(from_local));
}

/// A success answer carrying only the sender's next nonce, signed with its key.
fn signed_success(method: u16, tid: [u8; 12], auth: &Authenticated<'_>) -> Vec<u8> {
    let mut reply = Vec::with_capacity(64);
    let mut writer = MessageWriter::new(
        &mut reply,
        MessageType {
            method,
            class: Class::Success,
        },
        tid,
    );
    writer
        .attribute(stun_attr::NONCE, auth.next_nonce.as_bytes())
        .message_integrity_sha256(auth.password.as_bytes());
    writer.finish_with_fingerprint();
    reply
}

fn error_reply(
    request: &Message<'_>,
    code: u16,
    reason: &str,
    authenticated: Option<(&str, &str)>,
    to: SocketAddr,
    from_local: Option<IpAddr>,
) -> Transmit {
    let mut payload = Vec::with_capacity(96);
    let mut writer = MessageWriter::new(
        &mut payload,
        MessageType {
            method: request.message_type().method,
            class: Class::Error,
        },
        request.transaction_id(),
    );
    writer.error_code(code, reason);
    if let Some((password, nonce)) = authenticated {
        writer
            .attribute(stun_attr::NONCE, nonce.as_bytes())
            .message_integrity_sha256(password.as_bytes());
    }
    writer.finish_with_fingerprint();
    Transmit::udp(to, payload).from_local(from_local)
}

/// Builders and parsers for the peer's side of the protocol.
pub mod client {
    use super::*;

    /// Credentials a peer signs its requests with.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct PeerCredentials {
        /// `expiry:peer-id`.
        pub username: String,
        /// The derived password.
        pub password: String,
    }

    pub(super) fn request(
        method: u16,
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        fill: impl FnOnce(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        let mut writer = MessageWriter::new(
            &mut out,
            MessageType {
                method,
                class: Class::Request,
            },
            tid,
        );
        writer.attribute(stun_attr::USERNAME, credentials.username.as_bytes());
        if let Some(nonce) = nonce {
            writer.attribute(stun_attr::NONCE, nonce.as_bytes());
        }
        fill(&mut writer);
        writer.message_integrity_sha256(credentials.password.as_bytes());
        writer.finish_with_fingerprint();
        out
    }

    /// A Register (or keepalive) request announcing host candidates. `nonce` is the
    /// last one the gateway gave (none at first contact: the answer brings one).
    pub fn register(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        hosts: &[SocketAddr],
        nat: NatClass,
        rtt_ms: u32,
    ) -> Vec<u8> {
        let candidates: Vec<Candidate> = hosts
            .iter()
            .map(|&addr| Candidate {
                kind: CandidateKind::Host,
                addr,
            })
            .collect();
        register_with_candidates(tid, credentials, nonce, &candidates, nat, rtt_ms)
    }

    /// A Register request announcing host and predicted candidates.
    pub fn register_with_candidates(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        candidates: &[Candidate],
        nat: NatClass,
        rtt_ms: u32,
    ) -> Vec<u8> {
        request(method::REGISTER, tid, credentials, nonce, |w| {
            for &candidate in candidates.iter().take(MAX_CANDIDATES - 1) {
                let (value, len) = encode_candidate(candidate, tid);
                w.attribute(attr::CANDIDATE, &value[..len]);
            }
            w.attribute(attr::NAT_CLASS, &[nat as u8]);
            w.attribute(attr::RTT, &rtt_ms.to_be_bytes());
        })
    }

    /// A Connect request for `target`.
    pub fn connect(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        target: &str,
    ) -> Vec<u8> {
        request(method::CONNECT, tid, credentials, nonce, |w| {
            w.attribute(attr::PEER_ID, target.as_bytes());
        })
    }

    /// An Outcome report.
    pub fn outcome(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        intro_id: u64,
        outcome: SessionOutcome,
        time_to_direct_ms: u32,
        probes: u32,
    ) -> Vec<u8> {
        request(method::OUTCOME, tid, credentials, nonce, |w| {
            w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
            let mut value = [0u8; 9];
            value[0] = outcome as u8;
            value[1..5].copy_from_slice(&time_to_direct_ms.to_be_bytes());
            value[5..9].copy_from_slice(&probes.to_be_bytes());
            w.attribute(attr::OUTCOME, &value);
        })
    }

    /// What a TCP punching outcome report says.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TcpReport {
        /// The technique.
        pub technique: TcpTechnique,
        /// Whether it produced a connection.
        pub connected: bool,
        /// From the technique's start to the connection (or to giving up).
        pub elapsed_ms: u32,
        /// connect() calls made.
        pub attempts: u32,
    }

    /// A TCP punching outcome report for introduction `intro_id`.
    pub fn tcp_outcome(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        intro_id: u64,
        report: TcpReport,
    ) -> Vec<u8> {
        let TcpReport {
            technique,
            connected,
            elapsed_ms,
            attempts,
        } = report;
        let outcome = if connected {
            SessionOutcome::Direct
        } else {
            SessionOutcome::Failed
        };
        request(method::OUTCOME, tid, credentials, nonce, |w| {
            w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
            let mut value = [0u8; 9];
            value[0] = outcome as u8;
            value[1..5].copy_from_slice(&elapsed_ms.to_be_bytes());
            value[5..9].copy_from_slice(&attempts.to_be_bytes());
            w.attribute(attr::OUTCOME, &value);
            w.attribute(attr::TECHNIQUE, &[technique as u8]);
        })
    }

    /// A relay offer: our TURN relayed address for introduction `intro_id`.
    pub fn relay_offer(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        intro_id: u64,
        relayed: SocketAddr,
    ) -> Vec<u8> {
        request(method::RELAY_OFFER, tid, credentials, nonce, |w| {
            w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
            let (value, len) = encode_candidate(
                Candidate {
                    kind: CandidateKind::Relayed,
                    addr: relayed,
                },
                tid,
            );
            w.attribute(attr::CANDIDATE, &value[..len]);
        })
    }

    /// A TCP-Seq request: the initial sequence number of our low-TTL SYN for
    /// introduction `intro_id`, and the other side's endpoint we sent it to. With
    /// `forge`, the gateway keeps it and forges the SYN-ACKs itself (technique 4)
    /// instead of forwarding it.
    pub fn tcp_seq(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        intro_id: u64,
        isn: u32,
        expected: Option<SocketAddr>,
        forge: bool,
    ) -> Vec<u8> {
        request(method::TCP_SEQ, tid, credentials, nonce, |w| {
            w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
            w.attribute(attr::TCP_SEQ, &isn.to_be_bytes());
            if forge {
                w.attribute(attr::TCP_FORGE, &[1]);
            }
            if let Some(addr) = expected {
                let (value, len) = encode_candidate(
                    Candidate {
                        kind: CandidateKind::TcpServerReflexive,
                        addr,
                    },
                    tid,
                );
                w.attribute(attr::CANDIDATE, &value[..len]);
            }
        })
    }

    /// A TCP-Seq forwarded by the gateway.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct TcpSeq {
        /// The introduction it belongs to.
        pub intro_id: u64,
        /// Who sent it.
        pub peer_id: String,
        /// The initial sequence number of their SYN.
        pub isn: u32,
        /// The endpoint of ours they sent that SYN to, if they said.
        pub expected: Option<SocketAddr>,
    }

    /// Parses and verifies a forwarded TCP-Seq signed with `password`.
    pub fn parse_tcp_seq(datagram: &[u8], password: &str) -> Option<TcpSeq> {
        let message = signed_indication(datagram, method::TCP_SEQ, password)?;
        let tid = message.transaction_id();
        let (mut intro_id, mut peer_id, mut isn, mut expected) = (None, None, None, None);
        for a in message.attributes().filter_map(Result::ok) {
            match a.ty {
                attr::INTRO_ID => intro_id = read_u64(a.value),
                attr::PEER_ID => peer_id = std::str::from_utf8(a.value).ok().map(str::to_owned),
                attr::TCP_SEQ if a.value.len() == 4 => isn = read_u32(a.value),
                attr::CANDIDATE => {
                    expected = decode_candidate(a.value, tid)
                        .filter(|c| c.kind == CandidateKind::TcpServerReflexive)
                        .map(|c| c.addr)
                }
                _ => {}
            }
        }
        Some(TcpSeq {
            intro_id: intro_id?,
            peer_id: peer_id?,
            isn: isn?,
            expected,
        })
    }

    /// A Binding request with CHANGE-REQUEST (RFC 5780 filtering tests), signed like
    /// the rendezvous requests so the gateway will answer it from another endpoint.
    pub fn change_request(
        tid: [u8; 12],
        credentials: &PeerCredentials,
        nonce: Option<&str>,
        change: binding::ChangeRequest,
    ) -> Vec<u8> {
        request(stun_method::BINDING, tid, credentials, nonce, |w| {
            w.attribute(binding::attr5780::CHANGE_REQUEST, &change.to_value());
        })
    }

    /// An indication of `wanted` method from the gateway, integrity-checked with
    /// `password` (introductions and relay offers are signed for their recipient).
    fn signed_indication<'a>(
        datagram: &'a [u8],
        wanted: u16,
        password: &str,
    ) -> Option<Message<'a>> {
        let message = Message::parse(datagram).ok()?;
        let ty = message.message_type();
        if ty.method != wanted || ty.class != Class::Indication {
            return None;
        }
        message.verify_integrity_sha256(password.as_bytes()).ok()?;
        Some(message)
    }

    /// A relay offer forwarded by the gateway.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct RelayOffer {
        /// The introduction it belongs to.
        pub intro_id: u64,
        /// Who offers.
        pub peer_id: String,
        /// Their relayed address: send there to reach them.
        pub relayed: SocketAddr,
    }

    /// Parses and verifies a forwarded relay offer signed with `password`.
    pub fn parse_relay_offer(datagram: &[u8], password: &str) -> Option<RelayOffer> {
        let message = signed_indication(datagram, method::RELAY_OFFER, password)?;
        let tid = message.transaction_id();
        let (mut intro_id, mut peer_id, mut relayed) = (None, None, None);
        for a in message.attributes().filter_map(Result::ok) {
            match a.ty {
                attr::INTRO_ID => intro_id = read_u64(a.value),
                attr::PEER_ID => peer_id = std::str::from_utf8(a.value).ok().map(str::to_owned),
                attr::CANDIDATE => {
                    relayed = decode_candidate(a.value, tid)
                        .filter(|c| c.kind == CandidateKind::Relayed)
                        .map(|c| c.addr)
                }
                _ => {}
            }
        }
        Some(RelayOffer {
            intro_id: intro_id?,
            peer_id: peer_id?,
            relayed: relayed?,
        })
    }

    /// A verified response from the gateway.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Response {
        /// The method answered.
        pub method: u16,
        /// The transaction.
        pub transaction_id: [u8; 12],
        /// `Ok` for success, `Err(code)` for an error response.
        pub result: Result<(), u16>,
        /// XOR-MAPPED-ADDRESS, when present.
        pub mapped: Option<SocketAddr>,
        /// INTRO-ID, when present.
        pub intro_id: Option<u64>,
        /// LIFETIME, when present.
        pub lifetime: Option<Duration>,
        /// The nonce to use next, when the response is authenticated and has one.
        pub nonce: Option<String>,
    }

    /// Parses a response to a rendezvous request. Success responses must carry valid
    /// integrity under `password`; unauthenticated error responses are accepted
    /// (they cannot do more than make the peer retry), but only an authenticated
    /// response can hand the peer a nonce.
    pub fn parse_response(datagram: &[u8], password: &str) -> Option<Response> {
        let message = Message::parse(datagram).ok()?;
        let ty = message.message_type();
        let authenticated = message.verify_integrity_sha256(password.as_bytes()).is_ok();
        let result = match ty.class {
            Class::Success if authenticated => Ok(()),
            Class::Success => return None,
            Class::Error => {
                let code = message
                    .attributes()
                    .filter_map(Result::ok)
                    .find(|a| a.ty == stun_attr::ERROR_CODE)
                    .and_then(|a| {
                        Some(u16::from(*a.value.get(2)? & 7) * 100 + u16::from(*a.value.get(3)?))
                    })
                    .unwrap_or(0);
                Err(code)
            }
            _ => return None,
        };
        let tid = message.transaction_id();
        let mut response = Response {
            method: ty.method,
            transaction_id: tid,
            result,
            mapped: None,
            intro_id: None,
            lifetime: None,
            nonce: None,
        };
        for a in message.attributes().filter_map(Result::ok) {
            match a.ty {
                stun_attr::XOR_MAPPED_ADDRESS => {
                    response.mapped = stun::decode_xor_address(a.value, tid)
                }
                attr::INTRO_ID => response.intro_id = read_u64(a.value),
                attr::LIFETIME => {
                    response.lifetime = read_u32(a.value).map(|s| Duration::from_secs(u64::from(s)))
                }
                stun_attr::NONCE if authenticated => {
                    response.nonce = std::str::from_utf8(a.value).ok().map(str::to_owned)
                }
                _ => {}
            }
        }
        Some(response)
    }

    /// Whether the peer initiated or answers an introduction.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Role {
        /// It sent the Connect.
        Initiator,
        /// The other side did.
        Responder,
    }

    /// A verified Introduction.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Introduction {
        /// Its id.
        pub intro_id: u64,
        /// The other side's peer id.
        pub peer_id: String,
        /// The other side's candidates, server-reflexive first.
        pub candidates: Vec<Candidate>,
        /// The key both sides sign probes with.
        pub probe_key: [u8; 16],
        /// How long to wait after receipt before probing.
        pub start_delay: Duration,
        /// This side's role.
        pub role: Role,
        /// The other side's NAT class.
        pub peer_nat: NatClass,
    }

    /// Parses and verifies an Introduction indication signed with `password`.
    pub fn parse_introduction(datagram: &[u8], password: &str) -> Option<Introduction> {
        let message = signed_indication(datagram, method::INTRODUCTION, password)?;
        let tid = message.transaction_id();
        let mut intro_id = None;
        let mut peer_id = None;
        let mut candidates = Vec::new();
        let mut probe_key = None;
        let mut start_delay = Duration::ZERO;
        let mut role = None;
        let mut peer_nat = NatClass::Unknown;
        for a in message.attributes().filter_map(Result::ok) {
            match a.ty {
                attr::INTRO_ID => intro_id = read_u64(a.value),
                attr::PEER_ID => peer_id = std::str::from_utf8(a.value).ok().map(str::to_owned),
                attr::CANDIDATE if candidates.len() < MAX_CANDIDATES => {
                    candidates.extend(decode_candidate(a.value, tid));
                }
                attr::PROBE_KEY => probe_key = a.value.try_into().ok(),
                attr::START_DELAY => {
                    start_delay = Duration::from_millis(u64::from(read_u32(a.value)?.min(5_000)))
                }
                attr::ROLE => {
                    role = match a.value.first()? {
                        0 => Some(Role::Initiator),
                        _ => Some(Role::Responder),
                    }
                }
                attr::NAT_CLASS => peer_nat = NatClass::from_u8(*a.value.first()?),
                _ => {}
            }
        }
        Some(Introduction {
            intro_id: intro_id?,
            peer_id: peer_id?,
            candidates,
            probe_key: probe_key?,
            start_delay,
            role: role?,
            peer_nat,
        })
    }

    /// A punch probe: a Binding request authenticated with the introduction's key.
    pub fn probe_request(tid: [u8; 12], intro_id: u64, key: &[u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        let mut writer = MessageWriter::new(
            &mut out,
            MessageType {
                method: stun_method::BINDING,
                class: Class::Request,
            },
            tid,
        );
        writer
            .attribute(stun_attr::USERNAME, format!("{intro_id:016x}").as_bytes())
            .message_integrity_sha256(key);
        writer.finish_with_fingerprint();
        out
    }

    /// The answer to a probe received from `from`.
    pub fn probe_response(tid: [u8; 12], from: SocketAddr, key: &[u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        let mut writer = MessageWriter::new(
            &mut out,
            MessageType {
                method: stun_method::BINDING,
                class: Class::Success,
            },
            tid,
        );
        writer
            .xor_mapped_address(from)
            .message_integrity_sha256(key);
        writer.finish_with_fingerprint();
        out
    }

    /// A verified probe or probe response.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Probe {
        /// A request for introduction `intro_id`, to be answered.
        Request {
            /// Which introduction.
            intro_id: u64,
            /// Its transaction.
            transaction_id: [u8; 12],
        },
        /// A response to one of our probes.
        Response {
            /// Its transaction.
            transaction_id: [u8; 12],
            /// Where the other side saw our probe come from.
            mapped: Option<SocketAddr>,
        },
    }

    /// Parses a probe or probe response and checks it against `key`.
    pub fn parse_probe(datagram: &[u8], key: &[u8; 16]) -> Option<Probe> {
        let message = Message::parse(datagram).ok()?;
        let ty = message.message_type();
        if ty.method != stun_method::BINDING {
            return None;
        }
        message.verify_integrity_sha256(key).ok()?;
        let tid = message.transaction_id();
        match ty.class {
            Class::Request => {
                let username = message
                    .attributes()
                    .filter_map(Result::ok)
                    .find(|a| a.ty == stun_attr::USERNAME)?;
                let text = std::str::from_utf8(username.value).ok()?;
                let intro_id = u64::from_str_radix(text, 16).ok()?;
                Some(Probe::Request {
                    intro_id,
                    transaction_id: tid,
                })
            }
            Class::Success => {
                let mapped = message
                    .attributes()
                    .filter_map(Result::ok)
                    .find(|a| a.ty == stun_attr::XOR_MAPPED_ADDRESS)
                    .and_then(|a| stun::decode_xor_address(a.value, tid));
                Some(Probe::Response {
                    transaction_id: tid,
                    mapped,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;
    use proptest::prelude::*;

    const NOW_UNIX: u64 = 1_800_000_000;

    fn secret() -> SharedSecret {
        SharedSecret::new(b"operator secret")
    }

    fn creds(peer: &str) -> PeerCredentials {
        let issued = secret().issue(peer, NOW_UNIX + 3600).expect("issue");
        PeerCredentials {
            username: issued.username,
            password: issued.password,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    struct World {
        server: RendezvousServer,
        now: Instant,
    }

    impl World {
        fn new() -> Self {
            Self {
                server: RendezvousServer::new(secret(), RendezvousConfig::default(), 7),
                now: Instant::now(),
            }
        }

        /// The nonce the server gives `from` (what an agent learns on first contact).
        fn nonce(&self, from: SocketAddr) -> String {
            self.server.nonces.issue(from, NOW_UNIX)
        }

        fn send(&mut self, from: SocketAddr, datagram: &[u8]) -> (Handled, Vec<Transmit>) {
            let mut out = Vec::new();
            let local = Some(IpAddr::from([192, 0, 2, 10]));
            let handled = self
                .server
                .handle(self.now, NOW_UNIX, from, local, datagram, &mut out);
            (handled, out)
        }

        fn register(
            &mut self,
            peer: &str,
            from: SocketAddr,
            hosts: &[SocketAddr],
            nat: NatClass,
            rtt: u32,
        ) {
            let c = creds(peer);
            let (handled, out) = self.send(
                from,
                &register([1; 12], &c, Some(&self.nonce(from)), hosts, nat, rtt),
            );
            assert_eq!(handled, Handled::Registered);
            let response = parse_response(&out[0].payload, &c.password).expect("signed response");
            assert_eq!(response.result, Ok(()));
            assert_eq!(response.mapped, Some(from));
        }
    }

    /// The lab's layout: service on every address, a discovery socket on another port
    /// of every address, one on another address and port.
    fn discovery_world(unauthenticated: bool) -> World {
        let mut world = World::new();
        world.server.set_alternates(
            binding::Alternates::new(
                addr("0.0.0.0:3478"),
                vec![addr("0.0.0.0:3479"), addr("192.0.2.11:3480")],
            ),
            unauthenticated,
        );
        world
    }

    fn change(change_ip: bool, change_port: bool) -> binding::ChangeRequest {
        binding::ChangeRequest {
            change_ip,
            change_port,
        }
    }

    fn address_attr(datagram: &[u8], ty: u16) -> Option<SocketAddr> {
        Message::parse(datagram)
            .ok()?
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == ty)
            .and_then(|a| binding::decode_address(a.value))
    }

    #[test]
    fn change_requests_are_answered_from_the_endpoint_asked_for() {
        let mut world = discovery_world(false);
        let alice = creds("alice");
        let home = addr("198.51.100.2:4000");
        let nonce = world.nonce(home);
        for (ip, port, endpoint, origin) in [
            (false, true, 0, "192.0.2.10:3479"),
            (true, true, 1, "192.0.2.11:3480"),
        ] {
            let request = change_request([4; 12], &alice, Some(&nonce), change(ip, port));
            let (handled, out) = world.send(home, &request);
            assert_eq!(handled, Handled::ChangeAnswered);
            assert!(out.is_empty(), "nothing leaves from the service socket");
            let redirected: Vec<Redirected> = world.server.drain_redirected().collect();
            assert_eq!(redirected.len(), 1);
            let answer = &redirected[0];
            assert_eq!(answer.endpoint, endpoint);
            assert_eq!(answer.transmit.to, home);
            let response =
                parse_response(&answer.transmit.payload, &alice.password).expect("signed");
            assert_eq!((response.result, response.mapped), (Ok(()), Some(home)));
            let payload = &answer.transmit.payload;
            assert_eq!(
                address_attr(payload, binding::attr5780::RESPONSE_ORIGIN),
                Some(addr(origin))
            );
            assert_eq!(
                address_attr(payload, binding::attr5780::OTHER_ADDRESS),
                Some(addr("192.0.2.11:3480"))
            );
            assert!(payload.len() <= request.len(), "no amplification");
            assert!(payload.len() <= binding::MAX_CHANGE_RESPONSE);
        }
        // The wildcard endpoint sends from the address the request reached.
        let request = change_request([5; 12], &alice, Some(&nonce), change(false, true));
        world.send(home, &request);
        let redirected: Vec<Redirected> = world.server.drain_redirected().collect();
        assert_eq!(
            redirected[0].transmit.from_local,
            Some(IpAddr::from([192, 0, 2, 10]))
        );
        // No flag: answered from the service socket itself.
        let request = change_request([6; 12], &alice, Some(&nonce), change(false, false));
        let (handled, out) = world.send(home, &request);
        assert_eq!(handled, Handled::ChangeAnswered);
        assert_eq!(out.len(), 1);
        assert_eq!(world.server.drain_redirected().count(), 0);
        // "Change IP" alone (same port, another address) has no endpoint here: 420,
        // signed, listing CHANGE-REQUEST.
        let request = change_request([7; 12], &alice, Some(&nonce), change(true, false));
        let (handled, out) = world.send(home, &request);
        assert_eq!(
            handled,
            Handled::Binding(binding::Outcome::UnknownAttribute)
        );
        assert_eq!(world.server.drain_redirected().count(), 0);
        let response = parse_response(&out[0].payload, &alice.password).expect("signed");
        assert_eq!(response.result, Err(420));
        let unknown = Message::parse(&out[0].payload)
            .expect("reply")
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == stun_attr::UNKNOWN_ATTRIBUTES)
            .map(|a| a.value.to_vec());
        assert_eq!(unknown, Some(vec![0x00, 0x03]));
    }

    #[test]
    fn a_gateway_without_discovery_endpoints_answers_change_requests_with_420() {
        let mut world = World::new();
        let alice = creds("alice");
        let home = addr("198.51.100.2:4000");
        let nonce = world.nonce(home);
        let request = change_request([4; 12], &alice, Some(&nonce), change(false, true));
        let (handled, out) = world.send(home, &request);
        assert_eq!(
            handled,
            Handled::Binding(binding::Outcome::UnknownAttribute)
        );
        assert_eq!(
            parse_response(&out[0].payload, &alice.password).map(|r| r.result),
            Some(Err(420))
        );
        assert_eq!(world.server.drain_redirected().count(), 0);
    }

    fn unauthenticated_change_request(tid: [u8; 12], flags: binding::ChangeRequest) -> Vec<u8> {
        let mut request = Vec::new();
        let mut writer = MessageWriter::new(
            &mut request,
            MessageType {
                method: stun_method::BINDING,
                class: Class::Request,
            },
            tid,
        );
        writer.attribute(binding::attr5780::CHANGE_REQUEST, &flags.to_value());
        writer.finish_with_fingerprint();
        request
    }

    #[test]
    fn change_requests_need_credentials_and_a_nonce_by_default() {
        let mut world = discovery_world(false);
        let victim = addr("198.51.100.99:53");
        // No credentials: a small 401 from the service socket, nothing redirected.
        let request = unauthenticated_change_request([1; 12], change(true, true));
        let (handled, out) = world.send(victim, &request);
        assert_eq!(handled, Handled::Unauthorized);
        assert_eq!(world.server.drain_redirected().count(), 0);
        assert_eq!(out.len(), 1);
        // Header, ERROR-CODE 401 "Unauthorized", FINGERPRINT (and within the global
        // budget of unauthenticated replies).
        assert!(out[0].payload.len() <= 48, "{} bytes", out[0].payload.len());
        assert_eq!(
            parse_response(&out[0].payload, "").map(|r| r.result),
            Some(Err(401))
        );
        // A wrong password: the same.
        let mut forged = creds("alice");
        forged.password = "guess".into();
        let nonce = world.nonce(victim);
        let (handled, _) = world.send(
            victim,
            &change_request([2; 12], &forged, Some(&nonce), change(true, true)),
        );
        assert_eq!(handled, Handled::Unauthorized);
        assert_eq!(world.server.drain_redirected().count(), 0);
        // Valid credentials but a nonce issued to another address (a replayed or
        // spoofed request): challenged, nothing redirected.
        let alice = creds("alice");
        let nonce = world.nonce(addr("198.51.100.2:4000"));
        let (handled, out) = world.send(
            victim,
            &change_request([3; 12], &alice, Some(&nonce), change(true, true)),
        );
        assert_eq!(handled, Handled::StaleNonce);
        assert_eq!(world.server.drain_redirected().count(), 0);
        assert_eq!(
            parse_response(&out[0].payload, &alice.password).map(|r| r.result),
            Some(Err(438))
        );
        // A malformed CHANGE-REQUEST value: 400.
        let mut request = Vec::new();
        let mut writer = MessageWriter::new(
            &mut request,
            MessageType {
                method: stun_method::BINDING,
                class: Class::Request,
            },
            [4; 12],
        );
        writer.attribute(binding::attr5780::CHANGE_REQUEST, &[6]);
        writer.finish_with_fingerprint();
        assert_eq!(world.send(victim, &request).0, Handled::BadRequest);
        assert_eq!(world.server.drain_redirected().count(), 0);
    }

    #[test]
    fn unauthenticated_change_requests_only_when_the_operator_allows_them() {
        let mut world = discovery_world(true);
        let from = addr("198.51.100.2:4000");
        let request = unauthenticated_change_request([1; 12], change(true, true));
        let (handled, out) = world.send(from, &request);
        assert_eq!(handled, Handled::ChangeAnswered);
        assert!(out.is_empty());
        let redirected: Vec<Redirected> = world.server.drain_redirected().collect();
        assert_eq!(redirected[0].endpoint, 1);
        let payload = &redirected[0].transmit.payload;
        assert_eq!(binding::parse_binding_success(payload, [1; 12]), Some(from));
        // Unsigned, and bounded: header, three IPv4 addresses, FINGERPRINT.
        assert_eq!(payload.len(), 20 + 3 * 12 + 8);
        // A request that carries credentials must still prove them.
        let mut forged = creds("alice");
        forged.password = "guess".into();
        let (handled, _) = world.send(
            from,
            &change_request([2; 12], &forged, None, change(true, true)),
        );
        assert_eq!(handled, Handled::Unauthorized);
        // The unauthenticated answers share the global budget of unauthenticated
        // replies: a flood gets at most that many per second.
        let budget = RendezvousConfig::default().max_error_replies_per_second;
        let mut answered = 0;
        for _ in 0..budget + 50 {
            let (handled, _) = world.send(from, &request);
            answered += u32::from(handled == Handled::ChangeAnswered);
        }
        assert!(answered < budget, "{answered} answered");
        assert_eq!(
            world.server.drain_redirected().count(),
            usize::try_from(answered).expect("count")
        );
    }

    proptest! {
        /// Whatever the flags and credentials, an answer to a CHANGE-REQUEST stays
        /// within the bound, and nothing is redirected without valid credentials.
        #[test]
        fn change_answers_are_bounded(
            ip in any::<bool>(),
            port in any::<bool>(),
            v6 in any::<bool>(),
            signed in any::<bool>(),
            peer in "[a-z]{1,12}",
        ) {
            let mut world = World::new();
            world.server.set_alternates(
                binding::Alternates::new(
                    addr("[::]:3478"),
                    vec![addr("[::]:3479"), addr("[2001:db8::11]:3480")],
                ),
                false,
            );
            let from = if v6 { addr("[2001:db8:1::2]:4000") } else { addr("198.51.100.2:4000") };
            let c = creds(&peer);
            let request = if signed {
                change_request([1; 12], &c, Some(&world.nonce(from)), change(ip, port))
            } else {
                unauthenticated_change_request([1; 12], change(ip, port))
            };
            let mut out = Vec::new();
            let local = Some(if v6 { "2001:db8::10".parse().expect("ip") } else { IpAddr::from([192, 0, 2, 10]) });
            world.server.handle(world.now, NOW_UNIX, from, local, &request, &mut out);
            let redirected: Vec<Redirected> = world.server.drain_redirected().collect();
            prop_assert!(signed || redirected.is_empty());
            for payload in out.iter().map(|t| &t.payload).chain(redirected.iter().map(|r| &r.transmit.payload)) {
                prop_assert!(payload.len() <= binding::MAX_CHANGE_RESPONSE, "{} bytes", payload.len());
            }
        }
    }

    #[test]
    fn signed_requests_need_a_nonce_bound_to_the_sender_and_fresh() {
        let mut world = World::new();
        let alice = creds("alice");
        let home = addr("198.51.100.2:4000");
        let elsewhere = addr("203.0.113.66:4000");
        // First contact: an authenticated 401 carrying the nonce; no state.
        let (handled, out) = world.send(
            home,
            &register([1; 12], &alice, None, &[], NatClass::Unknown, 0),
        );
        assert_eq!(handled, Handled::StaleNonce);
        let challenge = parse_response(&out[0].payload, &alice.password).expect("signed");
        assert_eq!(challenge.result, Err(401));
        let nonce = challenge.nonce.expect("nonce");
        assert_eq!(world.server.peer_count(), 0);
        // A forged password cannot extract a nonce-bearing answer.
        let mut forged = alice.clone();
        forged.password = "guess".into();
        let (handled, out) = world.send(
            home,
            &register([1; 12], &forged, None, &[], NatClass::Unknown, 0),
        );
        assert_eq!(handled, Handled::Unauthorized);
        assert_eq!(
            parse_response(&out[0].payload, &alice.password).and_then(|r| r.nonce),
            None
        );
        // With the nonce: registered, and the answer brings the next nonce.
        let signed = register([2; 12], &alice, Some(&nonce), &[], NatClass::Unknown, 0);
        let (handled, out) = world.send(home, &signed);
        assert_eq!(handled, Handled::Registered);
        let next = parse_response(&out[0].payload, &alice.password)
            .and_then(|r| r.nonce)
            .expect("fresh nonce");
        // The captured request replayed from elsewhere: 438, registration unmoved.
        let (handled, out) = world.send(elsewhere, &signed);
        assert_eq!(handled, Handled::StaleNonce);
        assert_eq!(
            parse_response(&out[0].payload, &alice.password).map(|r| r.result),
            Some(Err(438))
        );
        assert_eq!(world.server.peers.get("alice").map(|p| p.addr), Some(home));
        // Nonces expire: the same request after the nonce lifetime gets 438 too.
        let later = NOW_UNIX + RendezvousConfig::default().nonce_lifetime.as_secs();
        let mut out = Vec::new();
        let handled = world.server.handle(
            world.now,
            later,
            home,
            None,
            &register([3; 12], &alice, Some(&next), &[], NatClass::Unknown, 0),
            &mut out,
        );
        assert_eq!(handled, Handled::StaleNonce);
    }

    #[test]
    fn registration_needs_valid_credentials_and_creates_no_state_otherwise() {
        let mut world = World::new();
        let mut bad = creds("alice");
        bad.password = "wrong".into();
        let (handled, out) = world.send(
            addr("198.51.100.2:4000"),
            &register(
                [1; 12],
                &bad,
                Some(&world.nonce(addr("198.51.100.2:4000"))),
                &[],
                NatClass::Unknown,
                0,
            ),
        );
        assert_eq!(handled, Handled::Unauthorized);
        assert_eq!(
            parse_response(&out[0].payload, "x").expect("error").result,
            Err(401)
        );
        let expired = secret().issue("alice", NOW_UNIX - 1).expect("issue");
        let expired = PeerCredentials {
            username: expired.username,
            password: expired.password,
        };
        let (handled, _) = world.send(
            addr("198.51.100.2:4000"),
            &register(
                [1; 12],
                &expired,
                Some(&world.nonce(addr("198.51.100.2:4000"))),
                &[],
                NatClass::Unknown,
                0,
            ),
        );
        assert_eq!(handled, Handled::Unauthorized);
        assert_eq!(world.server.peer_count(), 0);
        world.register(
            "alice",
            addr("198.51.100.2:4000"),
            &[],
            NatClass::Unknown,
            0,
        );
        assert_eq!(world.server.peer_count(), 1);
    }

    #[test]
    fn connect_introduces_both_sides_with_candidates_and_aligned_start() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        let b = addr("198.51.100.6:5000");
        world.register(
            "alice",
            a,
            &[addr("10.0.1.2:4000")],
            NatClass::EndpointIndependent,
            40,
        );
        world.register(
            "bob",
            b,
            &[addr("10.0.2.2:5000")],
            NatClass::AddressAndPortDependent,
            100,
        );
        let alice = creds("alice");
        let (handled, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
        assert_eq!(handled, Handled::Introduced);
        assert_eq!(
            out.len(),
            5,
            "two introductions, each sent twice, and the reply"
        );
        let to_alice = out
            .iter()
            .find(|t| t.to == a && parse_introduction(&t.payload, &alice.password).is_some())
            .expect("intro to alice");
        let to_bob = out.iter().find(|t| t.to == b).expect("intro to bob");
        let ia = parse_introduction(&to_alice.payload, &alice.password).expect("verifies");
        let ib = parse_introduction(&to_bob.payload, &creds("bob").password).expect("verifies");
        assert!(
            parse_introduction(&to_bob.payload, &alice.password).is_none(),
            "signed for bob only"
        );
        assert_eq!(ia.intro_id, ib.intro_id);
        assert_eq!(ia.probe_key, ib.probe_key);
        assert_eq!(ia.role, Role::Initiator);
        assert_eq!(ib.role, Role::Responder);
        assert_eq!(ia.peer_id, "bob");
        assert_eq!(
            ia.candidates[0],
            Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: b
            }
        );
        assert_eq!(
            ia.candidates[1],
            Candidate {
                kind: CandidateKind::Host,
                addr: addr("10.0.2.2:5000")
            }
        );
        assert_eq!(ib.candidates[0].addr, a);
        assert_eq!(
            to_bob.from_local,
            Some(IpAddr::from([192, 0, 2, 10])),
            "sent from where bob registered"
        );
        assert_eq!(ia.peer_nat, NatClass::AddressAndPortDependent);
        // Both start at max(RTT)/2 + 5 ms (the default margin) after the gateway sent: alice's one-way
        // delay is 20 ms, bob's 50 ms.
        assert_eq!(
            ia.start_delay + Duration::from_millis(20),
            Duration::from_millis(55)
        );
        assert_eq!(
            ib.start_delay + Duration::from_millis(50),
            Duration::from_millis(55)
        );
        let reply = out
            .iter()
            .find_map(|t| parse_response(&t.payload, &alice.password))
            .expect("reply");
        assert_eq!(reply.intro_id, Some(ia.intro_id));
        let events: Vec<Event> = world.server.drain_events().collect();
        assert_eq!(
            events,
            vec![Event::Introduced {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::AddressAndPortDependent
            }]
        );
    }

    #[test]
    fn unauthenticated_error_replies_are_rate_limited() {
        let mut world = World::new();
        let mut bad = creds("alice");
        bad.password = "wrong".into();
        let request = register([1; 12], &bad, None, &[], NatClass::Unknown, 0);
        let limit = RendezvousConfig::default().max_error_replies_per_second as usize;
        let mut replies = 0;
        for _ in 0..limit + 500 {
            let (handled, out) = world.send(addr("198.51.100.2:4000"), &request);
            assert_eq!(handled, Handled::Unauthorized);
            replies += out.len();
        }
        assert_eq!(replies, limit);
        world.now += Duration::from_secs(1);
        assert_eq!(
            world.send(addr("198.51.100.2:4000"), &request).1.len(),
            1,
            "budget refilled"
        );
        assert_eq!(world.server.peer_count(), 0);
    }

    #[test]
    fn connect_refusals() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        world.register("alice", a, &[], NatClass::Unknown, 0);
        let alice = creds("alice");
        assert_eq!(
            world
                .send(
                    a,
                    &connect([2; 12], &alice, Some(&world.nonce(a)), "nobody")
                )
                .0,
            Handled::NotFound
        );
        assert_eq!(
            world
                .send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "alice"))
                .0,
            Handled::NotFound
        );
        // Valid credentials from another address than the registration: 403.
        assert_eq!(
            world
                .send(
                    addr("203.0.113.9:1"),
                    &connect(
                        [2; 12],
                        &alice,
                        Some(&world.nonce(addr("203.0.113.9:1"))),
                        "alice"
                    )
                )
                .0,
            Handled::Forbidden
        );
        // An unregistered peer cannot ask.
        let carol = creds("carol");
        assert_eq!(
            world
                .send(
                    addr("203.0.113.9:1"),
                    &connect(
                        [2; 12],
                        &carol,
                        Some(&world.nonce(addr("203.0.113.9:1"))),
                        "alice"
                    )
                )
                .0,
            Handled::Forbidden
        );
    }

    #[test]
    fn connects_are_rate_limited_per_peer() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        let b = addr("198.51.100.6:5000");
        world.register("alice", a, &[], NatClass::Unknown, 0);
        world.register("bob", b, &[], NatClass::Unknown, 0);
        let alice = creds("alice");
        let limit = RendezvousConfig::default().max_connects_per_second;
        let mut introduced = 0;
        for _ in 0..limit + 5 {
            if world
                .send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"))
                .0
                == Handled::Introduced
            {
                introduced += 1;
            }
        }
        assert_eq!(introduced, limit);
        world.now += Duration::from_secs(1);
        assert_eq!(
            world
                .send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"))
                .0,
            Handled::Introduced
        );
    }

    #[test]
    fn tcp_candidates_pass_on_only_from_the_registering_address_and_first() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        let b = addr("198.51.100.6:5000");
        let tcp = |addr| Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr,
        };
        let host = |addr| Candidate {
            kind: CandidateKind::Host,
            addr,
        };
        // Alice announces her TCP mapping (same public address as her UDP one), a
        // TCP "mapping" on a third party's address, and seven host candidates.
        let mut candidates = vec![tcp(addr("198.51.100.2:4100")), tcp(addr("203.0.113.99:80"))];
        candidates.extend((0..5).map(|i| host(addr(&format!("10.0.1.2:{}", 4000 + i)))));
        let alice = creds("alice");
        let (handled, _) = world.send(
            a,
            &register_with_candidates(
                [1; 12],
                &alice,
                Some(&world.nonce(a)),
                &candidates,
                NatClass::EndpointIndependent,
                0,
            ),
        );
        assert_eq!(handled, Handled::Registered);
        world.register("bob", b, &[], NatClass::None, 0);
        let bob = creds("bob");
        let (_, out) = world.send(b, &connect([2; 12], &bob, Some(&world.nonce(b)), "alice"));
        let intro = out
            .iter()
            .filter(|t| t.to == b)
            .find_map(|t| parse_introduction(&t.payload, &bob.password))
            .expect("bob's introduction");
        let kinds: Vec<CandidateKind> = intro.candidates.iter().map(|c| c.kind).collect();
        assert_eq!(kinds[0], CandidateKind::ServerReflexive);
        assert_eq!(
            intro.candidates[1],
            tcp(addr("198.51.100.2:4100")),
            "the TCP candidate comes right after the reflexive one"
        );
        assert!(
            !intro
                .candidates
                .iter()
                .any(|c| c.addr.ip() == addr("203.0.113.99:80").ip()),
            "a TCP candidate on another address than the sender's is dropped"
        );
        assert_eq!(intro.candidates.len(), 7);
    }

    #[test]
    fn tcp_outcomes_count_once_per_technique_and_leave_the_udp_outcome_alone() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        let b = addr("198.51.100.6:5000");
        let m = addr("203.0.113.5:6000");
        world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
        world.register("bob", b, &[], NatClass::None, 0);
        world.register("mallory", m, &[], NatClass::None, 0);
        let alice = creds("alice");
        let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
        let intro = out
            .iter()
            .find_map(|t| parse_response(&t.payload, &alice.password))
            .and_then(|r| r.intro_id)
            .expect("id");
        world.server.drain_events().for_each(drop);
        let report = |world: &World, who: &str, from, technique, connected| {
            tcp_outcome(
                [4; 12],
                &creds(who),
                Some(&world.nonce(from)),
                intro,
                TcpReport {
                    technique,
                    connected,
                    elapsed_ms: 200,
                    attempts: 2,
                },
            )
        };
        let so = TcpTechnique::SimultaneousOpen;
        let low = TcpTechnique::LowTtl;
        // Not a side of the introduction: nothing.
        let spoofed = report(&world, "mallory", m, so, true);
        assert_eq!(world.send(m, &spoofed).0, Handled::NotFound);
        let first = report(&world, "alice", a, so, false);
        assert_eq!(world.send(a, &first).0, Handled::OutcomeAccepted);
        let again = report(&world, "alice", a, so, true);
        assert_eq!(world.send(a, &again).0, Handled::NotFound, "duplicate");
        let other_side = report(&world, "bob", b, so, false);
        assert_eq!(world.send(b, &other_side).0, Handled::OutcomeAccepted);
        let second_technique = report(&world, "bob", b, low, true);
        assert_eq!(world.send(b, &second_technique).0, Handled::OutcomeAccepted);
        // The UDP outcome is still open.
        let udp = outcome(
            [5; 12],
            &alice,
            Some(&world.nonce(a)),
            intro,
            SessionOutcome::Direct,
            20,
            3,
        );
        assert_eq!(world.send(a, &udp).0, Handled::OutcomeAccepted);
        let events: Vec<Event> = world.server.drain_events().collect();
        assert_eq!(
            events,
            vec![
                Event::TcpOutcome {
                    initiator_nat: NatClass::EndpointIndependent,
                    responder_nat: NatClass::None,
                    technique: so,
                    success: false
                },
                Event::TcpOutcome {
                    initiator_nat: NatClass::EndpointIndependent,
                    responder_nat: NatClass::None,
                    technique: low,
                    success: true
                },
                Event::Outcome {
                    initiator_nat: NatClass::EndpointIndependent,
                    responder_nat: NatClass::None,
                    direct: true,
                    relayed: false,
                    time_to_direct: Duration::from_millis(20),
                    probes: 3
                }
            ]
        );
        // An unknown technique is a bad request.
        let bad = {
            let c = creds("alice");
            super::client::request(method::OUTCOME, [6; 12], &c, Some(&world.nonce(a)), |w| {
                w.attribute(attr::INTRO_ID, &intro.to_be_bytes());
                w.attribute(attr::OUTCOME, &[0; 9]);
                w.attribute(attr::TECHNIQUE, &[9]);
            })
        };
        assert_eq!(world.send(a, &bad).0, Handled::BadRequest);
    }

    #[test]
    fn tcp_seq_is_forwarded_once_per_side_signed_for_the_other_side_only() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        let b = addr("198.51.100.6:5000");
        let m = addr("203.0.113.5:6000");
        world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
        world.register("bob", b, &[], NatClass::None, 0);
        world.register("mallory", m, &[], NatClass::None, 0);
        let alice = creds("alice");
        let bob = creds("bob");
        let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
        let intro = out
            .iter()
            .find_map(|t| parse_response(&t.payload, &alice.password))
            .and_then(|r| r.intro_id)
            .expect("id");
        let expected = addr("198.51.100.6:5100");
        let seq = |world: &World, who: &str, from, intro_id, isn| {
            tcp_seq(
                [7; 12],
                &creds(who),
                Some(&world.nonce(from)),
                intro_id,
                isn,
                Some(expected),
                false,
            )
        };
        // Not a side, or an unknown introduction: refused, nothing forwarded.
        let (handled, out) = world.send(m, &seq(&world, "mallory", m, intro, 1));
        assert_eq!(handled, Handled::NotFound);
        assert!(out.iter().all(|t| t.to == m));
        let (handled, out) = world.send(a, &seq(&world, "alice", a, intro ^ 1, 1));
        assert_eq!(handled, Handled::NotFound);
        assert!(out.iter().all(|t| t.to == a));
        // From another address than the registration: forbidden.
        let elsewhere = addr("198.51.100.2:4001");
        let (handled, _) = world.send(elsewhere, &seq(&world, "alice", elsewhere, intro, 1));
        assert_eq!(handled, Handled::Forbidden);
        // Alice's ISN reaches bob, signed for him (not for alice).
        let (handled, out) = world.send(a, &seq(&world, "alice", a, intro, 0xDEAD_BEEF));
        assert_eq!(handled, Handled::TcpSeqForwarded);
        let to_bob: Vec<_> = out.iter().filter(|t| t.to == b).collect();
        assert_eq!(to_bob.len(), 2, "sent twice");
        let forwarded = parse_tcp_seq(&to_bob[0].payload, &bob.password).expect("signed for bob");
        assert_eq!(
            forwarded,
            TcpSeq {
                intro_id: intro,
                peer_id: "alice".into(),
                isn: 0xDEAD_BEEF,
                expected: Some(expected),
            }
        );
        assert!(parse_tcp_seq(&to_bob[0].payload, &alice.password).is_none());
        assert!(out.iter().filter(|t| t.to == a).any(|t| {
            parse_response(&t.payload, &alice.password).is_some_and(|r| r.result.is_ok())
        }));
        // Once per side.
        let (handled, out) = world.send(a, &seq(&world, "alice", a, intro, 2));
        assert_eq!(handled, Handled::NotFound);
        assert!(out.iter().all(|t| t.to == a));
        // Bob's own goes to alice.
        let (handled, out) = world.send(b, &seq(&world, "bob", b, intro, 7));
        assert_eq!(handled, Handled::TcpSeqForwarded);
        assert!(out.iter().filter(|t| t.to == a).any(|t| {
            parse_tcp_seq(&t.payload, &alice.password)
                .is_some_and(|s| s.isn == 7 && s.peer_id == "bob")
        }));
        // Without an ISN: a bad request.
        let bad =
            super::client::request(method::TCP_SEQ, [8; 12], &bob, Some(&world.nonce(b)), |w| {
                w.attribute(attr::INTRO_ID, &intro.to_be_bytes());
            });
        assert_eq!(world.send(b, &bad).0, Handled::BadRequest);
    }

    /// Alice at `a` and bob at `b` registered with TCP candidates `ta` and `tb`, and
    /// introduced; mallory registered elsewhere. Returns the introduction id.
    fn forge_world(forge: bool) -> (World, u64) {
        let mut world = World::new();
        world.server.set_tcp_forge(forge);
        let tcp = |addr| Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr,
        };
        for (who, from, tcp_at) in [
            (
                "alice",
                addr("198.51.100.2:4000"),
                addr("198.51.100.2:4100"),
            ),
            ("bob", addr("198.51.100.6:5000"), addr("198.51.100.6:5100")),
            (
                "mallory",
                addr("203.0.113.5:6000"),
                addr("203.0.113.5:6100"),
            ),
        ] {
            let (handled, _) = world.send(
                from,
                &register_with_candidates(
                    [1; 12],
                    &creds(who),
                    Some(&world.nonce(from)),
                    &[tcp(tcp_at)],
                    NatClass::EndpointIndependent,
                    0,
                ),
            );
            assert_eq!(handled, Handled::Registered);
        }
        let a = addr("198.51.100.2:4000");
        let alice = creds("alice");
        let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
        let intro = out
            .iter()
            .find_map(|t| parse_response(&t.payload, &alice.password))
            .and_then(|r| r.intro_id)
            .expect("id");
        (world, intro)
    }

    fn forge_request(
        world: &World,
        who: &str,
        from: SocketAddr,
        intro: u64,
        isn: u32,
        target: &str,
    ) -> Vec<u8> {
        tcp_seq(
            [9; 12],
            &creds(who),
            Some(&world.nonce(from)),
            intro,
            isn,
            Some(addr(target)),
            true,
        )
    }

    #[test]
    fn forged_synacks_answer_each_side_s_syn_once_both_isns_are_in() {
        let (mut world, intro) = forge_world(true);
        let (a, b) = (addr("198.51.100.2:4000"), addr("198.51.100.6:5000"));
        let (ta, tb) = (addr("198.51.100.2:4100"), addr("198.51.100.6:5100"));
        // Alice's half alone: kept, acknowledged, nothing forwarded or forged.
        let (handled, out) = world.send(
            a,
            &forge_request(&world, "alice", a, intro, 1000, "198.51.100.6:5100"),
        );
        assert_eq!(handled, Handled::TcpForgeQueued);
        assert!(
            out.iter().all(|t| t.to == a),
            "nothing goes to bob: {out:?}"
        );
        assert!(
            parse_response(&out[0].payload, &creds("alice").password)
                .is_some_and(|r| r.result.is_ok())
        );
        assert_eq!(world.server.drain_forged().count(), 0);
        // Bob's completes it: into alice's NAT the SYN-ACK answering her SYN (from
        // bob's endpoint, seq = bob's ISN, ack = hers + 1), and the mirror image,
        // each twice; bob's ISN is not forwarded to alice either.
        let (handled, out) = world.send(
            b,
            &forge_request(&world, "bob", b, intro, u32::MAX, "198.51.100.2:4100"),
        );
        assert_eq!(handled, Handled::TcpSynAckForged);
        assert!(out.iter().all(|t| t.to == b));
        let forged: Vec<ForgedSynAck> = world.server.drain_forged().collect();
        let to_alice = ForgedSynAck {
            src: tb,
            dst: ta,
            seq: u32::MAX,
            ack: 1001,
        };
        let to_bob = ForgedSynAck {
            src: ta,
            dst: tb,
            seq: 1000,
            ack: 0,
        };
        assert_eq!(forged.len(), MAX_FORGED_PER_INTRODUCTION);
        assert_eq!(forged.iter().filter(|f| **f == to_alice).count(), 2);
        assert_eq!(forged.iter().filter(|f| **f == to_bob).count(), 2);
        // Once per side per introduction: a second round forges nothing.
        for (who, from, target) in [
            ("alice", a, "198.51.100.6:5100"),
            ("bob", b, "198.51.100.2:4100"),
        ] {
            let (handled, _) =
                world.send(from, &forge_request(&world, who, from, intro, 5, target));
            assert_eq!(handled, Handled::NotFound);
        }
        assert_eq!(world.server.drain_forged().count(), 0);
    }

    #[test]
    fn bad_forge_requests_forge_nothing_and_leave_no_state() {
        let (mut world, intro) = forge_world(true);
        let (a, b, m) = (
            addr("198.51.100.2:4000"),
            addr("198.51.100.6:5000"),
            addr("203.0.113.5:6000"),
        );
        let cases: [(&str, SocketAddr, u64, &str, Handled); 5] = [
            // A foreign sender (not a side of the introduction).
            ("mallory", m, intro, "198.51.100.6:5100", Handled::NotFound),
            // An introduction the gateway does not know.
            (
                "alice",
                a,
                intro ^ 1,
                "198.51.100.6:5100",
                Handled::NotFound,
            ),
            // A target that is not the other side's TCP endpoint (a third party's).
            ("alice", a, intro, "203.0.113.5:6100", Handled::BadRequest),
            ("alice", a, intro, "198.51.100.6:5101", Handled::BadRequest),
            // From another address than the registration.
            (
                "alice",
                addr("198.51.100.2:4001"),
                intro,
                "198.51.100.6:5100",
                Handled::Forbidden,
            ),
        ];
        for (who, from, id, target, expected) in cases {
            let (handled, _) = world.send(from, &forge_request(&world, who, from, id, 7, target));
            assert_eq!(handled, expected, "{who} from {from} for {target}");
        }
        // Without the target: a bad request.
        let bare = super::client::request(
            method::TCP_SEQ,
            [8; 12],
            &creds("bob"),
            Some(&world.nonce(b)),
            |w| {
                w.attribute(attr::INTRO_ID, &intro.to_be_bytes());
                w.attribute(attr::TCP_SEQ, &7u32.to_be_bytes());
                w.attribute(attr::TCP_FORGE, &[1]);
            },
        );
        assert_eq!(world.send(b, &bare).0, Handled::BadRequest);
        // None of that left state: the two real halves still pair up.
        let (handled, _) = world.send(
            a,
            &forge_request(&world, "alice", a, intro, 1, "198.51.100.6:5100"),
        );
        assert_eq!(handled, Handled::TcpForgeQueued);
        assert_eq!(world.server.drain_forged().count(), 0);
        let (handled, _) = world.send(
            b,
            &forge_request(&world, "bob", b, intro, 2, "198.51.100.2:4100"),
        );
        assert_eq!(handled, Handled::TcpSynAckForged);
        assert!(
            world
                .server
                .drain_forged()
                .all(|f| f.seq == 1 || f.seq == 2)
        );
    }

    #[test]
    fn forging_is_refused_with_its_own_code_unless_enabled() {
        let (mut world, intro) = forge_world(false);
        let (a, b) = (addr("198.51.100.2:4000"), addr("198.51.100.6:5000"));
        for (who, from, target) in [
            ("alice", a, "198.51.100.6:5100"),
            ("bob", b, "198.51.100.2:4100"),
        ] {
            let (handled, out) =
                world.send(from, &forge_request(&world, who, from, intro, 3, target));
            assert_eq!(handled, Handled::TcpForgeDisabled);
            let response = parse_response(&out[0].payload, &creds(who).password).expect("signed");
            assert_eq!(response.result, Err(TCP_FORGE_DISABLED));
        }
        assert_eq!(world.server.drain_forged().count(), 0);
        // The refusal kept nothing: a NATBlaster TCP-Seq of the same side still passes.
        let plain = tcp_seq(
            [7; 12],
            &creds("alice"),
            Some(&world.nonce(a)),
            intro,
            3,
            Some(addr("198.51.100.6:5100")),
            false,
        );
        assert_eq!(world.send(a, &plain).0, Handled::TcpSeqForwarded);
    }

    #[test]
    fn outcome_reports_count_once_and_only_from_the_sides() {
        let mut world = World::new();
        let a = addr("198.51.100.2:4000");
        let b = addr("198.51.100.6:5000");
        world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
        world.register("bob", b, &[], NatClass::None, 0);
        world.register("mallory", addr("203.0.113.5:6000"), &[], NatClass::None, 0);
        let alice = creds("alice");
        let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
        let intro = out
            .iter()
            .find_map(|t| parse_response(&t.payload, &alice.password))
            .and_then(|r| r.intro_id)
            .expect("id");
        world.server.drain_events().for_each(drop);
        let mallory = creds("mallory");
        assert_eq!(
            world
                .send(
                    addr("203.0.113.5:6000"),
                    &outcome(
                        [3; 12],
                        &mallory,
                        Some(&world.nonce(addr("203.0.113.5:6000"))),
                        intro,
                        SessionOutcome::Direct,
                        5,
                        1
                    )
                )
                .0,
            Handled::NotFound
        );
        assert_eq!(
            world
                .send(
                    a,
                    &outcome(
                        [3; 12],
                        &alice,
                        Some(&world.nonce(a)),
                        intro + 1,
                        SessionOutcome::Direct,
                        5,
                        1
                    )
                )
                .0,
            Handled::NotFound
        );
        assert_eq!(
            world
                .send(
                    a,
                    &outcome(
                        [3; 12],
                        &alice,
                        Some(&world.nonce(a)),
                        intro,
                        SessionOutcome::Direct,
                        35,
                        4
                    )
                )
                .0,
            Handled::OutcomeAccepted
        );
        assert_eq!(
            world
                .send(
                    a,
                    &outcome(
                        [3; 12],
                        &alice,
                        Some(&world.nonce(a)),
                        intro,
                        SessionOutcome::Direct,
                        35,
                        4
                    )
                )
                .0,
            Handled::NotFound,
            "replay"
        );
        assert_eq!(
            world
                .send(
                    b,
                    &outcome(
                        [3; 12],
                        &creds("bob"),
                        Some(&world.nonce(b)),
                        intro,
                        SessionOutcome::Direct,
                        30,
                        4
                    )
                )
                .0,
            Handled::OutcomeAccepted
        );
        let events: Vec<Event> = world.server.drain_events().collect();
        assert_eq!(
            events,
            vec![Event::Outcome {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::None,
                direct: true,
                relayed: false,
                time_to_direct: Duration::from_millis(35),
                probes: 4
            }],
            "one outcome per introduction"
        );
    }

    #[test]
    fn silent_peers_expire() {
        let mut world = World::new();
        world.register(
            "alice",
            addr("198.51.100.2:4000"),
            &[],
            NatClass::Unknown,
            0,
        );
        let deadline = world.server.poll_timeout().expect("sweep armed");
        world.server.handle_timeout(deadline, NOW_UNIX);
        assert_eq!(world.server.peer_count(), 1);
        world
            .server
            .handle_timeout(world.now + Duration::from_secs(61), NOW_UNIX);
        assert_eq!(world.server.peer_count(), 0);
        assert_eq!(world.server.poll_timeout(), None);
    }

    #[test]
    fn probes_round_trip_and_need_the_key() {
        let key = [9u8; 16];
        let request = probe_request([4; 12], 0xABCD, &key);
        assert_eq!(
            parse_probe(&request, &key),
            Some(Probe::Request {
                intro_id: 0xABCD,
                transaction_id: [4; 12]
            })
        );
        assert_eq!(parse_probe(&request, &[8; 16]), None);
        let from = addr("198.51.100.2:4000");
        let response = probe_response([4; 12], from, &key);
        assert_eq!(
            parse_probe(&response, &key),
            Some(Probe::Response {
                transaction_id: [4; 12],
                mapped: Some(from)
            })
        );
    }

    proptest! {
        #[test]
        fn any_datagram_is_handled_without_panic_or_state(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut world = World::new();
            let (_, out) = world.send(addr("198.51.100.2:4000"), &bytes);
            prop_assert_eq!(world.server.peer_count(), 0);
            for t in out {
                prop_assert!(t.payload.len() <= 96);
            }
        }

        #[test]
        fn candidates_round_trip(addr in any::<SocketAddr>(), tid in any::<[u8; 12]>(), kind in 0u8..5) {
            let addr = SocketAddr::new(addr.ip(), addr.port());
            let kind = [CandidateKind::Host, CandidateKind::ServerReflexive, CandidateKind::Predicted, CandidateKind::Relayed, CandidateKind::TcpServerReflexive][kind as usize];
            let (value, len) = encode_candidate(Candidate { kind, addr }, tid);
            prop_assert_eq!(decode_candidate(&value[..len], tid), Some(Candidate { kind, addr }));
        }
    }
}
