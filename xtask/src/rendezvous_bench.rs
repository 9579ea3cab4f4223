//! `cargo xtask bench-rendezvous`: introductions per second end to end through the
//! real `gateway serve` (release build, loopback, no eBPF), next to STUN Binding
//! requests per second through the same server with the same load generator (the
//! baseline), plus the server's CPU per request and its RSS with N peers registered.
//! The load generator is the release-built example `rendezvous_load` of the gateway
//! crate; the 1M-peer memory figure comes from the `registry_memory` example.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gateway::proto::binding::{binding_request, parse_binding_success};
use gateway_tests::daemon::metric_value;

use crate::toolchain::workspace_root;

/// Options of `cargo xtask bench-rendezvous`.
#[derive(Debug, clap::Args)]
pub struct RendezvousBenchArgs {
    /// Peers the load generator registers (one UDP socket each).
    #[arg(long, default_value_t = 16_000)]
    peers: usize,
    /// Seconds per timed phase (Binding, then Connect, per round).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of both phases.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Requests outstanding at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Sign every Connect afresh with the newest nonce and verify every answer, as a
    /// real agent does (costs the generator CPU the server then lacks).
    #[arg(long)]
    sign_each: bool,
    /// Let the generator poll without sleeping (it then takes a whole core).
    #[arg(long)]
    busy_poll: bool,
    /// Also run the `registry_memory` example with this many peers (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    memory_peers: usize,
    /// Benchmark this `gateway` binary instead of target/release/gateway (to compare
    /// builds under the same load).
    #[arg(long)]
    server_binary: Option<PathBuf>,
    /// Pass `--threads N` to `gateway serve` (driver loops; builds before the option
    /// existed refuse it).
    #[arg(long)]
    server_threads: Option<usize>,
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// Waits until the server answers a STUN Binding request.
fn wait_ready(server: &mut Server, addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut request = Vec::new();
    let tid = [7; 12];
    binding_request(tid, &mut request);
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(status) = server.child.try_wait()? {
            bail!("gateway serve exited during start-up: {status}");
        }
        socket.send_to(&request, addr)?;
        if let Ok((len, _)) = socket.recv_from(&mut buf)
            && buf
                .get(..len)
                .and_then(|d| parse_binding_success(d, tid))
                .is_some()
        {
            return Ok(());
        }
    }
    bail!("gateway serve did not answer a Binding request within 15 s")
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run_checked(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn write_secret(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("secret");
    let secret: [u8; 16] = rand_bytes()?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, hex)?;
    Ok(path)
}

fn rand_bytes() -> Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Runs the benchmark and prints its tables.
pub fn bench_rendezvous(args: RendezvousBenchArgs) -> Result<()> {
    let root = workspace_root();
    run_checked(Command::new(cargo()).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "gateway",
        "--bin",
        "gateway",
        "--example",
        "rendezvous_load",
        "--example",
        "registry_memory",
    ]))?;
    let release = root.join("target/release");
    let dir = std::env::temp_dir().join(format!("gateway-bench-rendezvous-{}", std::process::id()));
    let secret = write_secret(&dir)?;
    let udp: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_tcp_port()?).into();
    let log_path = dir.join("gateway.log");
    let log = std::fs::File::create(&log_path)?;
    let mut serve_args = vec![
        "serve".to_owned(),
        "--listen".into(),
        udp.to_string(),
        "--metrics-listen".into(),
        metrics.to_string(),
        "--no-ebpf".into(),
        "--secret-file".into(),
        secret.display().to_string(),
        "--log-level".into(),
        "warn".into(),
    ];
    if let Some(threads) = args.server_threads {
        serve_args.extend(["--threads".to_owned(), threads.to_string()]);
    }
    println!(
        "machine: {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let binary = args
        .server_binary
        .clone()
        .unwrap_or_else(|| release.join("gateway"));
    println!("server: {} {}", binary.display(), serve_args.join(" "));
    let mut server = Server {
        child: Command::new(&binary)
            .args(&serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?,
    };
    wait_ready(&mut server, udp)?;
    let pid = server.child.id().to_string();
    let mut load_args = vec![
        "--server".to_owned(),
        udp.to_string(),
        "--server-pid".into(),
        pid,
        "--secret-file".into(),
        secret.display().to_string(),
        "--peers".into(),
        args.peers.to_string(),
        "--seconds".into(),
        args.seconds.to_string(),
        "--rounds".into(),
        args.rounds.to_string(),
        "--window".into(),
        args.window.to_string(),
    ];
    if args.sign_each {
        load_args.push("--sign-each".into());
    }
    if args.busy_poll {
        load_args.push("--busy-poll".into());
    }
    println!(
        "load: target/release/examples/rendezvous_load {}",
        load_args.join(" ")
    );
    run_checked(Command::new(release.join("examples/rendezvous_load")).args(&load_args))?;

    let text = http_get(metrics, "/metrics")?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    println!();
    println!(
        "server's own counters: registered peers {}, introductions {}, datagrams received {}, sent {}, \
         rate-limited connects {}",
        metric_value(&text, "gateway_registered_peers", "").unwrap_or(f64::NAN),
        sum("gateway_punch_attempts_total{"),
        sum("gateway_udp_received_datagrams_total"),
        sum("gateway_udp_sent_datagrams_total"),
        metric_value(
            &text,
            "gateway_stun_datagrams_total",
            "outcome=\"rate_limited\""
        )
        .unwrap_or(f64::NAN),
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    if args.memory_peers > 0 {
        println!();
        println!(
            "memory (sans-IO registry): target/release/examples/registry_memory {}",
            args.memory_peers
        );
        run_checked(
            Command::new(release.join("examples/registry_memory"))
                .arg(args.memory_peers.to_string()),
        )?;
    }
    Ok(())
}
