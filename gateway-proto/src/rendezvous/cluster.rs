//! Several gateway nodes as one rendezvous service (see "Across nodes" in
//! `docs/protocol.md`): what the nodes share through the cluster store (Redis) and
//! say to each other, as sans-IO values and compact versioned codecs.
//!
//! The core asks its driver for cluster work with [`ClusterRequest`]s (inside
//! [`super::RendezvousEvent::Cluster`]): store a registration ([`PeerEntry`]), find
//! the node of a peer, send a [`ClusterMessage`] to a node. The driver answers
//! with [`super::RendezvousServer::handle_located`] and hands what other nodes sent
//! to [`super::RendezvousServer::handle_cluster_message`].
//!
//! Encodings: one version byte, then the fields in a fixed order; lengths and the
//! larger integers of [`PeerEntry`] as LEB128 varints (so a typical entry is 60–70
//! bytes). Decoders refuse an unknown version and ignore bytes after the fields they
//! know, so a later version may append fields without breaking older nodes during a
//! rolling upgrade; a change to existing fields takes a new version byte. Decoding
//! never panics and checks every limit (peer ids as credentials allow them, node
//! ids, candidate counts, payload sizes).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use super::wire::{Candidate, CandidateKind, MAX_CANDIDATES, NatClass};
use crate::credentials::valid_peer_id;

/// The encodings' version byte (of [`PeerEntry`] and [`ClusterMessage`]).
pub const CLUSTER_VERSION: u8 = 1;

/// Longest node id, in bytes: node ids travel in every entry and message.
pub const MAX_NODE_ID_LEN: usize = 64;

/// Largest [`ClusterMessage::Deliver`] payload: the core only delivers signed
/// indications of a few hundred bytes, so anything larger is a bug or garbage.
pub const MAX_DELIVER_PAYLOAD: usize = 1_280;

/// Most Connects waiting for their target's node at once (beyond, a Connect is
/// answered as if the cluster were down): bounds the memory a burst can take.
pub const MAX_PARKED_CONNECTS: usize = 65_536;

/// How long a Connect waits for its target to be located before it is answered
/// 503 "Cluster Unavailable": longer than any healthy store round trip, shorter than
/// the agent's patience.
pub const LOCATE_TIMEOUT: Duration = Duration::from_secs(2);

/// The default one-way node-to-node delay estimate, until the driver measures one.
pub const DEFAULT_TRANSIT: Duration = Duration::from_millis(2);

/// Why cluster bytes (an entry from the store, a message from another node) were
/// refused: they are dropped, nothing else happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterDecodeError {
    /// The bytes end before the fields do.
    #[error("truncated")]
    Truncated,
    /// Written by a version this node does not read.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// A message type this node does not know.
    #[error("unknown message type {0}")]
    UnknownMessage(u8),
    /// An address family tag other than 4 or 6.
    #[error("bad address family {0}")]
    BadAddress(u8),
    /// More candidates than a registration may hold.
    #[error("too many candidates ({0})")]
    TooManyCandidates(u8),
    /// A peer id that credentials could not name.
    #[error("bad peer id")]
    BadPeerId,
    /// A node id empty, too long or not UTF-8.
    #[error("bad node id")]
    BadNodeId,
    /// A varint over 64 bits, or a length over its limit.
    #[error("value too large")]
    TooLarge,
    /// A flag byte other than 0 or 1.
    #[error("bad flag {0}")]
    BadFlag(u8),
}

/// A registration as the cluster shares it: what another node needs to introduce
/// one of its peers to this one (stored in Redis for every peer, so kept compact).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// The peer's id (from its credentials).
    pub peer_id: String,
    /// The node it is registered on.
    pub node: String,
    /// Its server-reflexive address, as that node saw it.
    pub addr: SocketAddr,
    /// When its credentials expire (Unix seconds): other nodes sign for it with
    /// the password of `expiry:peer-id`.
    pub expiry_unix: u64,
    /// Host, predicted and TCP (its TCP mapping) candidates it announced.
    pub candidates: Vec<Candidate>,
    /// Its NAT mapping class.
    pub nat: NatClass,
    /// Its round trip to its node, in ms (for start alignment).
    pub rtt_ms: u32,
    /// When it registered (Unix ms; seconds precision today): the latest wins.
    pub registered_unix_ms: u64,
}

impl PeerEntry {
    /// The compact binary form stored in Redis (version 1; 60–70 bytes for a
    /// typical IPv4 peer with two or three candidates).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(CLUSTER_VERSION);
        self.encode_fields(&mut out);
        out
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        put_bytes(out, self.peer_id.as_bytes());
        put_bytes(out, self.node.as_bytes());
        put_addr(out, self.addr, 0);
        put_varint(out, self.expiry_unix);
        out.push(self.nat as u8);
        put_varint(out, u64::from(self.rtt_ms));
        put_varint(out, self.registered_unix_ms);
        // More than a registration may hold cannot be decoded: cut here.
        let candidates = &self.candidates[..self.candidates.len().min(MAX_CANDIDATES)];
        out.push(candidates.len() as u8);
        for candidate in candidates {
            put_addr(out, candidate.addr, candidate.kind as u8);
        }
    }

    /// Reads [`Self::encode`]'s form; refuses garbage without panicking.
    pub fn decode(bytes: &[u8]) -> Result<Self, ClusterDecodeError> {
        let mut reader = Reader(bytes);
        reader.version()?;
        Self::decode_fields(&mut reader)
    }

    fn decode_fields(reader: &mut Reader<'_>) -> Result<Self, ClusterDecodeError> {
        let peer_id = reader.peer_id()?;
        let node = reader.node_id()?;
        let (addr, low) = reader.addr()?;
        if low != 0 {
            return Err(ClusterDecodeError::BadAddress(low));
        }
        let expiry_unix = reader.varint()?;
        let nat = NatClass::from_u8(reader.u8()?);
        let rtt_ms = u32::try_from(reader.varint()?).map_err(|_| ClusterDecodeError::TooLarge)?;
        let registered_unix_ms = reader.varint()?;
        let count = reader.u8()?;
        if usize::from(count) > MAX_CANDIDATES {
            return Err(ClusterDecodeError::TooManyCandidates(count));
        }
        let mut candidates = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (addr, kind) = reader.addr()?;
            // A kind this node does not know (a newer node's, during a rolling
            // upgrade) is skipped, as peers skip unknown kinds in a Register: the
            // rest of the entry still locates the peer.
            if let Some(kind) = CandidateKind::from_u8(kind) {
                candidates.push(Candidate { kind, addr });
            }
        }
        Ok(Self {
            peer_id,
            node,
            addr,
            expiry_unix,
            candidates,
            nat,
            rtt_ms,
            registered_unix_ms,
        })
    }
}

/// What one node says to another (through the driver's per-node Redis stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterMessage {
    /// From the initiator's node: send your local peer `responder_id` its
    /// Introduction (START-DELAY `responder_delay_ms`, computed by the sender with
    /// [`cross_node_start_delays`]) and remember the introduction for the reports,
    /// relay offers and TCP-Seq that peer will send.
    Introduce {
        /// The introduction's id (chosen by the initiator's node, which owns it).
        intro_id: u64,
        /// The initiator's node: where answers and outcome reports go.
        from_node: String,
        /// The initiator's registration.
        initiator: PeerEntry,
        /// The peer to introduce it to.
        responder_id: String,
        /// The key both sides sign their probes with.
        probe_key: [u8; 16],
        /// The responder's START-DELAY, in ms.
        responder_delay_ms: u32,
    },
    /// To the initiator's node: the responder is no longer registered here, the
    /// introduction was not made (its agent will Connect again).
    IntroduceFailed {
        /// The introduction.
        intro_id: u64,
        /// Its initiator.
        initiator_id: String,
    },
    /// Send these bytes (already built and signed for the recipient by the sender)
    /// to your local peer `peer_id`: a relay offer or TCP-Seq crossing nodes.
    Deliver {
        /// The recipient.
        peer_id: String,
        /// The datagram.
        payload: Vec<u8>,
    },
    /// To the introduction's owner (the initiator's node): an outcome report the
    /// responder sent to its own node, to count once with the owner's.
    Outcome {
        /// The introduction.
        intro_id: u64,
        /// The reporting side (1, the responder).
        side: u8,
        /// [`super::SessionOutcome`] as on the wire.
        outcome: u8,
        /// Time from introduction to the first two-way exchange (or the technique's
        /// time), in ms.
        ms: u32,
        /// Probes (or connect() calls) the reporter made.
        probes: u32,
        /// [`super::TcpTechnique`] as on the wire, for a TCP report.
        technique: Option<u8>,
    },
    /// The peer registered on another node at `registered_unix_ms`: forget your
    /// registration of it if it is older (the latest registration wins).
    Moved {
        /// The peer.
        peer_id: String,
        /// When it registered elsewhere (Unix ms).
        registered_unix_ms: u64,
    },
}

/// Message type bytes (after the version byte).
mod tag {
    pub(super) const INTRODUCE: u8 = 1;
    pub(super) const INTRODUCE_FAILED: u8 = 2;
    pub(super) const DELIVER: u8 = 3;
    pub(super) const OUTCOME: u8 = 4;
    pub(super) const MOVED: u8 = 5;
}

impl ClusterMessage {
    /// The binary form carried between nodes (version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(CLUSTER_VERSION);
        match self {
            Self::Introduce {
                intro_id,
                from_node,
                initiator,
                responder_id,
                probe_key,
                responder_delay_ms,
            } => {
                out.push(tag::INTRODUCE);
                out.extend_from_slice(&intro_id.to_be_bytes());
                put_bytes(&mut out, from_node.as_bytes());
                let mut entry = Vec::with_capacity(96);
                initiator.encode_fields(&mut entry);
                put_bytes(&mut out, &entry);
                put_bytes(&mut out, responder_id.as_bytes());
                out.extend_from_slice(probe_key);
                out.extend_from_slice(&responder_delay_ms.to_be_bytes());
            }
            Self::IntroduceFailed {
                intro_id,
                initiator_id,
            } => {
                out.push(tag::INTRODUCE_FAILED);
                out.extend_from_slice(&intro_id.to_be_bytes());
                put_bytes(&mut out, initiator_id.as_bytes());
            }
            Self::Deliver { peer_id, payload } => {
                out.push(tag::DELIVER);
                put_bytes(&mut out, peer_id.as_bytes());
                put_bytes(&mut out, payload);
            }
            Self::Outcome {
                intro_id,
                side,
                outcome,
                ms,
                probes,
                technique,
            } => {
                out.push(tag::OUTCOME);
                out.extend_from_slice(&intro_id.to_be_bytes());
                out.extend_from_slice(&[*side, *outcome]);
                out.extend_from_slice(&ms.to_be_bytes());
                out.extend_from_slice(&probes.to_be_bytes());
                match technique {
                    Some(technique) => out.extend_from_slice(&[1, *technique]),
                    None => out.push(0),
                }
            }
            Self::Moved {
                peer_id,
                registered_unix_ms,
            } => {
                out.push(tag::MOVED);
                put_bytes(&mut out, peer_id.as_bytes());
                out.extend_from_slice(&registered_unix_ms.to_be_bytes());
            }
        }
        out
    }

    /// Reads [`Self::encode`]'s form; refuses garbage and unknown types without
    /// panicking.
    pub fn decode(bytes: &[u8]) -> Result<Self, ClusterDecodeError> {
        let mut reader = Reader(bytes);
        reader.version()?;
        match reader.u8()? {
            tag::INTRODUCE => {
                let intro_id = reader.u64()?;
                let from_node = reader.node_id()?;
                let entry = reader.bytes(usize::MAX)?;
                let initiator = PeerEntry::decode_fields(&mut Reader(entry))?;
                Ok(Self::Introduce {
                    intro_id,
                    from_node,
                    initiator,
                    responder_id: reader.peer_id()?,
                    probe_key: reader.array()?,
                    responder_delay_ms: reader.u32()?,
                })
            }
            tag::INTRODUCE_FAILED => Ok(Self::IntroduceFailed {
                intro_id: reader.u64()?,
                initiator_id: reader.peer_id()?,
            }),
            tag::DELIVER => Ok(Self::Deliver {
                peer_id: reader.peer_id()?,
                payload: reader.bytes(MAX_DELIVER_PAYLOAD)?.to_vec(),
            }),
            tag::OUTCOME => {
                let intro_id = reader.u64()?;
                let [side, outcome] = reader.array()?;
                let ms = reader.u32()?;
                let probes = reader.u32()?;
                let technique = match reader.u8()? {
                    0 => None,
                    1 => Some(reader.u8()?),
                    flag => return Err(ClusterDecodeError::BadFlag(flag)),
                };
                Ok(Self::Outcome {
                    intro_id,
                    side,
                    outcome,
                    ms,
                    probes,
                    technique,
                })
            }
            tag::MOVED => Ok(Self::Moved {
                peer_id: reader.peer_id()?,
                registered_unix_ms: reader.u64()?,
            }),
            other => Err(ClusterDecodeError::UnknownMessage(other)),
        }
    }
}

/// Cluster work the core asks of its driver (inside
/// [`super::RendezvousEvent::Cluster`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterRequest {
    /// Store this registration under its peer id (SET, TTL = the registration
    /// lifetime, [`super::RendezvousConfig::lifetime`]); emitted on every successful
    /// Register. A previous entry on another node calls for [`moved_notice`].
    Store(PeerEntry),
    /// Find the node of `peer_id` (GET) and answer with
    /// [`super::RendezvousServer::handle_located`] and this token.
    Locate {
        /// Echoed in the answer.
        token: u64,
        /// The peer to find.
        peer_id: String,
    },
    /// Send `message` to node `node` (its stream).
    Send {
        /// The recipient node.
        node: String,
        /// What to send ([`ClusterMessage::encode`]).
        message: ClusterMessage,
    },
}

/// What became of one cross-node Connect on the initiator's node: a bounded
/// metrics label. Each such Connect is counted exactly once as `Introduced`,
/// `NotFound`, `Unavailable`, `TimedOut` or `Failed`; `ResponderGone` comes later,
/// for some of the `Introduced` ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrossNodeOutcome {
    /// The target was on another node: the Introduce went there, the Connect was
    /// answered with the introduction id. (Also, rarely, a target that registered
    /// on this node while it was being located: introduced from here.)
    Introduced,
    /// The target is registered nowhere (or only in a stale record naming this
    /// node): 404.
    NotFound,
    /// The cluster is down, or too many Connects were waiting: 503.
    Unavailable,
    /// The target was not located within [`LOCATE_TIMEOUT`]: 503.
    TimedOut,
    /// The initiator was no longer registered here from the same address once its
    /// target was located: 403.
    Failed,
    /// The responder's node no longer had the responder (after `Introduced`).
    ResponderGone,
}

impl CrossNodeOutcome {
    /// Every outcome, for pre-registering label values.
    pub const ALL: [Self; 6] = [
        Self::Introduced,
        Self::NotFound,
        Self::Unavailable,
        Self::TimedOut,
        Self::Failed,
        Self::ResponderGone,
    ];

    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Introduced => "introduced",
            Self::NotFound => "not_found",
            Self::Unavailable => "unavailable",
            Self::TimedOut => "timed_out",
            Self::Failed => "failed",
            Self::ResponderGone => "responder_gone",
        }
    }
}

/// The message to send when storing `stored` replaced `previous` (what a SET with
/// GET returned): a [`ClusterMessage::Moved`] to the previous node when it is
/// another one, so it forgets its older registration. `None` otherwise.
pub fn moved_notice(stored: &PeerEntry, previous: Option<&PeerEntry>) -> Option<ClusterRequest> {
    let previous = previous.filter(|p| p.node != stored.node && p.peer_id == stored.peer_id)?;
    Some(ClusterRequest::Send {
        node: previous.node.clone(),
        message: ClusterMessage::Moved {
            peer_id: stored.peer_id.clone(),
            registered_unix_ms: stored.registered_unix_ms,
        },
    })
}

/// START-DELAYs `(initiator, responder)` in ms for an introduction across nodes, so
/// both agents start probing at the same instant.
///
/// The initiator's node sends the initiator its Introduction at `t0`; it arrives
/// after the initiator's one-way delay `d_i = initiator_rtt / 2`. The Introduce
/// reaches the responder's node after `transit` and its Introduction the responder
/// after `d_r = transit + responder_rtt / 2`. With `slower = max(d_i, d_r)`:
///
/// ```text
/// initiator_delay = slower + margin - d_i
/// responder_delay = slower + margin - d_r
/// ```
///
/// so both start at `t0 + slower + margin`. With `transit` zero this is the
/// single-node formula (`max(RTT_a, RTT_b)/2 + margin - RTT_x/2`).
pub fn cross_node_start_delays(
    initiator_rtt_ms: u32,
    responder_rtt_ms: u32,
    transit: Duration,
    margin: Duration,
) -> (u32, u32) {
    let transit = u32::try_from(transit.as_millis()).unwrap_or(u32::MAX);
    start_delays(
        initiator_rtt_ms / 2,
        transit.saturating_add(responder_rtt_ms / 2),
        u32::try_from(margin.as_millis()).unwrap_or(u32::MAX),
    )
}

/// START-DELAYs `(initiator, responder)` in ms from each side's one-way path from
/// the moment the introducing node acts: both start after the slower path plus
/// `margin_ms`.
pub(super) fn start_delays(
    initiator_path_ms: u32,
    responder_path_ms: u32,
    margin_ms: u32,
) -> (u32, u32) {
    let start = initiator_path_ms
        .max(responder_path_ms)
        .saturating_add(margin_ms);
    (
        start.saturating_sub(initiator_path_ms),
        start.saturating_sub(responder_path_ms),
    )
}

/// Appends a LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a varint length and the bytes.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends an address: a tag byte (`low` | 0x80 for IPv6), the IP, the port. The
/// low bits carry the candidate kind (0 for a plain address). IPv6 flow
/// information and scope ids are not kept.
fn put_addr(out: &mut Vec<u8>, addr: SocketAddr, low: u8) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(low);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(low | 0x80);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// A cursor over bytes being decoded; every read checks the length.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClusterDecodeError> {
        if self.0.len() < n {
            return Err(ClusterDecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ClusterDecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ClusterDecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, ClusterDecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ClusterDecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn version(&mut self) -> Result<(), ClusterDecodeError> {
        match self.u8()? {
            CLUSTER_VERSION => Ok(()),
            other => Err(ClusterDecodeError::UnsupportedVersion(other)),
        }
    }

    fn varint(&mut self) -> Result<u64, ClusterDecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7F);
            if shift == 63 && bits > 1 {
                return Err(ClusterDecodeError::TooLarge);
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ClusterDecodeError::TooLarge)
    }

    /// A varint length (at most `max`) and that many bytes.
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], ClusterDecodeError> {
        let len = usize::try_from(self.varint()?).map_err(|_| ClusterDecodeError::TooLarge)?;
        if len > max {
            return Err(ClusterDecodeError::TooLarge);
        }
        self.take(len)
    }

    fn peer_id(&mut self) -> Result<String, ClusterDecodeError> {
        // Longer than any valid id is refused before the bytes are looked at.
        let bytes = self.bytes(64).map_err(|e| match e {
            ClusterDecodeError::TooLarge => ClusterDecodeError::BadPeerId,
            e => e,
        })?;
        std::str::from_utf8(bytes)
            .ok()
            .filter(|id| valid_peer_id(id))
            .map(str::to_owned)
            .ok_or(ClusterDecodeError::BadPeerId)
    }

    fn node_id(&mut self) -> Result<String, ClusterDecodeError> {
        let bytes = self.bytes(MAX_NODE_ID_LEN).map_err(|e| match e {
            ClusterDecodeError::TooLarge => ClusterDecodeError::BadNodeId,
            e => e,
        })?;
        std::str::from_utf8(bytes)
            .ok()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or(ClusterDecodeError::BadNodeId)
    }

    /// An address written by [`put_addr`] and the low bits of its tag.
    fn addr(&mut self) -> Result<(SocketAddr, u8), ClusterDecodeError> {
        let tag = self.u8()?;
        let ip = if tag & 0x80 == 0 {
            IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))
        };
        let port = u16::from_be_bytes(self.array()?);
        let low = tag & 0x7F;
        if low > 0x0F {
            return Err(ClusterDecodeError::BadAddress(tag));
        }
        Ok((SocketAddr::new(ip, port), low))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        any::<SocketAddr>().prop_map(|a| SocketAddr::new(a.ip(), a.port()))
    }

    fn any_candidate() -> impl Strategy<Value = Candidate> {
        (0u8..7, any_addr()).prop_map(|(kind, addr)| Candidate {
            kind: CandidateKind::from_u8(kind).expect("known kind"),
            addr,
        })
    }

    fn any_peer_id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    fn any_entry() -> impl Strategy<Value = PeerEntry> {
        (
            any_peer_id(),
            "\\PC{1,16}".prop_filter("fits", |s: &String| s.len() <= MAX_NODE_ID_LEN),
            any_addr(),
            any::<u64>(),
            proptest::collection::vec(any_candidate(), 0..=MAX_CANDIDATES),
            0u8..5,
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(
                |(peer_id, node, addr, expiry_unix, candidates, nat, rtt_ms, registered)| {
                    PeerEntry {
                        peer_id,
                        node,
                        addr,
                        expiry_unix,
                        candidates,
                        nat: NatClass::from_u8(nat),
                        rtt_ms,
                        registered_unix_ms: registered,
                    }
                },
            )
    }

    fn any_message() -> impl Strategy<Value = ClusterMessage> {
        prop_oneof![
            (
                any::<u64>(),
                "[a-z0-9-]{1,64}",
                any_entry(),
                any_peer_id(),
                any::<[u8; 16]>(),
                any::<u32>()
            )
                .prop_map(
                    |(intro_id, from_node, initiator, responder_id, probe_key, delay)| {
                        ClusterMessage::Introduce {
                            intro_id,
                            from_node,
                            initiator,
                            responder_id,
                            probe_key,
                            responder_delay_ms: delay,
                        }
                    }
                ),
            (any::<u64>(), any_peer_id()).prop_map(|(intro_id, initiator_id)| {
                ClusterMessage::IntroduceFailed {
                    intro_id,
                    initiator_id,
                }
            }),
            (
                any_peer_id(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_DELIVER_PAYLOAD)
            )
                .prop_map(|(peer_id, payload)| ClusterMessage::Deliver { peer_id, payload }),
            (
                any::<u64>(),
                any::<u8>(),
                any::<u8>(),
                any::<u32>(),
                any::<u32>(),
                any::<Option<u8>>()
            )
                .prop_map(|(intro_id, side, outcome, ms, probes, technique)| {
                    ClusterMessage::Outcome {
                        intro_id,
                        side,
                        outcome,
                        ms,
                        probes,
                        technique,
                    }
                }),
            (any_peer_id(), any::<u64>()).prop_map(|(peer_id, registered_unix_ms)| {
                ClusterMessage::Moved {
                    peer_id,
                    registered_unix_ms,
                }
            }),
        ]
    }

    /// A typical peer: IPv4, a host and a TCP candidate and a predicted port.
    fn typical() -> PeerEntry {
        let addr = |s: &str| s.parse().expect("addr");
        PeerEntry {
            peer_id: "laptop-4821".into(),
            node: "gw-eu-1".into(),
            addr: addr("198.51.100.2:40000"),
            expiry_unix: 1_800_086_400,
            candidates: vec![
                Candidate {
                    kind: CandidateKind::Host,
                    addr: addr("10.0.1.2:4000"),
                },
                Candidate {
                    kind: CandidateKind::TcpServerReflexive,
                    addr: addr("198.51.100.2:40001"),
                },
                Candidate {
                    kind: CandidateKind::Predicted,
                    addr: addr("198.51.100.2:40002"),
                },
            ],
            nat: NatClass::AddressAndPortDependent,
            rtt_ms: 180,
            registered_unix_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn a_typical_entry_is_small() {
        let bytes = typical().encode();
        assert!(
            (60..=90).contains(&bytes.len()),
            "{} bytes: the store holds one per peer",
            bytes.len()
        );
        assert_eq!(PeerEntry::decode(&bytes), Ok(typical()));
    }

    #[test]
    fn unknown_versions_and_types_are_refused_and_later_fields_ignored() {
        let mut bytes = typical().encode();
        bytes[0] = 2;
        assert_eq!(
            PeerEntry::decode(&bytes),
            Err(ClusterDecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            ClusterMessage::decode(&[CLUSTER_VERSION, 99]),
            Err(ClusterDecodeError::UnknownMessage(99))
        );
        let mut longer = typical().encode();
        longer.extend_from_slice(b"a later version's field");
        assert_eq!(PeerEntry::decode(&longer), Ok(typical()));
    }

    #[test]
    fn a_newer_nodes_unknown_candidate_kind_is_skipped_not_fatal() {
        let entry = typical();
        let bytes = entry.encode();
        // The first candidate's kind byte sits right after the count; give it a kind
        // no node knows yet (kinds use the low bits of the address tag).
        let first = entry.candidates.first().expect("a candidate");
        let tag = bytes
            .windows(1 + 4)
            .position(|w| {
                matches!(first.addr.ip(), IpAddr::V4(ip) if w[1..] == ip.octets())
                    && w[0] == first.kind as u8
            })
            .expect("the candidate's tag");
        let mut newer = bytes.clone();
        newer[tag] = 0x0E;
        let decoded = PeerEntry::decode(&newer).expect("still decodes");
        assert_eq!(decoded.candidates, entry.candidates[1..].to_vec());
        assert_eq!((decoded.peer_id, decoded.addr), (entry.peer_id, entry.addr));
    }

    #[test]
    fn start_delays_align_both_sides_across_nodes() {
        let margin = Duration::from_millis(5);
        // Initiator 40 ms RTT (20 one way), responder 100 ms (50), transit 10: the
        // responder's path is 60 ms, the slower; both start at t0 + 65 ms.
        let (i, r) = cross_node_start_delays(40, 100, Duration::from_millis(10), margin);
        assert_eq!((20 + i, 10 + 50 + r), (65, 65));
        // A faster responder: the initiator's 100 ms path is the slower one.
        let (i, r) = cross_node_start_delays(200, 20, Duration::from_millis(2), margin);
        assert_eq!((100 + i, 2 + 10 + r), (105, 105));
        // No transit: the single-node formula.
        assert_eq!(
            cross_node_start_delays(40, 100, Duration::ZERO, margin),
            start_delays(20, 50, 5)
        );
    }

    #[test]
    fn moved_notices_go_to_the_previous_node_only() {
        let stored = typical();
        let mut previous = typical();
        assert_eq!(moved_notice(&stored, Some(&previous)), None);
        assert_eq!(moved_notice(&stored, None), None);
        previous.node = "gw-us-1".into();
        assert_eq!(
            moved_notice(&stored, Some(&previous)),
            Some(ClusterRequest::Send {
                node: "gw-us-1".into(),
                message: ClusterMessage::Moved {
                    peer_id: stored.peer_id.clone(),
                    registered_unix_ms: stored.registered_unix_ms
                }
            })
        );
    }

    proptest! {
        #[test]
        fn entries_round_trip(entry in any_entry(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = entry.encode();
            prop_assert_eq!(PeerEntry::decode(&bytes), Ok(entry.clone()));
            for cut in 0..bytes.len() {
                prop_assert!(PeerEntry::decode(&bytes[..cut]).is_err(), "prefix {} decoded", cut);
            }
            bytes.extend(tail);
            prop_assert_eq!(PeerEntry::decode(&bytes), Ok(entry));
        }

        #[test]
        fn messages_round_trip(message in any_message(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = message.encode();
            prop_assert_eq!(ClusterMessage::decode(&bytes), Ok(message.clone()));
            for cut in 0..bytes.len() {
                prop_assert!(ClusterMessage::decode(&bytes[..cut]).is_err(), "prefix {} decoded", cut);
            }
            bytes.extend(tail);
            prop_assert_eq!(ClusterMessage::decode(&bytes), Ok(message));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PeerEntry::decode(&bytes);
            let _ = ClusterMessage::decode(&bytes);
            // With a valid version byte and type, to get past the first checks.
            for t in 1..=5 {
                let mut framed = vec![CLUSTER_VERSION, t];
                framed.extend_from_slice(&bytes);
                let _ = ClusterMessage::decode(&framed);
            }
            let mut framed = vec![CLUSTER_VERSION];
            framed.extend_from_slice(&bytes);
            if let Ok(entry) = PeerEntry::decode(&framed) {
                // Whatever decodes re-encodes to something that decodes the same.
                prop_assert_eq!(PeerEntry::decode(&entry.encode()), Ok(entry));
            }
        }
    }
}
