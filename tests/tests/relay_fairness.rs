//! No starved direction in the userspace relay: while one client floods ChannelData
//! through `gateway serve` as fast as one thread can send, a paced flow the other
//! way (a peer sending to another client's relayed address) loses under 1%.
//!
//! Before the fix the service loop never returned to the scheduler under a flood
//! (its socket was always readable), so a relay socket's task, spawned from that
//! loop into its worker's LIFO slot where other workers cannot steal it, never ran:
//! coturn's packet-flood method relayed nothing back at all.
//!
//! Loopback only, no root, no eBPF: the userspace relay alone.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::{
    credentials::SharedSecret,
    turn::client::{ClientConfig, Framing},
};
use gateway_tests::{
    daemon::{gateway_binary, metric_value},
    turn::BlockingClient,
};

const SECRET: &str = "fairness secret";
const WAIT: Duration = Duration::from_secs(5);
/// Datagrams of the paced flow, one a millisecond.
const PACED: u32 = 2_000;
/// Bounds of the flood (the test stops it once the paced flow is over).
const FLOOD_MAX: u64 = 50_000_000;
const FLOOD_FOR: Duration = Duration::from_secs(15);

struct Gateway {
    child: Child,
    service: SocketAddr,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

impl Gateway {
    fn start(dir: &std::path::Path) -> Self {
        let service = free_udp();
        let metrics = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free TCP port");
        let secret = dir.join("secret");
        gateway_tests::daemon::write_secret(&secret, SECRET).expect("secret file");
        let log = dir.join("gateway.log");
        let first = 40_000 + 100 * (rand::random::<u16>() % 90);
        let child = Command::new(gateway_binary())
            .args(["serve", "--listen", &service.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--secret-file")
            .arg(&secret)
            .args([
                "--no-ebpf",
                "--no-relay-tcp",
                "--relay-address",
                "127.0.0.1",
            ])
            .args(["--relay-port-range", &format!("{first}-{}", first + 99)])
            .args(["--allow-peer", "127.0.0.0/8"])
            .env("GATEWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn the gateway");
        let gateway = Self {
            child,
            service,
            metrics,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while gateway.scrape().is_none() {
            assert!(Instant::now() < deadline, "no /metrics after 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    fn scrape(&self) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(WAIT)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.1 200").then_some(text)
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.scrape().expect("scrape");
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}} missing"))
    }

    fn client(&self, peer_id: &str) -> BlockingClient {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        let credentials = SharedSecret::new(SECRET.as_bytes())
            .issue(peer_id, expiry)
            .expect("valid peer id");
        let config = ClientConfig::new(self.service, credentials.username, credentials.password);
        BlockingClient::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("socket")
    }
}

#[test]
fn a_paced_flow_back_loses_under_one_percent_while_another_client_floods() {
    let dir = tempfile::tempdir().expect("dir");
    let gateway = Gateway::start(dir.path());

    // The flooder: a channel to a sink nobody reads (its drops are the kernel's).
    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sink");
    let mut flooder = gateway.client("flooder");
    flooder.allocate_now(WAIT);
    flooder
        .bind_now(sink.local_addr().expect("sink address"), WAIT)
        .expect("a channel");

    // The receiver: a paced peer sends to its relayed address.
    let paced_peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer");
    let mut receiver = gateway.client("receiver");
    let relayed = receiver.allocate_now(WAIT);
    receiver
        .bind_now(paced_peer.local_addr().expect("peer address"), WAIT)
        .expect("a channel");

    // Flood from another thread with the flooder's own socket and channel frames.
    let frame = {
        let mut out = Vec::new();
        let framing = flooder
            .client
            .encode_send(sink.local_addr().expect("sink"), &[0x42; 120], &mut out)
            .expect("frame");
        assert!(matches!(framing, Framing::ChannelData(_)));
        out
    };
    // The flood comes from the flooder's own socket (its allocation's 5-tuple).
    let flooding = Arc::new(AtomicBool::new(true));
    let flooded = Arc::new(AtomicU64::new(0));
    let flood = {
        let flooding = flooding.clone();
        let flooded = flooded.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while flooding.load(Ordering::Relaxed)
                && flooded.load(Ordering::Relaxed) < FLOOD_MAX
                && started.elapsed() < FLOOD_FOR
            {
                for _ in 0..256 {
                    if flooder.send_raw(&frame).is_ok() {
                        flooded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Stopped by the test, not by its own bounds.
            !flooding.load(Ordering::Relaxed)
        })
    };

    // Let the flood fill the service socket, then pace the other direction.
    std::thread::sleep(Duration::from_millis(300));
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for seq in 0..PACED {
            let due = start + Duration::from_millis(u64::from(seq));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = paced_peer.send_to(&seq.to_be_bytes(), relayed);
        }
    });
    let mut seen = vec![false; PACED as usize];
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(PACED)) + Duration::from_secs(4);
    while Instant::now() < deadline && seen.iter().any(|s| !s) {
        let Ok(received) = receiver.recv(Duration::from_millis(200)) else {
            continue;
        };
        if let Ok(seq) = <[u8; 4]>::try_from(received.data.as_slice())
            && let Some(slot) = seen.get_mut(u32::from_be_bytes(seq) as usize)
        {
            *slot = true;
        }
    }
    pacer.join().expect("pacer");
    flooding.store(false, Ordering::Relaxed);
    let flood_lasted = flood.join().expect("flood");
    let received = seen.iter().filter(|s| **s).count();
    let relayed_out = gateway.metric(
        "gateway_relay_packets_total",
        "direction=\"client_to_peer\"",
    );
    assert!(flood_lasted, "the flood must last the whole paced flow");
    assert!(
        relayed_out > 10_000.0,
        "the flood was relayed: {relayed_out} datagrams"
    );
    assert!(
        received * 100 >= PACED as usize * 99,
        "paced flow back: {received}/{PACED} arrived while {} flood datagrams were sent and {relayed_out} relayed; log:\n{}",
        flooded.load(Ordering::Relaxed),
        std::fs::read_to_string(&gateway.log).unwrap_or_default()
    );
}
