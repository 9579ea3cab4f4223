//! What the agent's kernel programs see of TCP punching: two `gateway peer --tcp
//! simultaneous-open` agents, each with `--ebpf-interface eth0 --metrics-listen`, watch
//! their TCP punch port as a TCP punch port (`watch::PUNCH_TCP`). Through two
//! port-restricted cones every side counts exactly one punched TCP flow (the one to the
//! other peer: the TCP connection the agent keeps to the gateway is not a punch flow).
//! Through two NATs that answer an unsolicited SYN with RST, a side whose attempt
//! failed must have counted the RSTs as `tcp_rst` bounces of TCP flows.
use std::{net::SocketAddr, time::Duration};

use gateway_tests::{
    daemon::{http_get, metric_value},
    lab::{NatPreset, lab_available},
    punch::{self, PunchLab, Topology},
};

/// Where each agent serves its metrics (each lab host has its own loopback).
const METRICS: &str = "127.0.0.1:9479";
const OBSERVE: [&str; 4] = ["--metrics-listen", METRICS, "--ebpf-interface", "eth0"];
/// Time for packets still crossing the lab's namespaces to reach the programs.
const SETTLE: Duration = Duration::from_millis(300);

/// One agent's kernel counts, per protocol, as its /metrics exports them.
#[derive(Debug)]
struct Counts {
    punched_tcp: f64,
    punched_udp: f64,
    punched_all: f64,
    rst_tcp: f64,
    rst_udp: f64,
    rst_all: f64,
    early_tcp: f64,
    text: String,
}

fn counts(pair: &PunchLab, site: &str) -> Counts {
    let host = pair
        .lab
        .site(site)
        .and_then(|s| s.host(0))
        .unwrap_or_else(|| panic!("host of site {site}"));
    let addr: SocketAddr = METRICS.parse().expect("address");
    let text = http_get(host, addr, "/metrics")
        .unwrap_or_else(|e| panic!("metrics of site {site}'s agent: {e}"));
    let value = |name: &str, labels: &str| {
        metric_value(&text, name, labels)
            .unwrap_or_else(|| panic!("{name}{{{labels}}} missing on site {site}:\n{text}"))
    };
    assert_eq!(
        value("gateway_ebpf_loaded", ""),
        1.0,
        "site {site}:\n{text}"
    );
    let by = |protocol: &str| {
        (
            value(
                "gateway_punched_flows_by_protocol_total",
                &format!("protocol=\"{protocol}\""),
            ),
            value(
                "gateway_bounced_packets_by_protocol_total",
                &format!("protocol=\"{protocol}\",reason=\"tcp_rst\""),
            ),
        )
    };
    let (punched_tcp, rst_tcp) = by("tcp");
    let (punched_udp, rst_udp) = by("udp");
    Counts {
        punched_tcp,
        punched_udp,
        punched_all: value("gateway_punched_flows_total", ""),
        rst_tcp,
        rst_udp,
        rst_all: value("gateway_bounced_packets_total", "reason=\"tcp_rst\""),
        early_tcp: value(
            "gateway_bounced_packets_by_protocol_total",
            "protocol=\"tcp\",reason=\"before_egress\"",
        ),
        text,
    }
}

/// Starts the pair with `--tcp simultaneous-open` and the observers, and waits for
/// both TCP verdicts (`tcp-path-up` or `tcp-punch-failed`).
fn run(alice: NatPreset, bob: NatPreset) -> (PunchLab, Option<String>, Option<String>) {
    let args = [&["--tcp", "simultaneous-open"][..], &OBSERVE].concat();
    let mut pair = punch::start(Topology::TwoSites(alice, bob), &args, &args).expect("punch lab");
    // Registration, discovery and the introduction take a second or two; the
    // technique's window is 6 s.
    let a = pair.alice.wait_for("tcp-p", Duration::from_secs(15));
    let b = pair.bob.wait_for("tcp-p", Duration::from_secs(5));
    std::thread::sleep(SETTLE);
    (pair, a, b)
}

fn up(line: &Option<String>) -> bool {
    line.as_deref()
        .is_some_and(|l| l.starts_with("tcp-path-up"))
}

/// Checks what holds for every run: the per-protocol series add up to the unlabelled
/// ones, UDP flows never carry TCP RSTs, and the agent's TCP port has at most one punch
/// flow (the one to the peer; the connection to the gateway is ignored).
fn consistent(site: &str, c: &Counts) {
    assert_eq!(
        c.punched_tcp + c.punched_udp,
        c.punched_all,
        "site {site}: {c:?}"
    );
    assert_eq!(c.rst_tcp + c.rst_udp, c.rst_all, "site {site}: {}", c.text);
    assert_eq!(c.rst_udp, 0.0, "site {site}: {}", c.text);
    assert!(
        c.punched_tcp <= 1.0,
        "site {site}: the gateway's TCP connection was counted as a punch flow:\n{}",
        c.text
    );
}

#[test]
fn simultaneous_open_through_port_restricted_cones_is_one_punched_tcp_flow_per_side() {
    if !lab_available() {
        return;
    }
    let (pair, alice, bob) = run(
        NatPreset::port_restricted_cone(),
        NatPreset::port_restricted_cone(),
    );
    assert!(
        up(&alice) && up(&bob),
        "simultaneous open connects through two port-restricted cones (docs/tcp-splicing.md); alice {:?} bob {:?}",
        pair.alice.seen(),
        pair.bob.seen()
    );
    for site in ["a", "b"] {
        let c = counts(&pair, site);
        consistent(site, &c);
        // The TCP punch port has two flows: to the gateway (its mapping connection,
        // SYN out and SYN-ACK back: it would count as punched if it were not ignored)
        // and to the peer. Exactly one is punched.
        assert_eq!(
            c.punched_tcp, 1.0,
            "site {site}: one punched TCP flow, to the peer:\n{}",
            c.text
        );
        // The UDP path is punched too (every introduction punches UDP as well), and
        // counted apart.
        assert!(c.punched_udp >= 1.0, "site {site}:\n{}", c.text);
        // A silently dropping NAT sends no RST, and lets no TCP packet reach the host
        // before the host sent to its source.
        assert_eq!(c.rst_tcp, 0.0, "site {site}:\n{}", c.text);
        assert_eq!(c.early_tcp, 0.0, "site {site}:\n{}", c.text);
    }
    // The agents' TCP connections to the gateway were made before their programs
    // were attached and have been idle since. Stopping the gateway makes them carry
    // packets: its FIN comes in, the agent's kernel acknowledges it. Were that
    // connection a punch flow, the FIN would bounce (ingress before egress) and the
    // ACK open a flow.
    let pid = pair.gateway.pid().expect("gateway pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM {pid}");
    std::thread::sleep(Duration::from_secs(1));
    for site in ["a", "b"] {
        let c = counts(&pair, site);
        consistent(site, &c);
        assert_eq!(
            (c.punched_tcp, c.early_tcp),
            (1.0, 0.0),
            "site {site}: the gateway's TCP connection is not a punch flow:\n{}",
            c.text
        );
    }
}

#[test]
fn simultaneous_open_through_rst_nats_counts_the_rsts_where_it_fails() {
    if !lab_available() {
        return;
    }
    let (pair, alice, bob) = run(NatPreset::reject_rst(), NatPreset::reject_rst());
    let (a, b) = (counts(&pair, "a"), counts(&pair, "b"));
    consistent("a", &a);
    consistent("b", &b);
    println!(
        "reject-rst | reject-rst: alice {alice:?} bob {bob:?}; tcp_rst bounces alice {} bob {}; punched TCP flows alice {} bob {}",
        a.rst_tcp, b.rst_tcp, a.punched_tcp, b.punched_tcp
    );
    // Both verdicts arrive (the window is bounded).
    assert!(
        alice.is_some() && bob.is_some(),
        "alice {alice:?} bob {bob:?}"
    );
    if !(up(&alice) && up(&bob)) {
        // The attempt failed: each try's earlier SYN met the other NAT without an
        // entry and was answered with RST, which reached its sender through its own
        // NAT (an only-crossing pair of SYNs would have connected). So the kernels
        // saw RSTs on TCP punch flows that were not punched yet.
        assert!(
            a.rst_tcp + b.rst_tcp >= 1.0,
            "failed through RST NATs without a tcp_rst bounce:\n{}\n{}",
            a.text,
            b.text
        );
    }
    // Racy either way (docs/tcp-splicing.md: 3/15 connected): when it connected, each
    // side punched its one TCP flow.
    if up(&alice) && up(&bob) {
        assert_eq!((a.punched_tcp, b.punched_tcp), (1.0, 1.0));
    }
}
