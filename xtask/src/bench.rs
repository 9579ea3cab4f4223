//! `cargo xtask punch-bench`: time from introduction to a two-way direct path, per NAT
//! pair, measured in the lab with the real binaries (median and p95 over N punches).
use std::time::Duration;

use anyhow::{Result, anyhow};
use gateway_tests::{
    lab::NatPreset,
    punch::{self, Topology},
};

use crate::{demo::require_lab, toolchain};

/// Options of `cargo xtask punch-bench`.
#[derive(Debug, clap::Args)]
pub struct PunchBenchArgs {
    /// Punches per NAT pair.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

const PAIRS: &[(&str, &str)] = &[
    ("port-restricted-cone", "port-restricted-cone"),
    ("no-nat", "port-restricted-cone"),
    ("restricted-cone", "symmetric"),
    ("port-restricted-cone", "symmetric-sequential"),
    ("port-restricted-cone", "router-accepts-unsolicited"),
    ("lossy-5", "port-restricted-cone"),
];

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_millis()
}

/// Runs the benchmark and prints a markdown table.
pub fn punch_bench(args: PunchBenchArgs) -> Result<()> {
    toolchain::build_host()?;
    require_lab()?;
    println!("| alice's NAT | bob's NAT | direct | median ms | p95 ms |");
    println!("|---|---|---|---|---|");
    for &(a, b) in PAIRS {
        let preset = |name: &str| name.parse::<NatPreset>().map_err(|e| anyhow!("{e}"));
        let mut times = Vec::new();
        for _ in 0..args.runs {
            // A fresh lab each run: new NAT state, new agents, a new introduction.
            let mut scenario = punch::start(Topology::TwoSites(preset(a)?, preset(b)?), &[], &[])?;
            times.extend(scenario.wait_direct(Duration::from_secs(6)));
        }
        times.sort_unstable();
        println!(
            "| {a} | {b} | {}/{} | {} | {} |",
            times.len(),
            args.runs,
            percentile(&times, 50.0),
            percentile(&times, 95.0)
        );
    }
    Ok(())
}
