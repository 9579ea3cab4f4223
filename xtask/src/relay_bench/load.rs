//! The load scenarios, each against one [`Target`]: relayed throughput client to
//! client, allocation rate, Binding rate, and memory per held allocation. Every loop is
//! bounded in time and count.
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gateway::proto::{
    binding,
    stun::{Class, Message, method as stun_method},
    turn::{
        ChannelData,
        client::{AllocationState, Framing, TurnClientEvent},
        is_channel_data,
    },
};

use super::{
    fleet::{Member, Stepper, Target},
    mmsg::{self, RecvBatch},
};

/// Longest any setup or teardown phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// A flow whose window stays full this long without a delivery declares what it has
/// in flight lost and sends again.
const STALL: Duration = Duration::from_millis(50);
/// Receiving goes on this long after sending stops.
const DRAIN: Duration = Duration::from_millis(300);
/// Datagrams per recvmmsg call.
const RECV_BATCH: usize = 64;
/// Datagrams per sendmmsg call.
const SEND_BATCH: usize = 32;

/// CPU time (user + system, all threads) a process has used, from /proc/PID/stat.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|&t| t > 0)?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// Resident set size of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The target's CPU time since `before`.
fn cpu_used(target: &Target, before: Option<Duration>) -> Option<Duration> {
    Some(target.pid.and_then(process_cpu)?.saturating_sub(before?))
}

/// CPU time this process has used.
fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Allocates on `count` fresh members at once (up to `concurrency` in flight at a
/// time) and returns them allocated; fails on any refusal.
pub fn allocate_many(
    target: &Target,
    first_id: usize,
    count: usize,
    concurrency: usize,
) -> Result<Vec<Member>> {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut done = Vec::with_capacity(count);
    let mut active: Vec<Member> = Vec::new();
    let mut started = 0;
    let mut stepper = Stepper::default();
    let mut events = Vec::new();
    while done.len() < count {
        while active.len() < concurrency && started < count {
            let mut member = Member::new(target, first_id + started).context("client socket")?;
            member.client.allocate(Instant::now())?;
            active.push(member);
            started += 1;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {count} allocations within {PHASE_LIMIT:?}",
                done.len()
            );
        }
        events.clear();
        stepper.step(&mut active, Duration::from_millis(20), &mut events)?;
        let mut finished: Vec<usize> = Vec::new();
        for (index, event) in events.drain(..) {
            match event {
                TurnClientEvent::Allocated { .. } => finished.push(index),
                TurnClientEvent::Failed { request, failure } => {
                    bail!("allocation refused: {request:?}: {failure}")
                }
                _ => {}
            }
        }
        finished.sort_unstable();
        for index in finished.into_iter().rev() {
            done.push(active.swap_remove(index));
        }
    }
    Ok(done)
}

/// Deallocates every member (up to `concurrency` in flight) and waits for the
/// answers; members that fail or time out are counted, not fatal.
pub fn deallocate_all(members: Vec<Member>, concurrency: usize) -> Result<usize> {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut waiting = members;
    let mut active: Vec<Member> = Vec::new();
    let mut failures = 0;
    let mut stepper = Stepper::default();
    let mut events = Vec::new();
    while !(waiting.is_empty() && active.is_empty()) && Instant::now() < deadline {
        while active.len() < concurrency {
            let Some(mut member) = waiting.pop() else {
                break;
            };
            member.client.close(Instant::now());
            active.push(member);
        }
        events.clear();
        stepper.step(&mut active, Duration::from_millis(20), &mut events)?;
        for (_, event) in events.drain(..) {
            if matches!(event, TurnClientEvent::Failed { .. }) {
                failures += 1;
            }
        }
        active.retain(|m| m.client.state() == AllocationState::Closing);
    }
    Ok(failures + waiting.len() + active.len())
}

/// Figures of one throughput run.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    /// Payload bytes per message.
    pub payload: usize,
    /// How long messages were sent.
    pub seconds: f64,
    /// Messages sent by all clients.
    pub sent: u64,
    /// Messages received while sending went on.
    pub received_in_time: u64,
    /// Messages received in all, drain included.
    pub received: u64,
    /// Datagrams that were neither the expected ChannelData nor STUN.
    pub unexpected: u64,
    /// The server's CPU time over the run, if its PID was given.
    pub server_cpu: Option<Duration>,
    /// The load generator's own CPU time over the run (all its threads).
    pub generator_cpu: Duration,
    /// Threads the generator's data phase ran on.
    pub generator_threads: usize,
}

impl Throughput {
    /// Relayed messages per second (received while sending).
    pub fn rate(&self) -> f64 {
        self.received_in_time as f64 / self.seconds
    }

    /// Lost share of the messages sent, in percent.
    pub fn loss_percent(&self) -> f64 {
        if self.sent == 0 {
            return 100.0;
        }
        100.0 * self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }

    /// Server CPU microseconds per relayed message.
    pub fn server_us_per_message(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.received > 0).then(|| cpu.as_secs_f64() * 1e6 / self.received as f64)
    }

    /// The load generator's CPU microseconds per relayed message. On loopback this
    /// includes the receive path of what it sends (softirq work runs in the sender's
    /// context), hence the kernel fast path's own cost when a server has one.
    pub fn generator_us_per_message(&self) -> Option<f64> {
        (self.received > 0).then(|| self.generator_cpu.as_secs_f64() * 1e6 / self.received as f64)
    }
}

/// Options of a throughput run.
#[derive(Clone, Copy, Debug)]
pub struct ThroughputOptions {
    /// Clients (even: they relay to each other in pairs).
    pub clients: usize,
    /// Payload bytes per message.
    pub payload: usize,
    /// How long to send.
    pub duration: Duration,
    /// Messages each client may have in flight; 0 sends as fast as the socket takes.
    pub window: u64,
    /// Stop after this many messages in all.
    pub max_messages: u64,
    /// Threads the client pairs are split over (at least 1, at most one per pair).
    pub generator_threads: usize,
}

/// What one generator thread sent and received.
#[derive(Clone, Copy, Debug, Default)]
struct Pumped {
    sent: u64,
    received: u64,
    received_in_time: u64,
    unexpected: u64,
    sending_stopped: Option<Instant>,
}

/// The data phase for one share of the clients (whole pairs: member 2k relays to
/// 2k + 1 and back), until `send_until` (or `max_messages`) and then [`DRAIN`].
fn pump(
    members: &mut [Member],
    datagrams: &[Vec<u8>],
    payload: &[u8],
    window: u64,
    started: Instant,
    send_until: Instant,
    max_messages: u64,
) -> Result<Pumped> {
    let clients = members.len();
    let partner = |i: usize| i ^ 1;
    let mut sent = vec![0u64; clients];
    let mut received = vec![0u64; clients];
    let mut presumed_lost = vec![0u64; clients];
    let mut last_delivery = vec![started; clients];
    let mut unexpected = 0u64;
    let mut batch = RecvBatch::new(RECV_BATCH);
    let mut pollfds: Vec<libc::pollfd> = members
        .iter()
        .map(|m| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&m.socket),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let window = if window == 0 { u64::MAX } else { window };
    let mut sending_stopped: Option<Instant> = None;
    let mut received_in_time = 0;
    let mut total_sent = 0u64;
    let mut next_tick = started;
    loop {
        let now = Instant::now();
        let sending = now < send_until && total_sent < max_messages;
        if !sending {
            let stopped = *sending_stopped.get_or_insert_with(|| {
                received_in_time = received.iter().sum();
                now
            });
            if now >= stopped + DRAIN {
                break;
            }
        }
        let mut progress = false;
        if sending {
            for i in 0..clients {
                let in_flight = sent[i].saturating_sub(received[partner(i)] + presumed_lost[i]);
                let room = window.saturating_sub(in_flight);
                if room == 0 {
                    if now.duration_since(last_delivery[partner(i)]) > STALL {
                        presumed_lost[i] += in_flight;
                        last_delivery[partner(i)] = now;
                    }
                    continue;
                }
                let count = usize::try_from(room.min(SEND_BATCH as u64)).unwrap_or(SEND_BATCH);
                let n = mmsg::send_copies(&members[i].socket, &datagrams[i], count)?;
                sent[i] += n as u64;
                total_sent += n as u64;
                progress |= n > 0;
            }
        }
        for i in 0..clients {
            loop {
                let n = batch.recv(&members[i].socket)?;
                for k in 0..n {
                    let datagram = batch.get(k);
                    if is_channel_data(datagram) {
                        match ChannelData::parse(datagram) {
                            Ok(cd) if cd.data == payload => received[i] += 1,
                            _ => unexpected += 1,
                        }
                    } else if Message::looks_like_stun(datagram) {
                        let server = members[i].client.server();
                        let _ = members[i]
                            .client
                            .handle_datagram(Instant::now(), server, datagram);
                    } else {
                        unexpected += 1;
                    }
                }
                if n > 0 {
                    last_delivery[i] = Instant::now();
                    progress = true;
                }
                if n < RECV_BATCH {
                    break;
                }
            }
        }
        if now >= next_tick {
            // Control-plane timers (refreshes) keep running during the data phase.
            for member in members.iter_mut() {
                member.tick(now)?;
            }
            next_tick = now + Duration::from_millis(100);
        }
        if !progress {
            mmsg::poll_readable(&mut pollfds, 1)?;
        }
    }
    Ok(Pumped {
        sent: sent.iter().sum(),
        received: received.iter().sum(),
        received_in_time,
        unexpected,
        sending_stopped,
    })
}

/// Client-to-client relaying: client 2k and 2k+1 allocate, each binds a channel to
/// the other's relayed address, and each sends ChannelData to the other through both
/// allocations (like `turnutils_uclient -y`): every message enters and leaves the
/// server twice. The pairs are split over `generator_threads` threads, each with its
/// own send/receive loop, so that the generator is not what limits a fast server.
pub fn throughput(target: &Target, options: ThroughputOptions) -> Result<Throughput> {
    let clients = options.clients.max(2) & !1;
    let mut members = allocate_many(target, 0, clients, clients)?;
    let relayed: Vec<SocketAddr> = members
        .iter()
        .map(|m| {
            m.client
                .relayed_address()
                .context("allocated without address")
        })
        .collect::<Result<_>>()?;
    let partner = |i: usize| i ^ 1;
    let now = Instant::now();
    for (i, member) in members.iter_mut().enumerate() {
        member.client.bind_channel(now, relayed[partner(i)])?;
    }
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut stepper = Stepper::default();
    let mut events = Vec::new();
    let mut bound = 0;
    while bound < clients {
        if Instant::now() > deadline {
            bail!("only {bound} of {clients} channels bound in time");
        }
        events.clear();
        stepper.step(&mut members, Duration::from_millis(20), &mut events)?;
        for (_, event) in events.drain(..) {
            match event {
                TurnClientEvent::ChannelBound { .. } => bound += 1,
                TurnClientEvent::Failed { request, failure } => {
                    bail!("{request:?} failed: {failure}")
                }
                _ => {}
            }
        }
    }
    let payload: Vec<u8> = (0..options.payload).map(|i| (i % 251) as u8).collect();
    let mut datagrams = Vec::with_capacity(clients);
    for (i, member) in members.iter_mut().enumerate() {
        let mut datagram = Vec::new();
        match member
            .client
            .encode_send(relayed[partner(i)], &payload, &mut datagram)?
        {
            Framing::ChannelData(_) => datagrams.push(datagram),
            Framing::SendIndication => bail!("channel not used after binding"),
        }
    }

    let threads = options.generator_threads.clamp(1, clients / 2);
    // Pairs stay together: thread t drives pairs t, t + threads, ... (as even-sized
    // contiguous chunks of whole pairs).
    let pairs = clients / 2;
    let server_cpu_before = target.pid.and_then(process_cpu);
    let generator_cpu_before = own_cpu();
    let started = Instant::now();
    let send_until = started + options.duration;
    let max_per_thread = options.max_messages / threads as u64;
    let mut outcomes: Vec<Result<Pumped>> = Vec::with_capacity(threads);
    std::thread::scope(|scope| {
        let mut rest: &mut [Member] = &mut members;
        let mut rest_datagrams: &[Vec<u8>] = &datagrams;
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let share = 2 * (pairs / threads + usize::from(t < pairs % threads));
            let (mine, others) = std::mem::take(&mut rest).split_at_mut(share);
            let (my_datagrams, other_datagrams) = rest_datagrams.split_at(share);
            rest = others;
            rest_datagrams = other_datagrams;
            let payload = payload.as_slice();
            handles.push(scope.spawn(move || {
                pump(
                    mine,
                    my_datagrams,
                    payload,
                    options.window,
                    started,
                    send_until,
                    max_per_thread,
                )
            }));
        }
        for handle in handles {
            outcomes.push(
                handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("generator thread panicked"))),
            );
        }
    });
    let mut total = Pumped::default();
    for outcome in outcomes {
        let pumped = outcome?;
        total.sent += pumped.sent;
        total.received += pumped.received;
        total.received_in_time += pumped.received_in_time;
        total.unexpected += pumped.unexpected;
        total.sending_stopped = total.sending_stopped.max(pumped.sending_stopped);
    }
    let seconds = total
        .sending_stopped
        .unwrap_or(send_until)
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-3);
    let server_cpu = cpu_used(target, server_cpu_before);
    let generator_cpu = own_cpu().saturating_sub(generator_cpu_before);
    let result = Throughput {
        payload: options.payload,
        seconds,
        sent: total.sent,
        received_in_time: total.received_in_time,
        received: total.received,
        unexpected: total.unexpected,
        server_cpu,
        generator_cpu,
        generator_threads: threads,
    };
    deallocate_all(members, clients)?;
    Ok(result)
}

/// A count over a time.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Operations that succeeded.
    pub count: u64,
    /// Operations that failed or got no answer.
    pub failures: u64,
    /// How long they took.
    pub seconds: f64,
    /// The server's CPU time meanwhile, if its PID was given.
    pub server_cpu: Option<Duration>,
}

impl Rate {
    /// Successes per second.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.seconds.max(1e-9)
    }

    /// Server CPU microseconds per success.
    pub fn server_us_each(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.count > 0).then(|| cpu.as_secs_f64() * 1e6 / self.count as f64)
    }
}

/// Allocation rate: `total` allocations, each deallocated right after it succeeds,
/// with up to `concurrency` clients at work at a time (each on a fresh socket).
pub fn allocations(target: &Target, total: usize, concurrency: usize) -> Result<Rate> {
    let cpu_before = target.pid.and_then(process_cpu);
    let started = Instant::now();
    let deadline = started + PHASE_LIMIT;
    let mut active: Vec<Member> = Vec::new();
    let mut launched = 0;
    let mut allocated = 0u64;
    let mut failures = 0u64;
    let mut stepper = Stepper::default();
    let mut events = Vec::new();
    while (launched < total || !active.is_empty()) && Instant::now() < deadline {
        while active.len() < concurrency && launched < total {
            let mut member = Member::new(target, 100_000 + launched).context("client socket")?;
            member.client.allocate(Instant::now())?;
            active.push(member);
            launched += 1;
        }
        events.clear();
        stepper.step(&mut active, Duration::from_millis(20), &mut events)?;
        for (index, event) in events.drain(..) {
            match event {
                TurnClientEvent::Allocated { .. } => {
                    allocated += 1;
                    if let Some(member) = active.get_mut(index) {
                        member.client.close(Instant::now());
                    }
                }
                TurnClientEvent::Failed { .. } => failures += 1,
                _ => {}
            }
        }
        active.retain(|m| {
            matches!(
                m.client.state(),
                AllocationState::Allocating | AllocationState::Closing
            )
        });
        // Closing members queued their Refresh in close(); the next step sends it.
    }
    failures += (total - launched) as u64 + active.len() as u64;
    Ok(Rate {
        count: allocated,
        failures,
        seconds: started.elapsed().as_secs_f64(),
        server_cpu: cpu_used(target, cpu_before),
    })
}

/// Binding rate: `sockets` sockets each keep `window` Binding requests in flight for
/// `duration` (or until `max` answers).
pub fn bindings(
    target: &Target,
    sockets: usize,
    window: u64,
    duration: Duration,
    max: u64,
) -> Result<Rate> {
    let mut endpoints = Vec::with_capacity(sockets);
    for i in 0..sockets.max(1) {
        let socket = UdpSocket::bind(super::fleet::fresh_local_addr(target.server))?;
        socket.connect(target.server)?;
        socket.set_nonblocking(true)?;
        let mut tid = [0u8; 12];
        tid[0] = u8::try_from(i % 256).unwrap_or(0);
        tid[1..5].copy_from_slice(b"load");
        let mut request = Vec::new();
        binding::binding_request(tid, &mut request);
        endpoints.push((socket, request, tid));
    }
    let mut sent = vec![0u64; endpoints.len()];
    let mut answered = vec![0u64; endpoints.len()];
    let mut presumed_lost = vec![0u64; endpoints.len()];
    let mut last_answer = vec![Instant::now(); endpoints.len()];
    let mut batch = RecvBatch::new(RECV_BATCH);
    let mut pollfds: Vec<libc::pollfd> = endpoints
        .iter()
        .map(|(s, _, _)| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let cpu_before = target.pid.and_then(process_cpu);
    let started = Instant::now();
    let until = started + duration;
    let mut total = 0u64;
    while Instant::now() < until && total < max {
        let now = Instant::now();
        let mut progress = false;
        for (i, (socket, request, tid)) in endpoints.iter().enumerate() {
            let in_flight = sent[i].saturating_sub(answered[i] + presumed_lost[i]);
            let room = window.saturating_sub(in_flight);
            if room == 0 {
                if now.duration_since(last_answer[i]) > STALL {
                    presumed_lost[i] += in_flight;
                    last_answer[i] = now;
                }
            } else {
                let count = usize::try_from(room.min(SEND_BATCH as u64)).unwrap_or(SEND_BATCH);
                let n = mmsg::send_copies(socket, request, count)?;
                sent[i] += n as u64;
                progress |= n > 0;
            }
            loop {
                let n = batch.recv(socket)?;
                for k in 0..n {
                    if is_binding_success(batch.get(k), *tid) {
                        answered[i] += 1;
                        total += 1;
                    }
                }
                if n > 0 {
                    last_answer[i] = Instant::now();
                    progress = true;
                }
                if n < RECV_BATCH {
                    break;
                }
            }
        }
        if !progress {
            mmsg::poll_readable(&mut pollfds, 1)?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let sent_total: u64 = sent.iter().sum();
    Ok(Rate {
        count: total,
        failures: sent_total.saturating_sub(total),
        seconds,
        server_cpu: cpu_used(target, cpu_before),
    })
}

fn is_binding_success(datagram: &[u8], tid: [u8; 12]) -> bool {
    Message::parse(datagram).is_ok_and(|m| {
        let ty = m.message_type();
        ty.class == Class::Success && ty.method == stun_method::BINDING && m.transaction_id() == tid
    })
}

/// Memory held per allocation.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// Allocations held when measured.
    pub allocations: usize,
    /// Server RSS before, KiB.
    pub rss_before_kib: u64,
    /// Server RSS with them held, KiB.
    pub rss_after_kib: u64,
}

impl Memory {
    /// RSS growth per allocation, bytes.
    pub fn bytes_per_allocation(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 * 1024.0
            / self.allocations.max(1) as f64
    }
}

/// Holds `count` allocations at once and measures the server's RSS growth, then
/// releases them.
pub fn memory(target: &Target, count: usize, concurrency: usize) -> Result<Memory> {
    let pid = target
        .pid
        .context("memory per allocation needs the server's PID")?;
    let rss_before_kib = rss_kib(pid).context("reading the server's VmRSS")?;
    let members = allocate_many(target, 200_000, count, concurrency)?;
    // Let the server finish any deferred work before reading its RSS.
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_kib = rss_kib(pid).context("reading the server's VmRSS")?;
    let failures = deallocate_all(members, concurrency)?;
    if failures > 0 {
        eprintln!("bench-relay: {failures} deallocations got no answer");
    }
    Ok(Memory {
        allocations: count,
        rss_before_kib,
        rss_after_kib,
    })
}
