//! The UDP driver: owns the service socket and feeds each datagram to the sans-IO
//! core, sending back whatever it returns. Nothing protocol-specific lives here.
use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use quinn_udp::{RecvMeta, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use std::{io::IoSliceMut, net::IpAddr};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UdpSocket,
};

use crate::{
    metrics::Metrics,
    proto::{
        binding::BindingService,
        rendezvous::{Handled, RendezvousServer, Transmit},
        stun::{Message, MessageType},
        turn::{self, server::TurnServer},
    },
    relay::{ClientSocket, RelayShared, to_v6_mapped},
};

/// Largest datagram read; anything longer is truncated by the kernel and then fails
/// to parse (STUN over UDP stays well under this).
const MAX_DATAGRAM: usize = 65_535;
/// Receive buffer asked of the kernel, so bursts are not dropped while we work.
const RECV_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Why the UDP service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created or bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the service socket with the options the gateway needs (a large receive
/// buffer; dual-stack when bound to `[::]`).
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(err)?;
    }
    // Best effort: the kernel caps this at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER_BYTES);
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Datagram buffers read per system call (recvmmsg).
const RECV_BATCH: usize = 8;

/// Prepares a bound service socket for [`run`]: its quinn-udp state (batched
/// receives, IP_PKTINFO), shared so relay tasks can send to clients from it too.
/// The socket is re-registered with the runtime for readability only (see
/// [`ClientSocket`] for why). Must be called inside a tokio runtime.
pub fn client_socket(socket: UdpSocket) -> std::io::Result<ClientSocket> {
    let socket = socket.into_std()?;
    let state = UdpSocketState::new((&socket).into())?;
    // An IPv6 socket is dual-stack (see `bind`) and needs v4-mapped peers.
    let dual_stack = socket.local_addr()?.is_ipv6();
    // SAFETY: the std socket owns its descriptor and keeps it open, unchanged, for
    // as long as the AsyncFd holding it lives.
    let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
    Ok(ClientSocket::new(
        Arc::new(socket),
        Arc::new(state),
        dual_stack,
    ))
}

/// True when a STUN-looking datagram carries a TURN method (cheap header peek, so
/// the relay's messages skip the rendezvous).
fn is_turn_message(datagram: &[u8]) -> bool {
    Message::looks_like_stun(datagram)
        && TurnServer::is_turn_method(
            MessageType::from_bits(u16::from_be_bytes([datagram[0], datagram[1]])).method,
        )
}

/// Serves the socket until `shutdown` completes. With a rendezvous core every
/// non-TURN datagram goes through it (it answers Binding too); without one, only
/// Binding. With a relay, TURN messages and ChannelData go to it.
///
/// I/O goes through `quinn-udp`: batched receives, and the destination address of
/// each datagram (IP_PKTINFO) so replies leave from the address the client sent to,
/// even when the socket is bound to a wildcard address on a multi-homed host.
pub async fn run(
    client: ClientSocket,
    metrics: Metrics,
    rendezvous: Option<RendezvousServer>,
    relay: Option<Arc<RelayShared>>,
    shutdown: impl Future<Output = ()>,
) {
    run_with_alternates(client, Vec::new(), metrics, rendezvous, relay, shutdown).await;
}

/// [`run`], with the discovery sockets (numbered as in the rendezvous core's
/// `Alternates`) that answers to CHANGE-REQUEST leave from.
pub async fn run_with_alternates(
    client: ClientSocket,
    alternates: Vec<ClientSocket>,
    metrics: Metrics,
    mut rendezvous: Option<RendezvousServer>,
    relay: Option<Arc<RelayShared>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut redirected: Vec<(usize, Transmit)> = Vec::new();
    let socket = &*client.socket;
    let state = &*client.state;
    let binding = BindingService;
    let mut storage = vec![0u8; MAX_DATAGRAM * RECV_BATCH];
    let mut metas = [RecvMeta::default(); RECV_BATCH];
    let mut reply = Vec::with_capacity(512);
    let mut transmits: Vec<Transmit> = Vec::new();
    let mut gso_buffer = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let timeout = rendezvous.as_ref().and_then(RendezvousServer::poll_timeout);
        let relay_timeout = relay.as_ref().and_then(|r| r.poll_timeout());
        let timeout = match (timeout, relay_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let received = tokio::select! {
            () = &mut shutdown => return,
            () = sleep => {
                if let Some(relay) = &relay {
                    relay.handle_timeout(Instant::now());
                }
                if let Some(server) = rendezvous.as_mut() {
                    server.handle_timeout(Instant::now(), unix_now());
                    metrics.registered_peers.set(server.peer_count() as i64);
                }
                continue;
            }
            ready = socket.readable() => ready,
        };
        let received = match received {
            Ok(mut ready) => ready.try_io(|socket| {
                // Views into the one preallocated buffer: no allocation per batch.
                let mut chunks = storage.chunks_mut(MAX_DATAGRAM);
                let mut bufs: [IoSliceMut<'_>; RECV_BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                state.recv(socket.get_ref().into(), &mut bufs, &mut metas)
            }),
            Err(e) => Ok(Err(e)),
        };
        let count = match received {
            Ok(Ok(count)) => count,
            // Readiness was stale: wait again.
            Err(_would_block) => continue,
            Ok(Err(e)) => {
                // ICMP errors from earlier sends surface here (ECONNREFUSED); keep going.
                tracing::debug!(error = %e, "receive failed");
                continue;
            }
        };
        transmits.clear();
        for (meta, buffer) in metas[..count].iter().zip(storage.chunks(MAX_DATAGRAM)) {
            let stride = meta.stride.max(1);
            // With GRO one buffer may hold several datagrams of `stride` bytes.
            for datagram in buffer[..meta.len].chunks(stride) {
                metrics.udp_received_datagrams.inc();
                metrics.udp_received_bytes.inc_by(datagram.len() as u64);
                let from = canonical(meta.addr);
                let local = meta.dst_ip.map(|ip| ip.to_canonical());
                if let Some(relay) = &relay {
                    if turn::is_channel_data(datagram) {
                        relay.channel_data(from.into(), datagram);
                        metrics
                            .stun_datagrams
                            .with_label_values(&["channel_data"])
                            .inc();
                        continue;
                    }
                    if is_turn_message(datagram) {
                        let label = relay.turn_message(from.into(), local, datagram, &mut reply);
                        if !reply.is_empty() {
                            transmits.push(Transmit {
                                to: from,
                                from_local: local,
                                payload: std::mem::take(&mut reply),
                            });
                        }
                        metrics.stun_datagrams.with_label_values(&[label]).inc();
                        continue;
                    }
                }
                let label = match rendezvous.as_mut() {
                    Some(server) => {
                        let handled = server.handle(
                            Instant::now(),
                            unix_now(),
                            from,
                            local,
                            datagram,
                            &mut transmits,
                        );
                        for event in server.drain_events() {
                            metrics.record(&event);
                        }
                        redirected
                            .extend(server.drain_redirected().map(|r| (r.endpoint, r.transmit)));
                        if matches!(handled, Handled::Registered) {
                            metrics.registered_peers.set(server.peer_count() as i64);
                        }
                        handled.as_str()
                    }
                    None => {
                        let outcome = binding.handle(from, datagram, &mut reply);
                        if !reply.is_empty() {
                            transmits.push(Transmit {
                                to: from,
                                from_local: local,
                                payload: std::mem::take(&mut reply),
                            });
                        }
                        outcome.as_str()
                    }
                };
                metrics.stun_datagrams.with_label_values(&[label]).inc();
            }
        }
        send_transmits(&client, &transmits, &metrics, &mut gso_buffer).await;
        for (endpoint, transmit) in redirected.drain(..) {
            if let Some(alternate) = alternates.get(endpoint) {
                let one = std::slice::from_ref(&transmit);
                send_transmits(alternate, one, &metrics, &mut gso_buffer).await;
            }
        }
    }
}

/// Largest UDP payload one GSO send may carry in all.
const MAX_GSO_BYTES: usize = 65_000;

/// Sends a batch's datagrams in order. Consecutive datagrams to the same destination
/// with the same length (an introduction's two copies) leave in one system call with
/// UDP segmentation offload where the kernel has it: the recipient still gets them as
/// separate datagrams, and the kernel's send path runs once for all of them. Should
/// such a send fail (a device without segmentation support), the copies go out one
/// by one instead.
async fn send_transmits(
    client: &ClientSocket,
    transmits: &[Transmit],
    metrics: &Metrics,
    gso_buffer: &mut Vec<u8>,
) {
    let max_segments = client.state.max_gso_segments();
    let mut rest = transmits;
    while let Some(first) = rest.first() {
        let len = first.payload.len();
        let limit = if len == 0 || len > usize::from(u16::MAX) {
            1
        } else {
            max_segments.min(MAX_GSO_BYTES / len).max(1)
        };
        let run = rest
            .iter()
            .take(limit)
            .take_while(|t| {
                t.to == first.to && t.from_local == first.from_local && t.payload.len() == len
            })
            .count()
            .max(1);
        let Some((group, tail)) = rest.split_at_checked(run) else {
            break;
        };
        rest = tail;
        if let [_, _, ..] = group {
            gso_buffer.clear();
            for transmit in group {
                gso_buffer.extend_from_slice(&transmit.payload);
            }
            match send_one(client, first, gso_buffer, Some(len)).await {
                Ok(()) => {
                    metrics.udp_sent_datagrams.inc_by(group.len() as u64);
                    metrics.udp_sent_bytes.inc_by(gso_buffer.len() as u64);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, to = %first.to, "segmented send failed; sending one by one");
                }
            }
        }
        for transmit in group {
            match send_one(client, transmit, &transmit.payload, None).await {
                Ok(()) => {
                    metrics.udp_sent_datagrams.inc();
                    metrics.udp_sent_bytes.inc_by(transmit.payload.len() as u64);
                }
                Err(e) => tracing::debug!(error = %e, to = %transmit.to, "send failed"),
            }
        }
    }
}

/// Sends `contents` (one datagram, or several of `segment_size` bytes each) to
/// `transmit`'s destination from its local address, waiting while the socket's send
/// buffer is full.
async fn send_one(
    client: &ClientSocket,
    transmit: &Transmit,
    contents: &[u8],
    segment_size: Option<usize>,
) -> std::io::Result<()> {
    let dual_stack = client.dual_stack;
    let destination = if dual_stack {
        to_v6_mapped(transmit.to)
    } else {
        transmit.to
    };
    let src_ip = transmit.from_local.map(|ip| match (dual_stack, ip) {
        (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => ip,
    });
    let outgoing = quinn_udp::Transmit {
        destination,
        ecn: None,
        contents,
        segment_size,
        src_ip,
    };
    let socket = client.socket.get_ref();
    loop {
        // A segmented send reports its failure so the caller can fall back; a plain
        // one is quinn-udp's `send`, which logs failures other than a full buffer.
        let sent = if segment_size.is_some() {
            client.state.try_send(socket.into(), &outgoing)
        } else {
            client.state.send(socket.into(), &outgoing)
        };
        match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The send buffer is full: wait until it drains, then retry.
                if let Err(e) = client.writable().await {
                    tracing::debug!(error = %e, "cannot wait for the socket to drain");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            result => return result,
        }
    }
}

/// IPv4-mapped IPv6 sources (from a dual-stack socket) as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn grouped_datagrams_arrive_one_by_one_in_order() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let client = client_socket(socket).expect("client socket");
        let metrics = Metrics::new().expect("metrics");
        let first = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
        let second = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
        for receiver in [&first, &second] {
            receiver
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
        }
        let to = |receiver: &std::net::UdpSocket, payload: &[u8]| Transmit {
            to: receiver.local_addr().expect("address"),
            from_local: None,
            payload: payload.to_vec(),
        };
        // Same destination and length: one segmented send of four; then a shorter
        // one; then another destination.
        let transmits = [
            to(&first, b"intro-a"),
            to(&first, b"intro-a"),
            to(&first, b"intro-b"),
            to(&first, b"intro-b"),
            to(&first, b"reply"),
            to(&second, b"other"),
            to(&second, b"other"),
        ];
        let mut buffer = Vec::new();
        send_transmits(&client, &transmits, &metrics, &mut buffer).await;
        let mut received = Vec::new();
        let mut datagram = [0u8; 64];
        for (receiver, count) in [(&first, 5), (&second, 2)] {
            for _ in 0..count {
                let len = receiver.recv(&mut datagram).expect("a datagram");
                received.push(datagram.get(..len).unwrap_or_default().to_vec());
            }
        }
        let expected: Vec<Vec<u8>> = transmits.iter().map(|t| t.payload.clone()).collect();
        assert_eq!(received, expected);
        assert_eq!(metrics.udp_sent_datagrams.get(), 7);
        assert_eq!(
            metrics.udp_sent_bytes.get(),
            expected.iter().map(|p| p.len() as u64).sum::<u64>()
        );
    }
}
