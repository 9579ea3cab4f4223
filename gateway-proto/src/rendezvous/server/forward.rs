//! What the gateway passes between the two sides of an introduction: relay offers
//! and TCP-Seq (forwarded for NATBlaster, or kept and paired for server-assisted
//! splicing, see [`crate::rendezvous::forge`]), each only from a registered side of
//! a remembered introduction and signed for the recipient. When the recipient is
//! registered on another node, the signed datagram goes there
//! ([`ClusterMessage::Deliver`]).
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
};

use rand::Rng;

use super::{
    IntroRecord, PeerRecord, Refusal, RendezvousEvent, RendezvousHandled, RendezvousServer,
    auth::{Authenticated, signed_success},
    intro_side,
};
use crate::{
    Transmit, Transport,
    credentials::SharedSecret,
    rendezvous::{
        cluster::{ClusterMessage, ClusterRequest},
        forge,
        wire::{
            CandidateKind, TCP_FORGE_DISABLED, attr, decode_candidate, encode_candidate, method,
            read_u32, read_u64,
        },
    },
    stun::{Class, MessageType, MessageWriter},
};

impl RendezvousServer {
    /// Forwards a side's TURN relayed address to the other side of an introduction,
    /// signed for the recipient. Only a registered side of a remembered introduction
    /// may offer, and only relayed candidates pass.
    pub(super) fn relay_offer(
        &mut self,
        from: SocketAddr,
        auth: &Authenticated<'_>,
    ) -> Result<(RendezvousHandled, Vec<u8>), Refusal> {
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
            return Err((RendezvousHandled::BadRequest, 400, "Bad Request"));
        };
        // Only an allocation of this gateway's relay: anything else would aim the
        // other side's agent at an address of the sender's choosing.
        if !self
            .relay_endpoints
            .as_ref()
            .is_some_and(|endpoints| endpoints.contains(relayed.addr))
        {
            return Err((
                RendezvousHandled::Forbidden,
                403,
                "Not A Relay Of This Gateway",
            ));
        }
        if self
            .peers
            .get(auth.peer_id.as_str())
            .is_none_or(|p| p.addr != from || p.transport != self.request_transport)
        {
            return Err((RendezvousHandled::Forbidden, 403, "Not Registered Here"));
        }
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        let (other_id, password, recipient) = other_side(&self.peers, &self.secret, record, side)?;
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
        self.send_to_side(other_id, recipient, payload);
        Ok((
            RendezvousHandled::RelayOffered,
            signed_success(method::RELAY_OFFER, tid, auth),
        ))
    }

    /// Forwards a side's initial sequence number (and the endpoint it expects the
    /// other side at) to the other side of an introduction, signed for the
    /// recipient. Only a registered side of a remembered introduction may send it,
    /// once per introduction; nothing else is kept.
    pub(super) fn tcp_seq(
        &mut self,
        from: SocketAddr,
        auth: &Authenticated<'_>,
    ) -> Result<(RendezvousHandled, Vec<u8>), Refusal> {
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
            return Err((RendezvousHandled::BadRequest, 400, "Bad Request"));
        };
        if forge {
            let Some(target) = expected else {
                return Err((RendezvousHandled::BadRequest, 400, "Bad Request"));
            };
            return self.tcp_forge(from, auth, intro_id, isn, target.addr);
        }
        if self
            .peers
            .get(auth.peer_id.as_str())
            .is_none_or(|p| p.addr != from || p.transport != self.request_transport)
        {
            return Err((RendezvousHandled::Forbidden, 403, "Not Registered Here"));
        }
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        if record.tcp_seq_sent[side] {
            return Err((RendezvousHandled::NotFound, 404, "Already Sent"));
        }
        let (other_id, password, recipient) = other_side(&self.peers, &self.secret, record, side)?;
        record.tcp_seq_sent[side] = true;
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
        self.send_to_side(other_id, recipient, payload);
        Ok((
            RendezvousHandled::TcpSeqForwarded,
            signed_success(method::TCP_SEQ, tid, auth),
        ))
    }

    /// Server-assisted splicing (technique 4): keeps a side's initial sequence number
    /// (nothing is forwarded) and, once the other side's is in, queues the two forged
    /// SYN-ACKs. Refused (no state, nothing forged) when forging is off, the sender is
    /// not registered from here or not a side of a remembered introduction, already
    /// sent one, has no TCP candidate, or names another target than the other side's
    /// TCP candidate. Forging needs both halves and both NATs' flows on one node:
    /// across nodes it is refused like forging switched off
    /// ([`TCP_FORGE_DISABLED`], 501).
    fn tcp_forge(
        &mut self,
        from: SocketAddr,
        auth: &Authenticated<'_>,
        intro_id: u64,
        isn: u32,
        target: SocketAddr,
    ) -> Result<(RendezvousHandled, Vec<u8>), Refusal> {
        if !self.tcp_forge {
            return Err((
                RendezvousHandled::TcpForgeDisabled,
                TCP_FORGE_DISABLED,
                "SYN-ACK Forging Disabled",
            ));
        }
        let tcp_endpoint = |peer: &PeerRecord| forge::tcp_endpoint(&peer.host_candidates);
        let own = match self.peers.get(auth.peer_id.as_str()) {
            Some(p) if p.addr == from && p.transport == self.request_transport => tcp_endpoint(p),
            _ => return Err((RendezvousHandled::Forbidden, 403, "Not Registered Here")),
        };
        let (record, side) = intro_side(&mut self.intros, intro_id, &auth.peer_id)?;
        if record.remote.is_some() {
            return Err((
                RendezvousHandled::TcpForgeDisabled,
                TCP_FORGE_DISABLED,
                "SYN-ACK Forging Disabled",
            ));
        }
        if record.tcp_seq_sent[side] {
            return Err((RendezvousHandled::NotFound, 404, "Already Sent"));
        }
        let other_tcp = self
            .peers
            .get(&*record.sides[1 - side])
            .and_then(tcp_endpoint)
            .ok_or((RendezvousHandled::NotFound, 404, "Peer Not Found"))?;
        let half = forge::half(isn, own, target, other_tcp)?;
        record.tcp_seq_sent[side] = true;
        let handled = match record.forge.offer(side, half) {
            Some(forged) => {
                let forged = forged.into_iter().map(RendezvousEvent::ForgeSynAck);
                self.events.extend(forged);
                RendezvousHandled::TcpSynAckForged
            }
            None => RendezvousHandled::TcpForgeQueued,
        };
        Ok((
            handled,
            signed_success(method::TCP_SEQ, auth.message.transaction_id(), auth),
        ))
    }
}

/// Where the other side of an introduction gets what its side sends.
enum Recipient {
    /// Registered here: sent from here (to its address, over its transport).
    Here((SocketAddr, Transport), Option<IpAddr>),
    /// Registered on another node: sent through that node.
    Node(Box<str>),
}

/// The other side of `record` than `side`: its id, the password its indications
/// are signed with (its username is `expiry:peer-id`) and where it is. 404 when it
/// is registered neither here nor, for this introduction, on another node.
fn other_side(
    peers: &HashMap<Box<str>, PeerRecord>,
    secret: &SharedSecret,
    record: &IntroRecord,
    side: usize,
) -> Result<(Box<str>, String, Recipient), Refusal> {
    let other_id = record.sides[1 - side].clone();
    // A side on another node is signed for with the current secret: which secret
    // its credentials derive from is known only there.
    let (expiry_unix, secret_index, recipient) = match record.remote.as_deref() {
        Some(remote) if remote.side == 1 - side => {
            (remote.expiry_unix, 0, Recipient::Node(remote.node.clone()))
        }
        _ => {
            let other = peers.get(&*other_id).ok_or((
                RendezvousHandled::NotFound,
                404,
                "Peer Not Found",
            ))?;
            (
                other.expiry_unix,
                usize::from(other.secret),
                Recipient::Here((other.addr, other.transport), other.local),
            )
        }
    };
    let password = secret.password_with(secret_index, &format!("{expiry_unix}:{other_id}"));
    Ok((other_id, password, recipient))
}

impl RendezvousServer {
    /// Sends a signed indication to the other side of an introduction: twice from
    /// here, or once to its node, which sends it twice.
    fn send_to_side(&mut self, other_id: Box<str>, recipient: Recipient, payload: Vec<u8>) {
        match recipient {
            Recipient::Here(to, local) => push_twice(&mut self.transmits, to, local, payload),
            Recipient::Node(node) => {
                self.events
                    .push_back(RendezvousEvent::Cluster(ClusterRequest::Send {
                        node: node.into(),
                        message: ClusterMessage::Deliver {
                            peer_id: other_id.into(),
                            payload,
                        },
                    }))
            }
        }
    }
}

/// Queues `payload` to `to` over its transport twice (a signed indication whose
/// loss costs a technique). Over a stream once is enough: the connection does not
/// lose it.
pub(super) fn push_twice(
    out: &mut VecDeque<Transmit>,
    (to, transport): (SocketAddr, Transport),
    from_local: Option<IpAddr>,
    payload: Vec<u8>,
) {
    if !transport.is_stream() {
        out.push_back(Transmit::udp(to, payload.clone()).from_local(from_local));
    }
    out.push_back(
        Transmit::udp(to, payload)
            .from_local(from_local)
            .over(transport),
    );
}
