//! Project automation, run as `cargo xtask <command>` (see `cargo xtask --help`).
mod bench;
mod deb;
mod demo;
mod ebpf_bench;
mod flood_bench;
mod redis_memory;
mod relay_bench;
mod rendezvous_bench;
mod soak;
mod toolchain;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The gateway's project tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "The gateway's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install every system package and tool the project needs (Debian 12, as root):
    /// the eBPF toolchain (rustc-web, rust-web-src, llvm-22-dev, bpf-linker 0.13),
    /// nftables and iproute2 for the NAT lab. Idempotent; fast when already done.
    Setup,
    /// Build the kernel programs (BTF included) into target/ebpf; the next build of
    /// the `gateway` crate embeds them.
    BuildEbpf,
    /// Set everything up and run every test: unit, property, lab and eBPF tests, plus
    /// rustfmt, clippy and a short fuzz run. This is what CI runs.
    Test,
    /// Fuzz every target (cargo fuzz, libFuzzer) for a while, on the corpus kept in
    /// fuzz/corpus/TARGET (new inputs are added there; minimize and commit them).
    Fuzz {
        /// Seconds per fuzz target [default: 60].
        #[arg(long, conflicts_with = "minutes")]
        seconds: Option<u64>,
        /// Minutes per fuzz target (long runs: 10 or more before a release).
        #[arg(long)]
        minutes: Option<u64>,
        /// Only this target (a file name in fuzz/fuzz_targets without .rs).
        #[arg(long)]
        target: Option<String>,
    },
    /// Set everything up and run the demo: a NAT lab, `gateway serve` on its server
    /// (with --nodes N: N nodes sharing a Redis in the lab), STUN traffic from peers
    /// behind two kinds of NAT, then the eBPF counters and the metrics.
    Demo(demo::DemoArgs),
    /// Measure time from introduction to a direct path per NAT pair in the lab
    /// (median and p95), printing a markdown table.
    PunchBench(bench::PunchBenchArgs),
    /// Time to a path per WAN profile (`cargo xtask lab profiles`) for probe pairs,
    /// birthday pairs and a relayed pair (median and p95 against the goals), as a
    /// markdown table.
    WanTiming(bench::WanTimingArgs),
    /// The UDP NAT matrix (or with --tcp the TCP table) with every lab under a WAN
    /// profile: the matrix tests run with GATEWAY_LAB_PROFILE set.
    WanMatrix(bench::WanMatrixArgs),
    /// Relay fallback and the background upgrade to direct under a WAN profile
    /// (default mobile), as a markdown table.
    WanFallback(bench::WanFallbackArgs),
    /// Measure what the eBPF programs cost per packet: BPF_PROG_TEST_RUN of each path
    /// beside a pass-through program, and UDP throughput over a veth pair with nothing,
    /// the pass-through, or the programs attached. Needs root; prints markdown tables.
    BenchEbpf(ebpf_bench::BenchEbpfArgs),
    /// Relay benchmark: start coturn (and with --gateway the gateway's relay) on
    /// loopback, drive both alternately with the same standard-TURN load (relayed
    /// messages/s client to client, loss, server CPU per message, allocations/s,
    /// Bindings/s, memory per allocation) and print medians and ratios. Runs from a
    /// release build (it rebuilds one first).
    BenchRelay(relay_bench::BenchRelayArgs),
    /// The relay benchmark's load against one running TURN server (loopback only).
    TurnLoad(relay_bench::TurnLoadArgs),
    /// Measure introductions per second end to end through the real `gateway serve`
    /// on loopback (release build), next to STUN Binding requests per second through
    /// the same server as the baseline; also the server's CPU per request and memory.
    /// With --nodes N, also N nodes sharing one Redis, every introduction crossing
    /// nodes, side by side with one node alone (see docs/benchmarks.md, "Cluster").
    BenchRendezvous(rendezvous_bench::RendezvousBenchArgs),
    /// Redis memory per registered peer of a cluster: write N realistic registry
    /// entries (the driver's encoding and keys, `SET gw:peer:<id> .. EX 60`,
    /// pipelined) into a fresh redis-server and report used_memory per peer. Needs
    /// no gateway binary.
    BenchRedisMemory(redis_memory::RedisMemoryArgs),
    /// What spoofed floods leave behind: `gateway serve` (release, loopback, the
    /// default budgets) under 100k forged-source datagrams/s of each kind
    /// (Binding, Allocate, Register, ChannelData) and held TCP connections that never
    /// speak; RSS, file descriptors, CPU and answers per kind, as a markdown table.
    /// Needs root (raw socket).
    BenchFlood(flood_bench::FloodBenchArgs),
    /// The churn soak in the NAT lab (default 30 minutes, then up to 11 minutes for
    /// what is left to expire): punched and relayed agent pairs, TURN allocations
    /// over UDP and TCP, every relayed byte checked; fails on a lost datagram or when
    /// the gateway's RSS or descriptors end more than 5% above the start. Needs root.
    Soak(soak::SoakArgs),
    /// Build the Debian package target/debian/gateway_VERSION_ARCH.deb (release build
    /// with the eBPF programs embedded, the systemd unit, /etc/gateway/gateway.toml,
    /// the system user, man pages, shell completions) with dpkg-deb alone.
    Deb(deb::DebArgs),
    /// The NAT lab for humans: bring a topology up, or clean up leftovers.
    #[command(subcommand)]
    Lab(demo::LabCommand),
}

fn main() -> ExitCode {
    forget_cargo_run_variables();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Setup => toolchain::setup(),
        Command::BuildEbpf => toolchain::build_ebpf(),
        Command::Test => toolchain::test(),
        Command::Fuzz {
            seconds,
            minutes,
            target,
        } => toolchain::fuzz(
            minutes.map_or(seconds.unwrap_or(60), |m| m.saturating_mul(60)),
            target.as_deref(),
        ),
        Command::Demo(args) => demo::demo(args),
        Command::PunchBench(args) => bench::punch_bench(args),
        Command::WanTiming(args) => bench::wan_timing(args),
        Command::WanMatrix(args) => bench::wan_matrix(args),
        Command::WanFallback(args) => bench::wan_fallback(args),
        Command::BenchEbpf(args) => ebpf_bench::bench_ebpf(args),
        Command::BenchRendezvous(args) => rendezvous_bench::bench_rendezvous(args),
        Command::BenchRedisMemory(args) => redis_memory::bench_redis_memory(&args),
        Command::Lab(command) => demo::lab(command),
        Command::BenchFlood(args) => flood_bench::bench_flood(args),
        Command::Soak(args) => soak::soak(&args),
        Command::Deb(args) if args.check => deb::check(&args),
        Command::Deb(args) => deb::build(&args).map(|_| ()),
        Command::BenchRelay(args) => relay_bench::bench_relay(args),
        Command::TurnLoad(args) => relay_bench::turn_load(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask` is `cargo run`, which puts xtask's own package variables
/// (`CARGO_MANIFEST_DIR=.../xtask`, `CARGO_PKG_NAME=xtask`, ...) in our environment,
/// and every cargo started from here inherits them. Build scripts that ask cargo to
/// rerun when one of them changes (ring's does, for several) then saw other values
/// than under a plain `cargo build`, so each switch between the two rebuilt ring,
/// rustls, redis and everything above them, the gateway included. Dropping them
/// makes the builds inside and outside xtask the same.
fn forget_cargo_run_variables() {
    let names: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_str().is_some_and(is_cargo_run_variable))
        .collect();
    for name in names {
        // SAFETY: called first in main, before this process starts any thread.
        unsafe { std::env::remove_var(name) };
    }
}

/// Whether `name` is one of the variables `cargo run` sets for the binary it runs
/// (its package's, not cargo's own settings such as `CARGO` or `CARGO_HOME`).
fn is_cargo_run_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
        )
}

#[cfg(test)]
mod tests {
    use super::is_cargo_run_variable;

    #[test]
    fn only_the_run_packages_variables_are_dropped() {
        for dropped in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
        ] {
            assert!(is_cargo_run_variable(dropped), "{dropped}");
        }
        for kept in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "RUSTFLAGS",
            "PATH",
        ] {
            assert!(!is_cargo_run_variable(kept), "{kept}");
        }
    }
}
