//! Load generator for a running `gateway serve`: registers N peers over UDP on
//! loopback (each its own source address in 127.77.0.0/16, all sharing one socket:
//! requests leave with sendmmsg and IP_PKTINFO picking each peer's source address,
//! answers come back with recvmmsg, their destination address naming the peer),
//! then alternates timed phases of STUN Binding requests (the baseline) and Connect
//! requests (each one an introduction), with a bounded window of requests
//! outstanding. Reports requests answered per second, the server's CPU per request
//! (from /proc/PID/stat) and its RSS before and after registering.
//!
//! Several nodes of a cluster (`--server` and `--server-pid` repeated): peer *i*
//! registers with node *i* mod *n* and sends everything there, and each peer's
//! Connect target is the next peer registered on *another* node (every introduction
//! crosses nodes). With `--redis-port` the Redis command counts (`INFO
//! commandstats`) are read before and after each Connect phase and reported per
//! introduction; per-process CPU covers every node, Redis and the generator.
//!
//! `cargo xtask bench-rendezvous` builds this in release mode, starts the server(s)
//! and runs it; see docs/benchmarks.md. It is an example rather than part of xtask so
//! it is compiled with optimisations (xtask itself runs as a debug build).
//!
//! Usage: `rendezvous_load --server 127.0.0.1:PORT --server-pid PID --secret-file FILE
//! [--server ADDR2 --server-pid PID2 ...] [--redis-port PORT --redis-pid PID]
//! [--peers 16000] [--seconds 5] [--rounds 2] [--window 256] [--sign-each]
//! [--summary FILE]`
use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use gateway::proto::{
    binding::binding_request,
    credentials::SharedSecret,
    rendezvous::{
        client::{self, PeerCredentials},
        wire::{NatClass, method},
    },
    stun::{self, Class, Message, MessageType},
};

/// Options.
#[derive(Debug, Parser)]
struct Args {
    /// The gateway's UDP service address (loopback). Repeated for the nodes of a
    /// cluster: peer i talks to the (i mod n)-th only.
    #[arg(long, required = true)]
    server: Vec<SocketAddr>,
    /// The gateway's process id, for its CPU time and RSS (one per --server).
    #[arg(long, required = true)]
    server_pid: Vec<u32>,
    /// The cluster's Redis (127.0.0.1:PORT): its command counts per introduction.
    #[arg(long)]
    redis_port: Option<u16>,
    /// The Redis server's process id, for its CPU time.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Append one `key=value` line per measured figure to this file (for xtask).
    #[arg(long)]
    summary: Option<PathBuf>,
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
/// Datagrams read per recvmmsg, and requests sent per sendmmsg.
const BATCH: usize = 64;
/// Bytes per receive buffer (the gateway's answers stay far below).
const RECV_BUFFER: usize = 1_500;
/// Peers per /24 of source addresses (host parts 1..=250).
const PEERS_PER_BLOCK: usize = 250;
/// Most peers the 127.77.0.0/16 addresses hold, one address each.
const MAX_PEERS: usize = 256 * PEERS_PER_BLOCK;
/// Receive and send buffer asked of the kernel (a full window of answers and
/// introductions, five datagrams per Connect, must fit).
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Control-message space per datagram (one `in_pktinfo`), in u64s for alignment.
const CMSG_WORDS: usize = 8;

/// Source address of peer `i`: 127.77.(i / 250).(i % 250 + 1).
fn peer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        77,
        (i / PEERS_PER_BLOCK) as u8,
        (i % PEERS_PER_BLOCK) as u8 + 1,
    )
}

/// The peer whose address `ip` is, if any.
fn peer_index(ip: Ipv4Addr) -> Option<usize> {
    match ip.octets() {
        [127, 77, block, host @ 1..=250] => {
            Some(usize::from(block) * PEERS_PER_BLOCK + usize::from(host) - 1)
        }
        _ => None,
    }
}

fn sockaddr_v4(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One simulated peer. Peers share one socket; each is its own source address.
struct Peer {
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
    /// Answered while draining after the phase (not in `answered` nor the rate; for
    /// a Connect, still an introduction made).
    answered_late: u64,
}

/// Buffers of one recvmmsg: datagrams, their sources and control messages.
struct RecvBatch {
    buffers: Vec<[u8; RECV_BUFFER]>,
    sources: Vec<libc::sockaddr_in>,
    control: Vec<[u64; CMSG_WORDS]>,
}

struct Load {
    peers: Vec<Peer>,
    /// The one socket all peers share: bound to 0.0.0.0:PORT, so every peer address
    /// 127.77.x.y:PORT arrives here; sends pick their source with IP_PKTINFO.
    socket: UdpSocket,
    /// The nodes: peer i talks to `servers[i % servers.len()]`.
    servers: Vec<libc::sockaddr_in>,
    next: usize,
    outstanding: usize,
    window: usize,
    sign_each: bool,
    busy_poll: bool,
    receive: RecvBatch,
    /// Peers whose request goes out in the next sendmmsg.
    to_send: Vec<usize>,
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

/// Sets an integer socket option.
fn set_option(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: the option value is a live i32 of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The peer that peer `i` connects to: the next one, or with several nodes the
/// next one registered on another node than `i`'s.
fn target_of(i: usize, peers: usize, nodes: usize) -> usize {
    let next = (i + 1) % peers.max(1);
    if nodes < 2 {
        return next;
    }
    (1..peers)
        .map(|k| (i + k) % peers)
        .find(|j| j % nodes != i % nodes)
        .unwrap_or(next)
}

impl Load {
    fn new(args: &Args) -> std::io::Result<Self> {
        let servers = args
            .server
            .iter()
            .map(|server| match server {
                SocketAddr::V4(server) => Ok(sockaddr_v4(*server)),
                SocketAddr::V6(_) => Err(std::io::Error::other("server addresses must be IPv4")),
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        if args.peers > MAX_PEERS {
            return Err(std::io::Error::other(format!(
                "at most {MAX_PEERS} peers (one 127.77.x.y address each)"
            )));
        }
        let secret = std::fs::read(&args.secret_file)?;
        let secret = SharedSecret::new(&secret);
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let fd = socket.as_raw_fd();
        // Best effort: the kernel caps these at net.core.{r,w}mem_max.
        let buffer = SOCKET_BUFFER_BYTES as i32;
        let _ = set_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, buffer);
        let _ = set_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, buffer);
        // Each datagram's destination address says which peer it is for.
        set_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        // A blocking receive waits at most this long (then expiry and refills run).
        socket.set_read_timeout(Some(Duration::from_millis(1)))?;
        let expiry = unix_now() + 3_600;
        let mut peers = Vec::with_capacity(args.peers);
        for i in 0..args.peers {
            let issued = secret
                .issue(&format!("load-{i}"), expiry)
                .map_err(std::io::Error::other)?;
            peers.push(Peer {
                credentials: PeerCredentials {
                    username: issued.username,
                    password: issued.password,
                },
                target: format!("load-{}", target_of(i, args.peers, servers.len())),
                nonce: None,
                in_flight: None,
                registered: false,
                request: Vec::new(),
            });
        }
        Ok(Self {
            peers,
            socket,
            servers,
            next: 0,
            outstanding: 0,
            window: args.window,
            sign_each: args.sign_each,
            busy_poll: args.busy_poll,
            receive: RecvBatch {
                buffers: vec![[0; RECV_BUFFER]; BATCH],
                sources: vec![sockaddr_v4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
                control: vec![[0; CMSG_WORDS]; BATCH],
            },
            to_send: Vec::with_capacity(BATCH),
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

    /// Sends the queued peers' requests with one sendmmsg (each from its peer's
    /// address). Peers whose request did not go out are free again. False when
    /// the socket would block.
    fn flush(&mut self, counts: &mut Counts) -> bool {
        if self.to_send.is_empty() {
            return true;
        }
        let mut control = [[0u64; CMSG_WORDS]; BATCH];
        // SAFETY: all-zero iovecs and headers are valid empty values.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32),
                libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32),
            )
        };
        let count = self.to_send.len();
        for (((&i, iovec), header), control) in self
            .to_send
            .iter()
            .zip(iovecs.iter_mut())
            .zip(headers.iter_mut())
            .zip(control.iter_mut())
        {
            let Some(peer) = self.peers.get(i) else {
                continue;
            };
            *iovec = libc::iovec {
                iov_base: peer.request.as_ptr().cast_mut().cast(),
                iov_len: peer.request.len(),
            };
            let Some(server) = self.servers.get(i % self.servers.len()) else {
                continue;
            };
            let msg = &mut header.msg_hdr;
            // sendmmsg only reads the destination.
            msg.msg_name = (&raw const *server).cast_mut().cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = iovec;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as usize;
            // SAFETY: the control buffer is aligned and holds CMSG_SPACE(in_pktinfo).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(msg);
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = len as usize;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(peer_ip(i)).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
        }
        // SAFETY: every header points at live buffers set up above.
        let sent = unsafe {
            libc::sendmmsg(
                self.socket.as_raw_fd(),
                headers.as_mut_ptr(),
                count as u32,
                libc::MSG_DONTWAIT,
            )
        };
        let sent = if sent < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                eprintln!("sendmmsg: {e}");
            }
            0
        } else {
            sent as usize
        };
        counts.sent += sent as u64;
        for &i in self.to_send.get(sent..).unwrap_or_default() {
            if let Some(peer) = self.peers.get_mut(i) {
                peer.in_flight = None;
                self.outstanding -= 1;
            }
        }
        self.to_send.clear();
        sent == count
    }

    /// Fills the window from peers in turn (those with nothing outstanding and,
    /// when registering, not yet registered), BATCH requests per system call.
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
            if let Some(peer) = self.peers.get_mut(i) {
                peer.in_flight = Some(now);
                self.outstanding += 1;
                self.to_send.push(i);
            }
            if self.to_send.len() == BATCH && !self.flush(counts) {
                return;
            }
        }
        self.flush(counts);
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

    /// Reads up to BATCH datagrams with one recvmmsg (waiting up to 1 ms for the
    /// first when `wait`, unless busy-polling) and handles them.
    fn poll(&mut self, phase: Phase, wait: bool, counts: &mut Counts) {
        let mut batch = std::mem::replace(
            &mut self.receive,
            RecvBatch {
                buffers: Vec::new(),
                sources: Vec::new(),
                control: Vec::new(),
            },
        );
        // SAFETY: all-zero iovecs and headers are valid empty values.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for ((((buffer, source), control), iovec), header) in batch
            .buffers
            .iter_mut()
            .zip(batch.sources.iter_mut())
            .zip(batch.control.iter_mut())
            .zip(iovecs.iter_mut())
            .zip(headers.iter_mut())
        {
            *iovec = libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            };
            let msg = &mut header.msg_hdr;
            msg.msg_name = (source as *mut libc::sockaddr_in).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = iovec;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(control);
        }
        let flags = if wait && !self.busy_poll {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        // SAFETY: every header points at live buffers set up above.
        let got = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        for ((header, buffer), source) in headers
            .iter()
            .zip(batch.buffers.iter())
            .zip(batch.sources.iter())
            .take(got.max(0) as usize)
        {
            let from_server = self.servers.iter().any(|server| {
                source.sin_port == server.sin_port
                    && source.sin_addr.s_addr == server.sin_addr.s_addr
            });
            let peer = destination(&header.msg_hdr).and_then(peer_index);
            match (from_server, peer, buffer.get(..header.msg_len as usize)) {
                (true, Some(i), Some(datagram)) if i < self.peers.len() => {
                    self.handle(i, phase, datagram, counts);
                }
                _ => counts.unexpected += 1,
            }
        }
        self.receive = batch;
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
            self.poll(phase, true, &mut counts);
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
            self.poll(phase, true, &mut ignored);
        }
        let quiet_end = Instant::now() + Duration::from_millis(15);
        while Instant::now() < quiet_end {
            self.poll(phase, true, &mut ignored);
        }
        counts.answered_late = ignored.answered;
        for peer in &mut self.peers {
            peer.in_flight = None;
        }
        self.outstanding = 0;
        (counts, elapsed)
    }
}

/// The destination address of a received datagram (its IP_PKTINFO).
fn destination(msg: &libc::msghdr) -> Option<Ipv4Addr> {
    // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG macros stay
    // within them and the payload is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
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

/// Calls per command (`cmdstat_<name>:calls=N,...`) from `redis-cli INFO
/// commandstats`; empty when Redis cannot be asked.
fn commandstats(port: u16) -> BTreeMap<String, u64> {
    let Ok(output) = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
    else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Lines of `key=value` figures for xtask (nothing without `--summary`).
struct Summary(Option<std::fs::File>);

impl Summary {
    fn line(&mut self, text: &str) {
        if let Some(file) = &mut self.0
            && let Err(e) = writeln!(file, "{text}")
        {
            eprintln!("summary: {e}");
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Register => "register",
        Phase::Binding => "binding",
        Phase::Connect => "connect",
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    if args.server.len() != args.server_pid.len() {
        return Err(std::io::Error::other(
            "give one --server-pid per --server, in the same order",
        ));
    }
    let nodes = args.server.len();
    let server_pids: Vec<String> = args.server_pid.iter().map(u32::to_string).collect();
    let own = std::process::id().to_string();
    // Every process whose CPU is reported, by label.
    let mut processes: Vec<(String, String)> = server_pids
        .iter()
        .enumerate()
        .map(|(k, pid)| {
            let label = if nodes == 1 {
                "gateway".to_owned()
            } else {
                format!("node-{}", k + 1)
            };
            (label, pid.clone())
        })
        .collect();
    if let Some(pid) = args.redis_pid {
        processes.push(("redis".into(), pid.to_string()));
    }
    processes.push(("generator".into(), own.clone()));
    let servers_cpu = || server_pids.iter().map(|p| cpu_seconds(p)).sum::<f64>();
    let servers_rss = || args.server_pid.iter().map(|&p| rss_mib(p)).sum::<f64>();
    let mut summary = Summary(match &args.summary {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => None,
    });
    let mut load = Load::new(&args)?;
    let rss_before = servers_rss();

    // Registration: first contact (401 with a nonce), then Register with the nonce.
    let started = Instant::now();
    let cpu_before = servers_cpu();
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
    let register_cpu = servers_cpu() - cpu_before;
    let rss_after = servers_rss();
    let peers = load.peers.len();
    let missing = load.peers.iter().filter(|p| !p.registered).count();
    if nodes > 1 {
        println!(
            "{nodes} nodes: peer i registers with node (i mod {nodes}) + 1 and connects to the \
             next peer registered on another node (every introduction crosses nodes); server \
             figures are the nodes' sums"
        );
    }
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
    let mut summary_rows: Vec<(Phase, f64, f64)> = Vec::new();
    // Per phase: (round, phase, each process's share of one core).
    let mut utilisation: Vec<(usize, Phase, Vec<f64>)> = Vec::new();
    // Per Connect phase: (round, introductions, Redis calls by command).
    let mut redis_calls: Vec<(usize, u64, BTreeMap<String, u64>)> = Vec::new();
    for round in 1..=args.rounds {
        for phase in [Phase::Binding, Phase::Connect] {
            let stats_before = match (phase, args.redis_port) {
                (Phase::Connect, Some(port)) => Some(commandstats(port)),
                _ => None,
            };
            let cpu_before: Vec<f64> = processes.iter().map(|(_, p)| cpu_seconds(p)).collect();
            let server_before = servers_cpu();
            let own_before = cpu_seconds(&own);
            let (counts, elapsed) = load.run(phase, duration);
            let server_cpu = servers_cpu() - server_before;
            let own_cpu = cpu_seconds(&own) - own_before;
            let shares: Vec<f64> = processes
                .iter()
                .zip(&cpu_before)
                .map(|((_, p), before)| (cpu_seconds(p) - before) / elapsed.as_secs_f64())
                .collect();
            if let (Some(before), Some(port)) = (stats_before, args.redis_port) {
                let after = commandstats(port);
                let delta: BTreeMap<String, u64> = after
                    .into_iter()
                    // Our own INFO is not the cluster's work.
                    .filter(|(name, _)| name != "info")
                    .map(|(name, calls)| {
                        let was = before.get(&name).copied().unwrap_or(0);
                        (name, calls.saturating_sub(was))
                    })
                    .filter(|&(_, calls)| calls > 0)
                    .collect();
                // Every introduction made while the counters ran, those answered
                // during the drain included.
                redis_calls.push((round, counts.answered + counts.answered_late, delta));
            }
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
            let error_codes: Vec<String> = counts
                .errors
                .iter()
                .map(|(code, n)| format!("{code}:{n}"))
                .collect();
            summary.line(&format!(
                "phase kind={} round={round} rate={rate:.0} sent={} answered={} errors={} \
                 error_codes={} lost={} introductions_received={} elapsed={:.3} \
                 server_cpu_us={:.2} generator_cpu_us={:.2}",
                phase_name(phase),
                counts.sent,
                counts.answered,
                counts.errors.values().sum::<u64>(),
                if error_codes.is_empty() {
                    "-".to_owned()
                } else {
                    error_codes.join(",")
                },
                counts.lost,
                counts.introductions_received,
                elapsed.as_secs_f64(),
                per(server_cpu),
                per(own_cpu),
            ));
            for ((label, _), share) in processes.iter().zip(&shares) {
                summary.line(&format!(
                    "cpu kind={} round={round} process={label} percent={:.1}",
                    phase_name(phase),
                    share * 100.0
                ));
            }
            utilisation.push((round, phase, shares));
            summary_rows.push((phase, rate, per(server_cpu)));
        }
    }

    println!();
    println!(
        "CPU of each process during each phase, % of one core (utime + stime over the phase):"
    );
    println!();
    let labels: Vec<&str> = processes.iter().map(|(l, _)| l.as_str()).collect();
    println!("| round | phase | {} | total |", labels.join(" | "));
    println!("|---|---|{}---|", "---|".repeat(labels.len()));
    for (round, phase, shares) in &utilisation {
        let cells: Vec<String> = shares
            .iter()
            .map(|s| format!("{:.0}%", s * 100.0))
            .collect();
        println!(
            "| {round} | {} | {} | {:.0}% |",
            phase_name(*phase),
            cells.join(" | "),
            shares.iter().sum::<f64>() * 100.0
        );
    }

    if !redis_calls.is_empty() {
        println!();
        println!(
            "Redis commands during each Connect phase (INFO commandstats before and after, \
             less the INFO itself), per introduction made (answered in the phase or while \
             draining after it):"
        );
        println!();
        println!("| round | introductions | command | calls | per introduction |");
        println!("|---|---|---|---|---|");
        for (round, introductions, delta) in &redis_calls {
            let per = |calls: u64| calls as f64 / (*introductions).max(1) as f64;
            for (name, calls) in delta {
                println!(
                    "| {round} | {introductions} | {} | {calls} | {:.3} |",
                    name.to_uppercase(),
                    per(*calls)
                );
                summary.line(&format!(
                    "redis round={round} introductions={introductions} command={name} calls={calls}"
                ));
            }
            let total: u64 = delta.values().sum();
            println!(
                "| {round} | {introductions} | all | {total} | {:.3} |",
                per(total)
            );
        }
    }

    let best = |phase: Phase| {
        summary_rows
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
