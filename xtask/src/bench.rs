//! `cargo xtask punch-bench`: time from introduction to a two-way direct path, per NAT
//! pair, measured in the lab with the real binaries (median and p95 over N punches).
use std::time::Duration;

use anyhow::{Result, anyhow};
use gateway_tests::{
    lab::{NatPreset, WanProfile},
    punch::{self, PathSeen, Topology},
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
    /// WAN profile of the lab's links (repeatable: one table per profile; see
    /// `cargo xtask lab profiles`).
    #[arg(long = "profile", value_name = "NAME", default_value = "lan")]
    profiles: Vec<String>,
}

/// Options of `cargo xtask wan-timing`.
#[derive(Debug, clap::Args)]
pub struct WanTimingArgs {
    /// Punches per NAT pair and profile.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Profiles [default: every delayed one].
    #[arg(long = "profile", value_name = "NAME")]
    profiles: Vec<String>,
    /// Only this pair of presets, as `ALICE,BOB` (repeatable) [default: two probe
    /// pairs, two birthday pairs and a relayed pair].
    #[arg(long = "pair", value_name = "ALICE,BOB")]
    pairs: Vec<String>,
}

/// The pairs of `cargo xtask wan-timing`: probe pairs, birthday pairs, a relayed one.
const WAN_PAIRS: &[(&str, &str)] = &[
    ("port-restricted-cone", "port-restricted-cone"),
    ("port-restricted-cone", "symmetric-sequential"),
    ("port-restricted-cone", "symmetric"),
    ("eim-random-port", "symmetric"),
    ("symmetric", "symmetric"),
];

/// Time to direct (or relayed) per pair under each WAN profile, with the goals.
pub fn wan_timing(args: WanTimingArgs) -> Result<()> {
    toolchain::build_host()?;
    require_lab()?;
    let profiles: Vec<WanProfile> = if args.profiles.is_empty() {
        WanProfile::ALL
            .into_iter()
            .filter(|p| *p != WanProfile::Lan)
            .collect()
    } else {
        args.profiles
            .iter()
            .map(|p| p.parse().map_err(|e| anyhow!("{e}")))
            .collect::<Result<_>>()?
    };
    let pairs = parse_pairs(&args.pairs, WAN_PAIRS)?;
    println!("| profile | alice's NAT | bob's NAT | path | runs | median ms | p95 ms | goal ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for profile in profiles {
        for (a, b) in &pairs {
            let row = measure(profile, a, b, args.runs, None)?;
            let rtt = profile.rtt().as_millis();
            let goal = match row.kind {
                Kind::Probe => format!("≤ {}", rtt + 20),
                Kind::Birthday => format!("≤ {}", 2 * rtt + 500),
                Kind::Relayed => "-".to_owned(),
            };
            println!(
                "| {} | {a} | {b} | {} | {}/{} | {} | {} | {goal} |",
                profile.name(),
                row.what,
                row.times.len(),
                args.runs,
                percentile(&row.times, 50.0),
                percentile(&row.times, 95.0),
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Probe,
    Birthday,
    Relayed,
}

struct Row {
    kind: Kind,
    what: &'static str,
    times: Vec<Duration>,
}

fn parse_pairs(given: &[String], default: &[(&str, &str)]) -> Result<Vec<(String, String)>> {
    if given.is_empty() {
        return Ok(default
            .iter()
            .map(|&(a, b)| (a.to_owned(), b.to_owned()))
            .collect());
    }
    given
        .iter()
        .map(|pair| {
            pair.split_once(',')
                .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
                .ok_or_else(|| anyhow!("--pair wants ALICE,BOB (two preset names), got {pair:?}"))
        })
        .collect()
}

/// Runs `runs` punches of `a` and `b` under `profile`; the times of those that got
/// the pair's expected kind of path (relayed for two random-port symmetric NATs,
/// direct otherwise).
fn measure(
    profile: WanProfile,
    a: &str,
    b: &str,
    runs: usize,
    dump_misses: Option<&std::path::Path>,
) -> Result<Row> {
    let preset = |name: &str| name.parse::<NatPreset>().map_err(|e| anyhow!("{e}"));
    let (pa, pb) = (preset(a)?, preset(b)?);
    let random = |p: &NatPreset| p.name() == "symmetric";
    let cone = |p: &NatPreset| p.mapping == gateway_tests::lab::Mapping::EndpointIndependent;
    let (kind, what) = if random(&pa) && random(&pb) {
        (Kind::Relayed, "relayed")
    } else if (random(&pa) && cone(&pb)) || (random(&pb) && cone(&pa)) {
        (Kind::Birthday, "direct (birthday)")
    } else {
        (Kind::Probe, "direct")
    };
    let slack = profile.rtt() * 20;
    let mut times = Vec::new();
    for _ in 0..runs {
        // A fresh lab each run: new NAT state, new agents, a new introduction.
        let mut scenario = punch::start_under(
            Topology::TwoSites(pa.clone(), pb.clone()),
            profile.conditions(),
            &[],
            &[],
            &[],
        )?;
        let want = if kind == Kind::Relayed {
            PathSeen::Relayed
        } else {
            PathSeen::Direct
        };
        let wait = Duration::from_secs(if kind == Kind::Relayed { 14 } else { 6 }) + slack;
        match scenario.wait_path(wait) {
            Some((seen, elapsed)) if seen == want => times.push(elapsed),
            _ => {
                if let Some(dir) = dump_misses {
                    dump_miss(dir, a, b, &mut scenario)?;
                }
            }
        }
    }
    times.sort_unstable();
    Ok(Row { kind, what, times })
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
    let chosen = parse_pairs(&args.pairs, PAIRS)?;
    for name in &args.profiles {
        let profile: WanProfile = name.parse().map_err(|e| anyhow!("{e}"))?;
        if profile != WanProfile::Lan || args.profiles.len() > 1 {
            println!("\nWAN profile {}: {}\n", profile.name(), profile.summary());
        }
        println!("| alice's NAT | bob's NAT | direct | median ms | p95 ms |");
        println!("|---|---|---|---|---|");
        for (a, b) in &chosen {
            let row =
                if a == "symmetric" && b == "symmetric" || a == b && a == "symmetric-sequential" {
                    // Both endpoint-dependent: count direct paths (expected none).
                    direct_only(profile, a, b, args.runs, args.dump_misses.as_deref())?
                } else {
                    measure(profile, a, b, args.runs, args.dump_misses.as_deref())?.times
                };
            println!(
                "| {a} | {b} | {}/{} | {} | {} |",
                row.len(),
                args.runs,
                percentile(&row, 50.0),
                percentile(&row, 95.0)
            );
        }
    }
    Ok(())
}

/// Direct paths only (for pairs expected to get none).
fn direct_only(
    profile: WanProfile,
    a: &str,
    b: &str,
    runs: usize,
    dump_misses: Option<&std::path::Path>,
) -> Result<Vec<Duration>> {
    let preset = |name: &str| name.parse::<NatPreset>().map_err(|e| anyhow!("{e}"));
    let mut times = Vec::new();
    for _ in 0..runs {
        let mut scenario = punch::start_under(
            Topology::TwoSites(preset(a)?, preset(b)?),
            profile.conditions(),
            &[],
            &[],
            &[],
        )?;
        match scenario.wait_direct(Duration::from_secs(6) + profile.rtt() * 20) {
            Some(elapsed) => times.push(elapsed),
            None => {
                if let Some(dir) = dump_misses {
                    dump_miss(dir, a, b, &mut scenario)?;
                }
            }
        }
    }
    times.sort_unstable();
    Ok(times)
}

/// Options of `cargo xtask wan-matrix`.
#[derive(Debug, clap::Args)]
pub struct WanMatrixArgs {
    /// The WAN profile of every cell's lab (see `cargo xtask lab profiles`).
    #[arg(long, default_value = "continental")]
    profile: String,
    /// The TCP table (tests/tests/tcp_matrix.rs) instead of the UDP NAT matrix.
    #[arg(long)]
    tcp: bool,
}

/// The full NAT matrix (or the TCP table) under a WAN profile: the matrix test itself
/// with `GATEWAY_LAB_PROFILE` set, so the rules and assertions are the same ones CI
/// checks without delay. Prints the measured table.
pub fn wan_matrix(args: WanMatrixArgs) -> Result<()> {
    let profile: WanProfile = args.profile.parse().map_err(|e| anyhow!("{e}"))?;
    toolchain::build_host()?;
    require_lab()?;
    let test = if args.tcp { "tcp_matrix" } else { "nat_matrix" };
    toolchain::run(
        std::process::Command::new(toolchain::host_cargo())
            .current_dir(toolchain::workspace_root())
            .env("GATEWAY_LAB_PROFILE", profile.name())
            .args(["test", "-p", "gateway-tests", "--test", test])
            .args(["--", "--nocapture"]),
    )
}

/// Options of `cargo xtask wan-fallback`.
#[derive(Debug, clap::Args)]
pub struct WanFallbackArgs {
    /// Runs of each scenario.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The WAN profile.
    #[arg(long, default_value = "mobile")]
    profile: String,
}

/// Relay fallback and the background upgrade under a WAN profile: (1) two random-port
/// symmetric NATs, relayed at once (time to the relayed path); (2) two
/// port-restricted cones whose direct UDP path the core drops: time to the relayed
/// path after the punch times out, then, once the core lets it through again, time
/// until the initiator reports the upgraded direct path (`--upgrade-interval 1`).
pub fn wan_fallback(args: WanFallbackArgs) -> Result<()> {
    let profile: WanProfile = args.profile.parse().map_err(|e| anyhow!("{e}"))?;
    toolchain::build_host()?;
    require_lab()?;
    let preset = |name: &str| name.parse::<NatPreset>().map_err(|e| anyhow!("{e}"));
    let slack = profile.rtt() * 20;
    let mut immediate = Vec::new();
    for _ in 0..args.runs {
        let mut scenario = punch::start_under(
            Topology::TwoSites(preset("symmetric")?, preset("symmetric")?),
            profile.conditions(),
            &[],
            &[],
            &[],
        )?;
        if let Some((PathSeen::Relayed, elapsed)) =
            scenario.wait_path(Duration::from_secs(14) + slack)
        {
            immediate.push(elapsed);
        }
    }
    let (mut fallback, mut upgrade) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let flags = ["--upgrade-interval", "1"];
        // The sites' direct UDP is dropped in the core (before the emulator's queue)
        // from the start; the gateway stays reachable.
        let block = |lab: &gateway_tests::lab::Lab| {
            let wan = |name: &str| {
                lab.site(name)
                    .map(|s| s.wan_addr())
                    .ok_or_else(|| gateway_tests::lab::LabError::Invalid("no site".into()))
            };
            let (a, b) = (wan("a")?, wan("b")?);
            lab.core()
                .sh(&format!(
                    "nft -f - <<EOF\ntable ip block {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  ip saddr {a} ip daddr {b} meta l4proto udp drop\n  ip saddr {b} ip daddr {a} meta l4proto udp drop\n }}\n}}\nEOF"
                ))
                .map(|_| ())
        };
        let mut scenario = punch::start_prepared(
            Topology::TwoSites(
                preset("port-restricted-cone")?,
                preset("port-restricted-cone")?,
            ),
            profile.conditions(),
            &block,
            &[],
            &flags,
            &flags,
        )?;
        match scenario.wait_path(Duration::from_secs(14) + slack) {
            Some((PathSeen::Relayed, elapsed)) => fallback.push(elapsed),
            other => {
                println!("(a blocked cone pair got {other:?}, not a relayed path)");
                continue;
            }
        }
        scenario.lab.core().sh("nft delete table ip block")?;
        let unblocked = std::time::Instant::now();
        if scenario
            .alice
            .wait_for("path-up peer bob direct", Duration::from_secs(10) + slack)
            .is_some()
        {
            upgrade.push(unblocked.elapsed());
        }
    }
    for v in [&mut immediate, &mut fallback, &mut upgrade] {
        v.sort_unstable();
    }
    println!("WAN profile {}: {}\n", profile.name(), profile.summary());
    println!("| scenario | runs | median ms | p95 ms |");
    println!("|---|---|---|---|");
    for (what, v) in [
        (
            "symmetric | symmetric: relayed at once (introduction to relayed path)",
            &immediate,
        ),
        (
            "cone pair, direct UDP blocked: introduction to relayed path",
            &fallback,
        ),
        (
            "then unblocked: to the upgraded direct path (--upgrade-interval 1)",
            &upgrade,
        ),
    ] {
        println!(
            "| {what} | {}/{} | {} | {} |",
            v.len(),
            args.runs,
            percentile(v, 50.0),
            percentile(v, 95.0)
        );
    }
    Ok(())
}
