//! The UDP driver: owns the service socket and feeds each datagram to the sans-IO
//! core, sending back whatever it returns. Nothing protocol-specific lives here.
use std::{
    future::Future,
    net::SocketAddr,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::{
    metrics::Metrics,
    proto::{
        binding::BindingService,
        rendezvous::{Handled, RendezvousServer, Transmit},
    },
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

/// Serves the socket until `shutdown` completes. With a rendezvous core every
/// datagram goes through it (it answers Binding too); without one, only Binding.
pub async fn run(
    socket: UdpSocket,
    metrics: Metrics,
    mut rendezvous: Option<RendezvousServer>,
    shutdown: impl Future<Output = ()>,
) {
    let binding = BindingService;
    let mut datagram = vec![0u8; MAX_DATAGRAM];
    let mut reply = Vec::with_capacity(512);
    let mut transmits: Vec<Transmit> = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let timeout = rendezvous.as_ref().and_then(RendezvousServer::poll_timeout);
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let (len, from) = tokio::select! {
            () = &mut shutdown => return,
            () = sleep => {
                if let Some(server) = rendezvous.as_mut() {
                    server.handle_timeout(Instant::now(), unix_now());
                    metrics.registered_peers.set(server.peer_count() as i64);
                }
                continue;
            }
            received = socket.recv_from(&mut datagram) => match received {
                Ok(received) => received,
                Err(e) => {
                    // ICMP errors from earlier sends surface here (ECONNREFUSED); keep going.
                    tracing::debug!(error = %e, "recv_from failed");
                    continue;
                }
            },
        };
        metrics.udp_received_datagrams.inc();
        metrics.udp_received_bytes.inc_by(len as u64);
        transmits.clear();
        let label = match rendezvous.as_mut() {
            Some(server) => {
                let handled = server.handle(
                    Instant::now(),
                    unix_now(),
                    from,
                    &datagram[..len],
                    &mut transmits,
                );
                for event in server.drain_events() {
                    metrics.record(&event);
                }
                if matches!(handled, Handled::Registered) {
                    metrics.registered_peers.set(server.peer_count() as i64);
                }
                handled.as_str()
            }
            None => {
                let outcome = binding.handle(from, &datagram[..len], &mut reply);
                if !reply.is_empty() {
                    transmits.push(Transmit {
                        to: from,
                        payload: std::mem::take(&mut reply),
                    });
                }
                outcome.as_str()
            }
        };
        metrics.stun_datagrams.with_label_values(&[label]).inc();
        for transmit in &transmits {
            match socket.send_to(&transmit.payload, transmit.to).await {
                Ok(sent) => {
                    metrics.udp_sent_datagrams.inc();
                    metrics.udp_sent_bytes.inc_by(sent as u64);
                }
                Err(e) => tracing::debug!(error = %e, to = %transmit.to, "send_to failed"),
            }
        }
    }
}
