//! The rendezvous server's part in a cluster of nodes ("Across nodes" in
//! `docs/protocol.md`; the shared values are in [`crate::rendezvous::cluster`]).
//!
//! A Connect whose target is not registered here waits ("parked") while the driver
//! locates the target in the cluster store; located on another node, the
//! introduction is made from both nodes: this one sends its peer's Introduction and
//! asks the other, with [`ClusterMessage::Introduce`], to send its own. The
//! initiator's node owns the introduction and counts its outcomes; what a side sends
//! about it to its own node (relay offers, TCP-Seq, outcome reports) crosses over
//! as [`ClusterMessage::Deliver`] and [`ClusterMessage::Outcome`].
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::Rng;

use super::{
    IntroPeer, IntroRecord, PeerRecord, Refusal, RendezvousEvent, RendezvousHandled,
    RendezvousServer, Report,
    auth::{Authenticated, error_reply_to},
};
use crate::{
    Transmit, Transport,
    rendezvous::{
        cluster::{
            ClusterMessage, ClusterRequest, CrossNodeOutcome, DEFAULT_TRANSIT, LOCATE_TIMEOUT,
            MAX_DELIVER_PAYLOAD, MAX_PARKED_CONNECTS, PeerEntry, cross_node_start_delays,
        },
        wire::{
            CLUSTER_UNAVAILABLE, CLUSTER_UNAVAILABLE_REASON, SessionOutcome, TcpTechnique, attr,
            method,
        },
    },
    stun::{Class, MessageType, MessageWriter, attr as stun_attr},
};

/// How to answer a request after its datagram is gone (a parked Connect): where
/// it came from and what `auth` gave.
#[derive(Clone, Debug)]
pub(super) struct ReplyTo {
    from: SocketAddr,
    transport: Transport,
    local: Option<IpAddr>,
    tid: [u8; 12],
    password: String,
    next_nonce: String,
}

impl ReplyTo {
    /// What answering `auth`'s request from `from` over `transport` (received on
    /// `local`) takes.
    pub(super) fn new(
        from: SocketAddr,
        transport: Transport,
        local: Option<IpAddr>,
        auth: &Authenticated<'_>,
    ) -> Self {
        Self {
            from,
            transport,
            local,
            tid: auth.message.transaction_id(),
            password: auth.password.clone(),
            next_nonce: auth.next_nonce.clone(),
        }
    }

    /// The Connect success answer ([`connect_success`]) as a datagram to the
    /// requester.
    fn success(&self, intro_id: u64) -> Transmit {
        let reply = connect_success(self.tid, &self.password, &self.next_nonce, intro_id);
        Transmit::udp(self.from, reply)
            .from_local(self.local)
            .over(self.transport)
    }

    /// A signed Connect error answer to the requester.
    fn error(&self, code: u16, reason: &str) -> Transmit {
        let signed = Some((self.password.as_str(), self.next_nonce.as_str()));
        error_reply_to(
            method::CONNECT,
            self.tid,
            code,
            reason,
            signed,
            self.from,
            self.local,
        )
        .over(self.transport)
    }
}

/// The Connect success answer: the introduction id and the next nonce, signed.
pub(super) fn connect_success(
    tid: [u8; 12],
    password: &str,
    nonce: &str,
    intro_id: u64,
) -> Vec<u8> {
    let mut reply = Vec::with_capacity(96);
    let mut writer = MessageWriter::new(
        &mut reply,
        MessageType {
            method: method::CONNECT,
            class: Class::Success,
        },
        tid,
    );
    writer
        .attribute(attr::INTRO_ID, &intro_id.to_be_bytes())
        .attribute(stun_attr::NONCE, nonce.as_bytes())
        .message_integrity_sha256(password.as_bytes());
    writer.finish_with_fingerprint();
    reply
}

/// The side of a cross-node introduction registered on another node: where what
/// its other side sends goes, and how to sign for it.
#[derive(Clone, Debug)]
pub(super) struct RemoteSide {
    /// Its node.
    pub(super) node: Box<str>,
    /// Which side it is (0 initiator: the introduction is owned there; 1 responder).
    pub(super) side: usize,
    /// When its credentials expire: its username is `expiry:peer-id`.
    pub(super) expiry_unix: u64,
}

/// A Connect waiting for its target to be located.
#[derive(Debug)]
struct Parked {
    deadline: Instant,
    initiator: Box<str>,
    target: Box<str>,
    reply: ReplyTo,
}

/// This node's part in a cluster: its id, the store's state, the Connects waiting
/// for it.
#[derive(Debug)]
pub(super) struct ClusterState {
    node_id: Box<str>,
    up: bool,
    transit: Duration,
    /// By token. Tokens grow as Connects arrive and every wait is
    /// [`LOCATE_TIMEOUT`], so the first one is the first due.
    parked: BTreeMap<u64, Parked>,
    next_token: u64,
}

impl ClusterState {
    /// When the oldest parked Connect times out.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.parked.first_key_value().map(|(_, p)| p.deadline)
    }

    /// A local registration as the cluster shares it.
    pub(super) fn entry(&self, peer_id: &str, record: &PeerRecord) -> PeerEntry {
        entry(&self.node_id, peer_id, record)
    }
}

/// Registration `record` of `peer_id` on node `node`, as the cluster shares it.
fn entry(node: &str, peer_id: &str, record: &PeerRecord) -> PeerEntry {
    PeerEntry {
        peer_id: peer_id.to_owned(),
        node: node.to_owned(),
        addr: record.addr,
        expiry_unix: record.expiry_unix,
        candidates: record.host_candidates.to_vec(),
        nat: record.nat,
        rtt_ms: record.rtt_ms,
        registered_unix_ms: u64::from(record.registered_unix) * 1_000,
    }
}

/// The message that takes a local side's outcome report to the introduction's
/// owner (the initiator's node, `remote`).
pub(super) fn outcome_to_owner(
    remote: &RemoteSide,
    intro_id: u64,
    side: usize,
    report: Report,
) -> ClusterRequest {
    ClusterRequest::Send {
        node: remote.node.to_string(),
        message: ClusterMessage::Outcome {
            intro_id,
            side: side as u8,
            outcome: report.outcome as u8,
            ms: report.ms,
            probes: report.probes,
            technique: report.technique.map(|t| t as u8),
        },
    }
}

impl RendezvousServer {
    /// Makes this server node `node_id` of a cluster: Connects to peers registered
    /// elsewhere are located and introduced across nodes, and every Register is
    /// stored for the other nodes ([`RendezvousEvent::Cluster`]). Without it the
    /// server is a single node and emits no cluster work. The cluster starts up;
    /// enabling again only renames the node.
    pub fn enable_cluster(&mut self, node_id: String) {
        match &mut self.cluster {
            Some(cluster) => cluster.node_id = node_id.into_boxed_str(),
            None => {
                self.cluster = Some(ClusterState {
                    node_id: node_id.into_boxed_str(),
                    up: true,
                    transit: DEFAULT_TRANSIT,
                    parked: BTreeMap::new(),
                    next_token: 0,
                })
            }
        }
    }

    /// This node's id in the cluster, if [`Self::enable_cluster`] made it one.
    pub fn node_id(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| &*c.node_id)
    }

    /// Whether the cluster store is reachable (the driver's view). While it is
    /// down, a Connect to a peer not registered here is answered 503 "Cluster
    /// Unavailable" at once, and so are the Connects waiting when it goes down (no
    /// answer will come for them). Other cluster work is still emitted: the driver
    /// may drop it, and re-publishes [`Self::local_entries`] when the store is back.
    pub fn set_cluster_up(&mut self, up: bool) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        cluster.up = up;
        if !up {
            for (_, parked) in std::mem::take(&mut cluster.parked) {
                self.fail_parked(&parked, CrossNodeOutcome::Unavailable);
            }
        }
    }

    /// The driver's estimate of the one-way node-to-node delay (through the store's
    /// streams): the responder's Introduction leaves that much later, so its
    /// START-DELAY is that much shorter ([`cross_node_start_delays`]). Default
    /// [`DEFAULT_TRANSIT`].
    pub fn set_cluster_transit(&mut self, transit: Duration) {
        if let Some(cluster) = &mut self.cluster {
            cluster.transit = transit;
        }
    }

    /// The answer to [`ClusterRequest::Locate`] `token`: where the target of a
    /// parked Connect is registered (`None`: nowhere). On another node the
    /// introduction is made across nodes and the Connect answered with its id;
    /// otherwise it is answered 404 (a record naming this node but no local
    /// registration is stale). A token not waiting (answered, timed out) is
    /// ignored. Also times out other Connects that waited too long.
    pub fn handle_located(
        &mut self,
        now: Instant,
        now_unix: u64,
        token: u64,
        entry: Option<PeerEntry>,
    ) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(parked) = cluster.parked.remove(&token) else {
            return;
        };
        let own = cluster.node_id.clone();
        self.answer_located(now_unix, &parked, entry, &own);
        self.expire_parked(now);
    }

    /// What another node sent this one (see [`ClusterMessage`]). Messages about
    /// peers or introductions this node does not have change nothing (an Introduce
    /// for a peer not registered here is answered [`ClusterMessage::IntroduceFailed`]).
    /// Ignored unless [`Self::enable_cluster`] was called.
    pub fn handle_cluster_message(&mut self, now: Instant, now_unix: u64, message: ClusterMessage) {
        if self.cluster.is_none() {
            return;
        }
        match message {
            introduce @ ClusterMessage::Introduce { .. } => {
                self.introduce_here(now, now_unix, introduce)
            }
            ClusterMessage::IntroduceFailed {
                intro_id,
                initiator_id,
            } => {
                // Only for an introduction this node made toward another node: it
                // is forgotten (its reports would count a punch that never was).
                let ours = self.intros.get(&intro_id).is_some_and(|r| {
                    *r.sides[0] == *initiator_id && r.remote.as_ref().is_some_and(|r| r.side == 1)
                });
                if ours {
                    self.intros.remove(&intro_id);
                    self.events
                        .push_back(RendezvousEvent::CrossNode(CrossNodeOutcome::ResponderGone));
                }
            }
            ClusterMessage::Deliver { peer_id, payload } => {
                if let Some(peer) = self.peers.get(peer_id.as_str())
                    && payload.len() <= MAX_DELIVER_PAYLOAD
                {
                    // Twice, as a relay offer or TCP-Seq from this node would be.
                    super::forward::push_twice(
                        &mut self.transmits,
                        (peer.addr, peer.transport),
                        peer.local,
                        payload,
                    );
                }
            }
            ClusterMessage::Outcome {
                intro_id,
                side,
                outcome,
                ms,
                probes,
                technique,
            } => {
                // An unknown technique: dropped.
                if let Ok(technique) = technique
                    .map(|t| TcpTechnique::from_u8(t).ok_or(t))
                    .transpose()
                {
                    let report = Report {
                        outcome: SessionOutcome::from_u8(outcome),
                        ms,
                        probes,
                        technique,
                    };
                    self.count_remote_report(intro_id, side, report);
                }
            }
            ClusterMessage::Moved {
                peer_id,
                registered_unix_ms,
            } => {
                if self
                    .peers
                    .get(peer_id.as_str())
                    .is_some_and(|p| u64::from(p.registered_unix) * 1_000 < registered_unix_ms)
                {
                    self.peers.remove(peer_id.as_str());
                }
            }
        }
        self.expire_parked(now);
    }

    /// Counts the remote side's report of an introduction this node owns (it
    /// introduced the initiator), through the same per-side dedup as a local
    /// report; anything else is dropped.
    fn count_remote_report(&mut self, intro_id: u64, side: u8, report: Report) {
        if let Some(record) = self.intros.get_mut(&intro_id)
            && let Some(remote) = record.remote.as_deref()
            && remote.side == 1
            && usize::from(side) == remote.side
            && let Ok(Some(event)) = record.count(remote.side, report)
        {
            self.events.push_back(event);
        }
    }

    /// Every registration of this node whose credentials are still valid, as the
    /// cluster shares them: to store again when the store comes back empty. Empty
    /// without [`Self::enable_cluster`].
    pub fn local_entries(&self, now_unix: u64) -> Vec<PeerEntry> {
        let Some(cluster) = &self.cluster else {
            return Vec::new();
        };
        self.peers
            .iter()
            .filter(|(_, p)| p.expiry_unix > now_unix)
            .map(|(id, p)| cluster.entry(id, p))
            .collect()
    }

    /// A Connect from `initiator_id` to `target`, not registered here: waits for
    /// the target to be located ([`ClusterRequest::Locate`]); 503 at once when the
    /// cluster is down or too many wait.
    pub(super) fn park_connect(
        &mut self,
        now: Instant,
        initiator_id: &str,
        target: String,
        reply: ReplyTo,
    ) -> Result<(RendezvousHandled, Option<Vec<u8>>), Refusal> {
        let Some(cluster) = &mut self.cluster else {
            return Err((RendezvousHandled::NotFound, 404, "Peer Not Found"));
        };
        if !cluster.up || cluster.parked.len() >= MAX_PARKED_CONNECTS {
            self.events
                .push_back(RendezvousEvent::CrossNode(CrossNodeOutcome::Unavailable));
            return Err((
                RendezvousHandled::ClusterUnavailable,
                CLUSTER_UNAVAILABLE,
                CLUSTER_UNAVAILABLE_REASON,
            ));
        }
        let token = cluster.next_token;
        cluster.next_token = cluster.next_token.wrapping_add(1);
        cluster.parked.insert(
            token,
            Parked {
                deadline: now + LOCATE_TIMEOUT,
                initiator: initiator_id.into(),
                target: target.as_str().into(),
                reply,
            },
        );
        self.events
            .push_back(RendezvousEvent::Cluster(ClusterRequest::Locate {
                token,
                peer_id: target,
            }));
        Ok((RendezvousHandled::Locating, None))
    }

    /// Answers 503 to the parked Connects whose wait is over.
    pub(super) fn expire_parked(&mut self, now: Instant) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let mut expired = Vec::new();
        while let Some(entry) = cluster.parked.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            expired.push(entry.remove());
        }
        for parked in expired {
            self.fail_parked(&parked, CrossNodeOutcome::TimedOut);
        }
    }

    /// Answers a parked Connect 503 "Cluster Unavailable", counted as `outcome`.
    fn fail_parked(&mut self, parked: &Parked, outcome: CrossNodeOutcome) {
        let reply = parked
            .reply
            .error(CLUSTER_UNAVAILABLE, CLUSTER_UNAVAILABLE_REASON);
        self.transmits.push_back(reply);
        self.events.push_back(RendezvousEvent::CrossNode(outcome));
    }

    /// Decides a parked Connect once its target's entry (or none) is known.
    fn answer_located(
        &mut self,
        now_unix: u64,
        parked: &Parked,
        entry: Option<PeerEntry>,
        own: &str,
    ) {
        let reply = &parked.reply;
        let initiator = self
            .peers
            .get(&*parked.initiator)
            .filter(|p| p.addr == reply.from)
            .cloned();
        let Some(initiator) = initiator else {
            // It left or moved while its target was looked up.
            let reply = reply.error(403, "Not Registered Here");
            self.transmits.push_back(reply);
            self.events
                .push_back(RendezvousEvent::CrossNode(CrossNodeOutcome::Failed));
            return;
        };
        // The target may have registered here meanwhile: this node introduces.
        if let Some(responder) = self.peers.get(&*parked.target).cloned() {
            let intro_id =
                self.introduce_local(&parked.initiator, &initiator, &parked.target, &responder);
            self.transmits.push_back(reply.success(intro_id));
            self.events
                .push_back(RendezvousEvent::CrossNode(CrossNodeOutcome::Introduced));
            return;
        }
        let entry = entry
            .filter(|e| *e.peer_id == *parked.target && e.node != own && e.expiry_unix > now_unix);
        let Some(entry) = entry else {
            self.transmits.push_back(reply.error(404, "Peer Not Found"));
            self.events
                .push_back(RendezvousEvent::CrossNode(CrossNodeOutcome::NotFound));
            return;
        };
        let intro_id = self.introduce_remote(&parked.initiator, &initiator, entry, own);
        self.transmits.push_back(reply.success(intro_id));
        self.events
            .push_back(RendezvousEvent::CrossNode(CrossNodeOutcome::Introduced));
    }

    /// Introduces local `initiator` to `responder`, registered on another node: the
    /// initiator's Introduction from here, the responder's through its node
    /// ([`ClusterMessage::Introduce`]), START-DELAYs aligned across the transit
    /// ([`cross_node_start_delays`]). This node owns the introduction. Returns its
    /// id.
    fn introduce_remote(
        &mut self,
        initiator_id: &str,
        initiator: &PeerRecord,
        responder: PeerEntry,
        own: &str,
    ) -> u64 {
        let intro_id: u64 = self.rng.random();
        let probe_key: [u8; 16] = self.rng.random();
        let transit = self.cluster.as_ref().map_or(DEFAULT_TRANSIT, |c| c.transit);
        let (initiator_delay, responder_delay) = cross_node_start_delays(
            initiator.rtt_ms,
            responder.rtt_ms,
            transit,
            self.config.start_margin,
        );
        let other = IntroPeer {
            id: &responder.peer_id,
            addr: responder.addr,
            candidates: &responder.candidates,
            nat: responder.nat,
        };
        let shared = (intro_id, probe_key);
        self.push_introduction(initiator_id, initiator, &other, shared, initiator_delay, 0);
        let initiator_entry = entry(own, initiator_id, initiator);
        let sides = [initiator_id.into(), responder.peer_id.as_str().into()];
        let nats = [initiator.nat, responder.nat];
        let remote = RemoteSide {
            node: responder.node.as_str().into(),
            side: 1,
            expiry_unix: responder.expiry_unix,
        };
        let mapped = super::has_mapped(&initiator.host_candidates)
            || super::has_mapped(&responder.candidates);
        self.remember_intro(
            intro_id,
            IntroRecord::new(sides, nats, Some(remote), mapped),
        );
        self.events
            .push_back(RendezvousEvent::Cluster(ClusterRequest::Send {
                node: responder.node,
                message: ClusterMessage::Introduce {
                    intro_id,
                    from_node: own.to_owned(),
                    initiator: initiator_entry,
                    responder_id: responder.peer_id,
                    probe_key,
                    responder_delay_ms: responder_delay,
                },
            }));
        self.events.push_back(RendezvousEvent::Introduced {
            initiator_nat: initiator.nat,
            responder_nat: responder.nat,
        });
        intro_id
    }

    /// The responder's half of an introduction made by `from_node`: its
    /// Introduction (twice) and the record its reports and offers need; or
    /// [`ClusterMessage::IntroduceFailed`] when it is not registered here (or
    /// the id is taken by another introduction). A repeated Introduce changes
    /// nothing.
    fn introduce_here(&mut self, now: Instant, now_unix: u64, introduce: ClusterMessage) {
        let ClusterMessage::Introduce {
            intro_id,
            from_node,
            initiator,
            responder_id,
            probe_key,
            responder_delay_ms: delay_ms,
        } = introduce
        else {
            return;
        };
        let responder_id = responder_id.as_str();
        let shared = (intro_id, probe_key);
        let sides: [Box<str>; 2] = [initiator.peer_id.as_str().into(), responder_id.into()];
        let repeated = self.intros.get(&intro_id).map(|r| r.sides == sides);
        let lifetime_ms = u32::try_from(self.config.lifetime.as_millis()).unwrap_or(u32::MAX);
        let now_ms = self.clock_ms(now);
        let responder = self
            .peers
            .get(responder_id)
            .filter(|p| {
                p.expiry_unix > now_unix && now_ms.wrapping_sub(p.last_seen_ms) < lifetime_ms
            })
            .filter(|_| *initiator.peer_id != *responder_id)
            .cloned();
        let responder = match (repeated, responder) {
            (Some(true), _) => return,
            (None, Some(responder)) => responder,
            _ => {
                self.events
                    .push_back(RendezvousEvent::Cluster(ClusterRequest::Send {
                        node: from_node,
                        message: ClusterMessage::IntroduceFailed {
                            intro_id,
                            initiator_id: initiator.peer_id,
                        },
                    }));
                return;
            }
        };
        let other = IntroPeer {
            id: &initiator.peer_id,
            addr: initiator.addr,
            candidates: &initiator.candidates,
            nat: initiator.nat,
        };
        self.push_introduction(responder_id, &responder, &other, shared, delay_ms, 1);
        let remote = RemoteSide {
            node: from_node.into_boxed_str(),
            side: 0,
            expiry_unix: initiator.expiry_unix,
        };
        let nats = [initiator.nat, responder.nat];
        let mapped = super::has_mapped(&initiator.candidates)
            || super::has_mapped(&responder.host_candidates);
        self.remember_intro(
            intro_id,
            IntroRecord::new(sides, nats, Some(remote), mapped),
        );
    }
}

#[cfg(test)]
mod tests;
