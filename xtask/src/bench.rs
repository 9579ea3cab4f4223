//! `cargo xtask punch-bench`: time from introduction to a two-way direct path, per NAT
//! pair, measured in the lab with the real binaries (median and p95 over N punches).
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, anyhow};
use gateway::proto::credentials::SharedSecret;
use gateway_tests::{
    daemon::{GatewayProcess, PeerProcess},
    lab::{Lab, NatPreset},
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
    ("lossy-5", "port-restricted-cone"),
];

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs the benchmark and prints a markdown table.
pub fn punch_bench(args: PunchBenchArgs) -> Result<()> {
    toolchain::build_host()?;
    require_lab()?;
    let discover = [
        "--discover",
        "192.0.2.10:3479",
        "--discover",
        "192.0.2.11:3478",
    ];
    println!("| alice's NAT | bob's NAT | direct | median ms | p95 ms |");
    println!("|---|---|---|---|---|");
    for &(a, b) in PAIRS {
        let lab = Lab::builder()
            .site("a", a.parse::<NatPreset>().map_err(|e| anyhow!("{e}"))?)
            .site("b", b.parse::<NatPreset>().map_err(|e| anyhow!("{e}"))?)
            .build()?;
        let server = lab.server();
        let primary = server.addrs()[0];
        let secret_path =
            std::env::temp_dir().join(format!("gateway-bench-{}", std::process::id()));
        std::fs::write(&secret_path, "bench secret")?;
        let _gateway = GatewayProcess::start(
            server,
            SocketAddr::from((primary, 9478)),
            &[
                "--listen",
                "0.0.0.0:3478",
                "--discovery-listen",
                "0.0.0.0:3479",
                "--no-ebpf",
                "--secret-file",
                &secret_path.to_string_lossy(),
            ],
        )?;
        let secret = SharedSecret::new(b"bench secret");
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        let to = SocketAddr::from((primary, 3478));
        let host_a = lab.site("a").and_then(|s| s.host(0)).context("host a")?;
        let host_b = lab.site("b").and_then(|s| s.host(0)).context("host b")?;
        let mut times = Vec::new();
        for run in 0..args.runs {
            // Fresh agents each run: a new introduction, new NAT mappings.
            let bob_creds = secret.issue(&format!("bob{run}"), expiry)?;
            let alice_creds = secret.issue(&format!("alice{run}"), expiry)?;
            let mut bob = PeerProcess::start(
                host_b,
                to,
                &bob_creds.username,
                &bob_creds.password,
                &discover,
            )?;
            bob.wait_for("nat mapping", Duration::from_secs(3));
            let target = format!("bob{run}");
            let mut alice_args = vec!["--connect", target.as_str()];
            alice_args.extend_from_slice(&discover);
            let mut alice = PeerProcess::start(
                host_a,
                to,
                &alice_creds.username,
                &alice_creds.password,
                &alice_args,
            )?;
            if let Some(line) = alice.wait_for("path-up", Duration::from_secs(6)) {
                let ms = line
                    .split_whitespace()
                    .skip_while(|w| *w != "elapsed_ms")
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok());
                times.extend(ms);
            }
        }
        std::fs::remove_file(&secret_path).ok();
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
