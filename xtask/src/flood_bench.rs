//! `cargo xtask bench-flood`: what spoofed floods leave behind in the real
//! `gateway serve` (release build, loopback, defaults: the reply budgets in force).
//! For each kind of unauthenticated input it sends a flood from forged source
//! addresses (a raw socket writing IPv4 headers with random 127/8 sources, so the
//! answers go nowhere, as they would to a spoofed victim), then reports the daemon's
//! RSS and open file descriptors before, right after and once it has settled, its
//! CPU, and what it answered. TCP connections cannot be forged: that phase holds
//! real connections from many loopback sources that never speak.
//!
//! Needs root (raw socket). Figures go to docs/benchmarks.md ("Floods").
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gateway::proto::{
    binding::binding_request,
    rendezvous::client::{self, PeerCredentials},
    stun::{Class, MessageType, MessageWriter},
    turn::{self, attr as turn_attr, method},
};
use gateway_tests::daemon::{metric_value, write_secret};

use crate::toolchain::workspace_root;

/// Options of `cargo xtask bench-flood`.
#[derive(Debug, clap::Args)]
pub struct FloodBenchArgs {
    /// Seconds of flood per kind.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Datagrams per second to aim for (per UDP kind).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Connections held in the TCP phase (from 64 loopback sources, never speaking).
    #[arg(long, default_value_t = 3_000)]
    tcp_connections: usize,
    /// Benchmark this `gateway` binary instead of a fresh release build.
    #[arg(long)]
    server_binary: Option<PathBuf>,
    /// Only the TCP phase.
    #[arg(long)]
    tcp_only: bool,
}

/// The kinds of input flooded.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Binding,
    Allocate,
    Register,
    ChannelData,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Binding => "Binding",
            Kind::Allocate => "Allocate (no credentials)",
            Kind::Register => "Register (bad credentials)",
            Kind::ChannelData => "ChannelData, unknown channel",
        }
    }

    /// One datagram of this kind (the transaction id varies per batch).
    fn payload(self, tid: [u8; 12]) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Kind::Binding => binding_request(tid, &mut out),
            Kind::Allocate => {
                let mut writer = MessageWriter::new(
                    &mut out,
                    MessageType {
                        method: method::ALLOCATE,
                        class: Class::Request,
                    },
                    tid,
                );
                writer.attribute(
                    turn_attr::REQUESTED_TRANSPORT,
                    &[turn::TRANSPORT_UDP, 0, 0, 0],
                );
                writer.finish_with_fingerprint();
            }
            Kind::Register => {
                let forged = PeerCredentials {
                    username: "4000000000:mallory".into(),
                    password: "not the password".into(),
                };
                out = client::register(tid, &forged, None, &[], Default::default(), 0);
            }
            Kind::ChannelData => turn::encode_channel_data(0x4ABC, &[0u8; 100], &mut out),
        }
        out
    }
}

/// The daemon under test; killed on drop.
struct Daemon {
    child: Child,
    service: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")
    }

    fn fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let after = stat.rsplit_once(')').context("stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
        Ok(Duration::from_millis(ticks * 10))
    }

    fn metrics(&self) -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    }

    fn counter(&self, name: &str, labels: &str) -> f64 {
        self.metrics()
            .ok()
            .and_then(|m| metric_value(&m, name, labels))
            .unwrap_or(0.0)
    }

    /// Datagrams the daemon has sent so far (every answer leaves the service socket).
    fn answered(&self) -> f64 {
        self.counter("gateway_udp_sent_datagrams_total", "")
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(binary: &PathBuf, dir: &std::path::Path) -> Result<Daemon> {
    let service = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let secret = dir.join("secret");
    write_secret(&secret, "flood bench secret")?;
    let child = Command::new(binary)
        .args(["serve", "--listen", &service.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .arg("--secret-file")
        .arg(&secret)
        .args([
            "--no-ebpf",
            "--relay-address",
            "127.0.0.1",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log"))?)
        .spawn()
        .context("starting gateway serve")?;
    let daemon = Daemon {
        child,
        service,
        metrics,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.metrics().is_err() {
        if Instant::now() > deadline {
            bail!("gateway serve did not answer /metrics in 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(daemon)
}

/// A raw IPv4 socket that writes its own headers (IP_HDRINCL), for forged sources.
fn raw_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw socket (needs root)");
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes an IPv4 + UDP datagram from `source` to `target` into `packet`. The kernel
/// fills the IP checksum; the UDP checksum is left 0 (allowed over IPv4).
fn write_packet(packet: &mut Vec<u8>, source: SocketAddrV4, target: SocketAddrV4, payload: &[u8]) {
    let total = 20 + 8 + payload.len();
    packet.clear();
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&source.ip().octets());
    packet.extend_from_slice(&target.ip().octets());
    packet.extend_from_slice(&source.port().to_be_bytes());
    packet.extend_from_slice(&target.port().to_be_bytes());
    packet.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
}

/// Sends the batch of packets to `target` with one sendmmsg; how many went.
fn send_batch(fd: &OwnedFd, packets: &[Vec<u8>], target: SocketAddrV4) -> usize {
    let mut address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iovs: Vec<libc::iovec> = packets
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
    let mut headers: Vec<libc::mmsghdr> = (0..packets.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (header, iov) in headers.iter_mut().zip(iovs.iter_mut()) {
        header.msg_hdr.msg_name = (&mut address as *mut libc::sockaddr_in).cast();
        header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        header.msg_hdr.msg_iov = iov;
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at `address` and an iovec of a live packet; the
    // kernel only reads them during the call.
    let sent = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            0,
        )
    };
    usize::try_from(sent).unwrap_or(0)
}

/// One row of the report.
struct Row {
    kind: String,
    sent: u64,
    seconds: f64,
    answered: f64,
    cpu: Duration,
    rss: [u64; 3],
    fds: [usize; 3],
}

fn flood_udp(daemon: &Daemon, kind: Kind, args: &FloodBenchArgs) -> Result<Row> {
    let fd = raw_socket()?;
    let SocketAddr::V4(target) = daemon.service else {
        bail!("IPv4 service address expected");
    };
    let before = (
        daemon.rss_kib()?,
        daemon.fds()?,
        daemon.cpu()?,
        daemon.answered(),
    );
    let mut rng_state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    const BATCH: usize = 64;
    let mut packets: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(256)).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let mut sent: u64 = 0;
    while Instant::now() < end {
        // Pace: never ahead of rate x elapsed.
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let tid_seed = next();
        let payload = kind.payload({
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&tid_seed.to_be_bytes());
            tid
        });
        for packet in &mut packets {
            let r = next();
            let source = SocketAddrV4::new(
                Ipv4Addr::new(
                    127,
                    (r >> 8) as u8 | 1,
                    (r >> 16) as u8,
                    (r >> 24) as u8 | 1,
                ),
                1024 + (r >> 32) as u16 % 60_000,
            );
            write_packet(packet, source, target, &payload);
        }
        sent += send_batch(&fd, &packets, target) as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    let right_after = (daemon.rss_kib()?, daemon.fds()?);
    std::thread::sleep(Duration::from_secs(5));
    let settled = (daemon.rss_kib()?, daemon.fds()?);
    Ok(Row {
        kind: kind.name().into(),
        sent,
        seconds,
        answered: daemon.answered() - before.3,
        cpu: daemon.cpu()?.saturating_sub(before.2),
        rss: [before.0, right_after.0, settled.0],
        fds: [before.1, right_after.1, settled.1],
    })
}

fn flood_tcp(daemon: &Daemon, args: &FloodBenchArgs) -> Result<Row> {
    let before = (daemon.rss_kib()?, daemon.fds()?, daemon.cpu()?);
    let refused_before = daemon.counter("gateway_turn_tcp_refused_total", "");
    let start = Instant::now();
    let mut held = Vec::with_capacity(args.tcp_connections);
    for i in 0..args.tcp_connections {
        // 64 sources, each asked for more than its 64 slots when connections > 4,096.
        let source = Ipv4Addr::new(127, 3, 0, 1 + (i % 64) as u8);
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((source, 0)).into())?;
        if socket.connect(&daemon.service.into()).is_ok() {
            held.push(socket);
        }
    }
    let opened = held.len();
    let right_after = (daemon.rss_kib()?, daemon.fds()?);
    // The gateway closes a connection whose first frame is not whole in 30 s.
    std::thread::sleep(Duration::from_secs(35));
    let settled_while_held = (daemon.rss_kib()?, daemon.fds()?);
    drop(held);
    std::thread::sleep(Duration::from_secs(2));
    let refused = daemon.counter("gateway_turn_tcp_refused_total", "") - refused_before;
    eprintln!(
        "tcp: {opened} connections opened, {refused} closed at once (per-source share); gateway fds while still held by the clients: {}",
        settled_while_held.1
    );
    Ok(Row {
        kind: format!("TCP connects that never speak ({opened} held 35 s)"),
        sent: opened as u64,
        seconds: start.elapsed().as_secs_f64(),
        answered: refused,
        cpu: daemon.cpu()?.saturating_sub(before.2),
        rss: [before.0, right_after.0, daemon.rss_kib()?],
        fds: [before.1, right_after.1, settled_while_held.1],
    })
}

/// Raises the soft limit of open files to the hard one (the TCP phase holds many).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Runs every flood and prints a markdown table.
pub fn bench_flood(args: FloodBenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-flood needs root: it forges source addresses with a raw socket");
    }
    raise_nofile();
    let binary = match &args.server_binary {
        Some(path) => path.clone(),
        None => {
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(workspace_root())
                .args(["build", "--release", "-p", "gateway", "--bin", "gateway"])
                .status()?;
            if !status.success() {
                bail!("release build failed");
            }
            workspace_root().join("target/release/gateway")
        }
    };
    let dir = tempfile::tempdir()?;
    let daemon = start(&binary, dir.path())?;
    std::thread::sleep(Duration::from_secs(2));
    let mut rows = Vec::new();
    let kinds: &[Kind] = if args.tcp_only {
        &[]
    } else {
        &[
            Kind::Binding,
            Kind::Allocate,
            Kind::Register,
            Kind::ChannelData,
        ]
    };
    for &kind in kinds {
        eprintln!(
            "flood: {} for {} s at {}/s",
            kind.name(),
            args.seconds,
            args.rate
        );
        rows.push(flood_udp(&daemon, kind, &args)?);
    }
    eprintln!("flood: TCP connections");
    rows.push(flood_tcp(&daemon, &args)?);
    println!(
        "| input | sent | per s | answered | gateway CPU | RSS KiB before / right after / settled | fds before / right after / settled |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} s | {} / {} / {} | {} / {} / {} |",
            row.kind,
            row.sent,
            row.sent as f64 / row.seconds,
            row.answered,
            row.cpu.as_secs_f64(),
            row.rss[0],
            row.rss[1],
            row.rss[2],
            row.fds[0],
            row.fds[1],
            row.fds[2],
        );
    }
    Ok(())
}
