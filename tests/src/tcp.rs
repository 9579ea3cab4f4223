//! Helpers for the TCP punching tests: an application's bytes both ways through two
//! agents' `--tcp-forward-listen 127.0.0.1:5100` / `--tcp-forward-to 127.0.0.1:6100`,
//! and the gateway's per-technique counts.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use crate::lab::Lab;

/// Alice's forwarder (127.0.0.1:5100 on host `i` of site a).
pub const FORWARD_LISTEN: &str = "127.0.0.1:5100";
/// Where bob's forwarder delivers (127.0.0.1:6100 on host `i` of site b).
pub const FORWARD_TO: &str = "127.0.0.1:6100";

/// An application on host `i` of site a connects to alice's forwarder and sends
/// `there`; one listening on host `i` of site b where bob's forwarder delivers must
/// read exactly that and answer `back`, which alice's application must read.
pub fn forward_both_ways(lab: &Lab, i: usize, there: &[u8], back: &[u8]) -> Result<(), String> {
    let host = |site: &str| {
        lab.site(site)
            .and_then(|s| s.host(i))
            .cloned()
            .ok_or("no host")
    };
    let (a, b) = (host("a")?, host("b")?);
    let addr = |s: &str| s.parse().map_err(|_| format!("bad address {s}"));
    let app_b = b
        .tcp_listen_on(addr(FORWARD_TO)?)
        .map_err(|e| e.to_string())?;
    let mut app_a: TcpStream = a
        .tcp_connect(addr(FORWARD_LISTEN)?, Duration::from_secs(2))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect to alice's forwarder: {e}"))?;
    app_a
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    app_a.write_all(there).map_err(|e| e.to_string())?;
    app_b.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match app_b.accept() {
            Ok((c, _)) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("bob's app got no connection: {e}")),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; there.len()];
    conn.read_exact(&mut buf)
        .map_err(|e| format!("bob's app reads: {e}"))?;
    if buf != there {
        return Err(format!("bob's app got {buf:?}"));
    }
    conn.write_all(back).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; back.len()];
    app_a
        .read_exact(&mut got)
        .map_err(|e| format!("alice's app reads: {e}"))?;
    if got != back {
        return Err(format!("alice's app got {got:?}"));
    }
    Ok(())
}

/// Sum of `gateway_tcp_punch_attempts_total` for a technique (CLI name; `auto` sums
/// over every technique) and outcome, over the NAT labels.
pub fn counted(metrics: &str, technique: &str, outcome: &str) -> f64 {
    let technique = if technique == "auto" {
        "technique=".to_owned()
    } else {
        format!("technique=\"{}\"", technique.replace('-', "_"))
    };
    let outcome = format!("outcome=\"{outcome}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("gateway_tcp_punch_attempts_total{"))
        .filter(|l| l.contains(&technique) && l.contains(&outcome))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
