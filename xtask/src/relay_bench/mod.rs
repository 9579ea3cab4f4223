//! `cargo xtask bench-relay` and `cargo xtask turn-load`: a TURN load generator that
//! speaks standard TURN (the gateway's sans-IO client for the control plane,
//! `sendmmsg`/`recvmmsg` for the data plane), so the same tool drives coturn and the
//! gateway's relay side by side on this machine.
//!
//! `turn-load` runs the scenarios against one server that is already running.
//! `bench-relay` starts coturn (and with `--gateway` the gateway) on loopback,
//! alternates the same scenarios between them, and prints medians and ratios.
mod fleet;
mod flood;
mod load;
mod mmsg;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gateway_tests::coturn::{self, Coturn, CoturnConfig};

use self::{
    fleet::Target,
    flood::{Flood, FloodOptions, FloodTarget, FloodTools, WireMode},
    load::{Memory, Rate, Throughput, ThroughputOptions},
};
use crate::toolchain;

/// The benchmark's shared secret and realm (loopback only, never a real secret).
const SECRET: &str = "bench-relay-secret";
const REALM: &str = "bench.relay";
/// Relay port ranges: disjoint, below Linux's ephemeral range (32768 on), each wide
/// enough for the 5000 held allocations. Debian's coturn 4.6.1:
const COTURN_RELAY_PORTS: (u16, u16) = (10_000, 15_999);
/// coturn 4.17.1 for the windowed method.
const NEW_COTURN_RELAY_PORTS: (u16, u16) = (2_000, 7_999);
/// coturn 4.17.1 for the flood (with --multiplex-peer it relays from the ports at
/// [`MULTIPLEX_PEER_PORT`] instead).
const FLOOD_COTURN_RELAY_PORTS: (u16, u16) = (16_000, 19_999);
/// coturn 4.17.1's --multiplex-peer-port: two ports per relay thread from here.
const MULTIPLEX_PEER_PORT: u16 = 9_100;
const GATEWAY_RELAY_PORTS: (u16, u16) = (20_000, 25_999);
/// The second gateway's (with the kernel fast path).
const FAST_GATEWAY_RELAY_PORTS: (u16, u16) = (26_000, 31_999);

/// The measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Relayed messages per second client to client, loss, server CPU per message.
    Throughput,
    /// STUN Binding requests answered per second.
    Bindings,
    /// Allocations (with deallocation) per second.
    Allocations,
    /// Server RSS per held allocation.
    Memory,
}

/// Scenario options shared by `turn-load` and `bench-relay`.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Which measurements to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,bindings,allocations,memory"
    )]
    scenarios: Vec<Scenario>,
    /// Clients relaying to each other in pairs in the throughput runs.
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Seconds each throughput run sends.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload sizes of the throughput runs (bytes, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "120,1200")]
    payloads: Vec<usize>,
    /// Messages each client may have in flight (0: send as fast as the socket takes,
    /// like `turnutils_uclient -z 0`).
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Upper bound on the messages of one throughput run.
    #[arg(long, default_value_t = 10_000_000)]
    max_messages: u64,
    /// Threads the throughput runs' client pairs are split over, each with its own
    /// send/receive loop (default: the available cores; at most one per pair).
    #[arg(long)]
    generator_threads: Option<usize>,
    /// Allocations (each deallocated at once) in the allocation-rate run (coturn
    /// does 2000 in about 0.3 s here, too short to time well, hence more).
    #[arg(long, default_value_t = 5000)]
    allocations: usize,
    /// Allocations in progress at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Allocations held at once for memory per allocation (0 skips it).
    #[arg(long, default_value_t = 5000)]
    held: usize,
    /// Seconds of the Binding-rate run.
    #[arg(long, default_value_t = 5)]
    binding_seconds: u64,
    /// Sockets of the Binding-rate run (each keeps `--window` requests in flight).
    #[arg(long, default_value_t = 4)]
    binding_sockets: usize,
}

impl LoadArgs {
    /// `--generator-threads`, or the cores available to this process.
    fn generator_threads(&self) -> usize {
        self.generator_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1)
    }
}

/// Options of `cargo xtask turn-load`.
#[derive(Debug, clap::Args)]
pub struct TurnLoadArgs {
    /// The TURN server's UDP address (loopback).
    #[arg(long)]
    server: SocketAddr,
    /// Its REST shared secret (coturn's --static-auth-secret).
    #[arg(long)]
    secret: String,
    /// Its realm (checked against the one it announces).
    #[arg(long)]
    realm: Option<String>,
    /// Its process id, for CPU per message and memory per allocation.
    #[arg(long)]
    pid: Option<u32>,
    #[command(flatten)]
    load: LoadArgs,
}

/// The two ways of loading a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Method {
    /// The project's: client-to-client pairs with a window of messages in flight
    /// (throughput), plus Bindings, allocations and memory per allocation.
    Windowed,
    /// coturn's: `turnutils_uclient -Y packet` to `turnutils_peer` reflectors.
    Flood,
    /// Both, one after the other, on the same servers.
    All,
}

/// Options of the packet-flood method.
#[derive(Clone, Debug, clap::Args)]
pub struct FloodArgs {
    /// Segment GSO batches before loopback's receive path, as on a wire (`ethtool -K
    /// lo tx-udp-segmentation off` for the run, restored afterwards; root).
    #[arg(long)]
    as_on_a_wire: bool,
    /// Seconds measured per flood.
    #[arg(long, default_value_t = 5)]
    flood_seconds: u64,
    /// Seconds of flooding before the measured window.
    #[arg(long, default_value_t = 2)]
    flood_warmup: u64,
    /// Payload bytes of the flood (`turnutils_uclient -l`).
    #[arg(long, default_value_t = 120)]
    flood_payload: usize,
    /// uclient processes (each `-m 1` to its own reflector).
    #[arg(long, default_value_t = 1)]
    flood_streams: usize,
    /// uclient's `--sender-threads`.
    #[arg(long, default_value_t = 1)]
    flood_sender_threads: usize,
}

impl FloodArgs {
    fn options(&self) -> FloodOptions {
        FloodOptions {
            seconds: self.flood_seconds,
            warmup: self.flood_warmup,
            payload: self.flood_payload,
            streams: self.flood_streams,
            sender_threads: self.flood_sender_threads,
        }
    }
}

/// Options of `cargo xtask bench-relay`.
#[derive(Debug, clap::Args)]
pub struct BenchRelayArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// The project's windowed method, coturn's packet flood, or both.
    #[arg(long, value_enum, default_value = "windowed")]
    method: Method,
    #[command(flatten)]
    flood: FloodArgs,
    /// Leave out Debian's coturn 4.6.1 (coturn 4.17.1, built from
    /// ../shared/vendor, always runs: it is the baseline).
    #[arg(long)]
    no_debian_coturn: bool,
    /// Alternating rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also start `gateway serve` as a relay and compare it with coturn.
    #[arg(long)]
    gateway: bool,
    /// With --gateway, also start a second `gateway serve` with the kernel fast path
    /// (`--relay-fast-path ebpf` on lo; needs root and a gateway built with its eBPF
    /// object) and measure it in the same rounds ("gateway-ebpf").
    #[arg(long, requires = "gateway")]
    fast_path: bool,
    /// Also start today's `gateway serve` (no relay flags: it answers STUN Binding
    /// only) and compare Bindings/s with coturn; the gateway runs no other scenario.
    #[arg(long, conflicts_with = "gateway")]
    gateway_binding_only: bool,
    /// Also run coturn's own load tool (turnutils_uclient -y) against coturn once,
    /// as a sanity check of the figures.
    #[arg(long)]
    uclient: bool,
}

/// Re-runs this xtask command from a release build when running from a debug one (a
/// debug load generator would measure itself). Returns false when it did not.
pub fn run_in_release() -> Result<bool> {
    if !cfg!(debug_assertions) {
        return Ok(false);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    eprintln!("bench: rebuilding xtask and gateway in release mode first");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .current_dir(toolchain::workspace_root())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "xtask",
            "-p",
            "gateway",
        ])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("release build failed: {status}");
    }
    let xtask = toolchain::workspace_root().join("target/release/xtask");
    let status = Command::new(xtask)
        .args(args)
        .status()
        .context("running the release xtask")?;
    if !status.success() {
        bail!("release run failed: {status}");
    }
    Ok(true)
}

/// All figures of one server in one round.
#[derive(Clone, Debug, Default)]
struct Figures {
    throughput: Vec<Throughput>,
    allocations: Option<Rate>,
    bindings: Option<Rate>,
    /// Measured once per server, first, on the fresh process.
    memory: Option<Memory>,
    /// coturn's packet flood.
    flood: Option<Flood>,
}

/// One measurement of one round.
#[derive(Clone, Copy, Debug)]
enum Step {
    Throughput(usize),
    Bindings,
    Allocations,
}

/// The steps `load` selects, in the order they run.
fn steps(load: &LoadArgs) -> Vec<Step> {
    let mut steps = Vec::new();
    if load.scenarios.contains(&Scenario::Throughput) {
        steps.extend(load.payloads.iter().map(|&p| Step::Throughput(p)));
    }
    if load.scenarios.contains(&Scenario::Bindings) {
        steps.push(Step::Bindings);
    }
    if load.scenarios.contains(&Scenario::Allocations) {
        steps.push(Step::Allocations);
    }
    steps
}

fn run_step(
    target: &Target,
    load: &LoadArgs,
    name: &str,
    step: Step,
    figures: &mut Figures,
) -> Result<()> {
    match step {
        Step::Throughput(payload) => run_throughput(target, load, name, payload, figures),
        Step::Bindings => run_bindings(target, load, name, figures),
        Step::Allocations => run_allocations(target, load, name, figures),
    }
}

fn run_throughput(
    target: &Target,
    load: &LoadArgs,
    name: &str,
    payload: usize,
    figures: &mut Figures,
) -> Result<()> {
    let result = load::throughput(
        target,
        ThroughputOptions {
            clients: load.clients,
            payload,
            duration: Duration::from_secs(load.seconds),
            window: load.window,
            max_messages: load.max_messages,
            generator_threads: load.generator_threads(),
        },
    )
    .with_context(|| format!("{name}: throughput at {payload} bytes"))?;
    eprintln!(
        "{name}: {} B: {:.0} msg/s, sent {} received {} ({:.2}% lost), unexpected {}, server CPU {:?} ({} µs/msg), generator CPU {:.2} s ({} threads)",
        result.payload,
        result.rate(),
        result.sent,
        result.received,
        result.loss_percent(),
        result.unexpected,
        result.server_cpu,
        micros(result.server_us_per_message()),
        result.generator_cpu.as_secs_f64(),
        result.generator_threads,
    );
    figures.throughput.push(result);
    Ok(())
}

fn run_bindings(target: &Target, load: &LoadArgs, name: &str, figures: &mut Figures) -> Result<()> {
    let bindings = load::bindings(
        target,
        load.binding_sockets,
        load.window.max(1),
        Duration::from_secs(load.binding_seconds),
        50_000_000,
    )
    .with_context(|| format!("{name}: bindings"))?;
    eprintln!(
        "{name}: Bindings: {:.0}/s ({} answered, {} unanswered, {:.1} s), server {} µs each",
        bindings.per_second(),
        bindings.count,
        bindings.failures,
        bindings.seconds,
        micros(bindings.server_us_each()),
    );
    figures.bindings = Some(bindings);
    Ok(())
}

fn run_allocations(
    target: &Target,
    load: &LoadArgs,
    name: &str,
    figures: &mut Figures,
) -> Result<()> {
    let allocations = load::allocations(target, load.allocations, load.concurrency)
        .with_context(|| format!("{name}: allocations"))?;
    eprintln!(
        "{name}: allocations: {:.0}/s ({} done, {} failed, {:.1} s), server {} µs each",
        allocations.per_second(),
        allocations.count,
        allocations.failures,
        allocations.seconds,
        micros(allocations.server_us_each()),
    );
    figures.allocations = Some(allocations);
    Ok(())
}

fn micros(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |us| format!("{us:.2}"))
}

fn run_memory(target: &Target, load: &LoadArgs, name: &str) -> Result<Option<Memory>> {
    if load.held == 0 || target.pid.is_none() || !load.scenarios.contains(&Scenario::Memory) {
        return Ok(None);
    }
    let memory = load::memory(target, load.held, load.concurrency)
        .with_context(|| format!("{name}: memory"))?;
    eprintln!(
        "{name}: {} allocations held: RSS {} -> {} KiB, {:.0} bytes each",
        memory.allocations,
        memory.rss_before_kib,
        memory.rss_after_kib,
        memory.bytes_per_allocation()
    );
    Ok(Some(memory))
}

/// `cargo xtask turn-load`.
pub fn turn_load(args: TurnLoadArgs) -> Result<()> {
    if !args.server.ip().is_loopback() {
        bail!("turn-load only targets loopback addresses");
    }
    if run_in_release()? {
        return Ok(());
    }
    raise_fd_limit();
    let target = Target {
        server: args.server,
        secret: args.secret,
        pid: args.pid,
    };
    if let Some(realm) = &args.realm {
        check_realm(&target, realm)?;
    }
    let mut figures = Figures {
        memory: run_memory(&target, &args.load, "target")?,
        ..Figures::default()
    };
    for step in steps(&args.load) {
        run_step(&target, &args.load, "target", step, &mut figures)?;
    }
    let columns = [Column {
        name: "target".into(),
        rounds: vec![figures],
    }];
    print_table(metrics(&args.load), &columns);
    Ok(())
}

/// Allocates once, compares the realm the server announced with `realm`, and
/// releases the allocation.
fn check_realm(target: &Target, realm: &str) -> Result<()> {
    let members = load::allocate_many(target, 999_000, 1, 1)?;
    let announced = members
        .first()
        .and_then(|m| m.client.realm())
        .map(str::to_owned);
    load::deallocate_all(members, 1)?;
    match announced {
        Some(announced) if announced == realm => Ok(()),
        Some(announced) => bail!("the server announces realm {announced:?}, not {realm:?}"),
        None => bail!("the server allocated without a challenge (no realm announced)"),
    }
}

/// A running `gateway serve`; killed on drop.
struct GatewayServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    command_line: String,
}

impl Drop for GatewayServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the benchmark launches `gateway serve` as a TURN relay equivalent to the coturn
/// instance (same secret, realm, loopback relay address, its own port range, loopback
/// peers allowed). This is the one place that knows the relay's flags: adjust it when
/// they settle.
pub fn gateway_relay_command(
    binary: &Path,
    listen: SocketAddr,
    secret_file: &Path,
    realm: &str,
    relay_ports: (u16, u16),
    fast_path: bool,
) -> Command {
    let mut command = Command::new(binary);
    command.args([
        "serve",
        "--listen",
        &listen.to_string(),
        "--secret-file",
        &secret_file.display().to_string(),
        "--no-metrics",
        "--no-ebpf",
        "--no-relay-tcp",
        // The whole load comes from 127.0.0.1: no per-source reply budget.
        "--replies-per-source",
        "0",
        "--realm",
        realm,
        "--relay-address",
        &listen.ip().to_string(),
        "--relay-port-range",
        &format!("{}-{}", relay_ports.0, relay_ports.1),
        // Like coturn's --allow-loopback-peers: client-to-client on loopback.
        "--allow-peer",
        "127.0.0.0/8",
    ]);
    if fast_path {
        // Attached to the interface of the listen address: lo.
        command.args(["--relay-fast-path", "ebpf"]);
    }
    command
}

/// How a benchmarked gateway runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GatewayKind {
    /// Answers STUN Binding only.
    BindingOnly,
    /// The relay, every datagram in userspace.
    Relay,
    /// The relay with the kernel fast path.
    FastPath,
}

fn start_gateway(kind: GatewayKind) -> Result<GatewayServer> {
    let binary = toolchain::workspace_root().join("target/release/gateway");
    if !binary.is_file() {
        bail!(
            "{} is missing (cargo build --release -p gateway)",
            binary.display()
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "bench-relay-gateway-{}-{kind:?}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, SECRET)?;
    // The gateway refuses a secret file others may read.
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut command = if kind != GatewayKind::BindingOnly {
        let fast = kind == GatewayKind::FastPath;
        let ports = if fast {
            FAST_GATEWAY_RELAY_PORTS
        } else {
            GATEWAY_RELAY_PORTS
        };
        gateway_relay_command(&binary, addr, &secret_file, REALM, ports, fast)
    } else {
        let mut command = Command::new(&binary);
        command.args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--no-metrics",
            "--no-ebpf",
            // The whole load comes from 127.0.0.1: no per-source reply budget.
            "--replies-per-source",
            "0",
        ]);
        command
    };
    let command_line = format!("{command:?}");
    let log = std::fs::File::create(dir.join("gateway.log"))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {command_line}"))?;
    flood::stop_on_signal(child.id());
    let server = GatewayServer {
        child,
        addr,
        dir,
        command_line,
    };
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ready = false;
    while Instant::now() < deadline && server.child.try_wait()?.is_none() {
        if coturn::wait_for_binding(addr, Duration::from_millis(200)) {
            ready = true;
            break;
        }
    }
    if !ready {
        let log = std::fs::read_to_string(server.dir.join("gateway.log")).unwrap_or_default();
        bail!(
            "the gateway did not answer a Binding on {addr}; started as {}; log:\n{log}",
            server.command_line
        );
    }
    Ok(server)
}

struct Column {
    name: String,
    /// One entry per round, plus one holding the memory figure.
    rounds: Vec<Figures>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// How many decimals a row shows.
#[derive(Clone, Copy)]
enum Precision {
    Whole,
    Hundredths,
}

/// One table row: a label, how to read the figure from one round, and its precision.
type Metric = (String, Box<dyn Fn(&Figures) -> Option<f64>>, Precision);

/// The median over a column's rounds of one row's figure.
fn column_value(column: &Column, read: &dyn Fn(&Figures) -> Option<f64>) -> Option<f64> {
    median(column.rounds.iter().filter_map(read).collect())
}

/// The rows of coturn's packet flood.
fn flood_metrics(flood: &FloodArgs) -> Vec<Metric> {
    use Precision::{Hundredths, Whole};
    let payload = flood.flood_payload;
    let rate = |label: &str, read: fn(&Flood) -> f64| -> Metric {
        (
            format!("{label}, {payload} B"),
            Box::new(move |r: &Figures| r.flood.as_ref().map(read)),
            Whole,
        )
    };
    vec![
        rate("offered ChannelData/s (client to server)", |f| f.offered),
        rate("**client to peer delivered/s**", |f| f.to_peer),
        rate("reflector echoes/s (what it received)", |f| f.echoed),
        rate("**peer to client delivered/s**", |f| f.to_client),
        rate("uclient recv_pps (median; coturn's metric)", |f| {
            f.uclient_recv
        }),
        (
            "return loss % (echoes not delivered to the client)".to_owned(),
            Box::new(|r| r.flood.as_ref().map(Flood::return_loss_percent)),
            Hundredths,
        ),
        (
            "server CPU µs per relayed datagram".to_owned(),
            Box::new(|r| r.flood.as_ref().and_then(Flood::server_us_per_message)),
            Hundredths,
        ),
        (
            "server + uclient + reflector CPU µs per relayed datagram".to_owned(),
            Box::new(|r| r.flood.as_ref().and_then(Flood::all_us_per_message)),
            Hundredths,
        ),
    ]
}

fn metrics(load: &LoadArgs) -> Vec<Metric> {
    use Precision::{Hundredths, Whole};
    let mut rows: Vec<Metric> = Vec::new();
    for (i, &payload) in load.payloads.iter().enumerate() {
        let at = move |r: &Figures| r.throughput.get(i).copied();
        rows.push((
            format!("relayed msg/s, {payload} B, {} clients", load.clients),
            Box::new(move |r| at(r).map(|t| t.rate())),
            Whole,
        ));
        rows.push((
            format!("loss %, {payload} B"),
            Box::new(move |r| at(r).map(|t| t.loss_percent())),
            Hundredths,
        ));
        rows.push((
            format!("server CPU µs per relayed msg, {payload} B"),
            Box::new(move |r| at(r).and_then(|t| t.server_us_per_message())),
            Hundredths,
        ));
        rows.push((
            format!("load generator CPU µs per relayed msg, {payload} B"),
            Box::new(move |r| at(r).and_then(|t| t.generator_us_per_message())),
            Hundredths,
        ));
        rows.push((
            format!("server + generator CPU µs per relayed msg, {payload} B"),
            Box::new(move |r| {
                at(r).and_then(|t| Some(t.server_us_per_message()? + t.generator_us_per_message()?))
            }),
            Hundredths,
        ));
    }
    rows.push((
        format!("allocations/s ({} with deallocation)", load.allocations),
        Box::new(|r| r.allocations.map(|a| a.per_second())),
        Whole,
    ));
    rows.push((
        "server CPU µs per allocation (401 round and deallocation included)".to_owned(),
        Box::new(|r| r.allocations.and_then(|a| a.server_us_each())),
        Hundredths,
    ));
    rows.push((
        "STUN Bindings/s".to_owned(),
        Box::new(|r| r.bindings.map(|b| b.per_second())),
        Whole,
    ));
    rows.push((
        "server CPU µs per Binding".to_owned(),
        Box::new(|r| r.bindings.and_then(|b| b.server_us_each())),
        Hundredths,
    ));
    rows.push((
        format!("server RSS bytes per allocation ({} held)", load.held),
        Box::new(|r| r.memory.map(|m| m.bytes_per_allocation())),
        Whole,
    ));
    rows
}

fn format_value(value: Option<f64>, precision: Precision) -> String {
    match (value, precision) {
        (None, _) => "—".to_owned(),
        (Some(v), Precision::Hundredths) => format!("{v:.2}"),
        (Some(v), Precision::Whole) => format!("{v:.0}"),
    }
}

fn print_table(rows: Vec<Metric>, columns: &[Column]) {
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    // One ratio column per server against the first (coturn).
    let ratio_header: String = names
        .iter()
        .skip(1)
        .map(|name| format!(" {name} / {} |", names[0]))
        .collect();
    println!("| metric | {} |{ratio_header}", names.join(" | "));
    println!(
        "|---|{}{}",
        "---|".repeat(columns.len()),
        "---|".repeat(columns.len().saturating_sub(1))
    );
    // The ratio is the median of the per-round ratios (the servers measured back to
    // back), not the ratio of the medians.
    let ratio = |read: &dyn Fn(&Figures) -> Option<f64>| {
        let mut cells = String::new();
        for other in columns.iter().skip(1) {
            let ratios: Vec<f64> = columns[0]
                .rounds
                .iter()
                .zip(&other.rounds)
                .filter_map(|(base, other)| match (read(base), read(other)) {
                    (Some(base), Some(other)) if base != 0.0 => Some(other / base),
                    _ => None,
                })
                .collect();
            cells.push_str(&median(ratios).map_or(" — |".to_owned(), |r| format!(" {r:.2}x |")));
        }
        cells
    };
    for (label, read, precision) in rows {
        let values: Vec<Option<f64>> = columns
            .iter()
            .map(|c| column_value(c, read.as_ref()))
            .collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        let cells: Vec<String> = values.iter().map(|v| format_value(*v, precision)).collect();
        println!(
            "| {label} | {} |{}",
            cells.join(" | "),
            ratio(read.as_ref())
        );
    }
}

/// Runs coturn's own load tool against `coturn` once and prints what it reports.
fn run_uclient(coturn: &Coturn, load: &LoadArgs) -> Result<()> {
    let payload = load.payloads.first().copied().unwrap_or(120);
    let messages = 10_000;
    let args = [
        "-y".to_owned(),
        "-c".to_owned(),
        "-m".to_owned(),
        load.clients.to_string(),
        "-n".to_owned(),
        messages.to_string(),
        "-l".to_owned(),
        payload.to_string(),
        "-z".to_owned(),
        "0".to_owned(),
        "-u".to_owned(),
        "bench".to_owned(),
        "-W".to_owned(),
        SECRET.to_owned(),
        "-p".to_owned(),
        coturn.addr().port().to_string(),
        coturn.addr().ip().to_string(),
    ];
    eprintln!("uclient: turnutils_uclient {}", args.join(" "));
    let cpu_before = load::process_cpu(coturn.pid());
    let started = Instant::now();
    let mut child = Command::new("turnutils_uclient")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting turnutils_uclient (Debian's coturn package)")?;
    let stdout = child.stdout.take().context("uclient's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut text);
        text
    });
    let limit = Duration::from_secs(120);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("turnutils_uclient ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, load::process_cpu(coturn.pid())) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let text = reader.join().unwrap_or_default();
    let summary = uclient_summary(&text);
    match summary {
        Some((sent, received, seconds)) => {
            let rate = received as f64 / seconds.max(1) as f64;
            let loss = 100.0 * sent.saturating_sub(received) as f64 / sent.max(1) as f64;
            println!(
                "turnutils_uclient ({} clients, {payload} B): sent {sent}, received {received} in {seconds} s (its own whole-second timer; {wall:.1} s wall with setup): {rate:.0} msg/s, {loss:.2}% lost; coturn CPU {}",
                load.clients,
                cpu.map_or("-".to_owned(), |c| format!(
                    "{:.2} s = {:.2} µs/msg",
                    c.as_secs_f64(),
                    c.as_secs_f64() * 1e6 / received.max(1) as f64
                )),
            );
        }
        None => bail!("could not read turnutils_uclient's summary:\n{text}"),
    }
    Ok(())
}

/// (sent, received, transmit seconds) from uclient's closing lines.
fn uclient_summary(text: &str) -> Option<(u64, u64, u64)> {
    let mut totals = None;
    let mut seconds = None;
    for line in text.lines() {
        if let Some(rest) = line.split("start_mclient: tot_send_msgs=").nth(1) {
            let (sent, rest) = rest.split_once(", tot_recv_msgs=")?;
            totals = Some((sent.trim().parse().ok()?, rest.trim().parse().ok()?));
        }
        if let Some(rest) = line.split("Total transmit time is ").nth(1) {
            seconds = rest.trim().parse().ok();
        }
    }
    let (sent, received) = totals?;
    Some((sent, received, seconds?))
}

/// coturn 4.17.1's flags for the packet flood: its documented best (one shared relay
/// socket pair per thread, sendmmsg with UDP GSO, recvmmsg on the shared sockets).
fn flood_coturn_flags() -> Vec<String> {
    [
        "--multiplex-peer",
        "--multiplex-peer-port",
        &MULTIPLEX_PEER_PORT.to_string(),
        "--udp-gso",
        "--udp-recvmmsg",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// coturn 4.17.1's flags for the windowed method: `--multiplex-peer` cannot relay
/// between two clients of the same server (a client's peer is then the server's own
/// shared relay socket: ChannelBind answers 400), so only what remains of its fast
/// paths, batched receives on the client listener.
fn windowed_coturn_flags() -> Vec<String> {
    vec!["--udp-recvmmsg".to_owned()]
}

fn start_coturn(
    turnserver: PathBuf,
    relay_ports: (u16, u16),
    extra_args: Vec<String>,
    name: &str,
) -> Result<Coturn> {
    let mut config = CoturnConfig::loopback(SECRET, REALM);
    config.relay_ports = relay_ports;
    config.turnserver = turnserver;
    config.extra_args = extra_args;
    let coturn = Coturn::start(&config).with_context(|| format!("starting {name}"))?;
    eprintln!("{name}: {}", coturn.command_line());
    flood::stop_on_signal(coturn.pid());
    Ok(coturn)
}

fn coturn_target(coturn: &Coturn) -> Target {
    Target {
        server: coturn.addr(),
        secret: SECRET.to_owned(),
        pid: Some(coturn.pid()),
    }
}

/// `cargo xtask bench-relay`.
pub fn bench_relay(args: BenchRelayArgs) -> Result<()> {
    if run_in_release()? {
        return Ok(());
    }
    raise_fd_limit();
    let windowed = matches!(args.method, Method::Windowed | Method::All);
    let flooding = matches!(args.method, Method::Flood | Method::All);
    let started = Instant::now();
    let vendored = coturn::build_vendored().context("building coturn 4.17.1")?;
    eprintln!(
        "coturn {}: {} (built from {}; {:.0} s)",
        coturn::VENDORED_VERSION,
        vendored.turnserver().display(),
        coturn::vendored_tarball().display(),
        started.elapsed().as_secs_f64()
    );
    let new_coturn = if windowed {
        Some(start_coturn(
            vendored.turnserver(),
            NEW_COTURN_RELAY_PORTS,
            windowed_coturn_flags(),
            "coturn-4.17.1",
        )?)
    } else {
        None
    };
    let flood_coturn = if flooding {
        Some(start_coturn(
            vendored.turnserver(),
            FLOOD_COTURN_RELAY_PORTS,
            flood_coturn_flags(),
            "coturn-4.17.1 (flood)",
        )?)
    } else {
        None
    };
    let old_coturn = if args.no_debian_coturn {
        None
    } else {
        Some(start_coturn(
            PathBuf::from(coturn::TURNSERVER),
            COTURN_RELAY_PORTS,
            Vec::new(),
            "coturn-4.6.1 (Debian)",
        )?)
    };
    for coturn in new_coturn.iter().chain(&flood_coturn).chain(&old_coturn) {
        check_realm(&coturn_target(coturn), REALM)?;
    }
    let gateway = if args.gateway || args.gateway_binding_only {
        let kind = if args.gateway {
            GatewayKind::Relay
        } else {
            GatewayKind::BindingOnly
        };
        let gateway = start_gateway(kind)?;
        eprintln!("gateway: {}", gateway.command_line);
        Some(gateway)
    } else {
        None
    };
    let fast_gateway = if args.fast_path {
        let gateway = start_gateway(GatewayKind::FastPath)?;
        eprintln!("gateway-ebpf: {}", gateway.command_line);
        Some(gateway)
    } else {
        None
    };
    let target_of = |g: &GatewayServer| Target {
        server: g.addr,
        secret: SECRET.to_owned(),
        pid: Some(g.child.id()),
    };
    let gateway_target = gateway.as_ref().map(target_of);
    let fast_target = fast_gateway.as_ref().map(target_of);
    if args.gateway {
        for target in gateway_target.iter().chain(&fast_target) {
            check_realm(target, REALM)?;
        }
    }
    let gateways: Vec<(&str, &Target)> = gateway_target
        .as_ref()
        .map(|t| ("gateway", t))
        .into_iter()
        .chain(fast_target.as_ref().map(|t| ("gateway-ebpf", t)))
        .collect();
    let old_target = old_coturn.as_ref().map(coturn_target);
    if args.uclient
        && let Some(old) = &old_coturn
    {
        run_uclient(old, &args.load)?;
    }
    if let Some(new) = &new_coturn {
        let new_target = coturn_target(new);
        let targets: Vec<(&str, &Target)> = std::iter::once(("coturn-4.17.1", &new_target))
            .chain(old_target.as_ref().map(|t| ("coturn-4.6.1", t)))
            .chain(gateways.iter().copied())
            .collect();
        run_windowed(&args, &targets)?;
    }
    if let Some(flood_coturn) = &flood_coturn {
        let tools = FloodTools {
            uclient: vendored.uclient(),
            peer: vendored.peer(),
        };
        let flood_target = |t: &Target| FloodTarget {
            server: t.server,
            secret: t.secret.clone(),
            pid: t.pid,
        };
        let targets: Vec<(&str, FloodTarget)> =
            std::iter::once(("coturn-4.17.1", flood_target(&coturn_target(flood_coturn))))
                .chain(
                    old_target
                        .as_ref()
                        .map(|t| ("coturn-4.6.1", flood_target(t))),
                )
                .chain(gateways.iter().map(|(n, t)| (*n, flood_target(t))))
                .collect();
        run_floods(&args, &tools, &targets)?;
    }
    drop(fast_gateway);
    drop(gateway);
    Ok(())
}

/// coturn's packet flood on every target, `--rounds` times in alternating order.
fn run_floods(
    args: &BenchRelayArgs,
    tools: &FloodTools,
    targets: &[(&str, FloodTarget)],
) -> Result<()> {
    let options = args.flood.options();
    let dir = std::env::temp_dir().join(format!("bench-relay-flood-{}", std::process::id()));
    let _wire = WireMode::new(args.flood.as_on_a_wire)?;
    if let Some((_, first)) = targets.first() {
        eprintln!(
            "flood: turnutils_uclient {} (one per stream, each to its own turnutils_peer -L 127.0.0.1 -p PORT)",
            flood::uclient_args(first, 0, &options).join(" ")
        );
    }
    let mut columns: Vec<Column> = targets
        .iter()
        .map(|(name, _)| Column {
            name: (*name).into(),
            rounds: Vec::new(),
        })
        .collect();
    for round in 0..args.rounds.max(1) {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut figures = vec![Figures::default(); targets.len()];
        for &index in &order {
            let (name, target) = &targets[index];
            eprintln!("round {}: {name}: flood", round + 1);
            let result = flood::flood(tools, target, &options, &dir.join(name))
                .with_context(|| format!("{name}: flood"))?;
            eprintln!(
                "{name}: flood: offered {:.0}/s, to peer {:.0}/s, echoed {:.0}/s, to client {:.0}/s (uclient recv_pps {:.0}, send_pps {:.0}), server CPU {} µs/datagram, all {} µs",
                result.offered,
                result.to_peer,
                result.echoed,
                result.to_client,
                result.uclient_recv,
                result.uclient_send,
                micros(result.server_us_per_message()),
                micros(result.all_us_per_message()),
            );
            figures[index].flood = Some(result);
        }
        for (column, figures) in columns.iter_mut().zip(figures) {
            column.rounds.push(figures);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\ncoturn's packet flood ({}; {} round(s), {} s each after {} s of warm-up, {} stream(s)):\n",
        if args.flood.as_on_a_wire {
            "as on a wire: lo tx-udp-segmentation off"
        } else {
            "plain loopback: GSO batches arrive whole"
        },
        args.rounds.max(1),
        options.seconds,
        options.warmup,
        options.streams,
    );
    print_table(flood_metrics(&args.flood), &columns);
    Ok(())
}

/// The project's windowed method on every target.
fn run_windowed(args: &BenchRelayArgs, targets: &[(&str, &Target)]) -> Result<()> {
    let mut gateway_load = args.load.clone();
    if args.gateway_binding_only {
        gateway_load.scenarios = vec![Scenario::Bindings];
    }
    let load_of = |name: &str| {
        if name.starts_with("coturn") {
            &args.load
        } else {
            &gateway_load
        }
    };
    let mut columns: Vec<Column> = Vec::new();
    // Memory first, on fresh servers.
    for (name, target) in targets {
        let memory = run_memory(target, load_of(name), name)?;
        columns.push(Column {
            name: (*name).into(),
            rounds: vec![Figures {
                memory,
                ..Figures::default()
            }],
        });
    }
    // Each step runs on every server back to back, in an order that alternates from
    // round to round, so the servers are compared under the same machine load (other
    // work on a shared machine drifts over minutes, not seconds).
    let all_steps = steps(&args.load);
    for round in 0..args.rounds.max(1) {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut figures = vec![Figures::default(); targets.len()];
        for &step in &all_steps {
            for &index in &order {
                let (name, target) = targets[index];
                let load = load_of(name);
                let wanted = match step {
                    Step::Throughput(_) => Scenario::Throughput,
                    Step::Bindings => Scenario::Bindings,
                    Step::Allocations => Scenario::Allocations,
                };
                if load.scenarios.contains(&wanted) {
                    eprintln!("round {}: {name}: {step:?}", round + 1);
                    run_step(target, load, name, step, &mut figures[index])?;
                }
            }
        }
        for (column, figures) in columns.iter_mut().zip(figures) {
            column.rounds.push(figures);
        }
    }
    println!("\nThe windowed method (client-to-client pairs):\n");
    print_table(metrics(&args.load), &columns);
    Ok(())
}

/// Holding thousands of allocations needs thousands of sockets here and in the
/// servers (which inherit the limit): raise the soft descriptor limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a zeroed rlimit.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closing lines of a real `turnutils_uclient -y` run (coturn 4.6.1).
    const UCLIENT_TAIL: &str = "\
16: : start_mclient: msz=6, tot_send_msgs=200000, tot_recv_msgs=183974, tot_send_bytes ~ 24000000, tot_recv_bytes ~ 22076880
17: : start_mclient: tot_send_msgs=200000, tot_recv_msgs=183974
17: : start_mclient: tot_send_bytes ~ 24000000, tot_recv_bytes ~ 22076880
17: : Total transmit time is 17
17: : Total lost packets 16026 (8.013000%), total send dropped 0 (0.000000%)
";

    #[test]
    fn uclient_summary_reads_the_final_totals() {
        assert_eq!(uclient_summary(UCLIENT_TAIL), Some((200_000, 183_974, 17)));
        assert_eq!(uclient_summary("0: : Total transmit time is 3"), None);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
        assert_eq!(median(Vec::new()), None);
    }
}
