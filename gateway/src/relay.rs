//! The TURN relay's I/O: one UDP socket per allocation on a port of the relay range,
//! a task per socket forwarding what peers send back to the client, and the relay's
//! metrics. The protocol decisions are all in [`crate::proto::turn::server`]; this
//! module only moves datagrams.
use std::{
    cell::RefCell,
    collections::HashMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use quinn_udp::UdpSocketState;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::unix::AsyncFd, net::UdpSocket, task::AbortHandle};

use crate::proto::turn::{
    CHANNEL_DATA_HEADER, channel_data_header,
    server::{
        DropReason, Family, OpenError, RelaySockets, RequestMethod, RequestOutcome, TurnServer,
    },
};

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
        Ok(Self {
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

/// The main socket, shared so relay tasks can send to clients from it.
///
/// It is registered with the runtime for readability only: every datagram sent on a
/// socket registered for writability too makes the kernel signal EPOLLOUT, which
/// wakes a parked runtime thread for nothing (measured: a fifth of the server's CPU
/// at high request rates, see docs/benchmarks.md). Sends are plain non-blocking
/// system calls; the rare full send buffer is waited out by the service loop
/// ([`ClientSocket::writable`]) and drops relayed datagrams ([`ClientSocket::try_send`]).
#[derive(Clone)]
pub struct ClientSocket {
    pub(crate) socket: Arc<AsyncFd<std::net::UdpSocket>>,
    pub(crate) state: Arc<UdpSocketState>,
    pub(crate) dual_stack: bool,
}

impl ClientSocket {
    /// Wraps the service socket (registered for readability) and its quinn-udp state.
    pub fn new(
        socket: Arc<AsyncFd<std::net::UdpSocket>>,
        state: Arc<UdpSocketState>,
        dual_stack: bool,
    ) -> Self {
        Self {
            socket,
            state,
            dual_stack,
        }
    }

    /// Sends `payload` to `to` from the gateway address `local` (when known), without
    /// waiting: a full socket buffer drops the datagram, as the network would.
    pub fn try_send(&self, to: SocketAddr, local: Option<IpAddr>, payload: &[u8]) -> bool {
        let destination = if self.dual_stack {
            to_v6_mapped(to)
        } else {
            to
        };
        let src_ip = local.map(|ip| match (self.dual_stack, ip) {
            (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => ip,
        });
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents: payload,
            segment_size: None,
            src_ip,
        };
        self.state
            .send(self.socket.get_ref().into(), &transmit)
            .is_ok()
    }

    /// Waits until the socket can take a datagram again (after a send hit a full
    /// buffer). A second descriptor of the socket is registered for writability for
    /// the wait only, so sends in the common case wake nobody.
    pub async fn writable(&self) -> std::io::Result<()> {
        let descriptor = self.socket.get_ref().try_clone()?;
        // SAFETY: the std socket owns its descriptor and keeps it open, unchanged,
        // for as long as the AsyncFd holding it lives.
        let registered =
            unsafe { AsyncFd::register_with_interest(descriptor, tokio::io::Interest::WRITABLE)? };
        let _ready = registered.writable().await?;
        Ok(())
    }
}

/// IPv4 addresses as IPv4-mapped IPv6 (for sending from a dual-stack socket).
pub fn to_v6_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

struct OpenRelay {
    socket: Arc<UdpSocket>,
    task: AbortHandle,
}

/// The relay sockets, implementing the core's [`RelaySockets`].
pub struct RelaySocketTable {
    config: RelaySocketConfig,
    open: HashMap<SocketAddr, OpenRelay>,
    cursor: u16,
    shared: Option<std::sync::Weak<RelayShared>>,
    runtime: tokio::runtime::Handle,
    /// The gateway address of the Allocate being served (set around each call).
    current_local: Option<IpAddr>,
}

/// The core and its sockets behind one lock: one acquisition per relayed datagram.
pub struct RelayState {
    /// The protocol core.
    pub core: TurnServer,
    /// The sockets it has opened.
    pub sockets: RelaySocketTable,
}

impl RelayState {
    /// Runs the core's request handling with the gateway address the client reached,
    /// so relay sockets open on that address when none is configured.
    pub fn with_local<R>(
        &mut self,
        local: Option<IpAddr>,
        f: impl FnOnce(&mut TurnServer, &mut RelaySocketTable) -> R,
    ) -> R {
        self.sockets.current_local = local;
        let result = f(&mut self.core, &mut self.sockets);
        self.sockets.current_local = None;
        result
    }

    /// The socket of the relay address `relay`.
    pub fn relay_socket(&self, relay: SocketAddr) -> Option<Arc<UdpSocket>> {
        self.sockets.open.get(&relay).map(|r| r.socket.clone())
    }
}

/// What relay tasks share.
pub struct RelayShared {
    state: Mutex<RelayState>,
    metrics: RelayMetrics,
    client_socket: ClientSocket,
    tid_counter: AtomicU64,
}

impl RelayShared {
    /// Builds the relay around `core`, opening sockets per `config` and answering
    /// clients through `client_socket`. Must be called inside a tokio runtime.
    pub fn new(
        core: TurnServer,
        config: RelaySocketConfig,
        client_socket: ClientSocket,
        metrics: RelayMetrics,
    ) -> Arc<Self> {
        let cursor = rand::random::<u16>();
        Arc::new_cyclic(|weak| Self {
            state: Mutex::new(RelayState {
                core,
                sockets: RelaySocketTable {
                    config,
                    open: HashMap::new(),
                    cursor,
                    shared: Some(weak.clone()),
                    runtime: tokio::runtime::Handle::current(),
                    current_local: None,
                },
            }),
            metrics,
            client_socket,
            tid_counter: AtomicU64::new(rand::random()),
        })
    }

    /// Locks the core and its sockets (a poisoned lock is taken over: the state is
    /// plain data and every update leaves it consistent).
    pub fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// Runs the core's timers: expiries close sockets.
    pub fn handle_timeout(&self, now: Instant) {
        let mut state = self.lock();
        let RelayState { core, sockets } = &mut *state;
        core.handle_timeout(now, sockets);
        self.metrics.allocations.set(core.allocation_count() as i64);
    }

    /// When the core next needs [`RelayShared::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lock().core.poll_timeout()
    }
}

impl RelaySocketTable {
    fn bind_port(&mut self, ip: IpAddr, even: bool) -> Result<std::net::UdpSocket, OpenError> {
        let (start, end) = (*self.config.ports.start(), *self.config.ports.end());
        let span = u32::from(end - start) + 1;
        for _ in 0..span {
            self.cursor = self.cursor.wrapping_add(1);
            let port = start + (u32::from(self.cursor) % span) as u16;
            if even && port % 2 == 1 {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            if self.open.contains_key(&addr) {
                continue;
            }
            let Ok(socket) =
                Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            else {
                return Err(OpenError::NoPort);
            };
            if addr.is_ipv6() {
                let _ = socket.set_only_v6(true);
            }
            let _ = socket.set_recv_buffer_size(256 * 1024);
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            if socket.bind(&addr.into()).is_ok() {
                return Ok(socket.into());
            }
        }
        Err(OpenError::NoPort)
    }
}

impl RelaySockets for RelaySocketTable {
    fn open(&mut self, family: Family, even_port: bool) -> Result<SocketAddr, OpenError> {
        let local = self.current_local.map(|ip| ip.to_canonical());
        let ip = match family {
            Family::V4 => self.config.v4.or(local.filter(IpAddr::is_ipv4)),
            Family::V6 => self.config.v6.or(local.filter(IpAddr::is_ipv6)),
        }
        .ok_or(OpenError::FamilyUnavailable)?;
        let std_socket = self.bind_port(ip, even_port)?;
        let addr = std_socket.local_addr().map_err(|_| OpenError::NoPort)?;
        let _guard = self.runtime.enter();
        let socket = Arc::new(UdpSocket::from_std(std_socket).map_err(|_| OpenError::NoPort)?);
        let shared = self.shared.clone();
        let task = self
            .runtime
            .spawn(relay_task(socket.clone(), addr, shared))
            .abort_handle();
        self.open.insert(addr, OpenRelay { socket, task });
        Ok(addr)
    }

    fn close(&mut self, relay: SocketAddr) {
        if let Some(open) = self.open.remove(&relay) {
            open.task.abort();
        }
    }
}

impl Drop for RelaySocketTable {
    fn drop(&mut self) {
        for (_, open) in self.open.drain() {
            open.task.abort();
        }
    }
}

/// Largest datagram a relay socket reads, plus room for the ChannelData header.
const RELAY_BUFFER: usize = 65_536 + CHANNEL_DATA_HEADER;

thread_local! {
    /// One receive buffer per worker thread, not per allocation (allocations must
    /// stay small: thousands of idle relay sockets cost no buffer memory).
    static RELAY_BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> =
        RefCell::new((vec![0; RELAY_BUFFER], Vec::with_capacity(2048)));
}

/// Forwards what peers send to one relay address back to its client.
async fn relay_task(
    socket: Arc<UdpSocket>,
    relay: SocketAddr,
    shared: Option<std::sync::Weak<RelayShared>>,
) {
    let Some(shared) = shared else { return };
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Drain what is queued without awaiting (the buffer is borrowed meanwhile).
        let more = RELAY_BUFFERS.with_borrow_mut(|(buffer, indication)| {
            for _ in 0..64 {
                let received = socket.try_recv_from(&mut buffer[CHANNEL_DATA_HEADER..]);
                let (len, peer) = match received {
                    Ok(received) => received,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                    Err(_) => continue,
                };
                forward_to_client(&shared, relay, peer, buffer, len, indication);
            }
            true
        });
        if more {
            tokio::task::yield_now().await;
        }
    }
}

fn forward_to_client(
    shared: &RelayShared,
    relay: SocketAddr,
    peer: SocketAddr,
    buffer: &mut [u8],
    len: usize,
    indication: &mut Vec<u8>,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let verdict = shared
        .lock()
        .core
        .data_from_peer(Instant::now(), relay, peer, len);
    let to = match verdict {
        Ok(to) => to,
        Err(reason) => {
            shared.metrics.drop_one(reason);
            return;
        }
    };
    let sent = match to.channel {
        Some(channel) => {
            buffer[..CHANNEL_DATA_HEADER].copy_from_slice(&channel_data_header(channel, len));
            shared
                .client_socket
                .try_send(to.client, to.local, &buffer[..CHANNEL_DATA_HEADER + len])
        }
        None => {
            let tid_seed = shared
                .tid_counter
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&tid_seed.to_be_bytes());
            let data = &buffer[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len];
            crate::proto::turn::data_indication(tid, peer, data, indication);
            shared
                .client_socket
                .try_send(to.client, to.local, indication)
        }
    };
    if sent {
        shared.metrics.packets_to_client.inc();
        shared.metrics.bytes_to_client.inc_by(len as u64);
    }
}

/// Sends `data` from the relay socket `relay` to `peer` without waiting.
pub fn send_to_peer(state: &RelayState, relay: SocketAddr, peer: SocketAddr, data: &[u8]) -> bool {
    let Some(open) = state.sockets.open.get(&relay) else {
        return false;
    };
    let peer = if relay.is_ipv6() {
        to_v6_mapped(peer)
    } else {
        peer
    };
    open.socket.try_send_to(data, peer).is_ok()
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
}

/// Builds the relay from the configuration: the core with its policy (the
/// operator's ranges plus every address of this host, so the relay cannot be
/// pointed at the gateway itself), its sockets and its metrics.
pub fn start(
    config: &crate::config::Config,
    listen: SocketAddr,
    secret: crate::proto::credentials::SharedSecret,
    client_socket: ClientSocket,
    metrics: &crate::metrics::Metrics,
) -> Result<Arc<RelayShared>, RelayStartError> {
    use crate::proto::{
        peer_policy::PeerPolicy,
        turn::server::{TurnConfig, TurnServer},
    };
    let relay = &config.relay;
    let ports = relay.ports()?;
    let (allowed, denied) = relay.peer_ranges()?;
    let mut own = host_addresses();
    own.extend(relay.addresses.iter().copied());
    if !listen.ip().is_unspecified() {
        own.push(listen.ip());
    }
    let policy = PeerPolicy::new(allowed, denied, own);
    let turn_config = TurnConfig {
        realm: relay.realm.clone(),
        max_lifetime: std::time::Duration::from_secs(relay.max_lifetime_seconds),
        max_allocations: relay.max_allocations,
        max_allocations_per_user: relay.max_allocations_per_user,
        max_permissions: relay.max_permissions,
        max_channels: relay.max_channels,
        bandwidth_bytes_per_second: relay.bandwidth_bytes_per_second,
        ..TurnConfig::default()
    };
    let core = TurnServer::new(turn_config, secret, rand::random(), 600, policy);
    let socket_config = RelaySocketConfig {
        v4: relay.addresses.iter().copied().find(IpAddr::is_ipv4),
        v6: relay.addresses.iter().copied().find(IpAddr::is_ipv6),
        ports: ports.clone(),
    };
    let relay_metrics = RelayMetrics::new(&metrics.registry)?;
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
    ))
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

    #[test]
    fn host_addresses_include_loopback() {
        let addrs = host_addresses();
        assert!(
            addrs.contains(&IpAddr::from([127, 0, 0, 1])),
            "getifaddrs should list 127.0.0.1: {addrs:?}"
        );
    }
}
