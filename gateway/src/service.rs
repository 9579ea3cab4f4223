//! The service loop: receives batches on a service socket, demultiplexes each
//! datagram (TURN methods and ChannelData to the TURN driver, everything else to the
//! rendezvous core or, without one, the Binding service), runs the cores' timers and
//! sends what they return. The batched socket I/O itself is in [`crate::udp`].
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    metrics::Metrics,
    proto::{
        Transmit,
        binding::BindingService,
        rendezvous::{
            ForgedSynAck, RendezvousEvent, RendezvousHandled, RendezvousServer, discovery_index,
        },
        stun::{Message, MessageType},
        turn::{self, server::TurnServer},
    },
    turn::RelayShared,
    udp::{Datagram, RecvBatch, SendScratch, ServiceSocket, send_transmits},
};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// True when a STUN-looking datagram carries a TURN method (cheap header peek, so
/// the relay's messages skip the rendezvous).
fn is_turn_message(datagram: &[u8]) -> bool {
    Message::looks_like_stun(datagram)
        && TurnServer::is_turn_method(
            MessageType::from_bits(u16::from_be_bytes([datagram[0], datagram[1]])).method,
        )
}

/// The rendezvous core as the driver loops share it: each loop holds the lock only
/// while the core handles one received batch (sans-IO, no I/O under the lock);
/// receiving and sending run outside it, in parallel.
pub type SharedRendezvous = Arc<Mutex<RendezvousServer>>;

/// Locks the shared core (a loop that panicked while holding it left the core
/// consistent between calls, so its state is used as is).
fn lock(core: &SharedRendezvous) -> MutexGuard<'_, RendezvousServer> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves the socket until `shutdown` completes. With a rendezvous core every
/// non-TURN datagram goes through it (it answers Binding too); without one, only
/// Binding. With a relay, TURN messages and ChannelData go to it.
///
/// Several loops may serve the same socket and core at once (one task each, see
/// `server.threads`): each receives its own batches, so the kernel's send and
/// receive paths of one batch run beside the core's work on another. Every loop
/// also runs the timers that fall due (checked again under the lock, so one sweep
/// runs per deadline).
///
/// I/O goes through `quinn-udp`: batched receives, and the destination address of
/// each datagram (IP_PKTINFO) so replies leave from the address the client sent to,
/// even when the socket is bound to a wildcard address on a multi-homed host.
pub async fn run(
    client: ServiceSocket,
    metrics: Metrics,
    rendezvous: Option<SharedRendezvous>,
    relay: Option<Arc<RelayShared>>,
    shutdown: impl Future<Output = ()>,
) {
    run_with_alternates(client, Vec::new(), metrics, rendezvous, relay, shutdown).await;
}

/// [`run`], with the discovery sockets (numbered as in the rendezvous core's
/// `Alternates`) that answers to CHANGE-REQUEST leave from.
pub async fn run_with_alternates(
    client: ServiceSocket,
    alternates: Vec<ServiceSocket>,
    metrics: Metrics,
    rendezvous: Option<SharedRendezvous>,
    relay: Option<Arc<RelayShared>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut redirected: Vec<(usize, Transmit)> = Vec::new();
    let mut batch = RecvBatch::new();
    let mut transmits: Vec<Transmit> = Vec::new();
    let mut scratch = SendScratch::default();
    // Server-assisted TCP splicing (only when the core was told to forge): the raw
    // sockets open on first use.
    let mut forged: Vec<ForgedSynAck> = Vec::new();
    let mut injector = crate::tcp_raw::Injector::new();
    tokio::pin!(shutdown);
    loop {
        let timeout = rendezvous.as_ref().and_then(|r| lock(r).poll_timeout());
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
        let count = tokio::select! {
            () = &mut shutdown => return,
            () = sleep => {
                let now = Instant::now();
                if let Some(relay) = &relay
                    && relay.poll_timeout().is_some_and(|at| at <= now)
                {
                    relay.handle_timeout(now);
                }
                if let Some(core) = &rendezvous {
                    let mut server = lock(core);
                    if server.poll_timeout().is_some_and(|at| at <= now) {
                        server.handle_timeout(now, unix_now());
                        metrics.registered_peers.set(server.peer_count() as i64);
                    }
                }
                continue;
            }
            count = batch.recv(&client) => count,
        };
        if count == 0 {
            continue;
        }
        transmits.clear();
        handle_batch(
            &batch,
            &metrics,
            rendezvous.as_ref(),
            relay.as_deref(),
            &mut transmits,
            &mut redirected,
            &mut forged,
        );
        send_transmits(&client, &transmits, &metrics, &mut scratch).await;
        for synack in forged.drain(..) {
            inject_forged(&mut injector, &synack, &metrics);
        }
        for (endpoint, transmit) in redirected.drain(..) {
            if let Some(alternate) = alternates.get(endpoint) {
                let one = std::slice::from_ref(&transmit);
                send_transmits(alternate, one, &metrics, &mut scratch).await;
            }
        }
    }
}

/// Hands every datagram of one received batch to the relay or the core, collecting
/// the replies. The core's lock is taken at most once per batch, and released
/// before anything is sent. SYN-ACKs the core wants forged (server-assisted TCP
/// splicing) go to `forged`, CHANGE-REQUEST answers for other sockets to `redirected`.
#[allow(clippy::too_many_arguments)]
fn handle_batch(
    batch: &RecvBatch,
    metrics: &Metrics,
    rendezvous: Option<&SharedRendezvous>,
    relay: Option<&RelayShared>,
    transmits: &mut Vec<Transmit>,
    redirected: &mut Vec<(usize, Transmit)>,
    forged: &mut Vec<ForgedSynAck>,
) {
    let binding = BindingService;
    let mut reply = Vec::new();
    let mut core: Option<MutexGuard<'_, RendezvousServer>> = None;
    for Datagram {
        from,
        local,
        bytes: datagram,
    } in batch.datagrams()
    {
        metrics.udp_received_datagrams.inc();
        metrics.udp_received_bytes.inc_by(datagram.len() as u64);
        if let Some(relay) = relay {
            if turn::is_channel_data(datagram) {
                // Never hold the core's lock while taking the relay's.
                core = None;
                relay.channel_data(from.into(), datagram);
                metrics
                    .stun_datagrams
                    .with_label_values(&["channel_data"])
                    .inc();
                continue;
            }
            if is_turn_message(datagram) {
                core = None;
                let label = relay.turn_message(from.into(), local, datagram, &mut reply);
                if !reply.is_empty() {
                    transmits
                        .push(Transmit::udp(from, std::mem::take(&mut reply)).from_local(local));
                }
                metrics.stun_datagrams.with_label_values(&[label]).inc();
                continue;
            }
        }
        let label = match rendezvous {
            Some(shared) => {
                let server = core.get_or_insert_with(|| lock(shared));
                let handled =
                    server.handle_datagram(Instant::now(), unix_now(), from, local, datagram);
                while let Some(transmit) = server.poll_transmit() {
                    match discovery_index(transmit.socket) {
                        Some(endpoint) => redirected.push((endpoint, transmit)),
                        None => transmits.push(transmit),
                    }
                }
                while let Some(event) = server.poll_event() {
                    match event {
                        RendezvousEvent::ForgeSynAck(synack) => forged.push(synack),
                        event => metrics.record(&event),
                    }
                }
                if matches!(handled, RendezvousHandled::Registered) {
                    metrics.registered_peers.set(server.peer_count() as i64);
                }
                handled.as_str()
            }
            None => {
                let outcome = binding.handle(from, datagram, &mut reply);
                if !reply.is_empty() {
                    transmits
                        .push(Transmit::udp(from, std::mem::take(&mut reply)).from_local(local));
                }
                outcome.as_str()
            }
        };
        metrics.stun_datagrams.with_label_values(&[label]).inc();
    }
}

/// Crafts and sends one SYN-ACK the core asked for (server-assisted TCP splicing):
/// a raw IPv4 or IPv6 packet whose source is the other peer's public TCP endpoint,
/// counted in `gateway_tcp_forged_synacks_total` once the kernel took it.
fn inject_forged(
    injector: &mut crate::tcp_raw::Injector,
    synack: &ForgedSynAck,
    metrics: &Metrics,
) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let segment = crate::tcp_raw::Segment::syn_ack(
        canonical(synack.src),
        canonical(synack.dst),
        synack.seq,
        synack.ack,
    );
    match injector.send(&segment) {
        Ok(()) => {
            metrics.tcp_forged_synacks.inc();
            tracing::debug!(src = %segment.src, dst = %segment.dst, seq = synack.seq, ack = synack.ack, "forged SYN-ACK sent");
        }
        Err(e) => tracing::warn!(dst = %segment.dst, "cannot send a forged SYN-ACK: {e}"),
    }
}
