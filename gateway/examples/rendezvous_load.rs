//! Load generator for a running `gateway serve`: registers N peers over real UDP
//! sockets on loopback (one socket per peer, spread over 127.77.0.0/16 source
//! addresses), then alternates timed phases of STUN Binding requests (the baseline)
//! and Connect requests (each one an introduction), with a bounded window of
//! requests outstanding. Reports requests answered per second, the server's CPU per
//! request (from /proc/PID/stat) and its RSS before and after registering.
//!
//! `cargo xtask bench-rendezvous` builds this in release mode, starts the server and
//! runs it; see docs/benchmarks.md. It is an example rather than part of xtask so it
//! is compiled with optimisations (xtask itself runs as a debug build).
//!
//! Usage: `rendezvous_load --server 127.0.0.1:PORT --server-pid PID --secret-file FILE
//! [--peers 16000] [--seconds 5] [--rounds 2] [--window 256] [--sign-each]`
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use gateway::proto::{
    binding::binding_request,
    credentials::SharedSecret,
    rendezvous::{
        NatClass,
        client::{self, PeerCredentials},
        method,
    },
    stun::{self, Class, Message, MessageType},
};

/// Options.
#[derive(Debug, Parser)]
struct Args {
    /// The gateway's UDP service address (loopback).
    #[arg(long)]
    server: SocketAddr,
    /// The gateway's process id, for its CPU time and RSS.
    #[arg(long)]
    server_pid: u32,
    /// The gateway's shared-secret file (to issue peer credentials).
    #[arg(long)]
    secret_file: PathBuf,
    /// Peers to register, one UDP socket each.
    #[arg(long, default_value_t = 16_000)]
    peers: usize,
    /// Seconds per timed phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of (Binding phase, Connect phase).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Requests outstanding at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Behave like a real client in the Connect phase: sign every Connect afresh with
    /// the newest nonce and verify every answer and introduction (HMAC-SHA256). By
    /// default Connects are signed before the phase (the nonce stays valid 600 s) and
    /// answers are classified by their header, to leave the CPU to the server.
    #[arg(long)]
    sign_each: bool,
    /// Poll the sockets without sleeping (the generator then uses a whole core, and
    /// the server's sends no longer have to wake it).
    #[arg(long)]
    busy_poll: bool,
}

/// Seconds a request may stay unanswered before it counts as lost.
const LOST_AFTER: Duration = Duration::from_millis(300);
/// Datagrams read per recvmmsg.
const RECV_BATCH: usize = 8;
/// Bytes per receive buffer (the gateway's answers stay far below).
const RECV_BUFFER: usize = 1_500;
/// Peers per source address.
const PEERS_PER_ADDRESS: usize = 200;

/// One simulated peer.
struct Peer {
    socket: UdpSocket,
    credentials: PeerCredentials,
    target: String,
    nonce: Option<String>,
    /// What it waits for, and since when.
    in_flight: Option<Instant>,
    registered: bool,
    /// Pre-built request of the current phase.
    request: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Register,
    Binding,
    Connect,
}

#[derive(Default, Debug)]
struct Counts {
    sent: u64,
    answered: u64,
    introductions_received: u64,
    errors: BTreeMap<u16, u64>,
    lost: u64,
    unexpected: u64,
}

struct Load {
    peers: Vec<Peer>,
    epoll: i32,
    next: usize,
    outstanding: usize,
    window: usize,
    sign_each: bool,
    /// epoll_wait timeout while waiting for answers (0 with --busy-poll).
    wait_ms: i32,
    buffers: Vec<[u8; RECV_BUFFER]>,
    tid_counter: u64,
    registered: usize,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    fields.iter().sum::<u64>() as f64 / ticks
}

/// Resident set size of a process, MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            limit.rlim_max = limit.rlim_max.max(wanted);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                eprintln!("cannot raise the open-file limit to {wanted}; fewer peers may fit");
            }
        }
    }
}

impl Load {
    fn new(args: &Args) -> std::io::Result<Self> {
        raise_fd_limit(args.peers as u64 + 256);
        let secret = std::fs::read(&args.secret_file)?;
        let secret = SharedSecret::new(&secret);
        // SAFETY: epoll_create1 has no preconditions.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let expiry = unix_now() + 3_600;
        let mut peers = Vec::with_capacity(args.peers);
        for i in 0..args.peers {
            let block = i / PEERS_PER_ADDRESS;
            let source = Ipv4Addr::new(127, 77, (block >> 8) as u8, (block & 0xff) as u8 + 1);
            let socket = UdpSocket::bind((source, 0))?;
            socket.connect(args.server)?;
            socket.set_nonblocking(true)?;
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are valid; the event lives across the call.
            if unsafe {
                libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, socket.as_raw_fd(), &mut event)
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let issued = secret
                .issue(&format!("load-{i}"), expiry)
                .map_err(std::io::Error::other)?;
            peers.push(Peer {
                socket,
                credentials: PeerCredentials {
                    username: issued.username,
                    password: issued.password,
                },
                target: format!("load-{}", (i + 1) % args.peers),
                nonce: None,
                in_flight: None,
                registered: false,
                request: Vec::new(),
            });
        }
        Ok(Self {
            peers,
            epoll,
            next: 0,
            outstanding: 0,
            window: args.window,
            sign_each: args.sign_each,
            wait_ms: if args.busy_poll { 0 } else { 1 },
            buffers: vec![[0; RECV_BUFFER]; RECV_BATCH],
            tid_counter: 0,
            registered: 0,
        })
    }

    fn tid(&mut self) -> [u8; 12] {
        self.tid_counter += 1;
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.tid_counter.to_be_bytes());
        tid[8..].copy_from_slice(b"load");
        tid
    }

    /// The request peer `i` sends next in `phase`.
    fn build(&mut self, i: usize, phase: Phase) {
        let tid = self.tid();
        let Some(peer) = self.peers.get_mut(i) else {
            return;
        };
        match phase {
            Phase::Register => {
                peer.request = client::register(
                    tid,
                    &peer.credentials,
                    peer.nonce.as_deref(),
                    &[],
                    NatClass::EndpointIndependent,
                    1,
                );
            }
            Phase::Binding => binding_request(tid, &mut peer.request),
            Phase::Connect => {
                peer.request =
                    client::connect(tid, &peer.credentials, peer.nonce.as_deref(), &peer.target);
            }
        }
    }

    fn send(&mut self, i: usize, now: Instant, counts: &mut Counts) {
        let Some(peer) = self.peers.get_mut(i) else {
            return;
        };
        match peer.socket.send(&peer.request) {
            Ok(_) => {
                peer.in_flight = Some(now);
                self.outstanding += 1;
                counts.sent += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => eprintln!("send from peer {i}: {e}"),
        }
    }

    /// Fills the window from peers in turn (those with nothing outstanding and,
    /// when registering, not yet registered).
    fn fill(&mut self, phase: Phase, now: Instant, counts: &mut Counts) {
        let n = self.peers.len();
        let mut skipped = 0;
        while self.outstanding < self.window && skipped < n {
            let i = self.next;
            self.next = (self.next + 1) % n;
            let eligible = self.peers.get(i).is_some_and(|p| {
                p.in_flight.is_none() && (phase != Phase::Register || !p.registered)
            });
            if !eligible {
                skipped += 1;
                continue;
            }
            if phase == Phase::Register || (phase == Phase::Connect && self.sign_each) {
                self.build(i, phase);
            }
            self.send(i, now, counts);
        }
    }

    /// Requests unanswered for too long free their slot and count as lost.
    fn expire(&mut self, now: Instant, counts: &mut Counts) {
        for peer in &mut self.peers {
            if peer
                .in_flight
                .is_some_and(|since| now.duration_since(since) > LOST_AFTER)
            {
                peer.in_flight = None;
                self.outstanding -= 1;
                counts.lost += 1;
            }
        }
    }

    /// Waits up to `timeout` for answers and handles every datagram that arrived.
    fn poll(&mut self, phase: Phase, timeout_ms: i32, counts: &mut Counts) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 512];
        // SAFETY: the buffer is valid for `events.len()` entries.
        let ready = unsafe {
            libc::epoll_wait(
                self.epoll,
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        for event in events.iter().take(ready.max(0) as usize) {
            let i = event.u64 as usize;
            let Some(fd) = self.peers.get(i).map(|p| p.socket.as_raw_fd()) else {
                continue;
            };
            let lengths = self.receive(fd);
            let buffers = std::mem::take(&mut self.buffers);
            for (buffer, len) in buffers.iter().zip(lengths) {
                let Some(datagram) = len.and_then(|len| buffer.get(..len)) else {
                    break;
                };
                self.handle(i, phase, datagram, counts);
            }
            self.buffers = buffers;
        }
    }

    /// One recvmmsg on `fd`: the length of each datagram read.
    fn receive(&mut self, fd: i32) -> [Option<usize>; RECV_BATCH] {
        let mut iovecs: Vec<libc::iovec> = self
            .buffers
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid empty header.
        let mut headers: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
        for (header, iovec) in headers.iter_mut().zip(iovecs.iter_mut()) {
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one live iovec over a live buffer.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                RECV_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let mut lengths = [None; RECV_BATCH];
        for (length, header) in lengths
            .iter_mut()
            .zip(headers.iter())
            .take(got.max(0) as usize)
        {
            *length = Some(header.msg_len as usize);
        }
        lengths
    }

    fn handle(&mut self, i: usize, phase: Phase, datagram: &[u8], counts: &mut Counts) {
        let Some(bits) = datagram.get(..2) else {
            counts.unexpected += 1;
            return;
        };
        let ty = MessageType::from_bits(u16::from_be_bytes([bits[0], bits[1]]));
        let verify = phase == Phase::Register || self.sign_each;
        let Some(peer) = self.peers.get_mut(i) else {
            return;
        };
        if ty.method == method::INTRODUCTION && ty.class == Class::Indication {
            if verify && client::parse_introduction(datagram, &peer.credentials.password).is_none()
            {
                counts.unexpected += 1;
                return;
            }
            counts.introductions_received += 1;
            return;
        }
        if peer.in_flight.is_none() {
            // Late answer to a request already counted as lost.
            counts.unexpected += 1;
            return;
        }
        let result = match phase {
            Phase::Binding => match ty.class {
                Class::Success if ty.method == stun::method::BINDING => Ok(()),
                _ => Err(error_code(datagram)),
            },
            Phase::Register | Phase::Connect if verify => {
                match client::parse_response(datagram, &peer.credentials.password) {
                    Some(response) => {
                        if response.nonce.is_some() {
                            peer.nonce = response.nonce;
                        }
                        match response.result {
                            Ok(()) if phase == Phase::Connect && response.intro_id.is_none() => {
                                Err(0)
                            }
                            other => other,
                        }
                    }
                    None => Err(0),
                }
            }
            Phase::Register | Phase::Connect => match ty.class {
                Class::Success if ty.method == method::CONNECT => Ok(()),
                _ => Err(error_code(datagram)),
            },
        };
        peer.in_flight = None;
        self.outstanding -= 1;
        match result {
            Ok(()) => {
                if phase == Phase::Register && !peer.registered {
                    peer.registered = true;
                    self.registered += 1;
                }
                counts.answered += 1;
            }
            Err(code) => *counts.errors.entry(code).or_default() += 1,
        }
    }

    /// Runs `phase` until `duration` passes (or, registering, until every peer is).
    fn run(&mut self, phase: Phase, duration: Duration) -> (Counts, Duration) {
        let mut counts = Counts::default();
        if !self.sign_each || phase != Phase::Connect {
            for i in 0..self.peers.len() {
                if phase != Phase::Register {
                    self.build(i, phase);
                }
            }
        }
        let started = Instant::now();
        let end = started + duration;
        let mut next_expiry = started + LOST_AFTER;
        loop {
            let now = Instant::now();
            if now >= end || (phase == Phase::Register && self.registered == self.peers.len()) {
                break;
            }
            self.fill(phase, now, &mut counts);
            self.poll(phase, self.wait_ms, &mut counts);
            if now >= next_expiry {
                self.expire(now, &mut counts);
                next_expiry = now + LOST_AFTER / 2;
            }
        }
        let elapsed = started.elapsed();
        // Drain what is still on its way so the next phase starts clean.
        let drain_end = Instant::now() + LOST_AFTER;
        let mut ignored = Counts::default();
        while self.outstanding > 0 && Instant::now() < drain_end {
            self.poll(phase, 1, &mut ignored);
        }
        for _ in 0..3 {
            self.poll(phase, 5, &mut ignored);
        }
        for peer in &mut self.peers {
            peer.in_flight = None;
        }
        self.outstanding = 0;
        (counts, elapsed)
    }
}

fn error_code(datagram: &[u8]) -> u16 {
    Message::parse(datagram)
        .ok()
        .and_then(|m| {
            m.attributes()
                .filter_map(Result::ok)
                .find(|a| a.ty == stun::attr::ERROR_CODE)
                .and_then(|a| {
                    Some(u16::from(*a.value.get(2)? & 7) * 100 + u16::from(*a.value.get(3)?))
                })
        })
        .unwrap_or(0)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let pid = args.server_pid.to_string();
    let own = std::process::id().to_string();
    let mut load = Load::new(&args)?;
    let rss_before = rss_mib(args.server_pid);

    // Registration: first contact (401 with a nonce), then Register with the nonce.
    let started = Instant::now();
    let cpu_before = cpu_seconds(&pid);
    let mut register_sent = 0;
    let mut registered = 0;
    let mut register_errors: BTreeMap<u16, u64> = BTreeMap::new();
    for _ in 0..6 {
        let (counts, _) = load.run(Phase::Register, Duration::from_secs(30));
        register_sent += counts.sent;
        registered += counts.answered;
        for (code, n) in counts.errors {
            *register_errors.entry(code).or_default() += n;
        }
        if load.registered == load.peers.len() {
            break;
        }
    }
    let register_elapsed = started.elapsed();
    let register_cpu = cpu_seconds(&pid) - cpu_before;
    let rss_after = rss_mib(args.server_pid);
    let peers = load.peers.len();
    let missing = load.peers.iter().filter(|p| !p.registered).count();
    println!(
        "registered {registered}/{peers} peers in {:.2} s ({:.0} peers/s, two requests each: {register_sent} sent, \
         answers other than success: {register_errors:?}); server CPU {:.1} µs per registration",
        register_elapsed.as_secs_f64(),
        registered as f64 / register_elapsed.as_secs_f64(),
        register_cpu * 1e6 / registered.max(1) as f64,
    );
    println!(
        "server RSS {rss_before:.1} MiB before registering, {rss_after:.1} MiB after ({:.0} bytes per peer)",
        (rss_after - rss_before) * 1024.0 * 1024.0 / peers.max(1) as f64
    );
    if missing > 0 {
        return Err(std::io::Error::other(format!(
            "{missing} peers could not register"
        )));
    }

    println!();
    println!(
        "| round | phase | answered/s | server CPU µs per answer | generator CPU µs per answer | sent | answered | errors | lost | introductions received |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let duration = Duration::from_secs(args.seconds);
    let mut summary: Vec<(Phase, f64, f64)> = Vec::new();
    for round in 1..=args.rounds {
        for phase in [Phase::Binding, Phase::Connect] {
            let server_before = cpu_seconds(&pid);
            let own_before = cpu_seconds(&own);
            let (counts, elapsed) = load.run(phase, duration);
            let server_cpu = cpu_seconds(&pid) - server_before;
            let own_cpu = cpu_seconds(&own) - own_before;
            let rate = counts.answered as f64 / elapsed.as_secs_f64();
            let per = |cpu: f64| cpu * 1e6 / counts.answered.max(1) as f64;
            println!(
                "| {round} | {} | {rate:.0} | {:.1} | {:.1} | {} | {} | {:?} | {} | {} |",
                match phase {
                    Phase::Binding => "Binding (baseline)",
                    _ => "Connect (introduction)",
                },
                per(server_cpu),
                per(own_cpu),
                counts.sent,
                counts.answered,
                counts.errors,
                counts.lost,
                counts.introductions_received,
            );
            summary.push((phase, rate, per(server_cpu)));
        }
    }
    let best = |phase: Phase| {
        summary
            .iter()
            .filter(|(p, _, _)| *p == phase)
            .map(|&(_, rate, cpu)| (rate, cpu))
            .fold((0.0f64, f64::MAX), |(r, c), (rate, cpu)| {
                (r.max(rate), c.min(cpu))
            })
    };
    let (binding_rate, binding_cpu) = best(Phase::Binding);
    let (connect_rate, connect_cpu) = best(Phase::Connect);
    println!();
    println!(
        "best of {} rounds: Binding {binding_rate:.0}/s, introductions {connect_rate:.0}/s \
         (Binding/introduction ratio {:.2}); server CPU per answer {binding_cpu:.1} µs vs {connect_cpu:.1} µs \
         ({:.1}x)",
        args.rounds,
        binding_rate / connect_rate.max(1.0),
        connect_cpu / binding_cpu.max(f64::MIN_POSITIVE),
    );
    Ok(())
}
