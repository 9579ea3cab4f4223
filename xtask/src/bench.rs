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
    /// Only this pair of presets, as `ALICE,BOB` (repeatable) [default: the pairs of
    /// docs/benchmarks.md, including the birthday-punching ones].
    #[arg(long = "pair", value_name = "ALICE,BOB")]
    pairs: Vec<String>,
    /// When a run does not go direct, write both agents' status lines, the gateway's
    /// log and both NAT routers' conntrack tables into this directory (one file per
    /// miss), to find out why.
    #[arg(long, value_name = "DIR")]
    dump_misses: Option<std::path::PathBuf>,
}

const PAIRS: &[(&str, &str)] = &[
    ("port-restricted-cone", "port-restricted-cone"),
    ("no-nat", "port-restricted-cone"),
    ("restricted-cone", "symmetric"),
    ("port-restricted-cone", "symmetric-sequential"),
    ("port-restricted-cone", "router-accepts-unsolicited"),
    ("lossy-5", "port-restricted-cone"),
    // Birthday punching: one side endpoint-independent, the other random-port
    // symmetric.
    ("port-restricted-cone", "symmetric"),
    ("eim-random-port", "symmetric"),
    ("lossy-5", "symmetric"),
    ("symmetric", "router-accepts-unsolicited"),
    // Both endpoint-dependent: what prediction and birthday punching cannot do
    // (expected 0 direct; the relay carries these).
    ("symmetric-sequential", "symmetric-sequential"),
    ("symmetric", "symmetric"),
];

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_millis()
}

/// Writes what a missed run leaves behind: both agents' lines (after a short wait for
/// the relay fallback's lines), the gateway's log and the routers' conntrack tables.
fn dump_miss(
    dir: &std::path::Path,
    a: &str,
    b: &str,
    scenario: &mut punch::PunchLab,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    // Let the agents settle (relay fallback, late path-up lines) before the snapshot.
    scenario
        .alice
        .wait_for("no-such-line", Duration::from_secs(2));
    let mut text = String::new();
    for (who, peer) in [("alice", &scenario.alice), ("bob", &scenario.bob)] {
        text.push_str(&format!("== {who}\n{}\n", peer.seen().join("\n")));
    }
    for site in scenario.lab.sites() {
        let table = site
            .conntrack()
            .unwrap_or_else(|e| format!("conntrack failed: {e}"));
        text.push_str(&format!("== conntrack of site {}\n{table}\n", site.name()));
    }
    text.push_str(&format!("== gateway\n{}\n", scenario.gateway.log_text()));
    let path = dir.join(format!(
        "{a}--{b}-{}.txt",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    ));
    std::fs::write(&path, text)?;
    println!("(miss written to {})", path.display());
    Ok(())
}

/// Runs the benchmark and prints a markdown table.
pub fn punch_bench(args: PunchBenchArgs) -> Result<()> {
    toolchain::build_host()?;
    require_lab()?;
    println!("| alice's NAT | bob's NAT | direct | median ms | p95 ms |");
    println!("|---|---|---|---|---|");
    let chosen: Vec<(String, String)> = if args.pairs.is_empty() {
        PAIRS
            .iter()
            .map(|&(a, b)| (a.to_owned(), b.to_owned()))
            .collect()
    } else {
        args.pairs
            .iter()
            .map(|pair| {
                pair.split_once(',')
                    .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
                    .ok_or_else(|| {
                        anyhow!("--pair wants ALICE,BOB (two preset names), got {pair:?}")
                    })
            })
            .collect::<Result<_>>()?
    };
    for (a, b) in &chosen {
        let (a, b) = (a.as_str(), b.as_str());
        let preset = |name: &str| name.parse::<NatPreset>().map_err(|e| anyhow!("{e}"));
        let mut times = Vec::new();
        for _ in 0..args.runs {
            // A fresh lab each run: new NAT state, new agents, a new introduction.
            let mut scenario = punch::start(Topology::TwoSites(preset(a)?, preset(b)?), &[], &[])?;
            match scenario.wait_direct(Duration::from_secs(6)) {
                Some(elapsed) => times.push(elapsed),
                None => {
                    if let Some(dir) = &args.dump_misses {
                        dump_miss(dir, a, b, &mut scenario)?;
                    }
                }
            }
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
