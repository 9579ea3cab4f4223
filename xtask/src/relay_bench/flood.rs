//! coturn's packet-flood method (its CLAUDE.md, "Packet-flood matrix workload"):
//! `turnutils_uclient -Y packet` floods ChannelData through one allocation to a
//! `turnutils_peer` reflector, which echoes every batch back (with GSO), so every
//! datagram crosses the server twice: client to peer, then peer to client.
//!
//! What each direction delivered is counted outside both tools, by nftables counters:
//! on the input hook, the datagrams from the server reaching the peer's host (client
//! to peer, delivered) and the client's (peer to client, delivered); on the output
//! hook, the client's datagrams to the server (offered) and the reflector's echoes
//! (what it received). Input, not output, for what the server relays: the kernel
//! fast path rewrites at tc ingress, after the output hook. A GSO batch passes a
//! hook as one packet, so segments are counted from bytes: (bytes − packets × 28) /
//! segment length, exact when every datagram of a leg has the same length (it does:
//! `-l` bytes to and from the peer, 4 more as ChannelData). uclient's own
//! `recv_pps` (the median of its in-flight per-second lines, coturn's canonical
//! metric) is reported beside them.
//!
//! `--as-on-a-wire` turns off UDP segmentation offload on `lo` (`ethtool -K lo
//! tx-udp-segmentation off`) for the run, so GSO batches are split into datagrams
//! before the receive path, as a real NIC does on the wire; plain loopback hands a
//! batch to the receiver whole. It is restored on every way out ([`WireMode`]'s
//! drop).
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::load;

/// IPv4 and UDP headers: what a datagram adds to its payload at the output hook.
const IPV4_UDP_HEADERS: u64 = 28;
/// The ChannelData header.
const CHANNEL_DATA_HEADER: u64 = 4;

/// coturn's tools.
#[derive(Clone, Debug)]
pub struct FloodTools {
    /// `turnutils_uclient` (4.17 or later: `-Y packet`).
    pub uclient: PathBuf,
    /// `turnutils_peer`.
    pub peer: PathBuf,
}

/// How a flood runs.
#[derive(Clone, Copy, Debug)]
pub struct FloodOptions {
    /// Seconds measured (after the warm-up).
    pub seconds: u64,
    /// Seconds of flooding before the measured window.
    pub warmup: u64,
    /// Payload bytes per datagram (`-l`).
    pub payload: usize,
    /// uclient processes, each `-m 1` to its own reflector.
    pub streams: usize,
    /// uclient's `--sender-threads` per process.
    pub sender_threads: usize,
}

/// A TURN server under the flood.
#[derive(Clone, Debug)]
pub struct FloodTarget {
    /// Its UDP address (loopback, IPv4).
    pub server: std::net::SocketAddr,
    /// Its REST secret.
    pub secret: String,
    /// Its process (CPU time).
    pub pid: Option<u32>,
}

/// What one flood measured, in datagrams per second over the window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flood {
    /// Client to server (offered ChannelData).
    pub offered: f64,
    /// Server to peer: client to peer, delivered.
    pub to_peer: f64,
    /// The reflector's echoes (what it received).
    pub echoed: f64,
    /// Server to client: peer to client, delivered.
    pub to_client: f64,
    /// uclient's own median `recv_pps`, summed over the streams.
    pub uclient_recv: f64,
    /// uclient's own median `send_pps`, summed over the streams.
    pub uclient_send: f64,
    /// Server CPU over the window, seconds.
    pub server_cpu: Option<f64>,
    /// uclient and reflector CPU over the window, seconds.
    pub tools_cpu: f64,
    /// The window, seconds.
    pub seconds: f64,
}

impl Flood {
    /// Datagrams relayed (both directions) per second.
    pub fn relayed(&self) -> f64 {
        self.to_peer + self.to_client
    }

    /// Server CPU µs per relayed datagram.
    pub fn server_us_per_message(&self) -> Option<f64> {
        let relayed = self.relayed() * self.seconds;
        self.server_cpu
            .filter(|_| relayed > 0.0)
            .map(|cpu| cpu * 1e6 / relayed)
    }

    /// Server, uclient and reflector CPU µs per relayed datagram (on loopback the
    /// receive path of a datagram is charged to its sender).
    pub fn all_us_per_message(&self) -> Option<f64> {
        let relayed = self.relayed() * self.seconds;
        self.server_cpu
            .filter(|_| relayed > 0.0)
            .map(|cpu| (cpu + self.tools_cpu) * 1e6 / relayed)
    }

    /// Share of the reflector's echoes that did not reach the client, %.
    pub fn return_loss_percent(&self) -> f64 {
        if self.echoed <= 0.0 {
            return 0.0;
        }
        100.0 * (1.0 - self.to_client / self.echoed).max(0.0)
    }
}

/// `ethtool -K lo tx-udp-segmentation off` for as long as it lives; the setting found
/// is put back on drop (on errors and panics too).
pub struct WireMode {
    restore: Option<&'static str>,
}

impl WireMode {
    /// With `on`, segments GSO batches before loopback's receive path until dropped.
    pub fn new(on: bool) -> Result<Self> {
        if !on {
            return Ok(Self { restore: None });
        }
        let features = Command::new("ethtool")
            .args(["-k", "lo"])
            .output()
            .context("running ethtool -k lo (cargo xtask setup installs ethtool)")?;
        let text = String::from_utf8_lossy(&features.stdout);
        let was_on = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("tx-udp-segmentation:"))
            .is_some_and(|v| v.trim().starts_with("on"));
        if was_on {
            restore_on_signal();
        }
        ethtool_udp_segmentation("off")?;
        eprintln!("flood: ethtool -K lo tx-udp-segmentation off (as on a wire)");
        Ok(Self {
            restore: was_on.then_some("on"),
        })
    }
}

impl Drop for WireMode {
    fn drop(&mut self) {
        if self.restore.is_some() {
            // Signals act as usual again, and no pid is kept that could be reused.
            // SAFETY: puts back the default dispositions.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
            }
            children().clear();
        }
        if let Some(value) = self.restore {
            match ethtool_udp_segmentation(value) {
                Ok(()) => eprintln!("flood: ethtool -K lo tx-udp-segmentation {value} (restored)"),
                Err(e) => eprintln!("flood: could not restore lo's tx-udp-segmentation: {e:#}"),
            }
        }
    }
}

/// The flood's tools running now, for the signal watcher to stop.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Also stops `pid` (a server of the benchmark, which outlives the flood) should a
/// signal end the run during `--as-on-a-wire`.
pub fn stop_on_signal(pid: u32) {
    children().push(pid);
}

/// The signal that asked this process to stop (0: none yet).
static SIGNALLED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: what a signal handler may safely do.
    SIGNALLED.store(signal, std::sync::atomic::Ordering::SeqCst);
}

/// Ctrl-C or SIGTERM would end the process without running any drop and leave lo
/// without UDP segmentation offload: from now on they are caught, and a thread
/// restores lo (and removes this process's counters) before exiting as the signal
/// would have. Children started later get the default handlers back at exec.
fn restore_on_signal() {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let signal = SIGNALLED.load(std::sync::atomic::Ordering::SeqCst);
            if signal != 0 {
                for &pid in children().iter() {
                    // SAFETY: kill with the pid of a child not yet reaped.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
                let restored = ethtool_udp_segmentation("on");
                let table = format!("gateway_flood_{}", std::process::id());
                let _ = nft(&["delete", "table", "inet", &table], None);
                eprintln!(
                    "flood: stopped by signal {signal}; lo's tx-udp-segmentation on: {restored:?}"
                );
                std::process::exit(128 + signal);
            }
        }
    });
}

fn ethtool_udp_segmentation(value: &str) -> Result<()> {
    let status = Command::new("ethtool")
        .args(["-K", "lo", "tx-udp-segmentation", value])
        .status()
        .context("running ethtool (needs root)")?;
    if !status.success() {
        bail!("ethtool -K lo tx-udp-segmentation {value}: {status}");
    }
    Ok(())
}

/// An nftables table of output-hook counters; deleted on drop.
struct Counters {
    table: String,
}

/// One counter's packets and bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Count {
    packets: u64,
    bytes: u64,
}

impl Count {
    /// Datagrams of `payload` bytes each (GSO batches counted by their bytes).
    fn segments(self, payload: u64) -> u64 {
        self.bytes
            .saturating_sub(self.packets * IPV4_UDP_HEADERS)
            .checked_div(payload)
            .unwrap_or(0)
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

/// The four legs' counters at one instant.
#[derive(Clone, Copy, Debug, Default)]
struct Legs {
    offered: Count,
    to_peer: Count,
    echoed: Count,
    to_client: Count,
}

impl Counters {
    fn new(server_port: u16, peer_ports: &[u16]) -> Result<Self> {
        let table = format!("gateway_flood_{}", std::process::id());
        let peers = peer_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        // Offered and echoed where their senders hand them to the stack (output);
        // what the server relays where it arrives (input): the kernel fast path
        // rewrites datagrams at tc ingress, after the output hook.
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority -300; policy accept;\n    \
             udp dport {server_port} counter comment \"offered\"\n    \
             udp sport {{ {peers} }} counter comment \"echoed\"\n  }}\n  \
             chain in {{\n    type filter hook input priority -300; policy accept;\n    \
             udp dport {{ {peers} }} counter comment \"to_peer\"\n    \
             udp sport {server_port} counter comment \"to_client\"\n  }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&script)).context("adding the flood's nftables counters (root)")?;
        Ok(Self { table })
    }

    fn read(&self) -> Result<Legs> {
        let text = nft(&["list", "table", "inet", &self.table], None)?;
        let mut legs = Legs::default();
        for line in text.lines() {
            let Some(count) = parse_counter(line) else {
                continue;
            };
            let leg = if line.contains("\"offered\"") {
                &mut legs.offered
            } else if line.contains("\"to_peer\"") {
                &mut legs.to_peer
            } else if line.contains("\"echoed\"") {
                &mut legs.echoed
            } else if line.contains("\"to_client\"") {
                &mut legs.to_client
            } else {
                continue;
            };
            *leg = count;
        }
        Ok(legs)
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", &self.table], None);
    }
}

/// `counter packets N bytes M` in one rule's line.
fn parse_counter(line: &str) -> Option<Count> {
    let rest = line.split("counter packets ").nth(1)?;
    let mut words = rest.split_whitespace();
    let packets = words.next()?.parse().ok()?;
    if words.next()? != "bytes" {
        return None;
    }
    let bytes = words.next()?.parse().ok()?;
    Some(Count { packets, bytes })
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        std::io::Write::write_all(&mut pipe, text.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A child process killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn new(child: Child, log: PathBuf) -> Self {
        children().push(child.id());
        Self { child, log }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = self.child.id();
        children().retain(|&p| p != pid);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The command line of one uclient stream (as the docs quote it).
pub fn uclient_args(target: &FloodTarget, peer_port: u16, options: &FloodOptions) -> Vec<String> {
    [
        "-Y",
        "packet",
        "-m",
        "1",
        "-n",
        "50000000",
        "-l",
        &options.payload.to_string(),
        "-c",
        "--no-even-port",
        "--listener-threads",
        "1",
        "--sender-threads",
        &options.sender_threads.to_string(),
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port.to_string(),
        "-X",
        "-g",
        "-u",
        "bench",
        "-W",
        &target.secret,
        "-p",
        &target.server.port().to_string(),
        &target.server.ip().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Runs coturn's packet flood against `target` and measures both directions.
pub fn flood(
    tools: &FloodTools,
    target: &FloodTarget,
    options: &FloodOptions,
    dir: &Path,
) -> Result<Flood> {
    if !target.server.is_ipv4() {
        bail!("the flood runs over IPv4 loopback");
    }
    std::fs::create_dir_all(dir)?;
    let streams = options.streams.max(1);
    let mut peers = Vec::new();
    let mut peer_ports = Vec::new();
    for i in 0..streams {
        let port = free_udp_port()?;
        let log = dir.join(format!("peer-{i}.log"));
        let child = Command::new(&tools.peer)
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", tools.peer.display()))?;
        peers.push(Running::new(child, log));
        peer_ports.push(port);
    }
    // Let the reflectors bind.
    std::thread::sleep(Duration::from_millis(300));
    let counters = Counters::new(target.server.port(), &peer_ports)?;
    let mut clients = Vec::new();
    for (i, &port) in peer_ports.iter().enumerate() {
        let log = dir.join(format!("uclient-{i}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(&tools.uclient)
            .args(uclient_args(target, port, options))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", tools.uclient.display()))?;
        clients.push(Running::new(child, log));
    }
    std::thread::sleep(Duration::from_secs(options.warmup));
    let tool_pids: Vec<u32> = clients.iter().chain(&peers).map(|r| r.child.id()).collect();
    let tools_cpu = |pids: &[u32]| -> f64 {
        pids.iter()
            .filter_map(|&p| load::process_cpu(p))
            .map(|d| d.as_secs_f64())
            .sum()
    };
    let server_before = target.pid.and_then(load::process_cpu);
    let tools_before = tools_cpu(&tool_pids);
    let before = counters.read()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(options.seconds));
    let after = counters.read()?;
    let seconds = started.elapsed().as_secs_f64();
    let server_after = target.pid.and_then(load::process_cpu);
    let tools_after = tools_cpu(&tool_pids);
    for client in &mut clients {
        if let Some(exited) = client.child.try_wait()? {
            let log = std::fs::read_to_string(&client.log).unwrap_or_default();
            bail!(
                "turnutils_uclient exited early ({exited}):\n{}",
                tail(&log, 20)
            );
        }
        // SIGINT, as coturn's method stops it (`timeout -s INT`).
        // SAFETY: kill with a child's pid, which it still is (not yet reaped).
        unsafe {
            libc::kill(client.child.id() as i32, libc::SIGINT);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for client in &mut clients {
        while client.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (mut uclient_send, mut uclient_recv) = (0.0, 0.0);
    for client in &clients {
        let log = std::fs::read_to_string(&client.log).unwrap_or_default();
        let (send, recv) = uclient_rates(&log, options.warmup as usize).with_context(|| {
            format!(
                "no per-second lines in uclient's output:\n{}",
                tail(&log, 20)
            )
        })?;
        uclient_send += send;
        uclient_recv += recv;
    }
    drop(clients);
    drop(peers);
    drop(counters);
    let delta = |leg: fn(&Legs) -> Count, payload: u64| {
        leg(&after).since(leg(&before)).segments(payload) as f64 / seconds
    };
    let payload = options.payload as u64;
    Ok(Flood {
        offered: delta(|l| l.offered, payload + CHANNEL_DATA_HEADER),
        to_peer: delta(|l| l.to_peer, payload),
        echoed: delta(|l| l.echoed, payload),
        to_client: delta(|l| l.to_client, payload + CHANNEL_DATA_HEADER),
        uclient_recv,
        uclient_send,
        server_cpu: match (server_before, server_after) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        },
        tools_cpu: (tools_after - tools_before).max(0.0),
        seconds,
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The medians of uclient's per-second `send_pps` and `recv_pps`, skipping the
/// first `warmup` lines and the last (a partial second), as coturn's method reads
/// them.
pub fn uclient_rates(log: &str, warmup: usize) -> Option<(f64, f64)> {
    let mut samples: Vec<(f64, f64)> = log
        .lines()
        .filter_map(|line| {
            let send = line.split("send_pps=").nth(1)?.split(',').next()?;
            let recv = line.split("recv_pps=").nth(1)?.split(',').next()?;
            Some((send.trim().parse().ok()?, recv.trim().parse().ok()?))
        })
        .collect();
    samples.pop();
    let samples = samples.get(warmup.min(samples.len().saturating_sub(1))..)?;
    if samples.is_empty() {
        return None;
    }
    let send = super::median(samples.iter().map(|s| s.0).collect())?;
    let recv = super::median(samples.iter().map(|s| s.1).collect())?;
    Some((send, recv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_batches_count_by_their_bytes() {
        // Three packets: one batch of 10 datagrams of 120 bytes, two single ones.
        let count = Count {
            packets: 3,
            bytes: (28 + 10 * 120) + 2 * (28 + 120),
        };
        assert_eq!(count.segments(120), 12);
        assert_eq!(Count::default().segments(0), 0);
    }

    #[test]
    fn counters_parse_from_nft_listing() {
        let line = "\t\tudp dport 3490 counter packets 1958572 bytes 289868656 comment \"to_peer\"";
        let count = parse_counter(line).expect("a counter");
        assert_eq!((count.packets, count.bytes), (1_958_572, 289_868_656));
        assert!(parse_counter("udp dport 3490 counter").is_none());
    }

    #[test]
    fn uclient_rates_are_medians_of_in_flight_lines() {
        let log = "\
x INFO start_mclient: send_pps=100.00, recv_pps=10.00, total_sent=1, total_recv=1
x INFO start_mclient: msz=1, tot_send_msgs=1, tot_recv_msgs=1
x INFO start_mclient: send_pps=900.00, recv_pps=200.00, total_sent=1, total_recv=1
x INFO start_mclient: send_pps=800.00, recv_pps=100.00, total_sent=1, total_recv=1
x INFO start_mclient: send_pps=700.00, recv_pps=300.00, total_sent=1, total_recv=1
x INFO start_mclient: send_pps=5.00, recv_pps=5.00, total_sent=1, total_recv=1
";
        assert_eq!(uclient_rates(log, 1), Some((800.0, 200.0)));
        assert_eq!(uclient_rates("nothing", 1), None);
    }
}
