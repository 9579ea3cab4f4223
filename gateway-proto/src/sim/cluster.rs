//! Test-only: several rendezvous servers as one cluster, joined by an in-memory
//! "Redis" that does what the gateway's cluster driver does with the cores'
//! [`ClusterRequest`]s: a map of encoded [`PeerEntry`]s (Store, Locate) and one
//! stream of encoded [`ClusterMessage`]s per node (Send). Everything crosses as
//! bytes, so the codecs are exercised on every hop.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::rendezvous::{NOW_UNIX, World, creds};
use crate::rendezvous::{
    RendezvousEvent, RendezvousHandled, Transmit,
    client::{parse_response, register_with_candidates},
    cluster::{ClusterMessage, ClusterRequest, PeerEntry, moved_notice},
    wire::{Candidate, NatClass},
};

/// A message one node sent another, as the sim logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sent {
    /// The sender's index.
    pub from: usize,
    /// The recipient's node id.
    pub to: String,
    /// The message.
    pub message: ClusterMessage,
}

/// Nodes `gw-0`, `gw-1`, ... and the store between them.
pub(crate) struct ClusterSim {
    /// The nodes (each a server and its driver's queues).
    pub nodes: Vec<World>,
    /// The store: peer id → encoded entry.
    pub store: HashMap<String, Vec<u8>>,
    /// Whether Locates are answered (false: the store never answers).
    pub answering: bool,
    /// Every message sent between nodes, in order.
    pub sent: Vec<Sent>,
    /// Per node: encoded messages not yet delivered.
    streams: Vec<VecDeque<Vec<u8>>>,
    /// Locates not yet answered: (node, token, peer id).
    locates: VecDeque<(usize, u64, String)>,
    /// Per node: datagrams sent, not yet looked at.
    out: Vec<Vec<Transmit>>,
    /// Per node: events other than cluster work, not yet looked at.
    events: Vec<Vec<RendezvousEvent>>,
}

/// Node `i`'s id.
pub(crate) fn node_name(i: usize) -> String {
    format!("gw-{i}")
}

impl ClusterSim {
    /// `count` nodes, all with the cluster enabled and up, at one virtual time.
    pub fn new(count: usize) -> Self {
        let mut nodes: Vec<World> = (0..count).map(|i| World::seeded(100 + i as u64)).collect();
        let now = nodes[0].now;
        for (i, node) in nodes.iter_mut().enumerate() {
            node.now = now;
            node.server.enable_cluster(node_name(i));
        }
        Self {
            nodes,
            store: HashMap::new(),
            answering: true,
            sent: Vec::new(),
            streams: vec![VecDeque::new(); count],
            locates: VecDeque::new(),
            out: vec![Vec::new(); count],
            events: vec![Vec::new(); count],
        }
    }

    /// Hands `datagram` from `from` to node `node` at `now_unix`, then lets the
    /// cluster settle; returns what became of the datagram.
    pub fn send_at(
        &mut self,
        node: usize,
        now_unix: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> RendezvousHandled {
        let local = Some(IpAddr::from([192, 0, 2, 10 + node as u8]));
        let (handled, out) = self.nodes[node].deliver(now_unix, from, local, datagram);
        self.out[node].extend(out);
        self.settle();
        handled
    }

    /// [`Self::send_at`] at the tests' wall clock.
    pub fn send(&mut self, node: usize, from: SocketAddr, datagram: &[u8]) -> RendezvousHandled {
        self.send_at(node, NOW_UNIX, from, datagram)
    }

    /// The nonce node `node` gives `from`.
    pub fn nonce(&self, node: usize, from: SocketAddr) -> String {
        self.nodes[node].nonce(from)
    }

    /// Registers `peer` from `from` on node `node` at `now_unix` (no candidates, no
    /// NAT, RTT 10 ms) and checks the answer (what it sent is dropped).
    pub fn register_at(&mut self, node: usize, now_unix: u64, peer: &str, from: SocketAddr) {
        let request = |nonce: &str| {
            register_with_candidates([1; 12], &creds(peer), Some(nonce), &[], NatClass::None, 10)
        };
        let request = request(&self.nodes[node].server.issue_nonce(from, now_unix));
        self.registered(node, now_unix, peer, from, &request);
    }

    /// Registers `peer` from `from` on node `node` with `candidates`, class `nat`
    /// and RTT `rtt`, and checks the answer (what it sent is dropped).
    pub fn register(
        &mut self,
        node: usize,
        peer: &str,
        from: SocketAddr,
        candidates: &[Candidate],
        nat: NatClass,
        rtt: u32,
    ) {
        let nonce = self.nonce(node, from);
        let request =
            register_with_candidates([1; 12], &creds(peer), Some(&nonce), candidates, nat, rtt);
        self.registered(node, NOW_UNIX, peer, from, &request);
    }

    /// Sends Register `request` of `peer` and checks it succeeded.
    fn registered(
        &mut self,
        node: usize,
        now_unix: u64,
        peer: &str,
        from: SocketAddr,
        request: &[u8],
    ) {
        let handled = self.send_at(node, now_unix, from, request);
        assert_eq!(handled, RendezvousHandled::Registered);
        let out = self.take(node);
        let response = parse_response(&out[0].payload, &creds(peer).password).expect("signed");
        assert_eq!((response.result, response.mapped), (Ok(()), Some(from)));
    }

    /// The datagrams node `node` sent since the last call.
    pub fn take(&mut self, node: usize) -> Vec<Transmit> {
        std::mem::take(&mut self.out[node])
    }

    /// The events (other than cluster work) of node `node` since the last call.
    pub fn take_events(&mut self, node: usize) -> Vec<RendezvousEvent> {
        std::mem::take(&mut self.events[node])
    }

    /// The stored entry of `peer`, decoded.
    pub fn stored(&self, peer: &str) -> Option<PeerEntry> {
        self.store
            .get(peer)
            .map(|bytes| PeerEntry::decode(bytes).expect("the store holds valid entries"))
    }

    /// Moves every node's clock by `by` and runs the timers that fell due.
    pub fn advance(&mut self, by: Duration) {
        for node in &mut self.nodes {
            node.now += by;
            let now = node.now;
            if node.server.poll_timeout().is_some_and(|at| at <= now) {
                node.server.handle_timeout(now, NOW_UNIX);
            }
        }
        self.settle();
    }

    /// Hands `message` to node `node` as if another node had sent it, then settles.
    pub fn inject(&mut self, node: usize, message: ClusterMessage) {
        let now = self.nodes[node].now;
        self.nodes[node]
            .server
            .handle_cluster_message(now, NOW_UNIX, message);
        self.settle();
    }

    /// Runs the cluster until nothing moves: takes every node's output, answers
    /// Locates from the store (when answering) and delivers the streams.
    pub fn settle(&mut self) {
        loop {
            for i in 0..self.nodes.len() {
                let out = self.nodes[i].collect();
                self.out[i].extend(out);
                let events: Vec<RendezvousEvent> = self.nodes[i].drain_events().collect();
                for event in events {
                    match event {
                        RendezvousEvent::Cluster(request) => self.request(i, request),
                        event => self.events[i].push(event),
                    }
                }
            }
            let mut moved = false;
            while self.answering
                && let Some((i, token, peer)) = self.locates.pop_front()
            {
                let entry = self.stored(&peer);
                let now = self.nodes[i].now;
                self.nodes[i]
                    .server
                    .handle_located(now, NOW_UNIX, token, entry);
                moved = true;
            }
            for i in 0..self.nodes.len() {
                while let Some(bytes) = self.streams[i].pop_front() {
                    let message =
                        ClusterMessage::decode(&bytes).expect("nodes send valid messages");
                    let now = self.nodes[i].now;
                    self.nodes[i]
                        .server
                        .handle_cluster_message(now, NOW_UNIX, message);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Does what the driver does with one request of node `from`.
    fn request(&mut self, from: usize, request: ClusterRequest) {
        match request {
            ClusterRequest::Store(entry) => {
                let previous = self.store.insert(entry.peer_id.clone(), entry.encode());
                let previous = previous.map(|b| PeerEntry::decode(&b).expect("valid entry"));
                if let Some(notice) = moved_notice(&entry, previous.as_ref()) {
                    self.request(from, notice);
                }
            }
            ClusterRequest::Locate { token, peer_id } => {
                self.locates.push_back((from, token, peer_id));
            }
            ClusterRequest::Send { node, message } => {
                let index = (0..self.nodes.len()).find(|&i| node_name(i) == node);
                if let Some(index) = index {
                    self.streams[index].push_back(message.encode());
                }
                self.sent.push(Sent {
                    from,
                    to: node,
                    message,
                });
            }
        }
    }
}
