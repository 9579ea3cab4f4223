//! The churn soak: one `gateway serve` in the NAT lab taking round after round of
//! registrations, introductions, punched and relayed pairs (agents stopped with
//! SIGTERM after each round), TURN allocations with channels over UDP and over TCP,
//! every relayed byte checked, while its resident
//! memory and open descriptors are read after each round. `cargo xtask soak` runs it
//! for as long as asked; tests/tests/soak.rs runs two rounds.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use gateway::proto::turn::client::{ClientConfig, Framing, TurnClientEvent};

use crate::{
    daemon::{DaemonError, GatewayProcess, PeerProcess, metric_value},
    lab::{Host, Lab, LabError, NatPreset},
    punch::{self, DISCOVER, SERVICE},
    turn::{BlockingClient, DriveError},
};

/// The UDP port of the echo peer on the lab's un-NATed site.
const ECHO_PORT: u16 = 7000;

/// What one soak does.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Keep starting rounds until this much time has passed.
    pub duration: Duration,
    /// ... or until this many rounds ran (the first is the warm-up).
    pub max_rounds: usize,
    /// Datagrams checked each way per agent pair and per TURN client per round.
    pub datagrams: usize,
    /// TURN clients per transport (UDP, TCP) per round.
    pub turn_clients: usize,
    /// After the churn, wait at most this long for the gateway's allocations and
    /// registrations to be gone before the last reading (agents stop with SIGTERM
    /// and release their allocations; registrations expire).
    pub settle: Duration,
}

/// The gateway's footprint at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// Time since the soak started.
    pub at: Duration,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
    /// `gateway_turn_allocations`.
    pub allocations: f64,
    /// `gateway_registered_peers`.
    pub registered: f64,
}

/// What a soak did and saw.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// Rounds run (the warm-up included).
    pub rounds: usize,
    /// Agent pairs that came up direct / relayed.
    pub direct_pairs: usize,
    /// Agent pairs that came up relayed.
    pub relayed_pairs: usize,
    /// TURN allocations made over UDP / over TCP (each bound a channel, relayed data
    /// and was deleted).
    pub turn_udp: usize,
    /// TURN allocations over TCP.
    pub turn_tcp: usize,
    /// Payload bytes that crossed the gateway and were compared with what was sent.
    pub bytes_checked: u64,
    /// Datagrams that never arrived (each direction counted).
    pub lost: u64,
    /// Allocations tried again from another port after a 437 or 441: the site's NAT
    /// reused the public port of an earlier client whose allocation still lived.
    pub allocate_retries: usize,
    /// The reading after the warm-up round: the baseline.
    pub start: Option<Reading>,
    /// A reading after each round, then the last one after the settle.
    pub readings: Vec<Reading>,
}

impl SoakReport {
    /// The last reading (after the settle).
    pub fn end(&self) -> Option<Reading> {
        self.readings.last().copied()
    }

    /// The highest resident set seen.
    pub fn peak_rss_kib(&self) -> u64 {
        self.readings.iter().map(|r| r.rss_kib).max().unwrap_or(0)
    }

    /// End RSS relative to the start, in percent (positive = grew).
    pub fn rss_change_percent(&self) -> Option<f64> {
        let (start, end) = (self.start?, self.end()?);
        Some((end.rss_kib as f64 / start.rss_kib.max(1) as f64 - 1.0) * 100.0)
    }

    /// End descriptors relative to the start, in percent.
    pub fn fd_change_percent(&self) -> Option<f64> {
        let (start, end) = (self.start?, self.end()?);
        Some((end.fds as f64 / start.fds.max(1) as f64 - 1.0) * 100.0)
    }
}

/// Why the soak stopped.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// The lab could not be built or used.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A daemon could not be run.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A TURN client failed.
    #[error("TURN client: {0}")]
    Turn(#[from] DriveError),
    /// A socket operation failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// Something the soak checks did not hold (corrupted data, no path, a refused
    /// allocation, ...).
    #[error("round {round}: {what}")]
    Broken {
        /// The round.
        round: usize,
        /// What went wrong.
        what: String,
    },
}

/// The lab: two port-restricted cones (a with two hosts, c), a random-port symmetric
/// NAT (b) and an un-NATed site (p) where the TURN clients' echo peer lives.
fn build_lab() -> Result<Lab, LabError> {
    Lab::builder()
        .site_with_hosts("a", NatPreset::port_restricted_cone(), 2)
        .site("b", NatPreset::symmetric())
        .site("c", NatPreset::port_restricted_cone())
        .site("p", NatPreset::no_nat())
        .build()
}

fn host(lab: &Lab, site: &str, i: usize) -> Result<Host, LabError> {
    lab.site(site)
        .and_then(|s| s.host(i))
        .cloned()
        .ok_or_else(|| LabError::Invalid(format!("lab lacks host {i} of site {site}")))
}

/// The gateway's resident set, descriptors and live-state gauges now.
fn read(gateway: &GatewayProcess, started: Instant) -> Result<Reading, SoakError> {
    let pid = gateway
        .pid()
        .ok_or_else(|| DaemonError::NotReady("the gateway exited".into()))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let metrics = gateway.scrape()?;
    Ok(Reading {
        at: started.elapsed(),
        rss_kib: gateway.rss_kib().unwrap_or(0),
        fds,
        allocations: metric_value(&metrics, "gateway_turn_allocations", "").unwrap_or(-1.0),
        registered: metric_value(&metrics, "gateway_registered_peers", "").unwrap_or(-1.0),
    })
}

/// An echo peer on `host`: answers every datagram on [`ECHO_PORT`] with its bytes
/// XOR 0x5A, until the flag drops.
fn echo_peer(host: &Host, running: Arc<AtomicBool>) -> Result<JoinHandle<()>, LabError> {
    let socket = host.udp_bind(ECHO_PORT)?;
    Ok(std::thread::spawn(move || {
        let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 2048];
        while running.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let echo: Vec<u8> = buf[..n].iter().map(|b| b ^ 0x5A).collect();
                let _ = socket.send_to(&echo, from);
            }
        }
    }))
}

/// The checked payload number `i` of `round`: a sequence header and a pattern, 16 to
/// 1115 bytes long.
fn payload(round: usize, i: usize) -> Vec<u8> {
    let len = 16 + (i * 97 + round * 31) % 1100;
    let mut bytes: Vec<u8> = (0..len).map(|k| (k * 7 + i + round) as u8).collect();
    bytes[..8].copy_from_slice(&(((round as u64) << 32) | i as u64).to_be_bytes());
    bytes
}

/// Reads datagrams from `socket` until one equals `expected` (stale ones from earlier
/// retries are skipped) or the wait ends; `Ok(false)` when it never came; an error
/// when one with the right sequence header carries other bytes.
fn receive_exact(
    socket: &UdpSocket,
    expected: &[u8],
    wait: Duration,
) -> Result<Option<SocketAddr>, String> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            return Ok(None);
        };
        if &buf[..n] == expected {
            return Ok(Some(from));
        }
        if n >= 8 && buf[..8] == expected[..8] {
            return Err(format!(
                "datagram {:02x?} came back changed ({n} bytes, {} sent)",
                &expected[..8],
                expected.len()
            ));
        }
    }
    Ok(None)
}

/// Checked traffic between two forwarded applications: `app_a` sends to its agent's
/// forwarder at 127.0.0.1:5000, `app_b` (on 127.0.0.1:6000 behind the other agent)
/// answers each datagram XOR 0x5A. Returns (bytes checked, datagrams lost).
fn exchange(
    app_a: &UdpSocket,
    app_b: &UdpSocket,
    round: usize,
    datagrams: usize,
) -> Result<(u64, u64), String> {
    let forwarder: SocketAddr = ([127, 0, 0, 1], 5000).into();
    // The first datagram opens the way (the forwarders learn their apps); it may be
    // retried, and is not counted.
    let hello = payload(round, usize::MAX >> 32);
    let mut back_to = None;
    for _ in 0..10 {
        app_a
            .send_to(&hello, forwarder)
            .map_err(|e| e.to_string())?;
        if let Some(from) = receive_exact(app_b, &hello, Duration::from_millis(500))? {
            back_to = Some(from);
            break;
        }
    }
    let back_to = back_to.ok_or("no datagram crossed the path")?;
    let (mut checked, mut lost) = (0u64, 0u64);
    for i in 0..datagrams {
        let there = payload(round, i);
        app_a
            .send_to(&there, forwarder)
            .map_err(|e| e.to_string())?;
        if receive_exact(app_b, &there, Duration::from_secs(2))?.is_none() {
            lost += 1;
            continue;
        }
        checked += there.len() as u64;
        let back: Vec<u8> = there.iter().map(|b| b ^ 0x5A).collect();
        app_b.send_to(&back, back_to).map_err(|e| e.to_string())?;
        match receive_exact(app_a, &back, Duration::from_secs(2))? {
            Some(_) => checked += back.len() as u64,
            None => lost += 1,
        }
    }
    Ok((checked, lost))
}

/// One agent pair: bob on `b` forwarding to 127.0.0.1:6000, alice on `a` connecting
/// to him with a forwarder on 127.0.0.1:5000; waits for both paths and checks
/// traffic. Returns whether the path was direct, bytes checked and datagrams lost.
#[allow(clippy::too_many_arguments)]
fn agent_pair(
    report: &mut SoakReport,
    round: usize,
    datagrams: usize,
    kind: &str,
    a: &Host,
    b: &Host,
    alice_extra: &[&str],
    bob_extra: &[&str],
) -> Result<bool, SoakError> {
    let broken = |what: String| SoakError::Broken { round, what };
    let (alice_id, bob_id) = (format!("{kind}{round}a"), format!("{kind}{round}b"));
    let (alice_creds, bob_creds) = (punch::credentials(&alice_id), punch::credentials(&bob_id));
    let app_b = b.run(|| UdpSocket::bind("127.0.0.1:6000"))??;
    let app_a = a.run(|| UdpSocket::bind("127.0.0.1:0"))??;
    let mut args = DISCOVER.to_vec();
    args.extend_from_slice(&["--forward-to", "127.0.0.1:6000"]);
    args.extend_from_slice(bob_extra);
    let mut bob = PeerProcess::start(b, SERVICE, &bob_creds.username, &bob_creds.password, &args)?;
    bob.wait_for("nat mapping", Duration::from_secs(5));
    let mut args = vec!["--connect", &bob_id, "--forward-listen", "127.0.0.1:5000"];
    args.extend_from_slice(DISCOVER);
    args.extend_from_slice(alice_extra);
    let mut alice = PeerProcess::start(
        a,
        SERVICE,
        &alice_creds.username,
        &alice_creds.password,
        &args,
    )?;
    let up = alice
        .wait_for("path-up", Duration::from_secs(20))
        .ok_or_else(|| {
            broken(format!(
                "{kind} pair: no path; alice saw {:?}",
                alice.seen()
            ))
        })?;
    bob.wait_for("path-up", Duration::from_secs(5))
        .ok_or_else(|| broken(format!("{kind} pair: bob saw no path: {:?}", bob.seen())))?;
    let direct = up.split_whitespace().nth(3) == Some("direct");
    let (checked, lost) = exchange(&app_a, &app_b, round, datagrams)
        .map_err(|e| broken(format!("{kind} pair ({up}): {e}")))?;
    report.bytes_checked += checked;
    report.lost += lost;
    // Stopped as systemd or an operator stops them: SIGTERM, after which an agent
    // releases its allocation and port mapping and exits 0. (Killed agents left
    // their allocations for ten minutes, and a site NAT handed their public port to
    // the next agent, whose Allocate then got 441.)
    for (name, agent) in [("alice", &mut alice), ("bob", &mut bob)] {
        agent.signal(libc::SIGTERM)?;
        match agent.wait_exit(Duration::from_secs(5)) {
            Some(status) if status.success() => {}
            other => {
                return Err(broken(format!(
                    "{kind} pair: {name} did not stop cleanly on SIGTERM ({other:?}): {:?}",
                    agent.seen()
                )));
            }
        }
    }
    Ok(direct)
}

/// One TURN client on `host` (over TCP when `tcp`): allocate, bind a channel to the
/// echo peer, relay `datagrams` checked round trips, delete the allocation.
fn turn_client(
    report: &mut SoakReport,
    round: usize,
    datagrams: usize,
    host: &Host,
    echo: SocketAddr,
    tcp: bool,
    n: usize,
) -> Result<(), SoakError> {
    let broken = |what: String| SoakError::Broken { round, what };
    let creds = punch::credentials(&format!("t{round}-{n}"));
    let transport = if tcp { "tcp" } else { "udp" };
    let mut attempt = 0;
    let (mut client, relayed) = loop {
        let config = ClientConfig::new(SERVICE, creds.username.clone(), creds.password.clone());
        let mut client = if tcp {
            let stream = host
                .tcp_connect(SERVICE, Duration::from_secs(3))?
                .map_err(|e| broken(format!("TURN over TCP: connecting: {e}")))?;
            BlockingClient::over_tcp(stream, config)
        } else {
            BlockingClient::with_socket(host.udp_bind(0)?, config)
        };
        client
            .client
            .allocate(Instant::now())
            .map_err(DriveError::from)?;
        match client.wait_event(Duration::from_secs(5), |e| {
            matches!(
                e,
                TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
            )
        })? {
            TurnClientEvent::Allocated { relayed, .. } => break (client, relayed),
            // The NAT gave this socket the public port of an earlier client whose
            // allocation lives on (437: another allocation, 441: another user on this
            // 5-tuple): as a real client does, try again from another port.
            TurnClientEvent::Failed { failure, .. }
                if attempt < 3 && matches!(failure.code(), Some(437 | 441)) =>
            {
                attempt += 1;
                report.allocate_retries += 1;
            }
            other => return Err(broken(format!("TURN over {transport}: {other:?}"))),
        }
    };
    let channel = client
        .client
        .bind_channel(Instant::now(), echo)
        .map_err(DriveError::from)?;
    match client.wait_event(Duration::from_secs(5), |e| {
        matches!(
            e,
            TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
        )
    })? {
        TurnClientEvent::ChannelBound { .. } => {}
        other => return Err(broken(format!("TURN over {transport}: {other:?}"))),
    }
    for i in 0..datagrams {
        let there = payload(round, i + n * 1000);
        if client.send(echo, &there)? != Framing::ChannelData(channel) {
            return Err(broken(format!("TURN over {transport}: not on the channel")));
        }
        let back: Vec<u8> = there.iter().map(|b| b ^ 0x5A).collect();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut arrived = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(received) = client.recv(left) else {
                break;
            };
            if received.data == back && received.peer == echo {
                arrived = true;
                break;
            }
            if received.data.get(..8) == back.get(..8) {
                return Err(broken(format!(
                    "TURN over {transport} via {relayed}: datagram {i} came back changed"
                )));
            }
        }
        if arrived {
            report.bytes_checked += 2 * there.len() as u64;
        } else {
            report.lost += 1;
        }
    }
    client.client.close(Instant::now());
    client.run_for(Duration::from_millis(100))?;
    if tcp {
        report.turn_tcp += 1;
    } else {
        report.turn_udp += 1;
    }
    Ok(())
}

/// Runs the soak; `progress` gets one line per round.
pub fn run(config: &SoakConfig, mut progress: impl FnMut(&str)) -> Result<SoakReport, SoakError> {
    let started = Instant::now();
    let lab = build_lab()?;
    let (gateway, secret_path) = punch::start_gateway(&lab, &[])?;
    let result = (|| {
        let (a0, a1, b0, c0, p0) = (
            host(&lab, "a", 0)?,
            host(&lab, "a", 1)?,
            host(&lab, "b", 0)?,
            host(&lab, "c", 0)?,
            host(&lab, "p", 0)?,
        );
        let echo = SocketAddr::from((p0.addr(), ECHO_PORT));
        let running = Arc::new(AtomicBool::new(true));
        let echo_thread = echo_peer(&p0, running.clone())?;
        let mut report = SoakReport::default();
        let churn = (|| {
            for round in 0..config.max_rounds {
                if round > 0 && started.elapsed() >= config.duration {
                    break;
                }
                let n = config.datagrams;
                // Two port-restricted cones: punched.
                if agent_pair(&mut report, round, n, "d", &a0, &c0, &[], &[])? {
                    report.direct_pairs += 1;
                } else {
                    return Err(SoakError::Broken {
                        round,
                        what: "two port-restricted cones were relayed".into(),
                    });
                }
                // A cone against a random-port NAT without birthday punching: relayed.
                let relay_a = ["--birthday-probes", "0"];
                let relay_b = ["--birthday-sockets", "0"];
                if agent_pair(&mut report, round, n, "r", &a1, &b0, &relay_a, &relay_b)? {
                    return Err(SoakError::Broken {
                        round,
                        what: "a pair that cannot punch came up direct".into(),
                    });
                }
                report.relayed_pairs += 1;
                for k in 0..config.turn_clients {
                    turn_client(&mut report, round, n, &a0, echo, false, 2 * k)?;
                    turn_client(&mut report, round, n, &a1, echo, true, 2 * k + 1)?;
                }
                report.rounds += 1;
                let reading = read(&gateway, started)?;
                if round == 0 {
                    report.start = Some(reading);
                }
                report.readings.push(reading);
                progress(&format!(
                    "round {round}: {:.0} s, rss {} KiB, fds {}, allocations {}, registered {}, \
                     {} bytes checked, {} lost, {} allocations retried",
                    reading.at.as_secs_f64(),
                    reading.rss_kib,
                    reading.fds,
                    reading.allocations,
                    reading.registered,
                    report.bytes_checked,
                    report.lost,
                    report.allocate_retries
                ));
            }
            Ok(())
        })();
        running.store(false, Ordering::Relaxed);
        let _ = echo_thread.join();
        churn?;
        // Registrations of stopped agents expire by themselves.
        let settle_until = Instant::now() + config.settle;
        loop {
            let reading = read(&gateway, started)?;
            let idle = reading.allocations == 0.0 && reading.registered == 0.0;
            if idle || Instant::now() >= settle_until {
                progress(&format!(
                    "settled ({}): rss {} KiB, fds {}, allocations {}, registered {}",
                    if idle { "idle" } else { "settle time over" },
                    reading.rss_kib,
                    reading.fds,
                    reading.allocations,
                    reading.registered
                ));
                report.readings.push(reading);
                break;
            }
            std::thread::sleep(Duration::from_secs(5));
        }
        Ok(report)
    })();
    std::fs::remove_file(&secret_path).ok();
    drop(gateway);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_by_round_and_number_and_carry_their_sequence() {
        let (a, b, c) = (payload(1, 2), payload(1, 3), payload(2, 2));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(&a[..8], &((1u64 << 32) | 2).to_be_bytes());
        assert!((16..=1115).contains(&a.len()));
    }
}
