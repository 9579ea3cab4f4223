//! `cargo xtask bench-rendezvous`: introductions per second end to end through the
//! real `gateway serve` (release build, loopback, no eBPF), next to STUN Binding
//! requests per second through the same server with the same load generator (the
//! baseline), plus the server's CPU per request and its RSS with N peers registered.
//! The load generator is the release-built example `rendezvous_load` of the gateway
//! crate; the 1M-peer memory figure comes from the `registry_memory` example.
//!
//! With `--nodes N` (N > 1) it also benchmarks a cluster: a fresh `redis-server` and N
//! `gateway serve --cluster-redis` nodes on loopback, every introduction crossing
//! nodes, next to one node alone in the same invocation, and prints both side by side
//! with the Redis commands per introduction and each process's CPU.
use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gateway::proto::binding::{binding_request, parse_binding_success};
use gateway_tests::{daemon::metric_value, redis::RedisServer};

use crate::{redis_memory, toolchain::workspace_root};

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
    /// Gateway nodes. 1: one `gateway serve`, as always. N > 1: first one node alone
    /// (no cluster), then a fresh redis-server (loopback, no persistence) and N nodes
    /// sharing the rendezvous through it (`--cluster-redis`, node ids gw-1..gw-N);
    /// peer i registers with node i mod N and connects to a peer registered on
    /// another node; both are printed side by side with the ratio, the Redis
    /// commands per introduction and each process's CPU.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: u16,
    /// Also measure Redis memory per registered peer with this many registry entries
    /// (as `cargo xtask bench-redis-memory --peers N`; 0: skip).
    #[arg(long, default_value_t = 0)]
    redis_memory_peers: usize,
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
    // The gateway refuses a secret file others may read.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(path)
}

fn rand_bytes() -> Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// The machine's load average (1, 5, 15 minutes).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One running `gateway serve`.
struct Node {
    server: Server,
    udp: SocketAddr,
    metrics: SocketAddr,
    name: String,
}

/// Starts `gateway serve` on free loopback ports (joined to the cluster of Redis
/// `cluster` as node `name` when given) and waits until it answers.
fn start_node(
    binary: &Path,
    dir: &Path,
    name: &str,
    secret: &Path,
    args: &RendezvousBenchArgs,
    cluster: Option<&str>,
) -> Result<Node> {
    let udp: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_tcp_port()?).into();
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut serve_args = vec![
        "serve".to_owned(),
        "--listen".into(),
        udp.to_string(),
        "--metrics-listen".into(),
        metrics.to_string(),
        "--no-ebpf".into(),
        // Every peer of the load is on 127.0.0.1: no per-source reply budget.
        "--replies-per-source".into(),
        "0".into(),
        "--secret-file".into(),
        secret.display().to_string(),
        "--log-level".into(),
        "warn".into(),
    ];
    if let Some(threads) = args.server_threads {
        serve_args.extend(["--threads".to_owned(), threads.to_string()]);
    }
    if let Some(url) = cluster {
        serve_args.extend([
            "--cluster-redis".to_owned(),
            url.to_owned(),
            "--node-id".into(),
            name.to_owned(),
        ]);
    }
    println!("server: {} {}", binary.display(), serve_args.join(" "));
    let mut server = Server {
        child: Command::new(binary)
            .args(&serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?,
    };
    wait_ready(&mut server, udp)?;
    Ok(Node {
        server,
        udp,
        metrics,
        name: name.to_owned(),
    })
}

/// Waits until every node reports the cluster up with all `nodes` alive.
fn wait_cluster(nodes: &[Node]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = nodes.iter().all(|node| {
            http_get(node.metrics, "/metrics").is_ok_and(|text| {
                metric_value(&text, "gateway_cluster_up", "") == Some(1.0)
                    && metric_value(&text, "gateway_cluster_nodes", "")
                        .is_some_and(|n| n >= nodes.len() as f64)
            })
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster's nodes did not all see each other through Redis within 20 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the load generator against `nodes` (and their Redis).
fn run_load(
    release: &Path,
    nodes: &[Node],
    secret: &Path,
    args: &RendezvousBenchArgs,
    redis: Option<(u16, u32)>,
    summary: Option<&Path>,
) -> Result<()> {
    let mut load_args = Vec::new();
    for node in nodes {
        load_args.extend([
            "--server".to_owned(),
            node.udp.to_string(),
            "--server-pid".into(),
            node.server.child.id().to_string(),
        ]);
    }
    load_args.extend([
        "--secret-file".to_owned(),
        secret.display().to_string(),
        "--peers".into(),
        args.peers.to_string(),
        "--seconds".into(),
        args.seconds.to_string(),
        "--rounds".into(),
        args.rounds.to_string(),
        "--window".into(),
        args.window.to_string(),
    ]);
    if let Some((port, pid)) = redis {
        load_args.extend([
            "--redis-port".to_owned(),
            port.to_string(),
            "--redis-pid".into(),
            pid.to_string(),
        ]);
    }
    if let Some(path) = summary {
        load_args.extend(["--summary".to_owned(), path.display().to_string()]);
    }
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
    run_checked(Command::new(release.join("examples/rendezvous_load")).args(&load_args))
}

/// Prints the server's own counters (and, for a cluster node, its cluster counters).
fn print_counters(node: &Node, cluster: bool) -> Result<()> {
    let text = http_get(node.metrics, "/metrics")?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let prefix = if cluster {
        format!("{}'s own counters", node.name)
    } else {
        "server's own counters".to_owned()
    };
    println!(
        "{prefix}: registered peers {}, introductions {}, datagrams received {}, sent {}, \
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
    if cluster {
        let outcomes: Vec<String> = [
            "introduced",
            "not_found",
            "unavailable",
            "timed_out",
            "failed",
        ]
        .iter()
        .map(|outcome| {
            let n = metric_value(
                &text,
                "gateway_cluster_introductions_total",
                &format!("outcome=\"{outcome}\""),
            )
            .unwrap_or(f64::NAN);
            format!("{outcome} {n}")
        })
        .collect();
        println!(
            "  cross-node Connects: {}; messages sent {}, received {}; Redis errors {}; \
             requests dropped {}",
            outcomes.join(", "),
            metric_value(
                &text,
                "gateway_cluster_messages_total",
                "direction=\"sent\""
            )
            .unwrap_or(f64::NAN),
            metric_value(
                &text,
                "gateway_cluster_messages_total",
                "direction=\"received\""
            )
            .unwrap_or(f64::NAN),
            sum("gateway_cluster_redis_errors_total{"),
            metric_value(&text, "gateway_cluster_requests_dropped_total", "").unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// One line of the generator's summary: its kind and its `key=value` fields.
struct Record {
    kind: String,
    fields: HashMap<String, String>,
}

impl Record {
    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }

    fn num(&self, key: &str) -> f64 {
        self.get(key).parse().unwrap_or(f64::NAN)
    }
}

fn read_summary(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the generator's summary {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let kind = words.next()?.to_owned();
            let fields = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Some(Record { kind, fields })
        })
        .collect())
}

/// The Connect phases of a summary, in round order.
fn connect_phases(records: &[Record]) -> Vec<&Record> {
    records
        .iter()
        .filter(|r| r.kind == "phase" && r.get("kind") == "connect")
        .collect()
}

/// Prints the cluster's comparison: introductions/s of one node alone and of the
/// cluster per round with the ratio, Redis commands per introduction, and each
/// process's CPU in the Connect phases.
fn print_comparison(nodes: u16, single: &[Record], cluster: &[Record], loads: &[(String, String)]) {
    println!();
    println!("## Cluster summary");
    println!();
    for (what, load) in loads {
        println!("load average (1, 5, 15 min) {what}: {load}");
    }
    println!();
    println!(
        "| round | setup | introductions/s | answered | lost | errors | server CPU µs per introduction | vs one node |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let single_phases = connect_phases(single);
    let cluster_phases = connect_phases(cluster);
    let errors = |r: &Record| {
        let codes = r.get("error_codes");
        if codes == "-" {
            r.get("errors").to_owned()
        } else {
            format!("{} ({codes})", r.get("errors"))
        }
    };
    for (k, (one, many)) in single_phases.iter().zip(&cluster_phases).enumerate() {
        let round = k + 1;
        println!(
            "| {round} | one node, no cluster (local introductions) | {:.0} | {} | {} | {} | {:.1} | 1 |",
            one.num("rate"),
            one.get("answered"),
            one.get("lost"),
            errors(one),
            one.num("server_cpu_us"),
        );
        println!(
            "| {round} | {nodes} nodes + Redis (cross-node introductions) | {:.0} | {} | {} | {} | {:.1} (sum of nodes) | {:.2}x |",
            many.num("rate"),
            many.get("answered"),
            many.get("lost"),
            errors(many),
            many.num("server_cpu_us"),
            many.num("rate") / one.num("rate"),
        );
    }
    let best = |phases: &[&Record]| phases.iter().map(|r| r.num("rate")).fold(0.0, f64::max);
    let (best_one, best_many) = (best(&single_phases), best(&cluster_phases));
    println!();
    println!(
        "best round: one node {best_one:.0} introductions/s, {nodes} nodes {best_many:.0} \
         cross-node introductions/s ({:.2}x); the issue's target is 25,000/s with three nodes",
        best_many / best_one.max(1.0)
    );

    // Redis commands per introduction over all Connect phases.
    let mut calls: BTreeMap<String, f64> = BTreeMap::new();
    let mut rounds_seen: BTreeMap<String, f64> = BTreeMap::new();
    for r in cluster.iter().filter(|r| r.kind == "redis") {
        *calls.entry(r.get("command").to_uppercase()).or_default() += r.num("calls");
        rounds_seen.insert(r.get("round").to_owned(), r.num("introductions"));
    }
    let introductions: f64 = rounds_seen.values().sum();
    if introductions > 0.0 {
        println!();
        println!(
            "Redis commands per cross-node introduction (INFO commandstats before and after \
             each Connect phase, all rounds: {introductions:.0} introductions):"
        );
        println!();
        println!("| command | calls | per introduction |");
        println!("|---|---|---|");
        for (name, n) in &calls {
            println!("| {name} | {n:.0} | {:.3} |", n / introductions);
        }
        let total: f64 = calls.values().sum();
        println!("| all | {total:.0} | {:.3} |", total / introductions);
    }

    // CPU of each process in the Connect phases.
    for (what, records) in [("one node", single), ("cluster", cluster)] {
        let mut by_round: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.kind == "cpu" && r.get("kind") == "connect")
        {
            by_round
                .entry(r.get("round").to_owned())
                .or_default()
                .push((r.get("process").to_owned(), r.num("percent")));
        }
        for (round, shares) in by_round {
            let cells: Vec<String> = shares
                .iter()
                .map(|(process, percent)| format!("{process} {percent:.0}%"))
                .collect();
            println!(
                "{}CPU in the Connect phase, {what}, round {round} (% of one core): {}",
                if round == "1" { "\n" } else { "" },
                cells.join(", ")
            );
        }
    }
}

/// The pid of a Redis (from `INFO server`).
fn redis_pid(redis: &RedisServer) -> Result<u32> {
    let info = redis.cli(&["INFO", "server"])?;
    info.lines()
        .find_map(|l| l.trim().strip_prefix("process_id:")?.parse().ok())
        .context("no process_id in Redis's INFO server")
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
    println!(
        "machine: {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    let binary = args
        .server_binary
        .clone()
        .unwrap_or_else(|| release.join("gateway"));

    if args.nodes == 1 {
        let node = start_node(&binary, &dir, "gateway", &secret, &args, None)?;
        run_load(
            &release,
            std::slice::from_ref(&node),
            &secret,
            &args,
            None,
            None,
        )?;
        println!();
        print_counters(&node, false)?;
    } else {
        let nodes = args.nodes;
        let mut loads = Vec::new();
        println!();
        println!("## One node alone (no cluster), the baseline");
        println!();
        loads.push(("before the one-node run".to_owned(), load_average()));
        let single_summary = dir.join("single.summary");
        {
            let node = start_node(&binary, &dir, "gateway", &secret, &args, None)?;
            run_load(
                &release,
                std::slice::from_ref(&node),
                &secret,
                &args,
                None,
                Some(&single_summary),
            )?;
            println!();
            print_counters(&node, false)?;
        }
        println!();
        println!("## {nodes} nodes sharing the rendezvous through one Redis");
        println!();
        loads.push((format!("before the {nodes}-node run"), load_average()));
        let cluster_summary = dir.join("cluster.summary");
        {
            let redis = RedisServer::start(&dir)?;
            let pid = redis_pid(&redis)?;
            println!(
                "redis: redis-server --port {} --save \"\" --appendonly no (pid {pid}, fresh)",
                redis.port
            );
            let mut cluster = Vec::new();
            for k in 1..=nodes {
                cluster.push(start_node(
                    &binary,
                    &dir,
                    &format!("gw-{k}"),
                    &secret,
                    &args,
                    Some(&redis.url()),
                )?);
            }
            wait_cluster(&cluster)?;
            run_load(
                &release,
                &cluster,
                &secret,
                &args,
                Some((redis.port, pid)),
                Some(&cluster_summary),
            )?;
            println!();
            for node in &cluster {
                print_counters(node, true)?;
            }
            println!(
                "Redis keys after the run: {} (peers + gw:nodes + one inbox stream per node)",
                redis.cli(&["DBSIZE"])?
            );
        }
        loads.push(("at the end".to_owned(), load_average()));
        print_comparison(
            nodes,
            &read_summary(&single_summary)?,
            &read_summary(&cluster_summary)?,
            &loads,
        );
    }
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
    if args.redis_memory_peers > 0 {
        println!();
        println!(
            "Redis memory per registered peer (cargo xtask bench-redis-memory --peers {}):",
            args.redis_memory_peers
        );
        redis_memory::bench_redis_memory(&redis_memory::RedisMemoryArgs {
            peers: args.redis_memory_peers,
            batch: 2_000,
        })?;
    }
    Ok(())
}
