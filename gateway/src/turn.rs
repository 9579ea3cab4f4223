//! The TURN relay's I/O: one UDP socket per allocation on a port of the relay range,
//! a task per socket forwarding what peers send back to the client, and the relay's
//! metrics. The protocol decisions are all in [`crate::proto::turn::server`]; this
//! module only moves datagrams and carries out the core's events.
//!
//! Data plane: relay sockets are read in batches (recvmmsg through quinn-udp, UDP_GRO
//! so a peer's GSO batch arrives whole) and the client-to-peer ChannelData of a
//! service-socket batch is handed over at once ([`RelayShared::channel_data_batch`]);
//! a batch is routed under one acquisition of the lock, and consecutive datagrams of
//! the same length going the same way leave in one segmented (GSO) send. Each relay
//! socket's task relays at most `RELAY_TURN` datagrams before the other tasks get
//! their turn.
//!
//! Locking: the core and its socket table share one mutex, taken once per batch of
//! relayed datagrams and once per control message. Whoever feeds the core an input drains
//! its outputs under that lock, then releases it before any socket is bound,
//! registered with epoll, given a task or sent on; a new socket's report back to the
//! core takes the lock again. Only the kernel fast path's map updates (and counter
//! reads) stay under it, as the maps must follow the core's instructions in order.
//! The TCP clients' writers have a leaf lock of their own (`TcpClients`), never held
//! while the state lock is taken.
use std::{
    cell::RefCell,
    collections::HashMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use quinn_udp::{RecvMeta, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{Interest, unix::AsyncFd},
    task::AbortHandle,
};

/// A relay socket: registered with the runtime for readability only, so the sends
/// that relay traffic through it are plain non-blocking system calls that wake nobody
/// (and never wait for the runtime to have seen the socket writable first); with its
/// quinn-udp state for batched reads (recvmmsg, UDP_GRO) and segmented sends (GSO).
/// The state is the service socket's, shared: what it holds is the kernel's
/// (GSO support, sendmsg quirks), and building one per socket probes the kernel
/// with a socket of its own (a third of an allocation's CPU).
struct RelaySocket {
    fd: AsyncFd<std::net::UdpSocket>,
    state: Arc<UdpSocketState>,
}

impl RelaySocket {
    fn get_ref(&self) -> &std::net::UdpSocket {
        self.fd.get_ref()
    }
}

use crate::fast_path::{FastPathConfig, RelayFastPath};
use crate::limits::FdPermit;
use crate::proto::{
    Transmit, Transport,
    credentials::SharedSecret,
    drain::Draining,
    peer_policy::PeerPolicy,
    stun::Message,
    turn::{
        AddressFamily, CHANNEL_DATA_HEADER, ChannelData, channel_data_header,
        server::{
            ClientAddr, DropReason, EvenPort, FastPath, OpenError, RelayRequestId, RequestMethod,
            RequestOutcome, ToClient, TurnConfig, TurnHandled, TurnServer, TurnServerEvent,
        },
    },
};
use crate::udp::{ServiceSocket, to_v6_mapped};

/// The relay's Prometheus metrics (registered in the daemon's registry).
#[derive(Clone)]
pub struct RelayMetrics {
    /// Live allocations.
    pub allocations: IntGauge,
    /// Allocations created.
    pub allocations_created: IntCounter,
    /// TURN requests by method and outcome.
    pub requests: IntCounterVec,
    /// Relayed datagrams client → peer.
    pub packets_to_peer: IntCounter,
    /// Relayed datagrams peer → client.
    pub packets_to_client: IntCounter,
    /// Relayed application bytes client → peer.
    pub bytes_to_peer: IntCounter,
    /// Relayed application bytes peer → client.
    pub bytes_to_client: IntCounter,
    /// Datagrams not relayed, by reason.
    pub dropped: IntCounterVec,
    /// Datagrams the kernel fast path relayed client → peer (also in
    /// `packets_to_peer`).
    pub fast_path_to_peer: IntCounter,
    /// Datagrams the kernel fast path relayed peer → client (also in
    /// `packets_to_client`).
    pub fast_path_to_client: IntCounter,
    /// Channels installed in the kernel fast path now.
    pub fast_path_entries: IntGauge,
    /// ChannelData dropped unrelayed by the service loop's fair-share throttle.
    pub throttled: IntCounter,
}

impl RelayMetrics {
    /// Creates the relay metrics in `registry`, every label set pre-created at zero.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let allocations = IntGauge::new("gateway_turn_allocations", "Live TURN allocations")?;
        registry.register(Box::new(allocations.clone()))?;
        let allocations_created =
            IntCounter::new("gateway_turn_allocations_total", "TURN allocations created")?;
        registry.register(Box::new(allocations_created.clone()))?;
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_turn_requests_total",
                "TURN requests, by method and outcome (ok, unauthorized = 401 challenge, ...)",
            ),
            &["method", "outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        for method in RequestMethod::ALL {
            for outcome in RequestOutcome::ALL {
                requests.with_label_values(&[method.as_str(), outcome.as_str()]);
            }
        }
        let packets = IntCounterVec::new(
            Opts::new(
                "gateway_relay_packets_total",
                "Datagrams relayed, by direction (client_to_peer, peer_to_client)",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(packets.clone()))?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "gateway_relay_bytes_total",
                "Application bytes relayed (TURN framing excluded), by direction",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(bytes.clone()))?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "gateway_relay_dropped_packets_total",
                "Datagrams the relay refused to forward, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(dropped.clone()))?;
        for reason in DropReason::ALL {
            dropped.with_label_values(&[reason.as_str()]);
        }
        let fast_path = IntCounterVec::new(
            Opts::new(
                "gateway_relay_fast_path_packets_total",
                "Datagrams the kernel fast path relayed (included in gateway_relay_packets_total), by direction",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(fast_path.clone()))?;
        let fast_path_entries = IntGauge::new(
            "gateway_relay_fast_path_entries",
            "Bound channels installed in the kernel fast path",
        )?;
        registry.register(Box::new(fast_path_entries.clone()))?;
        let throttled = IntCounter::new(
            "gateway_relay_throttled_packets_total",
            "ChannelData the service loop dropped unrelayed because its client sent more than half of what an overloaded loop read while the kernel dropped others' datagrams",
        )?;
        registry.register(Box::new(throttled.clone()))?;
        Ok(Self {
            throttled,
            fast_path_entries,
            fast_path_to_peer: fast_path.with_label_values(&["client_to_peer"]),
            fast_path_to_client: fast_path.with_label_values(&["peer_to_client"]),
            allocations,
            allocations_created,
            requests,
            packets_to_peer: packets.with_label_values(&["client_to_peer"]),
            packets_to_client: packets.with_label_values(&["peer_to_client"]),
            bytes_to_peer: bytes.with_label_values(&["client_to_peer"]),
            bytes_to_client: bytes.with_label_values(&["peer_to_client"]),
            dropped,
        })
    }

    /// Counts a dropped datagram.
    pub fn drop_one(&self, reason: DropReason) {
        self.dropped.with_label_values(&[reason.as_str()]).inc();
    }
}

/// Where relay sockets are opened.
#[derive(Clone, Debug)]
pub struct RelaySocketConfig {
    /// The IPv4 relay address; `None`: the gateway address the client reached, when
    /// that is IPv4.
    pub v4: Option<IpAddr>,
    /// The IPv6 relay address; `None`: the gateway address the client reached, when
    /// that is IPv6.
    pub v6: Option<IpAddr>,
    /// Ports relay sockets may use.
    pub ports: RangeInclusive<u16>,
}

/// An open relay socket and its task; dropping it stops the task (the socket closes
/// when the task has let go of it).
struct RelaySocketHandle {
    socket: Arc<RelaySocket>,
    task: AbortHandle,
    /// The socket's share of the process's descriptor budget.
    _fd: FdPermit,
}

impl Drop for RelaySocketHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The core and its open sockets behind one lock: one acquisition per relayed
/// datagram finds both the route and the socket. Whoever feeds the core an input
/// drains its outputs ([`RelayState::drain`]) before releasing the lock, so each
/// caller carries out exactly what its own input caused. No system call runs under
/// this lock: sockets are opened, replies sent and the fast path's maps updated
/// after it is released (see [`RelayShared::unlock`]).
struct RelayState {
    /// The protocol core.
    core: TurnServer,
    /// The relay sockets open, by address.
    sockets: HashMap<SocketAddr, RelaySocketHandle>,
}

/// A socket request of the core, taken out from under the lock.
struct OpenRequest {
    request: RelayRequestId,
    family: AddressFamily,
    even_port: EvenPort,
    local: Option<IpAddr>,
}

/// What one drain of the core leaves to do once the lock is released.
#[derive(Default)]
struct Outputs {
    /// Replies to send.
    transmits: Vec<Transmit>,
    /// Relay sockets to open (and report back).
    open: Vec<OpenRequest>,
    /// Relay sockets taken out of the table: dropped (tasks stopped) unlocked.
    closed: Vec<RelaySocketHandle>,
    /// Fast-path instructions, in the core's order (applied by [`RelayShared::unlock`]).
    fast_path: Vec<FastPath>,
}

impl RelayState {
    /// Takes everything the core queued: counters updated, closed sockets taken out
    /// of the table, and fast-path instructions (in order), socket requests and
    /// replies handed back for the caller to carry out without the lock.
    fn drain(&mut self, metrics: &RelayMetrics, outputs: &mut Outputs) {
        while let Some(event) = self.core.poll_event() {
            match event {
                TurnServerEvent::OpenRelay {
                    request,
                    family,
                    even_port,
                    local,
                } => outputs.open.push(OpenRequest {
                    request,
                    family,
                    even_port,
                    local,
                }),
                TurnServerEvent::CloseRelay(relay) => {
                    outputs.closed.extend(self.sockets.remove(&relay));
                }
                TurnServerEvent::FastPath(instruction) => outputs.fast_path.push(instruction),
                TurnServerEvent::AllocationCreated { .. } => metrics.allocations_created.inc(),
            }
        }
        outputs
            .transmits
            .extend(std::iter::from_fn(|| self.core.poll_transmit()));
        metrics.allocations.set(self.core.allocation_count() as i64);
    }

    /// The socket of the relay address `relay`.
    fn relay_socket(&self, relay: SocketAddr) -> Option<Arc<RelaySocket>> {
        self.sockets.get(&relay).map(|r| r.socket.clone())
    }
}

/// Adds what the kernel relayed since the last call to `metrics`.
fn fold_fast_path(fast: &mut RelayFastPath, metrics: &RelayMetrics) {
    match fast.take_new() {
        Ok(new) => {
            metrics.packets_to_peer.inc_by(new.to_peer_packets);
            metrics.bytes_to_peer.inc_by(new.to_peer_bytes);
            metrics.packets_to_client.inc_by(new.to_client_packets);
            metrics.bytes_to_client.inc_by(new.to_client_bytes);
            metrics.fast_path_to_peer.inc_by(new.to_peer_packets);
            metrics.fast_path_to_client.inc_by(new.to_client_packets);
        }
        Err(e) => tracing::warn!(error = %e, "relay fast path: reading counters failed"),
    }
}

/// What relay tasks share.
pub struct RelayShared {
    state: Mutex<RelayState>,
    /// The kernel fast path, when loaded, behind its own lock. Lock order by
    /// structure: it is taken only in [`RelayShared::unlock`] (while the state lock
    /// is still held, which keeps the maps in the core's order of events, and kept
    /// after the state lock is released for the map updates) or alone, never the
    /// other way round.
    fast: Mutex<Option<RelayFastPath>>,
    opener: RelayOpener,
    metrics: RelayMetrics,
    client_socket: ServiceSocket,
    tid_counter: AtomicU64,
    /// This relay, for the tasks of the sockets it opens.
    this: Weak<RelayShared>,
}

impl RelayShared {
    /// Builds the relay around `core`, opening sockets per `config` and answering
    /// clients through `client_socket`. Must be called inside a tokio runtime.
    pub fn new(
        core: TurnServer,
        config: RelaySocketConfig,
        client_socket: ServiceSocket,
        metrics: RelayMetrics,
        fast: Option<RelayFastPath>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| Self {
            state: Mutex::new(RelayState {
                core,
                sockets: HashMap::new(),
            }),
            fast: Mutex::new(fast),
            opener: RelayOpener {
                config,
                cursor: AtomicU16::new(rand::random()),
                runtime: tokio::runtime::Handle::current(),
                udp_state: client_socket.state.clone(),
            },
            metrics,
            client_socket,
            tid_counter: AtomicU64::new(rand::random()),
            this: weak.clone(),
        })
    }

    /// Locks the core and its sockets (a poisoned lock is taken over: the state is
    /// plain data and every update leaves it consistent).
    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes and releases the relay's locks, one after the other (never together):
    /// returns only once neither is held forever. The systemd watchdog's probe.
    pub fn probe_locks(&self) {
        drop(self.lock());
        drop(self.fast_path());
    }

    /// The fast path's lock, alone (never with the state lock: see [`Self::unlock`]).
    fn fast_path(&self) -> MutexGuard<'_, Option<RelayFastPath>> {
        self.fast.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases the state lock, then applies the drained fast-path instructions to
    /// the kernel maps. The fast path's lock is taken before the state lock is let
    /// go, so two callers' instructions reach the maps in the order the core made
    /// them, while the `bpf()` system calls run with the core unlocked.
    fn unlock(&self, state: MutexGuard<'_, RelayState>, outputs: &mut Outputs) {
        if outputs.fast_path.is_empty() {
            drop(state);
            return;
        }
        let mut fast = self.fast_path();
        drop(state);
        let Some(fast) = fast.as_mut() else {
            outputs.fast_path.clear();
            return;
        };
        for instruction in outputs.fast_path.drain(..) {
            if let Err(e) = fast.apply(&instruction) {
                tracing::warn!(error = %e, ?instruction, "relay fast path: map update failed");
            }
        }
        self.metrics.fast_path_entries.set(fast.installed() as i64);
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// Runs the core's timers: expiries close sockets.
    pub fn handle_timeout(&self, now: Instant) {
        let mut state = self.lock();
        state.core.handle_timeout(now);
        let mut outputs = Outputs::default();
        state.drain(&self.metrics, &mut outputs);
        self.unlock(state, &mut outputs);
        if let Some(fast) = self.fast_path().as_mut() {
            fold_fast_path(fast, &self.metrics);
        }
        self.carry_out(outputs, None, &mut Vec::new());
    }

    /// Folds the fast path's counters into the metrics, detaches it and drops its
    /// maps (at shutdown; dropping the relay detaches too, silently).
    pub fn stop_fast_path(&self) {
        let taken = self.fast_path().take();
        if let Some(mut fast) = taken {
            fold_fast_path(&mut fast, &self.metrics);
            fast.detach();
        }
    }

    /// Applies a reloaded configuration to the core: the accepted secrets, the peer
    /// policy and the limits (see `TurnServer::set_secret`, `set_policy`,
    /// `set_config`). Allocations, permissions, channels, fast-path entries and TCP
    /// connections stay.
    pub fn reconfigure(&self, secret: SharedSecret, policy: PeerPolicy, config: TurnConfig) {
        let mut state = self.lock();
        state.core.set_secret(secret);
        state.core.set_policy(policy);
        state.core.set_config(config);
    }

    /// Starts (`Some`) or ends draining: new allocations are refused (see
    /// `TurnServer::set_draining`), existing ones served.
    pub fn set_draining(&self, draining: Option<Draining>) {
        self.lock().core.set_draining(draining);
    }

    /// Live allocations.
    pub fn allocation_count(&self) -> usize {
        self.lock().core.allocation_count()
    }

    /// When the core next needs [`RelayShared::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lock().core.poll_timeout()
    }

    /// Does, with the lock released, what a drain left: stops the tasks of closed
    /// sockets, sends the replies (the one to `asker`, if any, into `reply`), and
    /// opens the sockets the core asked for, reporting each back (which drains
    /// again, until nothing is left to open).
    fn carry_out(&self, mut outputs: Outputs, asker: Option<ClientAddr>, reply: &mut Vec<u8>) {
        loop {
            drop(std::mem::take(&mut outputs.closed));
            for transmit in outputs.transmits.drain(..) {
                self.deliver(transmit, asker, reply);
            }
            if outputs.open.is_empty() {
                return;
            }
            // Binding (up to MAX_BIND_ATTEMPTS ports), epoll registration and task
            // spawning all happen here, with no lock held.
            let opened: Vec<_> = outputs
                .open
                .drain(..)
                .map(|open| {
                    let opened =
                        self.opener
                            .open(open.family, open.even_port, open.local, &self.this);
                    (open.request, opened)
                })
                .collect();
            let mut state = self.lock();
            let now = Instant::now();
            for (request, result) in opened {
                let report = result.map(|opened| {
                    let (relay, handle) = opened.relay;
                    state.sockets.insert(relay, handle);
                    let reserved = opened.reserved.map(|(reserved, handle)| {
                        state.sockets.insert(reserved, handle);
                        reserved
                    });
                    (relay, reserved)
                });
                if let Some(outcome) = state.core.handle_relay_opened(now, request, report) {
                    self.metrics
                        .requests
                        .with_label_values(&[RequestMethod::Allocate.as_str(), outcome.as_str()])
                        .inc();
                }
            }
            state.drain(&self.metrics, &mut outputs);
            self.unlock(state, &mut outputs);
        }
    }

    /// Sends one reply of the core: into `reply` when it answers `asker` (the caller
    /// sends it, batched or on its connection), otherwise straight to its client.
    fn deliver(&self, transmit: Transmit, asker: Option<ClientAddr>, reply: &mut Vec<u8>) {
        let client = ClientAddr {
            addr: transmit.to,
            transport: transmit.transport,
        };
        if asker == Some(client) && reply.is_empty() {
            *reply = transmit.payload;
        } else {
            self.send_to_client(client, transmit.from_local, &transmit.payload);
        }
    }

    /// Sends to a client over its transport without waiting: the service socket
    /// for UDP, the connection's writer for TCP and TLS (a full queue drops, as UDP
    /// would).
    fn send_to_client(&self, client: ClientAddr, local: Option<IpAddr>, payload: &[u8]) -> bool {
        match client.transport {
            Transport::Udp => self.client_socket.try_send(client.addr, local, payload),
            Transport::Tcp | Transport::Tls => {
                crate::stream::writers().send(client.addr, client.transport, payload)
            }
        }
    }

    /// Relays ChannelData from a client to its bound peer.
    pub fn channel_data(&self, client: ClientAddr, datagram: &[u8]) {
        let Ok(message) = ChannelData::parse(datagram) else {
            self.metrics.drop_one(DropReason::Malformed);
            return;
        };
        let len = message.data.len();
        let mut state = self.lock();
        match state
            .core
            .channel_data_from_client(Instant::now(), client, message.channel, len)
        {
            Ok((relay_addr, peer)) => {
                let socket = state.relay_socket(relay_addr);
                drop(state);
                if socket.is_some_and(|s| send_from(&s, relay_addr, peer, message.data)) {
                    self.metrics.packets_to_peer.inc();
                    self.metrics.bytes_to_peer.inc_by(len as u64);
                }
            }
            Err(reason) => {
                drop(state);
                self.metrics.drop_one(reason);
            }
        }
    }

    /// Relays ChannelData datagrams from clients (in the order received) to their
    /// bound peers: every one routed under one acquisition of the lock, then sent
    /// with as few system calls as the routes allow (consecutive datagrams of the same
    /// length from the same relay socket to the same peer go out as one GSO send).
    pub fn channel_data_batch(
        &self,
        datagrams: &[(ClientAddr, &[u8])],
        scratch: &mut ForwardScratch,
    ) {
        let ForwardScratch {
            routes,
            sockets,
            out,
        } = scratch;
        routes.clear();
        sockets.clear();
        let now = Instant::now();
        {
            let mut state = self.lock();
            let mut last: Option<SocketAddr> = None;
            for (index, (client, datagram)) in datagrams.iter().enumerate() {
                let Ok(message) = ChannelData::parse(datagram) else {
                    routes.push(Err(DropReason::Malformed));
                    continue;
                };
                let len = message.data.len();
                let start = datagram.len() - len;
                let verdict =
                    state
                        .core
                        .channel_data_from_client(now, *client, message.channel, len);
                let (relay, peer) = match verdict {
                    Ok(route) => route,
                    Err(reason) => {
                        routes.push(Err(reason));
                        continue;
                    }
                };
                if last != Some(relay) {
                    let Some(socket) = state.relay_socket(relay) else {
                        routes.push(Err(DropReason::NoAllocation));
                        continue;
                    };
                    sockets.push(socket);
                    last = Some(relay);
                }
                let peer = if relay.is_ipv6() {
                    to_v6_mapped(peer)
                } else {
                    peer
                };
                routes.push(Ok(ClientRoute {
                    index,
                    start,
                    len,
                    socket: sockets.len() - 1,
                    peer,
                }));
            }
        }
        let mut sent = 0u64;
        let mut sent_bytes = 0u64;
        let mut i = 0;
        while i < routes.len() {
            let route = match &routes[i] {
                Ok(route) => *route,
                Err(reason) => {
                    self.metrics.drop_one(*reason);
                    i += 1;
                    continue;
                }
            };
            let Some(socket) = sockets.get(route.socket) else {
                i += 1;
                continue;
            };
            let data = |r: &ClientRoute| {
                datagrams
                    .get(r.index)
                    .and_then(|(_, d)| d.get(r.start..r.start + r.len))
                    .unwrap_or_default()
            };
            let most = socket
                .state
                .max_gso_segments()
                .min(MAX_GSO_BYTES / route.len.max(1))
                .max(1);
            let mut run = 1;
            while run < most
                && routes.get(i + run).is_some_and(|next| {
                    matches!(next, Ok(next) if next.socket == route.socket
                        && next.peer == route.peer
                        && next.len == route.len)
                })
            {
                run += 1;
            }
            let delivered = if run == 1 {
                usize::from(socket.get_ref().send_to(data(&route), route.peer).is_ok())
            } else {
                out.clear();
                for next in routes[i..i + run].iter().flatten() {
                    out.extend_from_slice(data(next));
                }
                send_segments(socket, route.peer, out, route.len)
            };
            sent += delivered as u64;
            sent_bytes += (delivered * route.len) as u64;
            i += run;
        }
        self.metrics.packets_to_peer.inc_by(sent);
        self.metrics.bytes_to_peer.inc_by(sent_bytes);
    }

    /// Hands a TURN request or indication to the core; the reply (if any) is left in
    /// `reply`. Returns the label for `gateway_stun_datagrams_total`.
    pub fn turn_message(
        &self,
        client: ClientAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        reply: &mut Vec<u8>,
    ) -> &'static str {
        reply.clear();
        let Ok(message) = Message::parse(datagram) else {
            return "malformed";
        };
        let metrics = &self.metrics;
        let mut state = self.lock();
        let handled = state
            .core
            .handle_stun(Instant::now(), unix_now(), client, local, &message);
        let mut outputs = Outputs::default();
        state.drain(metrics, &mut outputs);
        let (label, relay) = match handled {
            TurnHandled::Request { method, outcome } => {
                metrics
                    .requests
                    .with_label_values(&[method.as_str(), outcome.as_str()])
                    .inc();
                ("turn_request", None)
            }
            // Counted when the socket is reported (in `carry_out`).
            TurnHandled::AwaitingRelay => ("turn_request", None),
            TurnHandled::Relay { relay, peer, data } => (
                "turn_indication",
                state
                    .relay_socket(relay)
                    .map(|socket| (socket, relay, peer, data)),
            ),
            TurnHandled::Dropped(reason) => {
                metrics.drop_one(reason);
                ("turn_indication", None)
            }
            TurnHandled::NotTurn => ("unhandled", None),
        };
        self.unlock(state, &mut outputs);
        if let Some((socket, relay, peer, data)) = relay
            && send_from(&socket, relay, peer, data)
        {
            metrics.packets_to_peer.inc();
            metrics.bytes_to_peer.inc_by(data.len() as u64);
        }
        self.carry_out(outputs, Some(client), reply);
        label
    }

    /// A TCP or TLS client's connection is gone: its allocation (or pending
    /// Allocate) ends.
    pub(crate) fn remove_stream_client(&self, client: ClientAddr) {
        let mut state = self.lock();
        state.core.remove_client(client);
        let mut outputs = Outputs::default();
        state.drain(&self.metrics, &mut outputs);
        self.unlock(state, &mut outputs);
        self.carry_out(outputs, None, &mut Vec::new());
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Binds relay sockets and starts their tasks, for the core's
/// [`TurnServerEvent::OpenRelay`]s. Needs no lock: the port cursor is atomic, and
/// the kernel refuses ports in use.
struct RelayOpener {
    config: RelaySocketConfig,
    cursor: AtomicU16,
    runtime: tokio::runtime::Handle,
    /// The quinn-udp state every relay socket uses (the service socket's).
    udp_state: Arc<UdpSocketState>,
}

/// The socket(s) opened for one request: the relay's, and the reserved one's when a
/// pair was asked for.
struct Opened {
    relay: (SocketAddr, RelaySocketHandle),
    reserved: Option<(SocketAddr, RelaySocketHandle)>,
}

/// Most ports one Allocate tries before answering 508.
const MAX_BIND_ATTEMPTS: u32 = 2048;
/// Attempts at finding an even port whose successor is free too.
const MAX_PAIR_ATTEMPTS: usize = 64;

impl RelayOpener {
    /// Opens the socket(s) of one [`TurnServerEvent::OpenRelay`]; their tasks
    /// forward to `shared`.
    fn open(
        &self,
        family: AddressFamily,
        even_port: EvenPort,
        local: Option<IpAddr>,
        shared: &Weak<RelayShared>,
    ) -> Result<Opened, OpenError> {
        let ip = self.relay_ip(family, local)?;
        match even_port {
            EvenPort::Any | EvenPort::Even => {
                let socket = self.bind_port(ip, even_port == EvenPort::Even)?;
                Ok(Opened {
                    relay: self.adopt(socket, shared)?,
                    reserved: None,
                })
            }
            EvenPort::EvenReserveNext => self.open_pair(ip, shared),
        }
    }

    /// The relay IP for `family`: configured, or the gateway address the client
    /// reached (`local`).
    fn relay_ip(&self, family: AddressFamily, local: Option<IpAddr>) -> Result<IpAddr, OpenError> {
        let local = local.map(|ip| ip.to_canonical());
        match family {
            AddressFamily::V4 => self.config.v4.or(local.filter(IpAddr::is_ipv4)),
            AddressFamily::V6 => self.config.v6.or(local.filter(IpAddr::is_ipv6)),
        }
        .ok_or(OpenError::FamilyUnavailable)
    }

    fn bind_port(
        &self,
        ip: IpAddr,
        even: bool,
    ) -> Result<(std::net::UdpSocket, FdPermit), OpenError> {
        let (start, end) = (*self.config.ports.start(), *self.config.ports.end());
        let span = u32::from(end - start) + 1;
        // Bounded, so a nearly full range answers 508 soon rather than trying
        // thousands of binds.
        // A socket that would eat into the descriptors kept for /metrics and the
        // listeners is refused like a full port range: 508.
        let fd = crate::limits::fd_budget()
            .try_acquire()
            .ok_or(OpenError::NoPort)?;
        for _ in 0..span.min(MAX_BIND_ATTEMPTS) {
            let cursor = self.cursor.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            let port = start + (u32::from(cursor) % span) as u16;
            if even && port % 2 == 1 {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            let Ok(socket) =
                Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            else {
                return Err(OpenError::NoPort);
            };
            if addr.is_ipv6() {
                let _ = socket.set_only_v6(true);
            }
            crate::udp::size_recv_buffer(&socket, RELAY_RECV_BUFFER_BYTES);
            // A peer's GSO batch is read in one go.
            crate::udp::enable_gro(&socket);
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            // A port in use (ours or anyone's) fails here: no address reuse is set.
            if socket.bind(&addr.into()).is_ok() {
                return Ok((socket.into(), fd));
            }
        }
        Err(OpenError::NoPort)
    }

    /// Binds `port` on `ip` exactly (the odd half of a reserved pair).
    fn bind_exact(&self, ip: IpAddr, port: u16) -> Option<(std::net::UdpSocket, FdPermit)> {
        let addr = SocketAddr::new(ip, port);
        if !self.config.ports.contains(&port) {
            return None;
        }
        let fd = crate::limits::fd_budget().try_acquire()?;
        let socket =
            Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).ok()?;
        if addr.is_ipv6() {
            let _ = socket.set_only_v6(true);
        }
        crate::udp::size_recv_buffer(&socket, RELAY_RECV_BUFFER_BYTES);
        crate::udp::enable_gro(&socket);
        socket.set_nonblocking(true).ok()?;
        socket.bind(&addr.into()).ok()?;
        Some((socket.into(), fd))
    }

    /// An even port and the next one (EVEN-PORT with the R bit).
    fn open_pair(&self, ip: IpAddr, shared: &Weak<RelayShared>) -> Result<Opened, OpenError> {
        for _ in 0..MAX_PAIR_ATTEMPTS {
            let even = self.bind_port(ip, true)?;
            let port = even.0.local_addr().map_err(|_| OpenError::NoPort)?.port();
            let Some(odd) = port.checked_add(1).and_then(|p| self.bind_exact(ip, p)) else {
                continue;
            };
            // Should the second fail, the first's handle drops: its task stops.
            let relay = self.adopt(even, shared)?;
            let reserved = self.adopt(odd, shared)?;
            return Ok(Opened {
                relay,
                reserved: Some(reserved),
            });
        }
        Err(OpenError::NoPort)
    }

    /// Registers a bound relay socket with the runtime and starts its task.
    fn adopt(
        &self,
        (std_socket, fd): (std::net::UdpSocket, FdPermit),
        shared: &Weak<RelayShared>,
    ) -> Result<(SocketAddr, RelaySocketHandle), OpenError> {
        let addr = std_socket.local_addr().map_err(|_| OpenError::NoPort)?;
        let _guard = self.runtime.enter();
        let state = self.udp_state.clone();
        // SAFETY: the AsyncFd owns the socket, so its descriptor stays open (and is
        // not reused) for as long as it is registered.
        let registered = unsafe { AsyncFd::register_with_interest(std_socket, Interest::READABLE) }
            .map_err(|_| OpenError::NoPort)?;
        let socket = Arc::new(RelaySocket {
            fd: registered,
            state,
        });
        let task = self
            .runtime
            .spawn(relay_task(socket.clone(), addr, shared.clone()))
            .abort_handle();
        Ok((
            addr,
            RelaySocketHandle {
                socket,
                task,
                _fd: fd,
            },
        ))
    }
}

/// Largest datagram (or GRO batch) a relay socket reads.
const RELAY_BUFFER: usize = 65_536;
/// Buffers one recvmmsg on a relay socket fills.
const RELAY_BATCH: usize = 32;
/// Datagrams one relay socket's task relays before it lets the other tasks run: the
/// round-robin between allocations (a flooding peer gets its turn, not everyone's).
const RELAY_TURN: usize = 256;
/// Receive buffer asked for each relay socket: room for a burst from a peer (the
/// kernel's default, 208 KiB, dropped hundreds of thousands of datagrams under
/// coturn's flood). Memory is charged only while datagrams wait in it.
const RELAY_RECV_BUFFER_BYTES: usize = 1024 * 1024;
/// Largest UDP payload one segmented (GSO) send carries.
const MAX_GSO_BYTES: usize = 65_000;

/// One datagram of a relay socket's batch: where in the buffers, and where it goes.
struct PeerRoute {
    /// Offset and length of the payload in the receive buffers.
    start: usize,
    len: usize,
    peer: SocketAddr,
    to: Result<ToClient, DropReason>,
}

/// The buffers a worker thread's relay tasks share (one set per thread, not per
/// allocation: allocations must stay small, thousands of idle relay sockets cost no
/// buffer memory).
struct RelayScratch {
    recv: Vec<u8>,
    metas: [RecvMeta; RELAY_BATCH],
    routes: Vec<PeerRoute>,
    /// ChannelData built for one segmented send to a client.
    out: Vec<u8>,
    /// A Data indication.
    indication: Vec<u8>,
}

impl RelayScratch {
    fn new() -> Self {
        Self {
            recv: vec![0; RELAY_BUFFER * RELAY_BATCH],
            metas: [RecvMeta::default(); RELAY_BATCH],
            routes: Vec::new(),
            out: Vec::with_capacity(MAX_GSO_BYTES + 1024),
            indication: Vec::with_capacity(2048),
        }
    }
}

thread_local! {
    static RELAY_SCRATCH: RefCell<RelayScratch> = RefCell::new(RelayScratch::new());
}

/// Forwards what peers send to one relay address back to its client: batches read
/// with recvmmsg (GRO batches split), routed under one lock per batch, and sent to
/// the client as few system calls as the routes allow (consecutive ChannelData of
/// the same length to the same client go out as one GSO send).
async fn relay_task(socket: Arc<RelaySocket>, relay: SocketAddr, shared: Weak<RelayShared>) {
    loop {
        let Ok(mut ready) = socket.fd.readable().await else {
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Drain what is queued without awaiting (the buffers are borrowed meanwhile).
        let drained = RELAY_SCRATCH.with_borrow_mut(|scratch| {
            let mut relayed = 0;
            while relayed < RELAY_TURN {
                let count = {
                    let mut chunks = scratch.recv.chunks_mut(RELAY_BUFFER);
                    let mut bufs: [std::io::IoSliceMut<'_>; RELAY_BATCH] =
                        std::array::from_fn(|_| {
                            std::io::IoSliceMut::new(chunks.next().unwrap_or_default())
                        });
                    match socket
                        .state
                        .recv(socket.get_ref().into(), &mut bufs, &mut scratch.metas)
                    {
                        Ok(count) => count,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                        // ICMP errors from earlier sends surface here: read on.
                        Err(_) => continue,
                    }
                };
                relayed += forward_batch_to_client(&shared, relay, scratch, count);
            }
            false
        });
        if drained {
            // Empty: wait for the next readiness edge.
            ready.clear_ready();
        } else {
            drop(ready);
            tokio::task::yield_now().await;
        }
    }
}

/// Routes the `count` buffers just read (under one lock) and sends them on to their
/// clients. Returns the datagrams handled.
fn forward_batch_to_client(
    shared: &RelayShared,
    relay: SocketAddr,
    scratch: &mut RelayScratch,
    count: usize,
) -> usize {
    let RelayScratch {
        recv,
        metas,
        routes,
        out,
        indication,
    } = scratch;
    routes.clear();
    let now = Instant::now();
    {
        let mut state = shared.lock();
        for (index, meta) in metas.iter().take(count).enumerate() {
            let peer = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
            let stride = meta.stride.max(1);
            let base = index * RELAY_BUFFER;
            let mut offset = 0;
            while offset < meta.len {
                let len = stride.min(meta.len - offset);
                let to = state.core.data_from_peer(now, relay, peer, len);
                routes.push(PeerRoute {
                    start: base + offset,
                    len,
                    peer,
                    to,
                });
                offset += stride;
            }
        }
    }
    let max_segments = shared.client_socket.max_gso_segments();
    let mut sent = 0u64;
    let mut sent_bytes = 0u64;
    let mut i = 0;
    while i < routes.len() {
        let route = &routes[i];
        let to = match &route.to {
            Ok(to) => *to,
            Err(reason) => {
                shared.metrics.drop_one(*reason);
                i += 1;
                continue;
            }
        };
        let payload = recv
            .get(route.start..route.start + route.len)
            .unwrap_or_default();
        let Some(channel) = to.channel else {
            let tid_seed = shared
                .tid_counter
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&tid_seed.to_be_bytes());
            crate::proto::turn::data_indication(tid, route.peer, payload, indication);
            if shared.send_to_client(to.client, to.local, indication) {
                sent += 1;
                sent_bytes += route.len as u64;
            }
            i += 1;
            continue;
        };
        // The run of datagrams after this one going the same way with the same
        // length: one segmented send (UDP only: TCP clients get a frame each).
        let segment = CHANNEL_DATA_HEADER + route.len;
        let most = if to.client.transport == Transport::Udp {
            max_segments.min(MAX_GSO_BYTES / segment).max(1)
        } else {
            1
        };
        let mut run = 1;
        while run < most
            && routes.get(i + run).is_some_and(|next| {
                next.len == route.len && matches!(&next.to, Ok(next_to) if *next_to == to)
            })
        {
            run += 1;
        }
        out.clear();
        for r in &routes[i..i + run] {
            out.extend_from_slice(&channel_data_header(channel, r.len));
            out.extend_from_slice(recv.get(r.start..r.start + r.len).unwrap_or_default());
        }
        let delivered = if run == 1 {
            usize::from(shared.send_to_client(to.client, to.local, out))
        } else {
            shared
                .client_socket
                .try_send_segments(to.client.addr, to.local, out, segment)
        };
        sent += delivered as u64;
        sent_bytes += (delivered * route.len) as u64;
        i += run;
    }
    shared.metrics.packets_to_client.inc_by(sent);
    shared.metrics.bytes_to_client.inc_by(sent_bytes);
    routes.len()
}

/// Where one ChannelData datagram of a batch goes.
#[derive(Clone, Copy, Debug)]
struct ClientRoute {
    /// The datagram (index into the batch) and its payload's place in it.
    index: usize,
    start: usize,
    len: usize,
    /// The relay socket (index into [`ForwardScratch::sockets`]).
    socket: usize,
    /// The peer, as the socket's family writes it.
    peer: SocketAddr,
}

/// Buffers of the client-to-peer path ([`RelayShared::channel_data_batch`]), kept by
/// the caller across batches so nothing is allocated per batch.
#[derive(Default)]
pub struct ForwardScratch {
    routes: Vec<Result<ClientRoute, DropReason>>,
    sockets: Vec<Arc<RelaySocket>>,
    /// Payloads of one segmented send.
    out: Vec<u8>,
}

/// Sends `contents`, datagrams of `segment` bytes, from a relay socket to `peer` as
/// one GSO send without waiting (one by one should the kernel refuse it). Returns
/// how many left.
fn send_segments(socket: &RelaySocket, peer: SocketAddr, contents: &[u8], segment: usize) -> usize {
    let transmit = quinn_udp::Transmit {
        destination: peer,
        ecn: None,
        contents,
        segment_size: Some(segment),
        src_ip: None,
    };
    match socket.state.try_send(socket.get_ref().into(), &transmit) {
        Ok(()) => contents.len().div_ceil(segment.max(1)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        Err(_) => contents
            .chunks(segment.max(1))
            .filter(|one| socket.get_ref().send_to(one, peer).is_ok())
            .count(),
    }
}

/// Sends `data` from the relay socket at `relay` to `peer` without waiting.
fn send_from(socket: &RelaySocket, relay: SocketAddr, peer: SocketAddr, data: &[u8]) -> bool {
    let peer = if relay.is_ipv6() {
        to_v6_mapped(peer)
    } else {
        peer
    };
    socket.get_ref().send_to(data, peer).is_ok()
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayStartError {
    /// A relay setting is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The relay metrics could not be registered.
    #[error("relay metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// `relay.fast_path = "ebpf"` was asked for and cannot be had.
    #[error("the relay fast path (relay.fast_path = \"ebpf\") cannot start: {0}")]
    FastPath(#[from] crate::ebpf::EbpfError),
}

/// Where the relay started by [`start`] allocates: its relay addresses (or, without
/// any, the address clients reach: the listen address, or every address of the host
/// for an unspecified one) and its port range. The rendezvous accepts Relay-Offers
/// only for these.
pub fn relay_endpoints(
    config: &crate::config::Config,
    listen: SocketAddr,
) -> Result<crate::proto::rendezvous::RelayEndpoints, crate::config::ConfigError> {
    let relay = &config.relay;
    let addresses = if !relay.addresses.is_empty() {
        relay.addresses.clone()
    } else if !listen.ip().is_unspecified() {
        vec![listen.ip()]
    } else {
        host_addresses()
    };
    Ok(crate::proto::rendezvous::RelayEndpoints {
        addresses,
        ports: relay.ports()?,
    })
}

/// Builds the relay from the configuration: the core with its policy (the
/// operator's ranges plus every address of this host, so the relay cannot be
/// pointed at the gateway itself), its sockets and its metrics.
pub fn start(
    config: &crate::config::Config,
    listen: SocketAddr,
    secret: SharedSecret,
    client_socket: ServiceSocket,
    metrics: &crate::metrics::Metrics,
) -> Result<Arc<RelayShared>, RelayStartError> {
    let relay = &config.relay;
    let ports = relay.ports()?;
    let own = own_addresses(&config.relay, listen);
    let policy = peer_policy(config, listen)?;
    let core = TurnServer::new(turn_config(config), secret, rand::random(), 600, policy);
    let socket_config = RelaySocketConfig {
        v4: relay.addresses.iter().copied().find(IpAddr::is_ipv4),
        v6: relay.addresses.iter().copied().find(IpAddr::is_ipv6),
        ports: ports.clone(),
    };
    let relay_metrics = RelayMetrics::new(&metrics.registry)?;
    let fast = match relay.fast_path {
        crate::config::FastPathMode::Off => None,
        crate::config::FastPathMode::Ebpf => {
            let interfaces = if relay.fast_path_interfaces.is_empty() {
                let mut served = relay.addresses.clone();
                served.push(listen.ip());
                crate::fast_path::interfaces_of(&served)
            } else {
                relay.fast_path_interfaces.clone()
            };
            if interfaces.is_empty() {
                return Err(RelayStartError::Config(crate::config::ConfigError::Invalid(
                    "relay.fast_path: no interface carries the listen or relay addresses; set relay.fast_path_interfaces".into(),
                )));
            }
            if relay.bandwidth_bytes_per_second > 0 {
                tracing::warn!(
                    "relay.fast_path is on but relay.bandwidth_bytes_per_second caps every allocation: nothing will take the fast path"
                );
            }
            let fast = RelayFastPath::load(FastPathConfig {
                service_port: listen.port(),
                relay_ports: ports.clone(),
                interfaces,
                mode: crate::ebpf::AttachMode::Auto,
                local_addresses: own.clone(),
            })?;
            tracing::info!(interfaces = ?fast.interfaces(), "relay fast path (eBPF) attached");
            Some(fast)
        }
    };
    tracing::info!(
        realm = %relay.realm,
        ports = %format!("{}-{}", ports.start(), ports.end()),
        addresses = ?relay.addresses,
        allowed_peers = ?relay.allowed_peer_ranges,
        "TURN relay enabled"
    );
    Ok(RelayShared::new(
        core,
        socket_config,
        client_socket,
        relay_metrics,
        fast,
    ))
}

/// The relay's own addresses, which the peer policy denies unless an allowed
/// range opens them: every address of this host, the relay addresses, and the
/// listen address.
fn own_addresses(relay: &crate::config::RelayConfig, listen: SocketAddr) -> Vec<IpAddr> {
    let mut own = host_addresses();
    own.extend(relay.addresses.iter().copied());
    if !listen.ip().is_unspecified() {
        own.push(listen.ip());
    }
    own
}

/// The peer-address policy `relay` describes for a gateway listening on `listen`
/// (the operator's ranges plus this host's own addresses, read now).
pub fn peer_policy(
    config: &crate::config::Config,
    listen: SocketAddr,
) -> Result<PeerPolicy, crate::config::ConfigError> {
    let relay = &config.relay;
    let parts = relay.peer_policy_parts()?;
    let mut policy = PeerPolicy::new(parts.allowed, parts.denied, own_addresses(relay, listen));
    policy
        .set_nat64_prefixes(parts.nat64)
        .map_err(|e| crate::config::ConfigError::Invalid(format!("relay.nat64_prefixes: {e}")))?;
    // The gateway's own listeners stay out of the relay's reach even where an allowed
    // range covers its addresses (client-to-client relaying on one host).
    // Two clients of this relay may relay to each other (both sites without UDP,
    // each with an allocation over TCP or TLS): our relayed addresses are peers like
    // any other, our other ports are not.
    policy.allow_own_relay_ports(relay.ports()?);
    policy.protect_ports(
        std::iter::once(listen.port())
            .chain(config.server.discovery_sockets().0.iter().map(|a| a.port()))
            .chain(
                config
                    .metrics
                    .enabled
                    .then_some(config.metrics.listen.port()),
            ),
    );
    Ok(policy)
}

/// The core's limits and timers as `relay` sets them.
pub fn turn_config(config: &crate::config::Config) -> TurnConfig {
    let relay = &config.relay;
    TurnConfig {
        replies_per_source: config.server.replies_per_source,
        realm: relay.realm.clone(),
        max_lifetime: std::time::Duration::from_secs(relay.max_lifetime_seconds),
        max_allocations: relay.max_allocations,
        max_allocations_per_user: relay.max_allocations_per_user,
        max_permissions: relay.max_permissions,
        max_channels: relay.max_channels,
        bandwidth_bytes_per_second: relay.bandwidth_bytes_per_second,
        fast_path: relay.fast_path == crate::config::FastPathMode::Ebpf,
        ..TurnConfig::default()
    }
}

/// Every address configured on this host's interfaces (for the "own address" deny
/// rule). Empty if the kernel will not say.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below; we only read
    // sockaddr structures whose family says how large they are.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let entry = &*cursor;
            if !entry.ifa_addr.is_null() {
                match i32::from((*entry.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cursor = entry.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_opener(ports: RangeInclusive<u16>) -> RelayOpener {
        RelayOpener {
            config: RelaySocketConfig {
                v4: None,
                v6: None,
                ports,
            },
            cursor: AtomicU16::new(0),
            runtime: tokio::runtime::Handle::current(),
            udp_state: Arc::new(
                UdpSocketState::new(
                    (&std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket")).into(),
                )
                .expect("quinn-udp state"),
            ),
        }
    }

    #[tokio::test]
    async fn the_opener_binds_in_the_range_on_the_address_reached() {
        let opener = loopback_opener(47_100..=47_199);
        let loopback = Some(IpAddr::from([127, 0, 0, 1]));
        let none = Weak::new();
        let opened = opener
            .open(AddressFamily::V4, EvenPort::Any, loopback, &none)
            .expect("a port");
        assert_eq!(opened.relay.0.ip(), IpAddr::from([127, 0, 0, 1]));
        assert!((47_100..=47_199).contains(&opened.relay.0.port()));
        assert!(opened.reserved.is_none());
        let pair = opener
            .open(
                AddressFamily::V4,
                EvenPort::EvenReserveNext,
                loopback,
                &none,
            )
            .expect("a pair");
        let (relay, reserved) = (pair.relay.0, pair.reserved.expect("reserved").0);
        assert_eq!(relay.port() % 2, 0);
        assert_eq!(reserved.port(), relay.port() + 1);
        // No IPv6 relay address configured and none reached: 440's error.
        assert!(matches!(
            opener.open(AddressFamily::V6, EvenPort::Any, loopback, &none),
            Err(OpenError::FamilyUnavailable)
        ));
    }

    #[tokio::test]
    async fn a_full_range_reports_no_port() {
        let opener = loopback_opener(47_200..=47_200);
        let loopback = Some(IpAddr::from([127, 0, 0, 1]));
        let none = Weak::new();
        let first = opener
            .open(AddressFamily::V4, EvenPort::Any, loopback, &none)
            .expect("the one port");
        assert_eq!(first.relay.0.port(), 47_200);
        // The port is ours and bound: the kernel refuses it again.
        assert!(matches!(
            opener.open(AddressFamily::V4, EvenPort::Any, loopback, &none),
            Err(OpenError::NoPort)
        ));
        drop(first);
    }

    #[test]
    fn host_addresses_include_loopback() {
        let addrs = host_addresses();
        assert!(
            addrs.contains(&IpAddr::from([127, 0, 0, 1])),
            "getifaddrs should list 127.0.0.1: {addrs:?}"
        );
    }
}
