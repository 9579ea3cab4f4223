//! The rendezvous core's driver: the core shared by the service loops, the pass that
//! feeds it a batch's datagrams under one lock, its timers, the draining of its
//! outputs (service-socket replies, CHANGE-REQUEST answers for the discovery sockets,
//! SYN-ACKs to forge, cluster requests, metrics events) and the injection of forged
//! SYN-ACKs.
//!
//! Lock order by structure: this module never reaches the TURN driver (it does not
//! import it), and the core's guard exists only inside its functions, so the
//! rendezvous lock and the relay's can never be held together.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    metrics::Metrics,
    proto::{
        MAIN_SOCKET,
        rendezvous::{ForgedSynAck, RendezvousEvent, RendezvousHandled, RendezvousServer},
    },
    service::BatchOutput,
    udp::{Datagram, RecvBatch},
};

/// Seconds since the Unix epoch (the core's credential and nonce clock).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The rendezvous core as the driver loops share it: each loop holds the lock only
/// while the core handles one received batch (sans-IO, no I/O under the lock);
/// receiving and sending run outside it, in parallel.
pub type SharedRendezvous = Arc<Mutex<RendezvousServer>>;

/// Locks the shared core (a loop that panicked while holding it left the core
/// consistent between calls, so its state is used as is). Called only where no relay
/// is in reach (see the module's doc).
pub fn lock(core: &SharedRendezvous) -> MutexGuard<'_, RendezvousServer> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wakes the service loops that sleep until the rendezvous core's deadline: a
/// message fed to the core elsewhere (over a TCP or TLS connection, from the
/// cluster) may have brought that deadline forward (the first registration's
/// sweep, a parked Connect's answer), and a loop armed with the old one would
/// sleep past it.
pub(crate) static DEADLINE_MOVED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Says that the core's deadline may have moved (see [`DEADLINE_MOVED`]).
pub(crate) fn deadline_may_have_moved() {
    DEADLINE_MOVED.notify_waiters();
}

/// When the rendezvous core's timer falls due (its lock held for the read only).
pub(crate) fn core_deadline(core: &SharedRendezvous) -> Option<Instant> {
    lock(core).poll_timeout()
}

/// Runs the rendezvous core's timer if it is still due under the lock (another loop
/// may have run it since the deadline was read), collecting what it produced (answers
/// to Connects that waited for the cluster, metrics events, cluster requests).
pub(crate) fn core_timeout(
    core: &SharedRendezvous,
    now: Instant,
    metrics: &Metrics,
    out: &mut BatchOutput,
) {
    let mut server = lock(core);
    if server.poll_timeout().is_some_and(|at| at <= now) {
        server.handle_timeout(now, unix_now());
        drain_core(&mut server, metrics, out, None);
        metrics.set_registered_peers(&server);
    }
}

/// Takes everything the core queued: service-socket replies (tagged with the index
/// of the datagram they answer, when there is one), CHANGE-REQUEST answers for the
/// discovery sockets, SYN-ACKs to forge, cluster requests and metrics events.
pub(crate) fn drain_core(
    server: &mut RendezvousServer,
    metrics: &Metrics,
    out: &mut BatchOutput,
    index: Option<usize>,
) {
    while let Some(transmit) = server.poll_transmit() {
        match (transmit.socket == MAIN_SOCKET, index) {
            (true, Some(index)) => out.core_replies.push((index, transmit)),
            (true, None) => out.transmits.push(transmit),
            (false, _) => out.redirected.push(transmit),
        }
    }
    while let Some(event) = server.poll_event() {
        match event {
            RendezvousEvent::ForgeSynAck(synack) => out.forged.push(synack),
            RendezvousEvent::Cluster(request) => out.cluster.push(request),
            event => metrics.record(&event),
        }
    }
}

/// Pass 2: every datagram the relay did not take, through the rendezvous core under
/// one lock, taken here and released on return. Given no relay, so the relay's lock
/// cannot be taken while the core's is held. The core's queues are drained after
/// each datagram, so they never hold more than one datagram's output.
pub(crate) fn core_pass(
    batch: &RecvBatch,
    metrics: &Metrics,
    core: &SharedRendezvous,
    out: &mut BatchOutput,
) {
    let mut server = lock(core);
    // Borrowed out of `out` while the loop fills the rest of it; put back below.
    let relay_took = std::mem::take(&mut out.relay_took);
    let datagrams = batch.datagrams().enumerate().zip(&relay_took);
    for ((index, datagram), _) in datagrams.filter(|(_, took)| !**took) {
        let Datagram { from, local, bytes } = datagram;
        let handled = server.handle_datagram(Instant::now(), unix_now(), from, local, bytes);
        drain_core(&mut server, metrics, out, Some(index));
        if matches!(handled, RendezvousHandled::Registered) {
            metrics.set_registered_peers(&server);
        }
        metrics
            .stun_datagrams
            .with_label_values(&[handled.as_str()])
            .inc();
    }
    out.relay_took = relay_took;
}

/// Crafts and sends one SYN-ACK the core asked for (server-assisted TCP splicing):
/// a raw IPv4 or IPv6 packet whose source is the other peer's public TCP endpoint,
/// counted in `gateway_tcp_forged_synacks_total` once the kernel took it.
pub(crate) fn inject_forged(
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
