//! `cargo xtask soak`: the churn soak of tests/src/soak.rs for as long as asked (30
//! minutes for the figures in docs/benchmarks.md, "Churn soak"): registrations,
//! introductions, punched and relayed agent pairs, TURN allocations with channels
//! over UDP and TCP, every relayed byte checked; the gateway's RSS and descriptors
//! after each round and once the stopped agents' state was gone. Needs root (the lab).
use std::time::Duration;

use anyhow::{Result, bail};
use gateway_tests::soak::{self, SoakConfig};

/// Options of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Minutes of churn (rounds start until this much time has passed).
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Datagrams checked each way per agent pair and TURN client per round.
    #[arg(long, default_value_t = 50)]
    datagrams: usize,
    /// TURN clients per transport (UDP, TCP) per round.
    #[arg(long, default_value_t = 2)]
    turn_clients: usize,
    /// Minutes to wait at most after the churn for allocations and registrations to
    /// be gone before the last reading (it ends as soon as they are).
    #[arg(long, default_value_t = 11)]
    settle_minutes: u64,
    /// Largest growth of RSS and descriptors, end against start, in percent.
    #[arg(long, default_value_t = 5.0)]
    tolerance_percent: f64,
}

/// Runs the soak and prints its figures; fails when a datagram was lost or the
/// footprint grew beyond the tolerance.
pub fn soak(args: &SoakArgs) -> Result<()> {
    crate::toolchain::build_host()?;
    let config = SoakConfig {
        duration: Duration::from_secs(args.minutes * 60),
        max_rounds: usize::MAX,
        datagrams: args.datagrams,
        turn_clients: args.turn_clients,
        settle: Duration::from_secs(args.settle_minutes * 60),
    };
    let report = soak::run(&config, |line| eprintln!("soak: {line}"))?;
    let (Some(start), Some(end)) = (report.start, report.end()) else {
        bail!("the soak made no reading");
    };
    let rss = report.rss_change_percent().unwrap_or(f64::NAN);
    let fds = report.fd_change_percent().unwrap_or(f64::NAN);
    println!("| figure | value |");
    println!("|---|---|");
    println!("| rounds | {} |", report.rounds);
    println!(
        "| agent pairs (direct / relayed) | {} / {} |",
        report.direct_pairs, report.relayed_pairs
    );
    println!(
        "| TURN allocations (UDP / TCP) | {} / {} |",
        report.turn_udp, report.turn_tcp
    );
    println!("| payload bytes checked | {} |", report.bytes_checked);
    println!("| datagrams lost | {} |", report.lost);
    println!(
        "| allocations retried from another port (437/441) | {} |",
        report.allocate_retries
    );
    println!(
        "| RSS start / peak / end (KiB) | {} / {} / {} ({rss:+.1}%) |",
        start.rss_kib,
        report.peak_rss_kib(),
        end.rss_kib
    );
    println!(
        "| descriptors start / end | {} / {} ({fds:+.1}%) |",
        start.fds, end.fds
    );
    println!(
        "| allocations / registrations at the end | {} / {} |",
        end.allocations, end.registered
    );
    if report.lost > 0 {
        bail!("{} datagrams were lost", report.lost);
    }
    if rss > args.tolerance_percent || fds > args.tolerance_percent {
        bail!(
            "the footprint grew: RSS {rss:+.1}%, descriptors {fds:+.1}% (tolerance {}%)",
            args.tolerance_percent
        );
    }
    Ok(())
}
