//! The TCP table: every unordered pair of the lab's named NAT presets (same-same
//! included) times the four TCP techniques, each cell's expected outcome derived from
//! the presets' properties by `expect` (with its reason; the table and the rules are
//! in docs/tcp-splicing.md). One lab per pair: two sites with four hosts each, one
//! gateway (run with `--tcp-forge-synack`), and the four techniques at once, technique
//! i between host i of site a (alice-i, who connects) and host i of site b (bob-i).
//! Each host is its own network namespace, so one technique's suppression rules never
//! touch another's; the NAT routers are shared, with a distinct 4-tuple per technique.
//!
//! Every cell checks: the verdict lines of both sides (`tcp-path-up` / `tcp-punch-failed`),
//! bytes both ways through the forwarded port wherever both are up, and the gateway's
//! `gateway_tcp_punch_attempts_total` for that technique (its introduction's first
//! report: success where it connected, failed where it did not). A site that blocks UDP
//! is introduced over TCP (its agent falls back by itself). Racy cells (the outcome depends on which side's SYN comes first)
//! are not held to one outcome, but both sides must agree and the gateway must have
//! counted what they saw. A pair with an asserted cell that differs runs once more in a
//! fresh lab (the table says so); the second run must match.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway_tests::{
    daemon::PeerProcess,
    lab::{
        Filtering, Lab, Mapping, NatPreset, RouterKind, Unsolicited, lab_available,
        profile_from_env,
    },
    punch::{self, SERVICE},
    tcp::{counted, forward_both_ways},
};

const TECHNIQUES: [&str; 4] = [
    "simultaneous-open",
    "low-ttl",
    "natblaster",
    "server-assisted",
];

/// What a cell must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Both sides up, the forwarded port carries bytes both ways.
    Connects,
    /// Both sides fail the technique.
    Fails,
    /// Either, by timing; both sides must agree.
    Racy,
    /// A side's router loses 5 % of packets: any technique may lose a control
    /// message, a SYN or a crafted packet at the wrong moment (measured: every
    /// technique, NATBlaster and server-assisted included, failed now and then).
    /// Held only to: a path both call up carries the port both ways, and the gateway
    /// counted a report.
    Lossy,
}

/// Which endpoint a side's SYN to the other leaves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Map {
    /// No translation (no NAT, or a firewall only).
    Open,
    /// The one the gateway saw: endpoint-independent mapping (a preserved port, or a
    /// port hashed from the internal endpoint alone).
    Fixed,
    /// Another one per destination (address-dependent or address-and-port-dependent
    /// mapping, random or sequential): not the one the gateway saw.
    PerDestination,
}

/// What a side's router does with a SYN for its public endpoint that matches no
/// connection-tracking entry (the other side's SYN when it arrives first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inbound {
    /// Lets it through to the host (no NAT, or endpoint-independent filtering):
    /// the agent's listener answers it.
    Pass,
    /// Drops it silently.
    Drop,
    /// Answers RST (the preset's reject, or the router's own TCP stack when it
    /// accepts unsolicited packets to itself).
    Rst,
    /// Answers ICMP port unreachable.
    Icmp,
}

#[derive(Clone, Copy, Debug)]
struct Class {
    map: Map,
    inbound: Inbound,
    /// The router tracks TCP connections (sequence numbers, states): every NAT and
    /// the firewall.
    conntrack: bool,
    /// A segment its conntrack holds invalid still leaves toward the Internet (no
    /// router, or the firewall, which forwards whatever comes from the LAN); a NAT
    /// does not translate it, so it never arrives.
    forwards_invalid: bool,
    /// Its filter admits the other side's address from any port once it sent there
    /// (no filter, endpoint-independent or address-dependent filtering).
    admits_other_ports: bool,
    /// Its filter admits, on the mapping the gateway saw, the other side's SYNs once
    /// it sent anything to that side's address, although that mapping is not the one
    /// its own SYN used: the address-dependent NAT (its inbound map keeps every
    /// mapping, its filter is by address).
    admits_on_gateway_port: bool,
}

/// The TCP-relevant class of a preset. A site that blocks UDP is classed by what it
/// does to TCP (the `udp-blocked` preset is a port-restricted cone otherwise): its
/// agent registers over TCP after 3 s of UDP silence and is introduced over that
/// connection like any other.
fn class(p: &NatPreset) -> Class {
    let rejecting = match p.unsolicited {
        Unsolicited::Drop if p.router_accepts_unsolicited => Inbound::Rst,
        Unsolicited::Drop => Inbound::Drop,
        Unsolicited::IcmpPortUnreachable => Inbound::Icmp,
        Unsolicited::TcpReset => Inbound::Rst,
    };
    match p.kind {
        RouterKind::NoNat => Class {
            map: Map::Open,
            inbound: Inbound::Pass,
            conntrack: false,
            forwards_invalid: true,
            admits_other_ports: true,
            admits_on_gateway_port: false,
        },
        RouterKind::FirewallOnly => Class {
            map: Map::Open,
            inbound: rejecting,
            conntrack: true,
            forwards_invalid: true,
            admits_other_ports: false,
            admits_on_gateway_port: false,
        },
        RouterKind::Nat => Class {
            map: match p.mapping {
                Mapping::EndpointIndependent => Map::Fixed,
                _ => Map::PerDestination,
            },
            inbound: if p.filtering == Filtering::EndpointIndependent {
                Inbound::Pass
            } else {
                rejecting
            },
            conntrack: true,
            forwards_invalid: false,
            admits_other_ports: p.filtering != Filtering::AddressAndPortDependent,
            admits_on_gateway_port: p.mapping != Mapping::EndpointIndependent
                && p.filtering != Filtering::AddressAndPortDependent,
        },
    }
}

/// Simultaneous open: whether the earlier SYN's fate at the later side's router can
/// break the attempt (`x` answers the early SYN of `y`).
fn harmless_early_syn(x: Class, y: Class) -> bool {
    match x.inbound {
        // The listener answers it, or it is gone without a trace.
        Inbound::Pass | Inbound::Drop => true,
        // The RST closes y's entry and refuses y's connect(); y's retry works when
        // y's router lets x's SYN in meanwhile without answering (x's entry is still
        // in SYN_SENT, its SYN retransmitted) or passes it to y's listener.
        Inbound::Rst => matches!(y.inbound, Inbound::Pass | Inbound::Drop),
        // The ICMP kills y's connect() but leaves y's entry with that SYN's sequence
        // number: harmless only where y has no entry at all (no conntrack).
        Inbound::Icmp => !y.conntrack,
    }
}

/// The expected outcome of `technique` between alice behind `a` and bob behind `b`.
fn expect(technique: &str, a: &NatPreset, b: &NatPreset) -> (Expect, &'static str) {
    let (x, y) = (class(a), class(b));
    if a.loss_percent > 0 || b.loss_percent > 0 {
        return (
            Expect::Lossy,
            "5 % loss each way on every packet: the introduction, TCP-Seq, the SYNs, the crafted or forged packets and the hello can each be lost at the wrong moment (a lost UDP punch makes the agent take a newer introduction and drop the older one's TCP-Seq); otherwise as without loss",
        );
    }
    if x.map == Map::PerDestination || y.map == Map::PerDestination {
        if technique == "server-assisted" {
            return (
                Expect::Fails,
                "a per-destination side's SYN leaves on another port than the gateway saw: the SYN-ACK forged into its NAT goes to that port, where no entry waits for it; the other side's socket may be established by its forged SYN-ACK, but its data goes to that port too",
            );
        }
        if technique == "natblaster" && (x.admits_on_gateway_port || y.admits_on_gateway_port) {
            return (
                Expect::Racy,
                "with the address-dependent NAT on a side, the re-SYNs cross: the other side's goes to the mapping the gateway saw (let in once the low-TTL SYN went to its address), the address-dependent side's comes from a new port; which one the sockets take first decides it (measured: connects in most runs; in each of the first full runs one or two of these cells failed on a first run and connected on the rerun)",
            );
        }
        if x.admits_other_ports && x.map != Map::PerDestination
            || y.admits_other_ports && y.map != Map::PerDestination
        {
            return (
                Expect::Connects,
                "the per-destination side's SYN (the real one, or NATBlaster's re-SYN) comes from a new port; the other side's filter admits any port of its address (no filter, endpoint-independent, or address-dependent once its own SYN went there), its listener answers, and that answer is the reply the per-destination NAT waits for",
            );
        }
        if x.admits_on_gateway_port || y.admits_on_gateway_port {
            return (
                Expect::Connects,
                "the address-dependent NAT keeps the mapping the gateway saw in its inbound map and filters by address: once its host sent anything to the other side's address, the other side's SYNs to that mapping (from whatever port) are let in, the host's socket or listener answers through that mapping, and the answer is the reply the other side's entry waits for",
            );
        }
        return (
            Expect::Fails,
            "the per-destination side's SYNs come from a new port, which the other side's filter (address and port dependent, or a stateful firewall) never sent to, and the other side's SYNs go to the port the gateway saw, which the per-destination NAT does not let in",
        );
    }
    match technique {
        "simultaneous-open" => {
            if harmless_early_syn(x, y) && harmless_early_syn(y, x) {
                (
                    Expect::Connects,
                    "whichever SYN comes first, the other router lets it through to the listener, drops it silently, or answers RST to a side whose own router then lets the retry meet a socket still in SYN-SENT: the later SYN finds the earlier side's entry and a simultaneous open completes",
                )
            } else {
                (
                    Expect::Racy,
                    "a router answers the earlier SYN in a way that hurts the earlier side (a RST that closes its entry while its own router answers the retry with RST too, or an ICMP that kills its connect() but leaves its entry with that SYN's sequence number, so the listener's answer is out of window): it works only when the SYNs cross within a one-way delay or the first SYN is the other side's",
                )
            }
        }
        "low-ttl" => {
            if !x.conntrack && !y.conntrack {
                (
                    Expect::Connects,
                    "no connection tracking: the opener dies at the core and changes nothing, the real connect() works as without NAT",
                )
            } else {
                (
                    Expect::Racy,
                    "the opener's ICMP time-exceeded kills its socket, so the real SYN carries a new initial sequence number; a tracking router whose entry already saw the other side's SYN (SYN_SENT2) holds its host's answer out of window: it works only when both real SYNs leave before the other's arrives",
                )
            }
        }
        "natblaster" => {
            if x.forwards_invalid && y.forwards_invalid {
                (
                    Expect::Connects,
                    "no NAT on either side: each crafted SYN-ACK (seq = own ISN, ack = the other ISN + 1) leaves (a firewall forwards what comes from its LAN, valid or not) and is the answer the other kernel in SYN-SENT, and the other firewall's entry, wait for: the SYN-ACK step connects",
                )
            } else if !x.forwards_invalid && !y.forwards_invalid {
                (
                    Expect::Connects,
                    "two NATs: each crafted SYN-ACK leaves its own NAT's entry in the original direction, is invalid there and never arrives; the re-SYN (captured ISN, full TTL) reaches the other NAT, whose entry from the low-TTL SYN takes it as a simultaneous open: no SYN is ever unsolicited, whatever the NAT does with those",
                )
            } else {
                (
                    Expect::Racy,
                    "a NAT on one side only: the un-NATed side's crafted SYN-ACK leaves and is exactly what the NAT's entry waits for, so the NATed side is established at once; its own crafted SYN-ACK dies untranslated in its NAT when it leaves before that (the re-SYN then meets an established socket, whose bare ACK a socket in SYN-SENT ignores: the un-NATed side never synchronizes), but gets through once the entry is established, and then both connect at the SYN-ACK step (measured: failed in every full run until a CI run of 2026-12-06 connected firewall-only | full-cone twice)",
                )
            }
        }
        "server-assisted" => (
            Expect::Connects,
            "the gateway forges into each router the SYN-ACK its entry waits for (from the endpoint the SYN went to, acknowledging that SYN's ISN); without a router it reaches the kernel in SYN-SENT directly; nothing unsolicited ever reaches a router",
        ),
        _ => (Expect::Racy, "unknown technique"),
    }
}

/// The verdict line of an agent (`tcp-path-up` or `tcp-punch-failed`).
fn verdict(peer: &mut PeerProcess, until: Instant) -> Option<String> {
    peer.wait_for("tcp-p", until.saturating_duration_since(Instant::now()))
}

/// What one cell showed.
#[derive(Clone, Debug)]
struct Measured {
    /// Both sides up and the forwarded port carried bytes both ways.
    connected: bool,
    alice: Option<String>,
    bob: Option<String>,
    introduced: bool,
    forwarded: Result<(), String>,
    /// The gateway's counts (success, failed) for the technique.
    counted: (f64, f64),
    seen: String,
}

impl Measured {
    fn time_to_path(&self) -> Option<u64> {
        let line = self.alice.as_deref()?;
        line.split_whitespace()
            .skip_while(|w| *w != "elapsed_ms")
            .nth(1)?
            .parse()
            .ok()
    }

    /// Why it does not match `expect`, if it does not.
    fn problem(&self, expect: Expect) -> Option<String> {
        let up = |l: &Option<String>| l.as_deref().is_some_and(|l| l.starts_with("tcp-path-up"));
        let failed = |l: &Option<String>| {
            l.as_deref()
                .is_some_and(|l| l.starts_with("tcp-punch-failed"))
        };
        let (success, fail) = self.counted;
        match expect {
            Expect::Connects if !self.connected => Some(format!(
                "expected a connection; forwarding {:?}",
                self.forwarded
            )),
            Expect::Connects if success != 1.0 => Some(format!(
                "connected, but the gateway counted success {success}"
            )),
            Expect::Fails if !(failed(&self.alice) && failed(&self.bob)) => {
                Some("expected both sides to fail".to_owned())
            }
            Expect::Fails if fail != 1.0 || success != 0.0 => Some(format!(
                "failed, but the gateway counted success {success} failed {fail}"
            )),
            // Whatever the timing: both sides agree, a path both call up carries the
            // port both ways, and the gateway counted the outcome they saw.
            Expect::Racy => {
                let both_up = up(&self.alice) && up(&self.bob);
                let both_failed = failed(&self.alice) && failed(&self.bob);
                if !(both_up || both_failed) {
                    Some("the two sides disagree".to_owned())
                } else if both_up && !self.connected {
                    Some(format!(
                        "both up but forwarding failed: {:?}",
                        self.forwarded
                    ))
                } else if (self.connected && success != 1.0)
                    || (!self.connected && (fail != 1.0 || success != 0.0))
                {
                    Some(format!(
                        "the gateway counted success {success} failed {fail}"
                    ))
                } else {
                    None
                }
            }
            Expect::Lossy => {
                if up(&self.alice) && up(&self.bob) && !self.connected {
                    Some(format!(
                        "both up but forwarding failed: {:?}",
                        self.forwarded
                    ))
                } else if self.introduced && success + fail < 1.0 {
                    Some("the gateway counted no report".to_owned())
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// Runs the four techniques between alice behind `a` and bob behind `b` in one lab.
fn run_pair(a: &NatPreset, b: &NatPreset) -> Vec<Measured> {
    // GATEWAY_LAB_PROFILE (`cargo xtask wan-matrix --tcp`): delayed links; deadlines
    // grow by 20 round trips.
    let profile = profile_from_env();
    let slack = profile.rtt() * 20;
    let lab = Lab::builder()
        .site_with_hosts("a", a.clone(), TECHNIQUES.len())
        .site_with_hosts("b", b.clone(), TECHNIQUES.len())
        .profile(profile)
        .build()
        .expect("lab");
    let (gateway, secret) = punch::start_gateway(&lab, &["--tcp-forge-synack"]).expect("gateway");
    let keepalive: &[&str] = if a.udp_mapping_timeout.is_some() || b.udp_mapping_timeout.is_some() {
        // Shorter than the NAT's UDP mapping timeout, as a deployment must use.
        &["--keepalive", "1"]
    } else {
        &[]
    };
    let host = |site: &str, i: usize| {
        lab.site(site)
            .and_then(|s| s.host(i))
            .cloned()
            .expect("host")
    };
    let start = |site: &str, i: usize, args: &[&str]| {
        let id = format!("{site}{i}");
        let creds = punch::credentials(&id);
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(keepalive);
        PeerProcess::start(
            &host(site, i),
            SERVICE,
            &creds.username,
            &creds.password,
            &all,
        )
        .expect("agent")
    };
    let mut bobs: Vec<PeerProcess> = TECHNIQUES
        .iter()
        .enumerate()
        .map(|(i, t)| start("b", i, &["--tcp", t, "--tcp-forward-to", "127.0.0.1:6100"]))
        .collect();
    // Bob registers before alice asks for him (a UDP-blocked bob never does).
    let registered_by = Instant::now() + Duration::from_secs(2) + slack;
    for bob in &mut bobs {
        bob.wait_for(
            "registered",
            registered_by.saturating_duration_since(Instant::now()),
        );
    }
    let mut alices: Vec<PeerProcess> = TECHNIQUES
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let bob = format!("b{i}");
            start(
                "a",
                i,
                &[
                    "--connect",
                    &bob,
                    "--tcp",
                    t,
                    "--tcp-forward-listen",
                    "127.0.0.1:5100",
                ],
            )
        })
        .collect();
    // Registration and the introduction take well under 2 s (5 s from a site that
    // blocks UDP: 3 s of silence, then TCP); each technique's window is 6 s.
    let until = Instant::now() + Duration::from_secs(14) + slack;
    let mut lines = Vec::new();
    for (alice, bob) in alices.iter_mut().zip(&mut bobs) {
        let a_line = verdict(alice, until);
        let b_line = verdict(bob, Instant::now() + Duration::from_secs(2) + slack);
        lines.push((a_line, b_line));
    }
    let mut measured = Vec::new();
    for (i, (alice_line, bob_line)) in lines.into_iter().enumerate() {
        let up = |l: &Option<String>| l.as_deref().is_some_and(|l| l.starts_with("tcp-path-up"));
        let forwarded = if up(&alice_line) && up(&bob_line) {
            forward_both_ways(&lab, i, b"over punched TCP", b"back")
        } else {
            Err("no connection".into())
        };
        measured.push((alice_line, bob_line, forwarded));
    }
    // Both sides' reports reach the gateway within a round trip of their verdicts.
    std::thread::sleep(Duration::from_millis(300) + slack / 10);
    let metrics = gateway.scrape().unwrap_or_default();
    let cells = measured
        .into_iter()
        .enumerate()
        .map(|(i, (alice, bob, forwarded))| {
            let introduced = alices[i]
                .seen()
                .iter()
                .chain(bobs[i].seen())
                .any(|l| l.starts_with("tcp-introduced"));
            Measured {
                connected: forwarded.is_ok(),
                introduced,
                counted: (
                    counted(&metrics, TECHNIQUES[i], "success"),
                    counted(&metrics, TECHNIQUES[i], "failed"),
                ),
                seen: format!("alice {:?} bob {:?}", alices[i].seen(), bobs[i].seen()),
                alice,
                bob,
                forwarded,
            }
        })
        .collect();
    drop(alices);
    drop(bobs);
    drop(gateway);
    std::fs::remove_file(secret).ok();
    cells
}

struct Row {
    a: NatPreset,
    b: NatPreset,
    cells: Vec<Measured>,
    /// The first run's cells when an asserted cell missed there.
    first: Option<Vec<Measured>>,
}

#[test]
fn tcp_table_every_technique_every_nat_pair() {
    if !lab_available() {
        return;
    }
    let presets = NatPreset::all_named().to_vec();
    // GATEWAY_TEST_TCP_PAIR=substring runs only the matching pairs (debugging).
    let only = std::env::var("GATEWAY_TEST_TCP_PAIR").ok();
    let mut pairs = Vec::new();
    for (i, a) in presets.iter().enumerate() {
        for b in &presets[i..] {
            let label = format!("{} | {}", a.name(), b.name());
            if only.as_deref().is_none_or(|o| label.contains(o)) {
                pairs.push((a.clone(), b.clone()));
            }
        }
    }
    let workers: usize = std::env::var("GATEWAY_TEST_TCP_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(4);
    let started = Instant::now();
    let queue = Arc::new(Mutex::new(pairs));
    let rows = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (queue, rows) = (queue.clone(), rows.clone());
            std::thread::spawn(move || {
                loop {
                    let Some((a, b)) = queue.lock().expect("queue").pop() else {
                        return;
                    };
                    let cells = run_pair(&a, &b);
                    let missed = TECHNIQUES.iter().zip(&cells).any(|(t, m)| {
                        let (e, _) = expect(t, &a, &b);
                        !matches!(e, Expect::Racy | Expect::Lossy) && m.problem(e).is_some()
                    });
                    let row = if missed {
                        eprintln!(
                            "{} | {}: missed on the first run, running it again",
                            a.name(),
                            b.name()
                        );
                        Row {
                            cells: run_pair(&a, &b),
                            first: Some(cells),
                            a,
                            b,
                        }
                    } else {
                        Row {
                            a,
                            b,
                            cells,
                            first: None,
                        }
                    };
                    rows.lock().expect("rows").push(row);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker");
    }
    let mut rows = Arc::try_unwrap(rows)
        .map_err(|_| "workers done")
        .expect("rows")
        .into_inner()
        .expect("rows");
    rows.sort_by(|x, y| (x.a.name(), x.b.name()).cmp(&(y.a.name(), y.b.name())));
    println!("| alice's NAT | bob's NAT | technique | expected | measured | time to path |");
    println!("|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    let mut retried = Vec::new();
    let mut racy = (0, 0);
    let mut lossy = (0, 0);
    for row in &rows {
        if let Some(first) = &row.first {
            let firsts: Vec<String> = TECHNIQUES
                .iter()
                .zip(first)
                .map(|(t, m)| format!("{t}: {}", if m.connected { "connects" } else { "no" }))
                .collect();
            retried.push(format!(
                "{} | {}: {}",
                row.a.name(),
                row.b.name(),
                firsts.join(", ")
            ));
        }
        for (t, m) in TECHNIQUES.iter().zip(&row.cells) {
            let (e, why) = expect(t, &row.a, &row.b);
            let shown = if m.connected { "connects" } else { "fails" };
            if e == Expect::Racy {
                racy.0 += 1;
                racy.1 += usize::from(m.connected);
            }
            if e == Expect::Lossy {
                lossy.0 += 1;
                lossy.1 += usize::from(m.connected);
            }
            println!(
                "| {} | {} | {t} | {e:?} | {shown}{} | {} |",
                row.a.name(),
                row.b.name(),
                if row.first.is_some() {
                    " (second run)"
                } else {
                    ""
                },
                m.time_to_path()
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_default()
            );
            if let Some(p) = m.problem(e) {
                failures.push(format!(
                    "{} | {} | {t}: {p} (expected {e:?}: {why}); {}",
                    row.a.name(),
                    row.b.name(),
                    m.seen
                ));
            }
        }
    }
    println!(
        "\n{} cells in {:.0} s; racy cells connected {}/{}, lossy cells {}/{}",
        rows.len() * TECHNIQUES.len(),
        started.elapsed().as_secs_f64(),
        racy.1,
        racy.0,
        lossy.1,
        lossy.0
    );
    if !retried.is_empty() {
        println!("pairs run twice (first run):\n{}", retried.join("\n"));
    }
    assert!(
        failures.is_empty(),
        "{} cells differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
