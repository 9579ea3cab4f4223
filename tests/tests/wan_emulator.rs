//! The lab's WAN emulator measured: configured delay, jitter, loss, reordering and rate
//! cap against what UDP traffic across the core sees, and every delivered payload
//! byte-identical to what was sent (nothing created, nothing changed). The bounds
//! are wide enough never to flake (several standard deviations, a hard floor that an
//! emulator releasing early would break) and tight enough that an emulator without
//! delay, without jitter, with the wrong rate or reordering by jitter fails.
use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway_tests::lab::{
    Direction, Lab, LabError, LinkConditions, NatPreset, WanConditions, WanProfile, lab_available,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// A payload: sequence number, then bytes derived from it (so the receiver can check
/// every byte without a copy of what was sent).
fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    let mut rng = StdRng::seed_from_u64(u64::from(seq) ^ 0x5eed);
    v.extend((4..len).map(|_| rng.random::<u8>()));
    v
}

fn check(bytes: &[u8]) -> u32 {
    let seq = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
    assert_eq!(
        bytes,
        payload(seq, bytes.len()),
        "packet {seq} changed on the way"
    );
    seq
}

fn recv(socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    loop {
        match socket.recv_from(buf) {
            Ok(r) => return Some(r),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    (v[0], percentile(&v, 0.5), percentile(&v, 0.95), sd)
}

/// Sends `n` payloads of `len` bytes from `from` to `to`, `gap` apart (by deadline,
/// not by sleeping `gap` after each), recording each send instant.
fn send_paced(
    from: &UdpSocket,
    to: SocketAddr,
    n: u32,
    len: usize,
    gap: Duration,
) -> HashMap<u32, Instant> {
    let start = Instant::now();
    let mut sent = HashMap::new();
    for seq in 0..n {
        let due = start + gap * seq;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sent.insert(seq, Instant::now());
        from.send_to(&payload(seq, len), to).expect("send");
    }
    sent
}

/// Receives until `quiet` passes without a packet: (seq, arrival) in arrival order.
fn receive_all(socket: &UdpSocket, quiet: Duration) -> Vec<(u32, Instant)> {
    socket.set_read_timeout(Some(quiet)).expect("timeout");
    let mut buf = vec![0; 2048];
    let mut got = Vec::new();
    while let Some((n, _)) = recv(socket, &mut buf) {
        got.push((check(&buf[..n]), Instant::now()));
    }
    got
}

/// Packets that arrived after a packet sent later (each counted once).
fn late(arrivals: &[(u32, Instant)]) -> usize {
    let mut highest = None;
    let mut late = 0;
    for &(seq, _) in arrivals {
        match highest {
            Some(h) if seq < h => late += 1,
            _ => highest = Some(seq),
        }
    }
    late
}

/// The tests of this file run one at a time: each measures timing, and four of them
/// sending thousands of packets at once on a two-core machine would measure the
/// machine instead of the emulator.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn lab(wan: WanConditions) -> Result<Lab, LabError> {
    Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .wan(wan)
        .build()
}

#[test]
fn delay_and_jitter_per_link_and_direction() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    // Site link 50 ms ± 5 ms both ways; the gateway link 10 ms toward the server only.
    let lab = lab(WanConditions {
        sites: LinkConditions::symmetric(Direction::ms(50).jitter(Duration::from_millis(5))),
        gateway: LinkConditions {
            up: Direction::default(),
            down: Direction::ms(10),
        },
        per_site: Vec::new(),
    })
    .expect("lab");
    let server = lab
        .server()
        .udp_bind_on(SocketAddr::from((lab.server().addr(), 7000)))
        .expect("server socket");
    let host = lab
        .site("a")
        .unwrap()
        .host(0)
        .unwrap()
        .udp_bind(7001)
        .unwrap();
    let to = server.local_addr().unwrap();
    // The server echoes every datagram unchanged, noting when it arrived.
    let seen_at: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let echo = {
        let seen_at = seen_at.clone();
        std::thread::spawn(move || {
            server
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut buf = vec![0; 2048];
            while let Some((n, from)) = recv(&server, &mut buf) {
                let seq = check(&buf[..n]);
                seen_at.lock().unwrap().insert(seq, Instant::now());
                server.send_to(&buf[..n], from).unwrap();
            }
        })
    };
    const N: u32 = 600;
    let sender = host.try_clone().unwrap();
    let send =
        std::thread::spawn(move || send_paced(&sender, to, N, 200, Duration::from_millis(10)));
    let arrivals = receive_all(&host, Duration::from_secs(2));
    let sent = send.join().unwrap();
    echo.join().unwrap();
    let seen_at = seen_at.lock().unwrap();

    assert_eq!(
        arrivals.len(),
        N as usize,
        "no loss configured: every echo returns"
    );
    assert_eq!(
        late(&arrivals),
        0,
        "jitter without reordering must not reorder"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let up: Vec<f64> = seen_at.iter().map(|(s, at)| ms(*at - sent[s])).collect();
    let down: Vec<f64> = arrivals
        .iter()
        .map(|(s, at)| ms(*at - seen_at[s]))
        .collect();
    let rtt: Vec<f64> = arrivals.iter().map(|(s, at)| ms(*at - sent[s])).collect();
    let (up, down, rtt) = (stats(up), stats(down), stats(rtt));
    println!(
        "one-way up   (expect 60 ± 5): min {:.1} median {:.1} p95 {:.1} sd {:.1}",
        up.0, up.1, up.2, up.3
    );
    println!(
        "one-way down (expect 50 ± 5): min {:.1} median {:.1} p95 {:.1} sd {:.1}",
        down.0, down.1, down.2, down.3
    );
    println!(
        "RTT         (expect 110 ± 7): min {:.1} median {:.1} p95 {:.1} sd {:.1}",
        rtt.0, rtt.1, rtt.2, rtt.3
    );
    // Truncation at ±2σ is a hard floor: nothing is released early.
    assert!(up.0 >= 49.9, "up min {}", up.0);
    assert!(down.0 >= 39.9, "down min {}", down.0);
    assert!(rtt.0 >= 89.9, "rtt min {}", rtt.0);
    assert!((58.0..=64.0).contains(&up.1), "up median {}", up.1);
    assert!((48.0..=54.0).contains(&down.1), "down median {}", down.1);
    assert!((106.0..=116.0).contains(&rtt.1), "rtt median {}", rtt.1);
    // The truncated normal ends at +10 ms; the rest is this (loaded) machine's
    // scheduling, which stretches a few packets.
    assert!(
        up.2 <= 76.0 && down.2 <= 66.0 && rtt.2 <= 136.0,
        "p95s {up:?} {down:?} {rtt:?}"
    );
    // Jitter is there (a truncated normal of σ 5 ms has sd ≈ 4.4 ms) and not larger.
    for (what, sd) in [("up", up.3), ("down", down.3)] {
        assert!((2.5..=8.0).contains(&sd), "{what} sd {sd}");
    }
    let s = lab.wan_stats().expect("emulator runs");
    // Each datagram is queued twice: arriving at the core and leaving it.
    assert_eq!(s.packets, 4 * u64::from(N), "{s:?}");
    assert_eq!((s.lost, s.queue_drops, s.reordered), (0, 0, 0));
}

#[test]
fn loss_and_reordering_at_their_rates() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    // Up: 5 % loss, 5 % held back 20 ms. Down: 20 ms ± 10 ms, nothing else.
    let lab = lab(WanConditions {
        sites: LinkConditions {
            up: Direction::ms(5)
                .loss(0.05)
                .reorder(0.05, Duration::from_millis(20)),
            down: Direction::ms(20).jitter(Duration::from_millis(10)),
        },
        ..WanConditions::default()
    })
    .expect("lab");
    let server = lab
        .server()
        .udp_bind_on(SocketAddr::from((lab.server().addr(), 7000)))
        .unwrap();
    let host = lab
        .site("a")
        .unwrap()
        .host(0)
        .unwrap()
        .udp_bind(7002)
        .unwrap();
    let (to_server, host_addr) = (server.local_addr().unwrap(), {
        // The host's public endpoint, learnt from a first packet that is not counted.
        host.send_to(b"hello", server.local_addr().unwrap())
            .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0; 16];
        let mut from = None;
        // Loss may eat the hello: repeat it.
        for _ in 0..20 {
            if let Some((_, f)) = recv(&server, &mut buf) {
                from = Some(f);
                break;
            }
            host.send_to(b"hello", server.local_addr().unwrap())
                .unwrap();
        }
        from.expect("the hello arrives")
    });
    let before = lab.wan_stats().expect("emulator");

    const UP: u32 = 4000;
    let sender = host.try_clone().unwrap();
    let send = std::thread::spawn(move || {
        send_paced(&sender, to_server, UP, 100, Duration::from_millis(1))
    });
    let got = receive_all(&server, Duration::from_secs(1));
    send.join().unwrap();
    let after = lab.wan_stats().unwrap();
    let lost = UP as usize - got.len();
    let reordered = late(&got);
    println!(
        "up: {lost} of {UP} lost (expect 200), {reordered} arrived after a later packet (expect about 190); emulator: {after:?}"
    );
    let mut seqs: Vec<u32> = got.iter().map(|(s, _)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), got.len(), "duplicated packets");
    assert!(seqs.iter().all(|s| *s < UP), "a packet nobody sent");
    // 5 % of 4000: mean 200, sd 13.8; ±5 sd.
    assert!((130..=270).contains(&lost), "lost {lost}");
    assert_eq!(
        after.lost - before.lost,
        lost as u64,
        "every missing packet was dropped by the configured loss, nothing else"
    );
    // Held back 20 ms while packets follow every 1 ms: each one arrives late.
    assert!((120..=270).contains(&reordered), "reordered {reordered}");

    const DOWN: u32 = 2000;
    let back = server.try_clone().unwrap();
    let send = std::thread::spawn(move || {
        send_paced(&back, host_addr, DOWN, 100, Duration::from_millis(1))
    });
    let got = receive_all(&host, Duration::from_secs(1));
    let sent = send.join().unwrap();
    assert_eq!(got.len(), DOWN as usize, "no loss configured downstream");
    assert_eq!(late(&got), 0, "jitter alone never reorders");
    let delays: Vec<f64> = got
        .iter()
        .map(|(s, at)| (*at - sent[s]).as_secs_f64() * 1e3)
        .collect();
    let (min, median, _, _) = stats(delays.clone());
    let max = delays.iter().copied().fold(0.0, f64::max);
    println!("down: min {min:.1} median {median:.1} max {max:.1} ms (expect 20 ± 10, ≥ 0)");
    assert!(
        max - min >= 15.0,
        "jitter of σ 10 ms spreads delays: {min}..{max}"
    );
    // Jitter without reordering: a packet waits for the one before it, which
    // raises the median of back-to-back packets above 20 ms.
    assert!((18.0..=45.0).contains(&median), "median {median}");
}

#[test]
fn rate_cap_spaces_packets_and_drops_beyond_its_queue() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    // 1 Mbit/s, 20 packets of queue: a 1250-byte IP packet takes 10 ms.
    let lab = lab(WanConditions {
        sites: LinkConditions {
            up: Direction::default().rate(1_000_000, 20),
            down: Direction::default(),
        },
        ..WanConditions::default()
    })
    .expect("lab");
    let server = lab
        .server()
        .udp_bind_on(SocketAddr::from((lab.server().addr(), 7000)))
        .unwrap();
    let host = lab
        .site("a")
        .unwrap()
        .host(0)
        .unwrap()
        .udp_bind(7003)
        .unwrap();
    let to = server.local_addr().unwrap();
    for seq in 0..100 {
        host.send_to(&payload(seq, 1250 - 28), to).unwrap();
    }
    let got = receive_all(&server, Duration::from_secs(1));
    let drops = lab.wan_stats().unwrap().queue_drops;
    println!(
        "{} of 100 delivered, {drops} dropped at the queue",
        got.len()
    );
    // The queue, plus what drained while the burst was being sent (slower on a
    // loaded machine).
    assert!((20..=32).contains(&got.len()), "delivered {}", got.len());
    assert_eq!(drops as usize, 100 - got.len());
    assert_eq!(late(&got), 0);
    let mut gaps: Vec<f64> = got
        .windows(2)
        .map(|w| (w[1].1 - w[0].1).as_secs_f64() * 1e3)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = percentile(&gaps, 0.5);
    assert!((9.0..=11.5).contains(&median), "median spacing {median} ms");
}

#[test]
fn profiles_build_and_the_lan_profile_starts_no_emulator() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let lan = Lab::builder()
        .site("a", NatPreset::full_cone())
        .profile(WanProfile::Lan)
        .build()
        .expect("lan");
    assert!(lan.wan_stats().is_none());
    let continental = Lab::builder()
        .site("a", NatPreset::full_cone())
        .profile(WanProfile::Continental)
        .build()
        .expect("continental");
    // TCP through the delayed core: a connect takes one RTT to the server (80 ms).
    let listener = continental.server().tcp_listen(7100).unwrap();
    let started = Instant::now();
    let stream = continental
        .site("a")
        .unwrap()
        .host(0)
        .unwrap()
        .tcp_connect(
            SocketAddr::from((continental.server().addr(), 7100)),
            Duration::from_secs(3),
        )
        .unwrap()
        .expect("connect");
    let took = started.elapsed();
    drop((stream, listener));
    assert!(
        took >= Duration::from_millis(79) && took < Duration::from_millis(300),
        "connect took {took:?}"
    );
    assert!(continental.describe().contains("WAN site a: up 20 ms"));
    // What the core answers itself crosses the site's link both ways too: a datagram
    // to a closed port of the core comes back as ICMP port unreachable after 40 ms.
    let refused = continental
        .site("a")
        .unwrap()
        .host(0)
        .unwrap()
        .run(|| {
            let socket = UdpSocket::bind("0.0.0.0:7200")?;
            socket.connect("198.51.100.1:9")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let started = Instant::now();
            socket.send(b"anyone?")?;
            let e = socket
                .recv(&mut [0; 16])
                .expect_err("nothing listens there");
            Ok::<_, std::io::Error>((e.kind(), started.elapsed()))
        })
        .unwrap()
        .expect("socket");
    assert_eq!(refused.0, std::io::ErrorKind::ConnectionRefused);
    assert!(
        refused.1 >= Duration::from_millis(39) && refused.1 < Duration::from_millis(300),
        "the core's answer took {:?}",
        refused.1
    );
    // Conditions for a site the lab lacks, and probabilities above 1, are refused.
    let bad = Lab::builder()
        .site("a", NatPreset::full_cone())
        .wan(WanConditions::default().with_site("zz", LinkConditions::default()))
        .build();
    assert!(matches!(bad, Err(LabError::Invalid(_))), "{bad:?}");
    let bad = Lab::builder()
        .site("a", NatPreset::full_cone())
        .wan(WanConditions {
            sites: LinkConditions::symmetric(Direction::default().loss(1.5)),
            ..WanConditions::default()
        })
        .build();
    assert!(matches!(bad, Err(LabError::Invalid(_))), "{bad:?}");
}
