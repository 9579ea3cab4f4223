//! The relay's kernel fast path (`--relay-fast-path ebpf`) with real TURN clients (the
//! project's own sans-IO client over UDP sockets) on loopback, the benchmark's
//! topology: two clients whose channels point at each other's relayed address.
//!
//! Proves that data flows both ways through the kernel (its counters grow while the
//! userspace service loop sees no ChannelData at all), that a deleted allocation's
//! entries go at once (the other client's data then falls back to userspace, which
//! drops it: nothing is delivered), and that a denied peer never gets an entry.
//! Needs root (the test attaches a tc program to `lo`) and a gateway binary built
//! with its eBPF object (`cargo xtask build-ebpf && cargo build --workspace`).
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::{
    credentials::SharedSecret,
    turn::client::{ClientConfig, Event, Framing},
};
use gateway_tests::{
    daemon::{gateway_binary, metric_value},
    lab::require_root,
    turn::{BlockingClient, Received},
};

const SECRET: &str = "fast-path-test-secret";
const WAIT: Duration = Duration::from_secs(5);

/// `gateway serve` on loopback with the fast path; killed on drop.
struct Gateway {
    child: Child,
    service: SocketAddr,
    metrics: SocketAddr,
    log: std::path::PathBuf,
    secret: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.secret);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

impl Gateway {
    fn start(extra: &[&str]) -> Self {
        let service = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let metrics = SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .expect("a free TCP port")
                .port(),
        ));
        let tag = format!("{}-{}", std::process::id(), rand::random::<u32>());
        let secret = std::env::temp_dir().join(format!("gw-fast-secret-{tag}"));
        std::fs::write(&secret, SECRET).expect("secret file");
        let log = std::env::temp_dir().join(format!("gw-fast-{tag}.log"));
        let first = 30_000 + 100 * (rand::random::<u16>() % 90);
        let child = Command::new(gateway_binary())
            .args(["serve", "--listen", &service.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--secret-file", &secret.to_string_lossy()])
            .args([
                "--no-ebpf",
                "--no-relay-tcp",
                "--relay-address",
                "127.0.0.1",
            ])
            .args(["--relay-port-range", &format!("{first}-{}", first + 99)])
            .args(["--allow-peer", "127.0.0.0/8", "--relay-fast-path", "ebpf"])
            .args(extra)
            .env("GATEWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn the gateway");
        let mut gateway = Self {
            child,
            service,
            metrics,
            log,
            secret,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while gateway.scrape().is_none() {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("the gateway exited with {status}:\n{}", gateway.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no /metrics after 10 s:\n{}",
                gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

    fn client(&self, peer_id: &str, last_octet: u8) -> BlockingClient {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            + 3600;
        let credentials = SharedSecret::new(SECRET.as_bytes())
            .issue(peer_id, expiry)
            .expect("valid peer id");
        let config = ClientConfig::new(self.service, credentials.username, credentials.password);
        // A loopback address of its own, away from other tests' sockets.
        let ip = Ipv4Addr::new(127, 77, (rand::random::<u8>() % 200) + 1, last_octet);
        BlockingClient::new(SocketAddr::from((ip, 0)), config).expect("client socket")
    }
}

fn allocate(client: &mut BlockingClient) -> SocketAddr {
    client.client.allocate(Instant::now()).expect("idle");
    match client.wait_event(WAIT, |e| {
        matches!(e, Event::Allocated { .. } | Event::Failed { .. })
    }) {
        Ok(Event::Allocated { relayed, .. }) => relayed,
        other => panic!("allocation failed: {other:?}"),
    }
}

fn bind(client: &mut BlockingClient, peer: SocketAddr) -> Result<u16, Event> {
    let channel = client
        .client
        .bind_channel(Instant::now(), peer)
        .expect("allocated");
    match client.wait_event(WAIT, |e| {
        matches!(e, Event::ChannelBound { .. } | Event::Failed { .. })
    }) {
        Ok(Event::ChannelBound { peer: bound, .. }) if bound == peer => Ok(channel),
        Ok(other) => Err(other),
        Err(e) => panic!("no answer to ChannelBind: {e}"),
    }
}

/// Waits past the relay's one-second sweep, which folds the kernel's counters.
fn settle() {
    std::thread::sleep(Duration::from_millis(1300));
}

#[test]
fn bound_channels_between_two_clients_are_relayed_in_the_kernel_both_ways() {
    require_root();
    let gateway = Gateway::start(&[]);
    let mut a = gateway.client("a", 1);
    let mut b = gateway.client("b", 2);
    let relayed_a = allocate(&mut a);
    let relayed_b = allocate(&mut b);
    let channel_a = bind(&mut a, relayed_b).expect("A binds toward B");
    let channel_b = bind(&mut b, relayed_a).expect("B binds toward A");
    assert_eq!(
        gateway.metric("gateway_relay_fast_path_entries", ""),
        2.0,
        "one entry per bound channel:\n{}",
        gateway.log_text()
    );

    const ROUNDS: u8 = 50;
    for i in 0..ROUNDS {
        let payload = vec![i; 100 + usize::from(i)];
        assert_eq!(
            a.send(relayed_b, &payload).expect("send"),
            Framing::ChannelData(channel_a)
        );
        assert_eq!(
            b.recv(WAIT).expect("B receives"),
            Received {
                peer: relayed_a,
                data: payload.clone(),
                channel: Some(channel_b)
            }
        );
        let echo: Vec<u8> = payload.iter().map(|x| x ^ 0xA5).collect();
        b.send(relayed_a, &echo).expect("send");
        assert_eq!(
            a.recv(WAIT).expect("A receives"),
            Received {
                peer: relayed_b,
                data: echo,
                channel: Some(channel_a)
            }
        );
    }
    settle();
    let messages = 2.0 * f64::from(ROUNDS);
    // Every message went through the kernel: counted once each way (A's allocation
    // relayed it to its peer, B's delivered it to its client)...
    for direction in ["client_to_peer", "peer_to_client"] {
        assert_eq!(
            gateway.metric(
                "gateway_relay_fast_path_packets_total",
                &format!("direction=\"{direction}\"")
            ),
            messages,
            "{direction}"
        );
        assert_eq!(
            gateway.metric(
                "gateway_relay_packets_total",
                &format!("direction=\"{direction}\"")
            ),
            messages,
            "{direction}: the relay's own totals include the kernel's"
        );
    }
    // ... and the userspace relay never saw any of it.
    assert_eq!(
        gateway.metric("gateway_stun_datagrams_total", "outcome=\"channel_data\""),
        0.0,
        "ChannelData reached the userspace service loop"
    );

    // A denied peer (private address) gets 403 and no entry.
    let mut c = gateway.client("c", 3);
    allocate(&mut c);
    let denied = SocketAddr::from(([192, 168, 77, 1], 9));
    assert!(
        bind(&mut c, denied).is_err(),
        "a denied peer must be refused"
    );
    assert_eq!(gateway.metric("gateway_relay_fast_path_entries", ""), 2.0);

    // B deletes its allocation: its entry goes at once.
    b.client.close(Instant::now());
    b.wait_event(WAIT, |e| {
        matches!(e, Event::Deallocated | Event::Failed { .. })
    })
    .expect("close answer");
    assert_eq!(gateway.metric("gateway_relay_fast_path_entries", ""), 1.0);
    // A's channel still points at B's old relayed address: the kernel no longer
    // finds the way back, so A's ChannelData falls back to the userspace relay, which
    // sends it to a closed port. B (its socket still open) receives nothing.
    for i in 0..5u8 {
        a.send(relayed_b, &[i; 64]).expect("send");
    }
    assert!(
        b.recv(Duration::from_millis(500)).is_err(),
        "nothing is delivered after deallocation"
    );
    settle();
    assert_eq!(
        gateway.metric("gateway_stun_datagrams_total", "outcome=\"channel_data\""),
        5.0,
        "the userspace relay handles what the kernel no longer does"
    );
    assert_eq!(
        gateway.metric(
            "gateway_relay_fast_path_packets_total",
            "direction=\"client_to_peer\""
        ),
        messages,
        "the kernel relayed nothing more"
    );
}

#[test]
fn fast_path_that_cannot_attach_stops_start_up() {
    require_root();
    let service = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port());
    let secret = std::env::temp_dir().join(format!("gw-fast-secret-{}", std::process::id()));
    std::fs::write(&secret, SECRET).expect("secret file");
    let output = Command::new(gateway_binary())
        .args(["serve", "--listen", &service.to_string(), "--no-metrics"])
        .args([
            "--secret-file",
            &secret.to_string_lossy(),
            "--no-ebpf",
            "--no-relay-tcp",
        ])
        .args(["--relay-fast-path", "ebpf"])
        .args(["--relay-fast-path-interface", "no-such-iface0"])
        .output()
        .expect("run the gateway");
    let _ = std::fs::remove_file(&secret);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must fail; said:\n{stderr}");
    assert!(
        stderr.contains("fast path") && stderr.contains("no-such-iface0"),
        "the error names the fast path and the interface:\n{stderr}"
    );
}
