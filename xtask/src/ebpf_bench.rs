//! `cargo xtask bench-ebpf`: what the tc programs cost per packet.
//!
//! 1. `BPF_PROG_TEST_RUN`: each program runs the same frame many times in the kernel,
//!    beside the pass-through baseline (returns `TC_ACT_UNSPEC`, reads nothing) in the
//!    same run; the difference is the cost the programs add per packet.
//! 2. Throughput: UDP datagrams blasted over a veth pair between two namespaces for a
//!    fixed time, with nothing attached, with the pass-through baseline attached, and
//!    with the real programs attached (every datagram a punch-flow packet), rounds
//!    interleaved; medians reported.
use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use gateway::ebpf::{AttachMode, EbpfProbe, ProgramRole, WatchSpec};

use crate::toolchain;

/// Options of `cargo xtask bench-ebpf`.
#[derive(Debug, clap::Args)]
pub struct BenchEbpfArgs {
    /// Runs of each frame per BPF_PROG_TEST_RUN call.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Interleaved rounds of every case (medians are reported).
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Seconds each throughput round sends for (0 skips the throughput part).
    #[arg(long, default_value_t = 1)]
    seconds: u64,
}

const LOCAL: [u8; 4] = [192, 0, 2, 1];
const REMOTE: [u8; 4] = [198, 51, 100, 7];
const GATEWAY: [u8; 4] = [203, 0, 113, 10];

fn ipv4_udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.1.to_be_bytes());
    udp.extend_from_slice(&dst.1.to_be_bytes());
    udp.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4(src.0, dst.0, 17, &udp)
}

fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

fn ipv6_udp(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn frame(ip: &[u8], ether_type: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// A 64-byte payload starting like a STUN Binding request.
fn stun_payload() -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[..8].copy_from_slice(&[0x00, 0x01, 0x00, 0x2c, 0x21, 0x12, 0xa4, 0x42]);
    p
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark and prints markdown tables.
pub fn bench_ebpf(args: BenchEbpfArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-ebpf loads eBPF programs and makes namespaces: run it as root");
    }
    toolchain::build_ebpf()?;
    // Shared machines are noisy: say how busy this one was.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let one_minute = load.split_whitespace().next().unwrap_or("?");
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        println!("load average {one_minute} on {cpus} CPUs at the start");
        println!();
    }
    let object = std::fs::read(toolchain::ebpf_object()).context("reading the eBPF object")?;
    test_run_table(&object, &args)?;
    if args.seconds > 0 {
        throughput_table(&object, &args)?;
    }
    Ok(())
}

fn test_run_table(object: &[u8], args: &BenchEbpfArgs) -> Result<()> {
    let watch = WatchSpec {
        counted_udp_ports: vec![3478],
        punch_udp_ports: vec![4000],
        punch_tcp_ports: vec![4100],
        stun_cookie: true,
        ignored_remotes: vec![SocketAddr::from((GATEWAY, 3478))],
    };
    let mut probe = EbpfProbe::load_object(object, &watch, &[], AttachMode::Auto)?;
    let payload = stun_payload();
    let punch_out = ipv4_udp((LOCAL, 4000), (REMOTE, 5000), &payload);
    let punch_in = ipv4_udp((REMOTE, 5000), (LOCAL, 4000), &payload);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&punch_out[..28]);
    let tcp_other = {
        let mut l4 = vec![
            0x1f, 0x90, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff,
        ];
        l4.extend_from_slice(&[0, 0, 0, 0]);
        l4.extend_from_slice(&[0u8; 64]);
        ipv4(LOCAL, REMOTE, 6, &l4)
    };
    let cases: Vec<(&str, ProgramRole, Vec<u8>)> = vec![
        (
            "TCP, unwatched port (most traffic on a host)",
            ProgramRole::Egress,
            frame(&tcp_other, 0x0800),
        ),
        (
            "UDP, unwatched port, no STUN cookie",
            ProgramRole::Egress,
            frame(&ipv4_udp((LOCAL, 9000), (REMOTE, 9001), &[0u8; 64]), 0x0800),
        ),
        (
            "UDP punch packet out (flow update)",
            ProgramRole::Egress,
            frame(&punch_out, 0x0800),
        ),
        (
            "UDP punch packet in, flow punched",
            ProgramRole::Ingress,
            frame(&punch_in, 0x0800),
        ),
        (
            "UDP, unwatched, STUN to an unknown flow in (bounce)",
            ProgramRole::Ingress,
            frame(
                &ipv4_udp(([203, 0, 113, 99], 5000), (LOCAL, 9002), &payload),
                0x0800,
            ),
        ),
        (
            "ICMP port unreachable quoting a punch flow",
            ProgramRole::Ingress,
            frame(&ipv4(REMOTE, LOCAL, 1, &icmp), 0x0800),
        ),
        (
            "IPv6 UDP punch packet out",
            ProgramRole::Egress,
            frame(&ipv6_udp(4000, 5000, &payload), 0x86DD),
        ),
    ];
    // Create the flows the cases expect, as traffic would have.
    probe.test_run(ProgramRole::Egress, &frame(&punch_out, 0x0800), 1)?;
    probe.test_run(ProgramRole::Ingress, &frame(&punch_in, 0x0800), 1)?;
    let baseline_frame = frame(&punch_out, 0x0800);
    let mut baseline = Vec::new();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..args.rounds {
        let run = probe.test_run(ProgramRole::PassThrough, &baseline_frame, args.repeat)?;
        baseline.push(run.duration.as_nanos() as f64);
        for (i, (_, role, frame)) in cases.iter().enumerate() {
            let run = probe.test_run(*role, frame, args.repeat)?;
            if run.return_value != gateway_ebpf::TC_ACT_UNSPEC as u32 {
                bail!(
                    "a program returned {} instead of TC_ACT_UNSPEC",
                    run.return_value
                );
            }
            results[i].push(run.duration.as_nanos() as f64);
        }
    }
    let base = median(&mut baseline);
    let base_min = baseline.first().copied().unwrap_or(0.0);
    println!(
        "BPF_PROG_TEST_RUN, {} runs per call, {} interleaved rounds; ns per packet (the kernel reports whole ns), median and, in brackets, the least disturbed round (minimum)",
        args.repeat, args.rounds
    );
    println!();
    println!("| case | program | pass-through baseline | added by the program | ratio |");
    println!("|---|---|---|---|---|");
    for (i, (name, role, _)) in cases.iter().enumerate() {
        let t = median(&mut results[i]);
        let t_min = results[i].first().copied().unwrap_or(0.0);
        let which = match role {
            ProgramRole::Ingress => "ingress",
            ProgramRole::Egress => "egress",
            ProgramRole::PassThrough => "pass",
        };
        println!(
            "| {name} ({which}) | {t:.0} [{t_min:.0}] | {base:.0} [{base_min:.0}] | {:.0} [{:.0}] | {:.2} |",
            (t - base).max(0.0),
            (t_min - base_min).max(0.0),
            t / base.max(1.0)
        );
    }
    println!();
    Ok(())
}

/// Runs `f` on a thread that entered network namespace `netns`.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = File::open(format!("/var/run/netns/{netns}"))
        .with_context(|| format!("opening namespace {netns}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on an open namespace fd, affecting only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("a thread in {netns} panicked"))?
    .with_context(|| format!("entering {netns}"))
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    if !status.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

/// Two namespaces joined by a veth pair (tx 10.99.0.1 — rx 10.99.0.2), deleted on drop.
/// Named like the lab's, so the lab's stale-namespace cleanup also removes leftovers.
struct VethPair {
    tx: String,
    rx: String,
}

impl VethPair {
    fn create() -> Result<Self> {
        let prefix = format!("gwlab-{}-bench", std::process::id());
        let pair = Self {
            tx: format!("{prefix}-tx"),
            rx: format!("{prefix}-rx"),
        };
        ip(&["netns", "add", &pair.tx])?;
        ip(&["netns", "add", &pair.rx])?;
        ip(&[
            "-n", &pair.tx, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
            "netns", &pair.rx,
        ])?;
        for (ns, addr) in [(&pair.tx, "10.99.0.1/24"), (&pair.rx, "10.99.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", "veth0"])?;
            ip(&["-n", ns, "link", "set", "veth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.tx, &self.rx] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attached {
    Nothing,
    PassThrough,
    Programs,
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// What one throughput round measured.
struct Round {
    sent_per_s: f64,
    received_per_s: f64,
    /// The sending thread's CPU time per datagram: the send system call plus, on a
    /// veth pair, the softirq work done in its context (tc egress, the peer's tc
    /// ingress, IP and UDP receive; this kernel has no IRQ time accounting, so that
    /// work is charged to the thread). Much steadier on a shared machine than rates.
    cpu_ns_per_datagram: f64,
}

/// Every round's measurements for one attachment.
struct Series {
    attached: Attached,
    sent: Vec<f64>,
    received: Vec<f64>,
    cpu: Vec<f64>,
}

impl Series {
    fn new(attached: Attached) -> Self {
        Self {
            attached,
            sent: Vec::new(),
            received: Vec::new(),
            cpu: Vec::new(),
        }
    }
}

/// One throughput round.
fn blast(pair: &VethPair, seconds: u64) -> Result<Round> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (received, stop) = (received.clone(), stop.clone());
        let socket = in_netns(&pair.rx, || UdpSocket::bind("10.99.0.2:5000"))??;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let sender = in_netns(&pair.tx, || UdpSocket::bind("10.99.0.1:4000"))??;
    let payload = stun_payload();
    let to = SocketAddr::from((Ipv4Addr::new(10, 99, 0, 2), 5000));
    let duration = Duration::from_secs(seconds);
    let started = Instant::now();
    let cpu_started = thread_cpu_ns();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        for _ in 0..256 {
            if sender.send_to(&payload, to).is_ok() {
                sent += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = thread_cpu_ns() - cpu_started;
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    receiver
        .join()
        .map_err(|_| anyhow!("the receiver panicked"))?;
    Ok(Round {
        sent_per_s: sent as f64 / elapsed,
        received_per_s: received.load(Ordering::Relaxed) as f64 / elapsed,
        cpu_ns_per_datagram: cpu / sent.max(1) as f64,
    })
}

fn throughput_table(object: &[u8], args: &BenchEbpfArgs) -> Result<()> {
    let pair = VethPair::create()?;
    let mut rows: Vec<Series> = [Attached::Nothing, Attached::PassThrough, Attached::Programs]
        .into_iter()
        .map(Series::new)
        .collect();
    // Both ends watch their port, so every datagram is a punch packet on the way out
    // (a flow update) and an early one on the way in (a bounce): the costly paths.
    let watch = WatchSpec {
        punch_udp_ports: vec![4000, 5000],
        ..WatchSpec::default()
    };
    for _ in 0..args.rounds {
        for Series {
            attached,
            sent,
            received,
            cpu,
        } in &mut rows
        {
            let mut probe = EbpfProbe::load_object(object, &watch, &[], AttachMode::Auto)?;
            for ns in [&pair.tx, &pair.rx] {
                let kind = *attached;
                probe = in_netns(ns, move || -> Result<EbpfProbe> {
                    match kind {
                        Attached::Nothing => {}
                        Attached::PassThrough => probe.attach_baseline("veth0", AttachMode::Tcx)?,
                        Attached::Programs => probe.attach("veth0", AttachMode::Tcx)?,
                    }
                    Ok(probe)
                })??;
            }
            let round = blast(&pair, args.seconds)?;
            sent.push(round.sent_per_s);
            received.push(round.received_per_s);
            cpu.push(round.cpu_ns_per_datagram);
            if *attached == Attached::Programs {
                let totals = probe.read_punch_totals()?;
                let bounced = totals.bounced(gateway_ebpf::BounceReason::BeforeEgress);
                if bounced == 0 {
                    bail!("the programs saw no traffic: the benchmark measured nothing");
                }
            }
            probe.detach();
        }
    }
    println!(
        "UDP throughput over a veth pair, 64-byte payloads, one sender thread, {} s per round, median of {} interleaved rounds",
        args.seconds, args.rounds
    );
    println!();
    println!(
        "| attached on both ends | sender CPU per datagram, median (min-max) | added vs nothing | ratio | sent/s | received/s |"
    );
    println!("|---|---|---|---|---|---|");
    let base = median(&mut rows[0].cpu.clone());
    for Series {
        attached,
        sent,
        received,
        cpu,
    } in &mut rows
    {
        let s = median(sent);
        let r = median(received);
        let c = median(cpu);
        let (low, high) = (cpu.first().copied(), cpu.last().copied());
        let name = match attached {
            Attached::Nothing => "nothing",
            Attached::PassThrough => "pass-through baseline (ingress + egress)",
            Attached::Programs => "punch observers (ingress + egress)",
        };
        println!(
            "| {name} | {c:.0} ns ({:.0}-{:.0}) | {:+.0} ns | {:.2} | {:.0} k | {:.0} k |",
            low.unwrap_or(0.0),
            high.unwrap_or(0.0),
            c - base,
            c / base.max(1.0),
            s / 1000.0,
            r / 1000.0,
        );
    }
    Ok(())
}
