//! The relay's kernel fast path (`--relay-fast-path ebpf`) with real TURN clients (the
//! project's own sans-IO client over UDP sockets) on loopback, the benchmark's
//! topology (two clients whose channels point at each other's relayed address), and a
//! client with a channel to a plain UDP peer socket (ChannelData shrunk to UDP, UDP
//! grown to ChannelData).
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
    turn::client::{ClientConfig, Framing, TurnClientEvent},
};
use gateway_tests::{
    daemon::{gateway_binary, metric_value},
    lab::require_root,
    turn::{BlockingClient, Received, channel_round_trip},
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
        gateway_tests::daemon::write_secret(&secret, SECRET).expect("secret file");
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
    let relayed_a = a.allocate_now(WAIT);
    let relayed_b = b.allocate_now(WAIT);
    let channel_a = a.bind_now(relayed_b, WAIT).expect("A binds toward B");
    let channel_b = b.bind_now(relayed_a, WAIT).expect("B binds toward A");
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
    c.allocate_now(WAIT);
    let denied = SocketAddr::from(([192, 168, 77, 1], 9));
    assert!(
        c.bind_now(denied, WAIT).is_err(),
        "a denied peer must be refused"
    );
    assert_eq!(gateway.metric("gateway_relay_fast_path_entries", ""), 2.0);

    // B deletes its allocation: its entry goes at once.
    b.client.close(Instant::now());
    b.wait_event(WAIT, |e| {
        matches!(
            e,
            TurnClientEvent::Deallocated | TurnClientEvent::Failed { .. }
        )
    })
    .expect("close answer");
    assert_eq!(gateway.metric("gateway_relay_fast_path_entries", ""), 1.0);
    // A's channel still points at B's old relayed address: the kernel no longer
    // finds the way back, so it sends A's ChannelData on as plain UDP from A's relay
    // address (what the userspace relay would do), to a closed port. B (its socket
    // still open) receives nothing, and the userspace relay sees none of it.
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
        0.0,
        "ChannelData reached the userspace service loop"
    );
    assert_eq!(
        gateway.metric(
            "gateway_relay_fast_path_packets_total",
            "direction=\"client_to_peer\""
        ),
        messages + 5.0,
        "the kernel relayed A's datagrams to the closed port"
    );
    assert_eq!(
        gateway.metric(
            "gateway_relay_fast_path_packets_total",
            "direction=\"peer_to_client\""
        ),
        messages,
        "and delivered nothing more"
    );
}

#[test]
fn a_bound_channel_to_a_plain_udp_peer_is_relayed_in_the_kernel_both_ways() {
    require_root();
    let gateway = Gateway::start(&[]);
    let mut a = gateway.client("a", 1);
    // A peer that is no TURN client: a plain UDP socket on a loopback address.
    let peer_socket = UdpSocket::bind((Ipv4Addr::new(127, 78, 0, 1), 0)).expect("peer socket");
    peer_socket
        .set_read_timeout(Some(WAIT))
        .expect("read timeout");
    let peer = peer_socket.local_addr().expect("peer address");
    let relayed_a = a.allocate_now(WAIT);
    let channel = a.bind_now(peer, WAIT).expect("A binds toward the peer");
    assert_eq!(gateway.metric("gateway_relay_fast_path_entries", ""), 1.0);

    // Every size class of the program's shifting: odd and even, across its chunks.
    let sizes = [1usize, 3, 4, 17, 127, 128, 129, 600, 1001, 1200, 1468];
    let mut bytes = 0usize;
    for (round, &len) in sizes.iter().enumerate() {
        channel_round_trip(&mut a, &peer_socket, peer, relayed_a, channel, len, round);
        bytes += len;
    }
    settle();
    let messages = sizes.len() as f64;
    for direction in ["client_to_peer", "peer_to_client"] {
        assert_eq!(
            gateway.metric(
                "gateway_relay_fast_path_packets_total",
                &format!("direction=\"{direction}\"")
            ),
            messages,
            "{direction}: every datagram went through the kernel"
        );
        assert_eq!(
            gateway.metric(
                "gateway_relay_bytes_total",
                &format!("direction=\"{direction}\"")
            ),
            bytes as f64,
            "{direction}: application bytes, as the kernel counted them"
        );
        assert_eq!(
            gateway.metric(
                "gateway_relay_packets_total",
                &format!("direction=\"{direction}\"")
            ),
            messages,
            "{direction}: the relay's totals are the kernel's alone: userspace relayed none"
        );
    }
    assert_eq!(
        gateway.metric("gateway_stun_datagrams_total", "outcome=\"channel_data\""),
        0.0,
        "ChannelData reached the userspace service loop"
    );

    // Larger than the program shifts: the userspace relay carries it, both ways.
    let big = vec![0xC3u8; 3000];
    a.send(peer, &big).expect("send");
    let mut buf = vec![0u8; 4096];
    let (n, from) = peer_socket.recv_from(&mut buf).expect("the peer receives");
    assert_eq!((from, &buf[..n]), (relayed_a, big.as_slice()));
    peer_socket.send_to(&big, relayed_a).expect("peer sends");
    assert_eq!(a.recv(WAIT).expect("A receives").data, big);
    settle();
    assert_eq!(
        gateway.metric("gateway_stun_datagrams_total", "outcome=\"channel_data\""),
        1.0,
        "the big ChannelData went through userspace"
    );
    assert_eq!(
        gateway.metric(
            "gateway_relay_fast_path_packets_total",
            "direction=\"peer_to_client\""
        ),
        messages,
        "and so did the big reply"
    );
}

#[test]
fn fast_path_that_cannot_attach_stops_start_up() {
    require_root();
    let service = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port());
    let secret = std::env::temp_dir().join(format!("gw-fast-secret-{}", std::process::id()));
    gateway_tests::daemon::write_secret(&secret, SECRET).expect("secret file");
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

/// An Ethernet frame carrying IPv4 + UDP `payload` from `src` to `dst`, with valid IP
/// and UDP checksums (or a zero UDP checksum with `no_udp_checksum`).
fn frame(src: SocketAddr, dst: SocketAddr, payload: &[u8], no_udp_checksum: bool) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let udp_len = 8 + payload.len();
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
    f[16..18].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let ip_check = checksum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&ip_check.to_be_bytes());
    if !no_udp_checksum {
        let udp_check = udp_checksum(&f);
        f[40..42].copy_from_slice(&udp_check.to_be_bytes());
    }
    f
}

/// The Internet checksum of `parts` concatenated (each part of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let bytes: Vec<u8> = parts.concat();
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP checksum of a frame from [`frame`] (its checksum field taken as zero).
fn udp_checksum(f: &[u8]) -> u16 {
    let udp_len = u16::from_be_bytes([f[38], f[39]]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let mut udp = f[34..34 + usize::from(udp_len)].to_vec();
    udp[6] = 0;
    udp[7] = 0;
    match checksum(&[&pseudo, &udp]) {
        0 => 0xFFFF,
        c => c,
    }
}

#[test]
fn the_kernel_program_rewrites_channel_data_and_peer_udp_with_valid_checksums() {
    use gateway::{
        ebpf::AttachMode,
        fast_path::{FastPathConfig, RelayFastPath},
        proto::turn::server::{FastChannel, FastPath},
    };
    require_root();
    let addr = |s: &str| -> SocketAddr { s.parse().expect("address") };
    let mut fast = RelayFastPath::load(FastPathConfig {
        service_port: 3478,
        relay_ports: 50_000..=50_100,
        interfaces: Vec::new(),
        mode: AttachMode::Auto,
        local_addresses: Vec::new(),
    })
    .expect("load the relay program (root, gateway built after `cargo xtask build-ebpf`)");
    let (service, client_a, client_b) = (
        addr("127.0.0.1:3478"),
        addr("127.9.0.1:40001"),
        addr("127.9.0.2:40002"),
    );
    let (relay_a, relay_b) = (addr("127.0.0.1:50000"), addr("127.0.0.1:50002"));
    let a = FastChannel {
        allocation: 0,
        client: client_a,
        service: service.ip(),
        channel: 0x4001,
        relay: relay_a,
        peer: relay_b,
        expires: Instant::now() + Duration::from_secs(60),
    };
    let b = FastChannel {
        allocation: 1,
        client: client_b,
        channel: 0x4009,
        relay: relay_b,
        peer: relay_a,
        ..a
    };
    // ChannelData with 17 bytes of data and 3 bytes of (non-zero) padding.
    let data = b"hello, fast path!";
    let mut message = vec![0x40, 0x01, 0, 17];
    message.extend_from_slice(data);
    message.extend_from_slice(&[0xEE; 3]);
    let input = frame(client_a, service, &message, false);

    // Nothing installed: untouched.
    assert_eq!(fast.test_run(&input).expect("run"), (-1, input.clone()));

    // Only A's half installed: A's channel goes to a peer (here B's relay address)
    // with no channel bound back, so its ChannelData becomes the plain UDP datagram
    // A's relay address sends to that peer: header and padding stripped.
    fast.apply(&FastPath::Install(a)).expect("install A");
    let (verdict, output) = fast.test_run(&input).expect("run");
    assert_eq!(verdict, 0, "TC_ACT_OK: delivered up the local stack");
    assert_eq!(
        output,
        frame(relay_a, relay_b, data, false),
        "the datagram A's relay would have sent, checksums valid"
    );
    let bare = frame(client_a, service, &message, true);
    assert_eq!(
        fast.test_run(&bare).expect("run"),
        (0, frame(relay_a, relay_b, data, true)),
        "a zero UDP checksum stays zero"
    );
    // Odd and even lengths across the program's 128-byte chunks, padded or not.
    for len in [1usize, 2, 3, 4, 127, 128, 129, 255, 1001, 1200, 1468, 2048] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        let pad = (4 - len % 4) % 4;
        for padded in [false, true] {
            let mut message = vec![0x40, 0x01];
            message.extend_from_slice(&(len as u16).to_be_bytes());
            message.extend_from_slice(&data);
            if padded {
                message.extend(std::iter::repeat_n(0xA5, pad));
            }
            let input = frame(client_a, service, &message, false);
            assert_eq!(
                fast.test_run(&input).expect("run"),
                (0, frame(relay_a, relay_b, &data, false)),
                "ChannelData of {len} bytes (padded: {padded}) to plain UDP"
            );
        }
        // And back: UDP from that peer to A's relay address is ChannelData to A.
        let input = frame(relay_b, relay_a, &data, false);
        let mut expected = vec![0x40, 0x01];
        expected.extend_from_slice(&(len as u16).to_be_bytes());
        expected.extend_from_slice(&data);
        assert_eq!(
            fast.test_run(&input).expect("run"),
            (0, frame(service, client_a, &expected, false)),
            "UDP of {len} bytes from the peer to ChannelData"
        );
    }
    // Beyond what the program shifts, odd padding, another peer port: untouched.
    let big = vec![7u8; 2049];
    let input_big = frame(relay_b, relay_a, &big, false);
    assert_eq!(fast.test_run(&input_big).expect("run"), (-1, input_big));
    let mut odd_pad = message[..4 + 17].to_vec();
    odd_pad.push(0);
    let input_odd = frame(client_a, service, &odd_pad, false);
    assert_eq!(fast.test_run(&input_odd).expect("run"), (-1, input_odd));
    let stranger = frame(addr("127.0.0.1:50003"), relay_a, data, false);
    assert_eq!(fast.test_run(&stranger).expect("run"), (-1, stranger));
    let from_peer = frame(relay_b, relay_a, data, true);
    let mut to_a = vec![0x40, 0x01, 0, 17];
    to_a.extend_from_slice(data);
    assert_eq!(
        fast.test_run(&from_peer).expect("run"),
        (0, frame(service, client_a, &to_a, true)),
        "a zero UDP checksum from the peer stays zero"
    );
    let before = fast.allocation_counters(0).expect("read");
    fast.apply(&FastPath::Remove(a)).expect("remove A");
    fast.apply(&FastPath::Install(a)).expect("reinstall A");
    assert_eq!(
        fast.allocation_counters(0).expect("read"),
        Default::default(),
        "a fresh allocation id starts at zero (it had {before:?})"
    );

    let totals_before = fast.totals().expect("read");
    fast.apply(&FastPath::Install(b)).expect("install B");
    let (verdict, output) = fast.test_run(&input).expect("run");
    assert_eq!(verdict, 0, "TC_ACT_OK: delivered up the local stack");
    let mut expected_message = vec![0x40, 0x09, 0, 17];
    expected_message.extend_from_slice(&message[4..]);
    let expected = frame(service, client_b, &expected_message, false);
    assert_eq!(
        output, expected,
        "the ChannelData B would have got, checksums valid"
    );
    let counters_a = fast.allocation_counters(0).expect("read");
    let counters_b = fast.allocation_counters(1).expect("read");
    assert_eq!(
        (counters_a.to_peer_packets, counters_a.to_peer_bytes),
        (1, 17)
    );
    assert_eq!(counters_a.to_client_packets, 0);
    assert_eq!(
        (counters_b.to_client_packets, counters_b.to_client_bytes),
        (1, 17)
    );
    let totals = fast.totals().expect("read");
    assert_eq!(
        (
            totals.to_peer_packets - totals_before.to_peer_packets,
            totals.to_client_packets - totals_before.to_client_packets
        ),
        (1, 1),
        "relay to relay: once each way"
    );

    // A zero UDP checksum (none computed) stays zero.
    let bare = frame(client_a, service, &message, true);
    let (verdict, output) = fast.test_run(&bare).expect("run");
    assert_eq!(verdict, 0);
    assert_eq!(output, frame(service, client_b, &expected_message, true));

    // Truncated ChannelData (length beyond the datagram) is left to userspace.
    let mut truncated = message.clone();
    truncated[3] = 40;
    let input_truncated = frame(client_a, service, &truncated, false);
    assert_eq!(fast.test_run(&input_truncated).expect("run").0, -1);

    // B's entry lapses (its deadline passed): no way back, so A's ChannelData goes
    // to B's relay address as plain UDP (for B's userspace relay), even before
    // userspace removes the entry.
    let to_relay_b = (0, frame(relay_a, relay_b, data, false));
    let lapsed = FastChannel {
        expires: Instant::now(),
        ..b
    };
    fast.apply(&FastPath::Install(lapsed)).expect("update B");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(fast.test_run(&input).expect("run"), to_relay_b);
    // Back, then removed: the same.
    fast.apply(&FastPath::Install(b)).expect("renew B");
    assert_eq!(fast.test_run(&input).expect("run").1, expected);
    fast.apply(&FastPath::Remove(b)).expect("remove B");
    assert_eq!(fast.test_run(&input).expect("run"), to_relay_b);
    // A's own entry lapses: untouched.
    fast.apply(&FastPath::Install(FastChannel {
        expires: Instant::now(),
        ..a
    }))
    .expect("update A");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(fast.test_run(&input).expect("run"), (-1, input.clone()));
    assert_eq!(fast.installed(), 1);
    fast.apply(&FastPath::Remove(a)).expect("remove A");
    assert_eq!(fast.installed(), 0);
}
