//! The service loop: receives batches on a service socket, demultiplexes each
//! datagram (TURN methods and ChannelData to the TURN driver, everything else to the
//! rendezvous core or, without one, the Binding service), runs the cores' timers and
//! sends what they return. The batched socket I/O itself is in [`crate::udp`], the
//! rendezvous core's driver in [`crate::rendezvous`].
//!
//! Lock order by structure: a batch is handled in two passes. [`relay_pass`] hands
//! the TURN messages and ChannelData to the relay, whose methods take and release
//! its lock inside and never return a guard. [`core_pass`] (in the rendezvous driver,
//! a module that cannot reach the relay) then handles every other datagram under one
//! lock of the rendezvous core, so the two locks can never be held together. The passes' replies are
//! merged back into the order of the datagrams they answer ([`merge_replies`]), so
//! every client gets its replies in the order of its requests, as when the batch was
//! handled in one pass.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Instant};

use crate::{
    cluster::ClusterLink,
    fair::{FairShare, ISOLATION_IDLE, Isolate, Isolation},
    metrics::Metrics,
    proto::{
        Transmit,
        binding::{self, BindingService},
        budget::{ReplyBudget, ReplyBudgetConfig},
        earliest,
        rendezvous::{ForgedSynAck, cluster::ClusterRequest, discovery_index},
        stun::{Message, MessageType},
        turn::{
            self,
            server::{ClientAddr, TurnServer},
        },
    },
    rendezvous::{SharedRendezvous, core_deadline, core_pass, core_timeout, inject_forged},
    turn::{ForwardScratch, RelayShared},
    udp::{Datagram, RECV_BATCH, RecvBatch, SendScratch, ServiceSocket, send_transmits},
};

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
    replies_per_source: u32,
    shutdown: impl Future<Output = ()>,
) {
    run_with_alternates(
        client,
        Vec::new(),
        metrics,
        rendezvous,
        relay,
        None,
        replies_per_source,
        shutdown,
    )
    .await;
}

/// [`run`], with the discovery sockets (numbered as in the rendezvous core's
/// `Alternates`) that answers to CHANGE-REQUEST leave from, and the cluster's
/// request queue (when the node is part of one) that the core's cluster requests go
/// to.
#[allow(clippy::too_many_arguments)]
pub async fn run_with_alternates(
    client: ServiceSocket,
    alternates: Vec<ServiceSocket>,
    metrics: Metrics,
    rendezvous: Option<SharedRendezvous>,
    relay: Option<Arc<RelayShared>>,
    cluster: Option<ClusterLink>,
    replies_per_source: u32,
    shutdown: impl Future<Output = ()>,
) {
    let served = Served {
        client,
        alternates,
        metrics,
        rendezvous,
        relay,
        cluster,
        replies_per_source,
    };
    let Served {
        client,
        metrics,
        rendezvous,
        relay,
        cluster,
        ..
    } = &served;
    // Isolated clients' loops end with the service's (at shutdown, or should this
    // loop's task be aborted).
    let _isolated = StopIsolated(client.isolation.clone());
    let mut batch = RecvBatch::new();
    let mut work = LoopWork::new(replies_per_source);
    let mut fair = FairShare::default();
    let mut isolate = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let timeout = earliest([
            rendezvous.as_ref().and_then(core_deadline),
            relay.as_ref().and_then(|r| r.poll_timeout()),
        ]);
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let moved = crate::rendezvous::DEADLINE_MOVED.notified();
        let count = tokio::select! {
            () = &mut shutdown => return,
            // The core's deadline may be earlier now: read it again.
            () = moved, if rendezvous.is_some() => continue,
            () = sleep => {
                let now = Instant::now();
                if let Some(relay) = &relay
                    && relay.poll_timeout().is_some_and(|at| at <= now)
                {
                    relay.handle_timeout(now);
                }
                if let Some(core) = rendezvous {
                    let out = &mut work.out;
                    out.clear();
                    core_timeout(core, now, metrics, out);
                    submit(cluster.as_ref(), &mut out.cluster);
                    send_transmits(client, &out.transmits, metrics, &mut work.scratch).await;
                }
                continue;
            }
            count = batch.recv(client) => count,
        };
        if count == 0 {
            continue;
        }
        fair.start_batch(count, RECV_BATCH);
        // Count each batch against tokio's cooperative budget, so this loop returns to
        // the scheduler every so many batches: under a flood the socket is always
        // readable and the loop would otherwise never yield, and a task spawned from
        // it (a relay socket's, in this worker's LIFO slot, which other workers cannot
        // steal) would never run: the peer-to-client direction starved to nothing.
        // Cheaper than a yield per batch: it yields only when the budget runs out.
        tokio::task::consume_budget().await;
        work.serve_batch(&served, &batch, Some(&mut fair)).await;
        fair.end_batch(Instant::now(), || client.kernel_drops(), &mut isolate);
        for one in isolate.drain(..) {
            isolate_client(&served, one);
        }
    }
}

/// What every loop serving one service socket shares, cloned into the loops of its
/// isolated clients.
#[derive(Clone)]
struct Served {
    client: ServiceSocket,
    alternates: Vec<ServiceSocket>,
    metrics: Metrics,
    rendezvous: Option<SharedRendezvous>,
    relay: Option<Arc<RelayShared>>,
    cluster: Option<ClusterLink>,
    replies_per_source: u32,
}

/// One loop's buffers and per-loop state, kept across batches.
struct LoopWork {
    out: BatchOutput,
    scratch: SendScratch,
    /// Without a rendezvous core this loop answers Bindings itself, within its own
    /// budget (each loop has one: the limits are per loop).
    binding_budget: ReplyBudget,
    /// Server-assisted TCP splicing (only when the core was told to forge): the raw
    /// sockets open on first use.
    injector: crate::tcp_raw::Injector,
}

impl LoopWork {
    fn new(replies_per_source: u32) -> Self {
        Self {
            out: BatchOutput::default(),
            scratch: SendScratch::default(),
            binding_budget: ReplyBudget::new(
                ReplyBudgetConfig::new(replies_per_source, BINDING_REPLIES_PER_SECOND),
                rand::random(),
            ),
            injector: crate::tcp_raw::Injector::new(),
        }
    }

    /// Handles one received batch (within `fair`'s throttle, when given) and sends
    /// what it produced from the service socket (and the discovery sockets).
    async fn serve_batch(
        &mut self,
        served: &Served,
        batch: &RecvBatch,
        fair: Option<&mut FairShare>,
    ) {
        let Served {
            client,
            alternates,
            metrics,
            rendezvous,
            relay,
            cluster,
            ..
        } = served;
        let out = &mut self.out;
        handle_batch(
            batch,
            metrics,
            rendezvous.as_ref(),
            relay.as_deref(),
            &mut self.binding_budget,
            fair,
            out,
        );
        submit(cluster.as_ref(), &mut out.cluster);
        send_transmits(client, &out.transmits, metrics, &mut self.scratch).await;
        for synack in out.forged.drain(..) {
            inject_forged(&mut self.injector, &synack, metrics);
        }
        for transmit in out.redirected.drain(..) {
            let alternate = discovery_index(transmit.socket).and_then(|i| alternates.get(i));
            if let Some(alternate) = alternate {
                let one = std::slice::from_ref(&transmit);
                send_transmits(alternate, one, metrics, &mut self.scratch).await;
            }
        }
    }
}

/// Stops the isolated clients' loops when dropped.
struct StopIsolated(Isolation);

impl Drop for StopIsolated {
    fn drop(&mut self) {
        self.0.stop_all();
    }
}

/// Gives a flooding client a socket of its own on the service port and a loop to
/// read it (see [`crate::fair`]); nothing when it has one already, too many clients
/// have one, or the socket cannot be opened (the client stays throttled).
fn isolate_client(served: &Served, isolate: Isolate) {
    let Isolate { client, local } = isolate;
    let isolation = &served.client.isolation;
    if !isolation.reserve(client) {
        return;
    }
    // Counted against the relay's descriptor budget, like a relay socket.
    let Some(permit) = crate::limits::fd_budget().try_acquire() else {
        isolation.release(client);
        return;
    };
    let socket = match crate::udp::isolated_socket(&served.client, client, local) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::debug!(error = %e, %client, "cannot give a flooding client its own socket");
            isolation.release(client);
            return;
        }
    };
    tracing::info!(%client, "a client floods the service port: it gets a socket of its own");
    let task = tokio::spawn(serve_isolated(served.clone(), socket, client, permit));
    isolation.started(client, task.abort_handle());
    served.metrics.udp_isolations.inc();
    served
        .metrics
        .udp_isolated_clients
        .set(isolation.count() as i64);
}

/// Serves one isolated client's socket like the service socket (its replies leave
/// from the service socket) until the client has been quiet for [`ISOLATION_IDLE`];
/// then closes it, and the client's datagrams go to the service socket again.
async fn serve_isolated(
    served: Served,
    socket: ServiceSocket,
    client: SocketAddr,
    permit: crate::limits::FdPermit,
) {
    let mut batch = RecvBatch::new();
    let mut work = LoopWork::new(served.replies_per_source);
    // One timer, moved on only when it fires (not re-armed per batch).
    let mut last_heard = Instant::now();
    let idle = tokio::time::sleep(ISOLATION_IDLE);
    tokio::pin!(idle);
    loop {
        let count = tokio::select! {
            () = &mut idle => {
                let quiet_until = last_heard + ISOLATION_IDLE;
                if quiet_until <= Instant::now() {
                    break;
                }
                idle.as_mut().reset(quiet_until.into());
                continue;
            }
            count = batch.recv(&socket) => count,
        };
        if count == 0 {
            continue;
        }
        last_heard = Instant::now();
        tokio::task::consume_budget().await;
        work.serve_batch(&served, &batch, None).await;
    }
    drop(socket);
    drop(permit);
    let isolation = &served.client.isolation;
    isolation.release(client);
    served
        .metrics
        .udp_isolated_clients
        .set(isolation.count() as i64);
    tracing::info!(%client, "an isolated client has been quiet: its socket is closed");
}

/// Binding answers per second per driver loop, all sources together, when no
/// rendezvous core answers them (discovery sockets, Binding-only mode); each source
/// also has its own limits (see [`crate::proto::budget`]).
const BINDING_REPLIES_PER_SECOND: u32 = 100_000;

/// Hands the cluster requests one batch produced to the cluster's queue (dropped
/// when the node is not part of a cluster: the core emits none then).
fn submit(cluster: Option<&ClusterLink>, requests: &mut Vec<ClusterRequest>) {
    match cluster {
        Some(link) => requests.drain(..).for_each(|r| link.submit(r)),
        None => requests.clear(),
    }
}

/// What one batch produced, in buffers kept across batches (cleared, never shrunk,
/// so the buffers themselves are not reallocated per batch).
#[derive(Default)]
pub(crate) struct BatchOutput {
    /// Per datagram of the batch, in order: whether the relay took it.
    pub(crate) relay_took: Vec<bool>,
    /// The relay's replies, each with the index of the datagram it answers.
    pub(crate) relay_replies: Vec<(usize, Transmit)>,
    /// The core's (or the Binding service's) replies from the service socket, each
    /// with the index of the datagram it answers.
    pub(crate) core_replies: Vec<(usize, Transmit)>,
    /// What the service socket sends: both passes' replies in the order of the
    /// datagrams they answer.
    pub(crate) transmits: Vec<Transmit>,
    /// CHANGE-REQUEST answers for the discovery sockets (socket numbers as the core
    /// set them, see [`discovery_index`]).
    pub(crate) redirected: Vec<Transmit>,
    /// SYN-ACKs the core wants forged (server-assisted TCP splicing).
    pub(crate) forged: Vec<ForgedSynAck>,
    /// What the core asks of the cluster (Redis), in order.
    pub(crate) cluster: Vec<ClusterRequest>,
    /// The relay's client-to-peer buffers.
    pub(crate) forward: ForwardScratch,
}

impl BatchOutput {
    /// Empties every buffer, keeping their capacity.
    fn clear(&mut self) {
        self.relay_took.clear();
        self.relay_replies.clear();
        self.core_replies.clear();
        self.transmits.clear();
        self.redirected.clear();
        self.forged.clear();
        self.cluster.clear();
    }
}

/// Hands every datagram of one received batch to the relay or the core, in two
/// passes (see the module's doc), and collects what to send in `out`. The core's
/// lock is taken at most once per batch and released before anything is sent.
fn handle_batch(
    batch: &RecvBatch,
    metrics: &Metrics,
    rendezvous: Option<&SharedRendezvous>,
    relay: Option<&RelayShared>,
    binding_budget: &mut ReplyBudget,
    fair: Option<&mut FairShare>,
    out: &mut BatchOutput,
) {
    out.clear();
    relay_pass(batch, metrics, relay, fair, out);
    match rendezvous {
        Some(core) => core_pass(batch, metrics, core, out),
        None => binding_pass(batch, binding_budget, metrics, out),
    }
    merge_replies(
        &mut out.relay_replies,
        &mut out.core_replies,
        &mut out.transmits,
    );
}

/// Pass 1: counts every datagram and hands the TURN messages and ChannelData to the
/// relay (each call takes and releases the relay's own lock); marks in
/// `out.relay_took` which datagrams it took. Never touches the rendezvous core.
/// ChannelData `fair` throttles is dropped here, before the relay routes it.
fn relay_pass(
    batch: &RecvBatch,
    metrics: &Metrics,
    relay: Option<&RelayShared>,
    mut fair: Option<&mut FairShare>,
    out: &mut BatchOutput,
) {
    let mut throttled = 0u64;
    let mut reply = Vec::new();
    // ChannelData waiting to be relayed: a run is handed over in one call (one lock,
    // segmented sends), before any TURN message that follows it, so the order of a
    // client's datagrams is kept.
    let mut channel_data: Vec<(ClientAddr, &[u8])> = Vec::new();
    let mut received = 0u64;
    let mut received_bytes = 0u64;
    for (index, datagram) in batch.datagrams().enumerate() {
        let Datagram { from, local, bytes } = datagram;
        received += 1;
        received_bytes += bytes.len() as u64;
        let data = relay.is_some() && turn::is_channel_data(bytes);
        let admitted = fair
            .as_deref_mut()
            .is_none_or(|fair| fair.admit(from, local, data));
        let label = match relay {
            Some(_) if data => {
                if admitted {
                    channel_data.push((from.into(), bytes));
                } else {
                    throttled += 1;
                }
                out.relay_took.push(true);
                continue;
            }
            Some(relay) if is_turn_message(bytes) => {
                if !channel_data.is_empty() {
                    relay_channel_data(relay, metrics, &mut channel_data, &mut out.forward);
                }
                let label = relay.turn_message(from.into(), local, bytes, &mut reply);
                if !reply.is_empty() {
                    let transmit = Transmit::udp(from, std::mem::take(&mut reply));
                    out.relay_replies.push((index, transmit.from_local(local)));
                }
                label
            }
            _ => {
                out.relay_took.push(false);
                continue;
            }
        };
        out.relay_took.push(true);
        metrics.stun_datagrams.with_label_values(&[label]).inc();
    }
    if let Some(relay) = relay
        && !channel_data.is_empty()
    {
        relay_channel_data(relay, metrics, &mut channel_data, &mut out.forward);
    }
    if let Some(relay) = relay
        && throttled > 0
    {
        relay.metrics().throttled.inc_by(throttled);
        metrics
            .stun_datagrams
            .with_label_values(&["channel_data"])
            .inc_by(throttled);
    }
    metrics.udp_received_datagrams.inc_by(received);
    metrics.udp_received_bytes.inc_by(received_bytes);
}

/// Relays the ChannelData collected so far and counts it.
fn relay_channel_data(
    relay: &RelayShared,
    metrics: &Metrics,
    channel_data: &mut Vec<(ClientAddr, &[u8])>,
    forward: &mut ForwardScratch,
) {
    relay.channel_data_batch(channel_data, forward);
    metrics
        .stun_datagrams
        .with_label_values(&["channel_data"])
        .inc_by(channel_data.len() as u64);
    channel_data.clear();
}

/// Pass 2 without a rendezvous core: the plain Binding service answers, within
/// this loop's reply budget (per source and in total: a Binding answer is twice
/// its request, so a spoofed flood could reflect through it).
fn binding_pass(
    batch: &RecvBatch,
    budget: &mut ReplyBudget,
    metrics: &Metrics,
    out: &mut BatchOutput,
) {
    let mut reply = Vec::new();
    let now = Instant::now();
    let datagrams = batch.datagrams().enumerate().zip(&out.relay_took);
    for ((index, datagram), _) in datagrams.filter(|(_, took)| !**took) {
        let Datagram { from, local, bytes } = datagram;
        let mut outcome = BindingService.handle(from, bytes, &mut reply);
        if !reply.is_empty() && !budget.allow(now, from.ip()) {
            reply.clear();
            outcome = binding::Outcome::Throttled;
        }
        if !reply.is_empty() {
            let transmit = Transmit::udp(from, std::mem::take(&mut reply));
            out.core_replies.push((index, transmit.from_local(local)));
        }
        metrics
            .stun_datagrams
            .with_label_values(&[outcome.as_str()])
            .inc();
    }
}

/// Merges the two passes' replies (each in datagram order, and no datagram answered
/// by both) into `out` in the order of the datagrams they answer.
fn merge_replies(
    relay: &mut Vec<(usize, Transmit)>,
    core: &mut Vec<(usize, Transmit)>,
    out: &mut Vec<Transmit>,
) {
    let mut relay = relay.drain(..).peekable();
    let mut core = core.drain(..).peekable();
    loop {
        let next = match (relay.peek(), core.peek()) {
            (Some((r, _)), Some((c, _))) if c < r => core.next(),
            (Some(_), _) => relay.next(),
            (None, _) => core.next(),
        };
        match next {
            Some((_, transmit)) => out.push(transmit),
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_the_order_of_the_datagrams_they_answer() {
        let to: std::net::SocketAddr = "192.0.2.1:9".parse().expect("address");
        let reply = |n: u8| Transmit::udp(to, vec![n]);
        // Datagrams 0 and 3 went to the relay, 1, 2 and 5 to the core (4 got nothing).
        let mut relay = vec![(0, reply(0)), (3, reply(3)), (3, reply(4))];
        let mut core = vec![(1, reply(1)), (2, reply(2)), (5, reply(5)), (5, reply(6))];
        let mut out = Vec::new();
        merge_replies(&mut relay, &mut core, &mut out);
        let order: Vec<u8> = out.iter().map(|t| t.payload[0]).collect();
        assert_eq!(order, [0, 1, 2, 3, 4, 5, 6]);
        assert!(relay.is_empty() && core.is_empty());
    }
}
