//! The rendezvous' wire vocabulary, shared by the server and the peers: method and
//! attribute numbers, error codes, limits, and the value types (candidates, NAT
//! classes, TCP techniques, outcomes) with their encodings. Nothing here keeps state.
use std::net::SocketAddr;

use crate::stun;

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
    /// Mapped-Check: the gateway's check of a peer's mapped (port-mapping)
    /// candidate before it introduces it. As an indication from the gateway with
    /// MAPPED-TOKEN: the probe, sent to the mapped endpoint (from a discovery
    /// socket when there is one); as a request from the peer with that token: the
    /// answer, through the peer's socket to the service socket; as an indication
    /// from the gateway with the candidate and no token: "not reachable, not
    /// introduced".
    pub const MAPPED_CHECK: u16 = 0xC07;
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
    /// In Mapped-Check: the random token of the gateway's probe (16 bytes), which
    /// the peer's answer must echo.
    pub const MAPPED_TOKEN: u16 = 0x400D;
    /// In a Register answer: another endpoint of this gateway that answers STUN
    /// Binding (MAPPED-ADDRESS format, once per endpoint), for the peer to classify
    /// its NAT without being told (`gateway peer` without `--discover`).
    /// Comprehension-optional (0xC000..): older peers ignore it.
    pub const DISCOVERY_ENDPOINT: u16 = 0xC0D1;
}

/// The most DISCOVERY-ENDPOINT attributes one Register answer carries (and a peer
/// reads).
pub const MAX_DISCOVERY_ENDPOINTS: usize = 6;

/// Error code of a TCP-Seq that asks for forged SYN-ACKs (technique 4) from a
/// gateway that does not forge (`server.tcp_forge_synack` is off, the default).
pub const TCP_FORGE_DISABLED: u16 = 501;

/// Error code of a Connect the gateway cannot serve because the target may be on
/// another node of the cluster and the cluster store is down or did not answer in
/// time (see "Across nodes" in `docs/protocol.md`).
pub const CLUSTER_UNAVAILABLE: u16 = 503;

/// Reason phrase of [`CLUSTER_UNAVAILABLE`] (the registry's own 503 says "Registry
/// Full").
pub const CLUSTER_UNAVAILABLE_REASON: &str = "Cluster Unavailable";

/// Most candidates accepted in, or sent out with, one message.
pub const MAX_CANDIDATES: usize = 8;

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
    /// The public endpoint the peer's router granted it by port mapping (PCP,
    /// NAT-PMP or UPnP-IGD): endpoint-independent in mapping and filtering, so it is
    /// probed like a server-reflexive one even behind a random-port NAT. Parsers
    /// before it drop an unknown kind, so older peers and gateways ignore it.
    Mapped = 5,
    /// The public TCP endpoint the peer's router granted it by port mapping for its
    /// TCP punching port: a TCP candidate (never probed over UDP) that a plain
    /// connect() reaches even behind a random-port NAT. Not checked by the gateway
    /// (its check is a UDP probe); like a TCP reflexive candidate it must be on the
    /// address the gateway sees the peer at. Older parsers drop the unknown kind.
    TcpMapped = 6,
}

impl CandidateKind {
    /// Decodes the wire value; `None` for an unknown kind.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Host),
            1 => Some(Self::ServerReflexive),
            2 => Some(Self::Predicted),
            3 => Some(Self::Relayed),
            4 => Some(Self::TcpServerReflexive),
            5 => Some(Self::Mapped),
            6 => Some(Self::TcpMapped),
            _ => None,
        }
    }

    /// Whether the candidate is a TCP endpoint (never probed over UDP).
    pub const fn is_tcp(self) -> bool {
        matches!(self, Self::TcpServerReflexive | Self::TcpMapped)
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

/// A candidate address: where a peer may be reachable, as Register announces it
/// and an Introduction hands it to the other side.
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

/// Decodes a CANDIDATE value (the inverse of [`encode_candidate`]); `None` for an
/// unknown kind or a malformed address.
pub fn decode_candidate(value: &[u8], transaction_id: [u8; 12]) -> Option<Candidate> {
    let kind = CandidateKind::from_u8(*value.first()?)?;
    let addr = stun::decode_xor_address(value.get(2..)?, transaction_id)?;
    Some(Candidate { kind, addr })
}

pub(super) fn read_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

pub(super) fn read_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn candidates_round_trip(addr in any::<SocketAddr>(), tid in any::<[u8; 12]>(), kind in 0u8..7) {
            let addr = SocketAddr::new(addr.ip(), addr.port());
            let kind = [CandidateKind::Host, CandidateKind::ServerReflexive, CandidateKind::Predicted, CandidateKind::Relayed, CandidateKind::TcpServerReflexive, CandidateKind::Mapped, CandidateKind::TcpMapped][kind as usize];
            let (value, len) = encode_candidate(Candidate { kind, addr }, tid);
            prop_assert_eq!(decode_candidate(&value[..len], tid), Some(Candidate { kind, addr }));
        }
    }
}
