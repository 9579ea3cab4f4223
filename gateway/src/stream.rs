//! The gateway over streams: TURN (RFC 8656 §3.1) and the rendezvous (the same
//! STUN-framed Register, Connect, Outcome, Relay-Offer and TCP-Seq as over UDP) on
//! TCP connections to the service port and on TLS connections to the TLS
//! listeners ([`crate::tls`]), so a host without UDP can register, be introduced
//! and relay.
//!
//! Every connection, TCP or TLS, is one [`serve_connection`]: frames (a STUN
//! message, or ChannelData padded to four bytes) are read with deadlines, TURN
//! methods and ChannelData go to the relay, everything else to the rendezvous core
//! (or, without one, the Binding service). What the cores send to a stream client
//! later (relayed data, introductions) goes through [`writers`], the table of the
//! open connections' write queues keyed by address and transport.
//!
//! Lock order by structure: a frame is handed to the relay (whose methods take and
//! release its lock) or to the rendezvous core (locked in [`rendezvous_frame`] only
//! for the call), never both at once, as in the UDP service loop.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use crate::{
    cluster::ClusterLink,
    metrics::Metrics,
    proto::{
        Transmit, Transport,
        binding::BindingService,
        stun::Message,
        turn::{
            CHANNEL_DATA_HEADER,
            server::{ClientAddr, TurnServer},
        },
    },
    rendezvous::SharedRendezvous,
    turn::RelayShared,
    udp::{SendScratch, ServiceSocket, send_transmits},
};

/// Most stream clients (TCP and TLS together) served at once; more wait in the
/// kernel's backlog.
const MAX_STREAM_CLIENTS: usize = 4096;
/// Most stream clients served at once from one source address (IPv4 address, IPv6
/// /64), TCP and TLS together: one source cannot take every slot. More are closed
/// at once.
pub const MAX_TCP_CLIENTS_PER_SOURCE: usize = 64;
/// A client's first frame must arrive whole within this long (after the TLS
/// handshake, on TLS), and an idle connection (no frame at all) is closed after
/// [`IDLE`].
const FIRST_FRAME: Duration = Duration::from_secs(30);
const IDLE: Duration = Duration::from_secs(3600);
/// Once a frame's header is in, the rest must follow within this long (a client
/// that announces a frame and then trickles or stops holds a slot otherwise).
pub const TCP_FRAME_BODY: Duration = Duration::from_secs(5);
/// A frame to a client must be written within this long (a client that stops
/// reading is closed rather than holding its queue and slot forever).
const WRITE: Duration = Duration::from_secs(10);
/// The largest frame taken, the largest UDP datagram: a STUN message or
/// ChannelData over a stream carries nothing a datagram could not.
pub const MAX_FRAME: usize = 65_535;
/// Frames queued to one connection; a full queue drops (as UDP would).
const WRITE_QUEUE: usize = 256;

/// Why a stream connection ended: the bounded `reason` label of
/// `gateway_stream_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it (or it broke).
    Eof,
    /// A frame that is neither STUN nor ChannelData.
    NotStun,
    /// A frame longer than [`MAX_FRAME`].
    Oversized,
    /// The first frame, a frame's body, or any frame for [`IDLE`], did not come
    /// in time.
    Timeout,
    /// The client did not read what it was sent within [`WRITE`].
    WriteTimeout,
    /// Another connection from the same address over the same transport was open
    /// (closed at once).
    Duplicate,
}

impl CloseReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::NotStun => "not_stun",
            CloseReason::Oversized => "oversized",
            CloseReason::Timeout => "timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::Duplicate => "duplicate",
        }
    }
}

/// The stream listeners' counters.
#[derive(Clone)]
pub struct StreamMetrics {
    /// `gateway_turn_tcp_refused_total`: connections (TCP or TLS) closed at accept
    /// because their source held its share of the slots.
    pub refused: IntCounter,
    /// `gateway_stream_connections{transport}`: connections served now.
    pub connections: IntGaugeVec,
    /// `gateway_stream_closed_total{transport,reason}`.
    pub closed: IntCounterVec,
}

impl StreamMetrics {
    /// Registers the counters in `registry`, every label set at zero.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let refused = IntCounter::new(
            "gateway_turn_tcp_refused_total",
            "TCP and TLS connections closed at once because their source (IPv4 address, IPv6 /64) held its share of the connection slots",
        )?;
        let connections = IntGaugeVec::new(
            Opts::new(
                "gateway_stream_connections",
                "TCP and TLS client connections served now (TLS: from accept, handshake included)",
            ),
            &["transport"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "gateway_stream_closed_total",
                "Served TCP and TLS client connections that ended, by transport and reason: eof (the client closed), not_stun (a frame neither STUN nor ChannelData), oversized (a frame over 65535 bytes), timeout (a frame late, or idle), write_timeout (the client did not read), duplicate (another connection from the same address and transport was open)",
            ),
            &["transport", "reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        for transport in [Transport::Tcp, Transport::Tls] {
            connections.with_label_values(&[transport.as_str()]);
            for reason in [
                CloseReason::Eof,
                CloseReason::NotStun,
                CloseReason::Oversized,
                CloseReason::Timeout,
                CloseReason::WriteTimeout,
                CloseReason::Duplicate,
            ] {
                closed.with_label_values(&[transport.as_str(), reason.as_str()]);
            }
        }
        Ok(Self {
            refused,
            connections,
            closed,
        })
    }
}

/// The write queues of the open stream connections, by client address and
/// transport. A leaf lock: each method takes and releases it without calling
/// anything else, so it is never held while a core's lock is taken, and taking it
/// under a core's lock cannot deadlock.
#[derive(Default)]
pub struct StreamWriters(Mutex<WriterMap>);

/// A connection's write queue by its client's address and transport.
type WriterMap = HashMap<(SocketAddr, Transport), mpsc::Sender<Vec<u8>>>;

/// The process's one table of stream writers (the relay and the rendezvous send to
/// stream clients through it).
pub fn writers() -> &'static StreamWriters {
    static WRITERS: LazyLock<StreamWriters> = LazyLock::new(StreamWriters::default);
    &WRITERS
}

impl StreamWriters {
    fn map(&self) -> MutexGuard<'_, WriterMap> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection's queue; false when another connection of the same
    /// address and transport is open (a client that reuses its source port on two
    /// TLS listeners): its replies and its allocation would be the other's.
    fn insert(
        &self,
        addr: SocketAddr,
        transport: Transport,
        writer: mpsc::Sender<Vec<u8>>,
    ) -> bool {
        match self.map().entry((addr, transport)) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(writer);
                true
            }
        }
    }

    fn remove(&self, addr: SocketAddr, transport: Transport) {
        self.map().remove(&(addr, transport));
    }

    /// Queues `payload` (padded to a multiple of four bytes, as ChannelData must be
    /// on a stream) to the connection of `addr` over `transport` without waiting;
    /// false when there is none or its queue is full.
    pub fn send(&self, addr: SocketAddr, transport: Transport, payload: &[u8]) -> bool {
        let Some(writer) = self.map().get(&(addr, transport)).cloned() else {
            return false;
        };
        let mut framed = Vec::with_capacity(payload.len().next_multiple_of(4));
        framed.extend_from_slice(payload);
        framed.resize(payload.len().next_multiple_of(4), 0);
        writer.try_send(framed).is_ok()
    }
}

/// TCP clients per source, for [`MAX_TCP_CLIENTS_PER_SOURCE`]. A leaf lock: held
/// only to count, never across I/O.
#[derive(Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    /// The unit a source is counted by.
    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
            v4 => v4,
        }
    }

    fn counts(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more connection from `ip`, unless it has its share already.
    fn admit(&self, ip: IpAddr) -> bool {
        let mut counts = self.counts();
        let count = counts.entry(Self::key(ip)).or_insert(0);
        if *count >= MAX_TCP_CLIENTS_PER_SOURCE {
            return false;
        }
        *count += 1;
        true
    }

    /// One connection from `ip` less; true when none is left from anyone.
    fn release(&self, ip: IpAddr) -> bool {
        let mut counts = self.counts();
        let key = Self::key(ip);
        if let Some(count) = counts.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&key);
            }
        }
        counts.is_empty()
    }
}

/// Gives the memory of closed stream clients back to the system once the last one
/// is gone: glibc keeps freed heap for reuse, so a burst of connections (a flood of
/// silent ones: about 5.5 KiB each) otherwise stays in the RSS for good.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free heap memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the stream listeners serve with: the cores, the UDP service socket (the
/// rendezvous may answer a stream client's request with a datagram to another
/// peer), the limits shared by every stream listener, and the counters.
pub struct StreamService {
    relay: Option<Arc<RelayShared>>,
    rendezvous: Option<SharedRendezvous>,
    udp: ServiceSocket,
    metrics: Metrics,
    cluster: Option<ClusterLink>,
    /// Its counters.
    pub stream_metrics: StreamMetrics,
    permits: Arc<tokio::sync::Semaphore>,
    sources: Sources,
}

/// One admitted connection's hold on the shared limits: the slot, the descriptor
/// and its source's count, all given back on drop.
pub struct Admission {
    service: Arc<StreamService>,
    ip: IpAddr,
    transport: Transport,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _fd: crate::limits::FdPermit,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.service
            .stream_metrics
            .connections
            .with_label_values(&[self.transport.as_str()])
            .dec();
        if self.service.sources.release(self.ip) {
            trim_heap();
        }
    }
}

impl StreamService {
    /// The stream service over the cores given (either may be absent: without a
    /// relay TURN requests get nothing, without a rendezvous only Binding is
    /// answered); registers its counters in `metrics`' registry.
    pub fn new(
        relay: Option<Arc<RelayShared>>,
        rendezvous: Option<SharedRendezvous>,
        udp: ServiceSocket,
        metrics: Metrics,
        cluster: Option<ClusterLink>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let stream_metrics = StreamMetrics::new(&metrics.registry)?;
        Ok(Arc::new(Self {
            relay,
            rendezvous,
            udp,
            metrics,
            cluster,
            stream_metrics,
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_CLIENTS)),
            sources: Sources::default(),
        }))
    }

    /// Waits for a free slot, then accepts one connection on `listener` and
    /// admits it under the shared limits (the descriptor budget, the per-source
    /// share); `None` for a connection closed at once (or an accept error, logged
    /// by `errors`).
    pub async fn accept(
        self: &Arc<Self>,
        listener: &tokio::net::TcpListener,
        transport: Transport,
        errors: &mut crate::limits::AcceptErrors,
        refused_logged: &mut bool,
    ) -> Option<(tokio::net::TcpStream, SocketAddr, Admission)> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => {
                errors.accepted();
                accepted
            }
            Err(e) => {
                errors.failed(&e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                return None;
            }
        };
        // A client beyond the descriptor budget is closed at once (it would need a
        // relay socket too), so the listeners and /metrics keep their reserve.
        let fd = crate::limits::fd_budget().try_acquire()?;
        if !self.sources.admit(addr.ip()) {
            // Closed at once (dropped): this source holds its share of the slots.
            if !*refused_logged {
                tracing::warn!(source = %addr.ip(), limit = MAX_TCP_CLIENTS_PER_SOURCE, transport = transport.as_str(), "a source reached its stream connection limit (TCP and TLS together); closing its further connections (logged once)");
                *refused_logged = true;
            }
            self.stream_metrics.refused.inc();
            return None;
        }
        self.stream_metrics
            .connections
            .with_label_values(&[transport.as_str()])
            .inc();
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let _ = stream.set_nodelay(true);
        let admission = Admission {
            service: self.clone(),
            ip: addr.ip(),
            transport,
            _permit: permit,
            _fd: fd,
        };
        Some((stream, addr, admission))
    }
}

/// TURN and the rendezvous over TCP on the service port: the client speaks STUN
/// and ChannelData framed on a stream; the relayed side is UDP as always. An
/// allocation lives as long as its connection. Serves until the task is dropped.
pub async fn serve_tcp(listener: tokio::net::TcpListener, service: Arc<StreamService>) {
    let mut refused_logged = false;
    let mut errors = crate::limits::AcceptErrors::new("TCP");
    loop {
        let Some((stream, addr, admission)) = service
            .accept(&listener, Transport::Tcp, &mut errors, &mut refused_logged)
            .await
        else {
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let local = stream.local_addr().ok().map(|a| a.ip().to_canonical());
            serve_connection(stream, addr, local, Transport::Tcp, &service).await;
            drop(admission);
        });
    }
}

/// Length of the frame starting with `head`: a STUN message (20-byte header plus
/// its length, a multiple of four) or ChannelData (4 bytes plus its length, padded
/// to four on streams); `Err` for anything else or a frame over [`MAX_FRAME`].
pub fn frame_len(head: [u8; 4]) -> Result<usize, CloseReason> {
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let total = match head[0] >> 6 {
        0 if len % 4 == 0 => 20 + len,
        1 => CHANNEL_DATA_HEADER + len.next_multiple_of(4),
        _ => return Err(CloseReason::NotStun),
    };
    if total > MAX_FRAME {
        return Err(CloseReason::Oversized);
    }
    Ok(total)
}

/// Serves one client connection (TCP, or TLS after its handshake) until it ends,
/// a frame breaks the framing, or a deadline passes; then its allocation ends and
/// its writer is gone. Counts why it ended.
pub async fn serve_connection<S>(
    stream: S,
    addr: SocketAddr,
    local: Option<IpAddr>,
    transport: Transport,
    service: &StreamService,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    if !writers().insert(addr, transport, tx.clone()) {
        tracing::debug!(%addr, transport = transport.as_str(), "stream client: this address already has a connection; closing the new one");
        service
            .stream_metrics
            .closed
            .with_label_values(&[transport.as_str(), CloseReason::Duplicate.as_str()])
            .inc();
        return;
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (written_tx, mut write_failed) = tokio::sync::oneshot::channel::<CloseReason>();
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            match tokio::time::timeout(WRITE, writer.write_all(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    let _ = written_tx.send(CloseReason::Eof);
                    return;
                }
                Err(_) => {
                    let _ = written_tx.send(CloseReason::WriteTimeout);
                    return;
                }
            }
        }
        let _ = writer.shutdown().await;
    });
    let client = ClientAddr { addr, transport };
    let mut ctx = FrameContext::default();
    // Grown to the largest frame seen (at most MAX_FRAME): a connection that never
    // sends a large frame never holds a large buffer.
    let mut frame = vec![0u8; 2048];
    // The first frame must be whole by this deadline; later ones get IDLE for
    // their header and TCP_FRAME_BODY for the rest.
    let mut first_deadline = Some(tokio::time::Instant::now() + FIRST_FRAME);
    let reason = loop {
        let head_deadline = first_deadline.unwrap_or_else(|| tokio::time::Instant::now() + IDLE);
        let mut head = [0u8; 4];
        tokio::select! {
            biased;
            failed = &mut write_failed => break failed.unwrap_or(CloseReason::Eof),
            read = tokio::time::timeout_at(head_deadline, reader.read_exact(&mut head)) => match read {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break CloseReason::Eof,
                Err(_) => break CloseReason::Timeout,
            },
        }
        let len = match frame_len(head) {
            Ok(len) => len,
            Err(reason) => {
                tracing::debug!(%addr, transport = transport.as_str(), reason = reason.as_str(), "stream client: bad frame; closing");
                break reason;
            }
        };
        if frame.len() < len {
            frame.resize(len, 0);
        }
        frame[..4].copy_from_slice(&head);
        let body_deadline = (tokio::time::Instant::now() + TCP_FRAME_BODY)
            .min(first_deadline.unwrap_or(tokio::time::Instant::now() + TCP_FRAME_BODY));
        match tokio::time::timeout_at(body_deadline, reader.read_exact(&mut frame[4..len])).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break CloseReason::Eof,
            Err(_) => {
                tracing::debug!(%addr, "stream client: a frame did not arrive whole in time; closing");
                break CloseReason::Timeout;
            }
        }
        first_deadline = None;
        let bytes = &frame[..len];
        if head[0] >> 6 == 1 {
            if let Some(relay) = &service.relay {
                relay.channel_data(client, bytes);
                service
                    .metrics
                    .stun_datagrams
                    .with_label_values(&["channel_data"])
                    .inc();
            }
            continue;
        }
        let reply = handle_message(service, client, local, bytes, &mut ctx).await;
        if let Some(reply) = reply
            && tx.send(reply).await.is_err()
        {
            break CloseReason::Eof;
        }
    };
    service
        .stream_metrics
        .closed
        .with_label_values(&[transport.as_str(), reason.as_str()])
        .inc();
    writers().remove(addr, transport);
    writer_task.abort();
    if let Some(relay) = &service.relay {
        relay.remove_stream_client(client);
    }
    if let Some(core) = &service.rendezvous {
        let mut server = crate::rendezvous::lock(core);
        if server.connection_closed(addr, transport) {
            service
                .metrics
                .registered_peers
                .set(server.peer_count() as i64);
        }
    }
}

/// Per connection scratch for what the rendezvous core sends.
#[derive(Default)]
struct FrameContext {
    scratch: SendScratch,
    out: crate::service::BatchOutput,
    injector: Option<crate::tcp_raw::Injector>,
}

/// Handles one STUN message from a stream client; returns the reply to write on
/// its connection, when one is made here (the rendezvous' go through [`writers`]
/// like everything it sends).
async fn handle_message(
    service: &StreamService,
    client: ClientAddr,
    local: Option<IpAddr>,
    bytes: &[u8],
    ctx: &mut FrameContext,
) -> Option<Vec<u8>> {
    let method = Message::parse(bytes).ok().map(|m| m.message_type().method);
    let mut reply = Vec::new();
    match (&service.relay, &service.rendezvous) {
        (Some(relay), _) if method.is_some_and(TurnServer::is_turn_method) => {
            let label = relay.turn_message(client, local, bytes, &mut reply);
            service
                .metrics
                .stun_datagrams
                .with_label_values(&[label])
                .inc();
        }
        (_, Some(core)) => {
            rendezvous_frame(core, &service.metrics, client, local, bytes, &mut ctx.out);
            deliver(service, ctx).await;
        }
        _ => {
            let outcome = BindingService.handle(client.addr, bytes, &mut reply);
            service
                .metrics
                .stun_datagrams
                .with_label_values(&[outcome.as_str()])
                .inc();
        }
    }
    (!reply.is_empty()).then_some(reply)
}

/// One message through the rendezvous core under its lock (taken and released
/// here, with no relay in reach); what it produced is left in `out`.
fn rendezvous_frame(
    core: &SharedRendezvous,
    metrics: &Metrics,
    client: ClientAddr,
    local: Option<IpAddr>,
    bytes: &[u8],
    out: &mut crate::service::BatchOutput,
) {
    let mut server = crate::rendezvous::lock(core);
    let handled = server.handle_message(
        Instant::now(),
        crate::rendezvous::unix_now(),
        client.addr,
        client.transport,
        local,
        bytes,
    );
    crate::rendezvous::drain_core(&mut server, metrics, out, None);
    metrics.set_registered_peers(&server);
    drop(server);
    crate::rendezvous::deadline_may_have_moved();
    metrics
        .stun_datagrams
        .with_label_values(&[handled.as_str()])
        .inc();
}

/// Sends what the rendezvous core produced for a stream message: datagrams and
/// stream frames (through [`send_transmits`], which routes each by transport),
/// cluster requests, SYN-ACKs to forge. Answers meant for discovery sockets are
/// not sent: CHANGE-REQUEST is a UDP matter.
async fn deliver(service: &StreamService, ctx: &mut FrameContext) {
    let out = &mut ctx.out;
    if !out.transmits.is_empty() {
        send_transmits(
            &service.udp,
            &out.transmits,
            &service.metrics,
            &mut ctx.scratch,
        )
        .await;
        out.transmits.clear();
    }
    out.redirected.clear();
    match &service.cluster {
        Some(link) => out.cluster.drain(..).for_each(|r| link.submit(r)),
        None => out.cluster.clear(),
    }
    for synack in out.forged.drain(..) {
        let injector = ctx
            .injector
            .get_or_insert_with(crate::tcp_raw::Injector::new);
        crate::rendezvous::inject_forged(injector, &synack, &service.metrics);
    }
}

/// Sends one of a core's transmits over a stream (TCP or TLS) through
/// [`writers`]; false when there is no such connection (any more) or its queue is
/// full.
pub(crate) fn send_stream(transmit: &Transmit) -> bool {
    writers().send(transmit.to, transmit.transport, &transmit.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_stun_or_padded_channel_data_within_the_maximum() {
        // STUN: 20-byte header plus the length field (a multiple of four).
        assert_eq!(frame_len([0x00, 0x03, 0x00, 0x08]), Ok(28));
        assert_eq!(
            frame_len([0x00, 0x03, 0x00, 0x06]),
            Err(CloseReason::NotStun)
        );
        // ChannelData: 4 bytes plus the data, padded to four on a stream.
        assert_eq!(frame_len([0x40, 0x00, 0x00, 0x05]), Ok(12));
        assert_eq!(frame_len([0x7F, 0xFF, 0x00, 0x08]), Ok(12));
        // Neither (first bits 10 or 11): the connection is closed.
        assert_eq!(
            frame_len([0x80, 0x00, 0x00, 0x00]),
            Err(CloseReason::NotStun)
        );
        assert_eq!(
            frame_len([0xC0, 0x00, 0x00, 0x00]),
            Err(CloseReason::NotStun)
        );
        // Over the largest datagram: refused, not read.
        assert_eq!(
            frame_len([0x00, 0x01, 0xFF, 0xFC]),
            Err(CloseReason::Oversized)
        );
        assert_eq!(
            frame_len([0x40, 0x00, 0xFF, 0xFD]),
            Err(CloseReason::Oversized)
        );
        assert_eq!(frame_len([0x00, 0x01, 0xFF, 0xE8]), Ok(MAX_FRAME - 3));
    }

    #[test]
    fn sources_are_counted_per_address_and_ipv6_64() {
        let sources = Sources::default();
        let ip: IpAddr = "2001:db8::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        for _ in 0..MAX_TCP_CLIENTS_PER_SOURCE {
            assert!(sources.admit(ip));
        }
        assert!(!sources.admit(same_64), "one /64 shares the limit");
        assert!(sources.admit("2001:db8:0:1::1".parse().expect("ip")));
        assert!(!sources.release(ip));
        assert!(sources.admit(same_64), "a slot given back is taken again");
    }
}
