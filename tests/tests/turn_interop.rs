//! Real TURN clients against `gateway serve`: coturn's `turnutils_stunclient` and
//! `turnutils_uclient` (Debian's `coturn` package) run on a lab host behind a NAT and
//! use the gateway on the lab's public server as their relay.
use std::{
    net::SocketAddr,
    process::{Command, Output},
};

use gateway_tests::{
    daemon::{GatewayProcess, metric_value},
    lab::{Host, Lab, NatPreset, lab_available},
    punch::{SECRET, SERVICE},
};

/// The relay range the lab gateway uses.
const RELAY_PORTS: &str = "50000-50999";

struct RelayLab {
    lab: Lab,
    gateway: GatewayProcess,
    secret_path: std::path::PathBuf,
}

impl Drop for RelayLab {
    fn drop(&mut self) {
        std::fs::remove_file(&self.secret_path).ok();
    }
}

/// A lab with one site behind a port-restricted cone NAT and the gateway on the
/// server; `extra` flags go to `gateway serve`.
fn relay_lab(extra: &[&str]) -> RelayLab {
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let secret_path = std::env::temp_dir().join(format!(
        "gw-turn-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    gateway_tests::daemon::write_secret(&secret_path, SECRET).expect("secret file");
    let secret_arg = secret_path.to_string_lossy().into_owned();
    let listen = if extra.contains(&"--listen") {
        Vec::new()
    } else {
        vec!["--listen", "0.0.0.0:3478"]
    };
    let mut args = listen;
    args.extend_from_slice(&[
        "--no-ebpf",
        "--secret-file",
        &secret_arg,
        "--relay-port-range",
        RELAY_PORTS,
    ]);
    args.extend_from_slice(extra);
    let gateway =
        GatewayProcess::start(lab.server(), SocketAddr::from((SERVICE.ip(), 9478)), &args)
            .expect("gateway");
    RelayLab {
        lab,
        gateway,
        secret_path,
    }
}

fn client_host(lab: &Lab) -> Host {
    lab.site("a").and_then(|s| s.host(0)).expect("host").clone()
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {command:?}: {e}; install Debian's coturn package (cargo xtask setup does)"
        )
    })
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `turnutils_uclient` against the lab gateway with the shared secret (REST auth),
/// `clients` clients sending `messages` messages of `length` bytes each.
fn uclient(host: &Host, mode: &[&str], clients: u32, messages: u32, length: u32) -> String {
    let secret = String::from_utf8_lossy(SECRET).into_owned();
    let (clients, messages, length) = (
        clients.to_string(),
        messages.to_string(),
        length.to_string(),
    );
    let mut command = host.command("timeout");
    command
        .args([
            "60",
            "turnutils_uclient",
            "-p",
            "3478",
            "-W",
            &secret,
            "-r",
            "gateway",
        ])
        .args([
            "-u", "uclient", "-m", &clients, "-n", &messages, "-l", &length,
        ])
        .args(mode)
        .arg(SERVICE.ip().to_string());
    text(&run(&mut command))
}

/// The numbers after `key=` in the last line that has them.
fn last_count(output: &str, key: &str) -> Option<u64> {
    output
        .lines()
        .rev()
        .find_map(|line| line.split(key).nth(1))
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
}

fn assert_all_delivered(output: &str, expected: u64) {
    let sent = last_count(output, "tot_send_msgs=");
    let received = last_count(output, "tot_recv_msgs=");
    assert_eq!(
        sent,
        Some(expected),
        "messages sent; uclient said:\n{output}"
    );
    assert_eq!(
        received,
        Some(expected),
        "messages received; uclient said:\n{output}"
    );
    assert!(
        output.contains("Total lost packets 0 (0.000000%)"),
        "uclient reports loss:\n{output}"
    );
}

#[test]
fn coturn_stunclient_learns_the_nat_public_address() {
    if !lab_available() {
        return;
    }
    let relay = relay_lab(&[]);
    let host = client_host(&relay.lab);
    let output =
        run(host
            .command("turnutils_stunclient")
            .args(["-p", "3478", &SERVICE.ip().to_string()]));
    let output = text(&output);
    let wan = relay.lab.site("a").expect("site").wan_addr();
    assert!(
        output.contains(&format!("UDP reflexive addr: {wan}:")),
        "expected the NAT's public address {wan} in:\n{output}"
    );
}

#[test]
fn coturn_uclient_relays_every_message_over_channels_and_send_indications() {
    if !lab_available() {
        return;
    }
    // The lab's "public" addresses are in RFC 5737 ranges, which the default policy
    // denies as reserved; the operator allows them, as an operator would allow an
    // internal range.
    let relay = relay_lab(&["--allow-peer", "192.0.2.0/24"]);
    let host = client_host(&relay.lab);
    // Client to client through the relay (-y): each client's allocation sends to the
    // other's relayed address; 4 clients x 200 messages of 120 bytes.
    // Default mode: each client allocates an RTP/RTCP pair (EVEN-PORT with the R
    // bit, then RESERVATION-TOKEN for the odd port).
    let channels = uclient(&host, &["-y"], 4, 200, 120);
    assert_all_delivered(&channels, 800);
    // The same with Send and Data indications instead of channels (-s), 1200 bytes.
    let indications = uclient(&host, &["-y", "-s", "-c"], 2, 100, 1200);
    assert_all_delivered(&indications, 200);
    let metrics = relay.gateway.scrape().expect("metrics");
    let to_peer = metric_value(
        &metrics,
        "gateway_relay_packets_total",
        "direction=\"client_to_peer\"",
    )
    .expect("relay packet counter");
    let to_client = metric_value(
        &metrics,
        "gateway_relay_packets_total",
        "direction=\"peer_to_client\"",
    )
    .expect("relay packet counter");
    // Every message crossed the relay twice: in from its sender, out to its receiver
    // (uclient also sends a few of its own probes, hence at least).
    assert!(
        to_peer >= 1000.0 && to_client >= 1000.0,
        "{to_peer} {to_client}\n{metrics}"
    );
    let created =
        metric_value(&metrics, "gateway_turn_allocations_total", "").expect("allocations");
    assert!(created >= 6.0, "allocations created: {created}");
    let bytes = metric_value(
        &metrics,
        "gateway_relay_bytes_total",
        "direction=\"peer_to_client\"",
    )
    .expect("bytes");
    assert!(
        bytes >= 800.0 * 120.0 + 200.0 * 1200.0,
        "relayed bytes {bytes}"
    );
}

#[test]
fn default_policy_refuses_peers_in_reserved_ranges_with_403() {
    if !lab_available() {
        return;
    }
    // Without --allow-peer the relay addresses (192.0.2.0/24, reserved and the
    // gateway's own) are not reachable through the relay.
    let relay = relay_lab(&[]);
    let host = client_host(&relay.lab);
    let output = uclient(&host, &["-y", "-c"], 1, 10, 100);
    assert!(
        output.contains("403"),
        "uclient should report 403 Forbidden:\n{output}"
    );
    let metrics = relay.gateway.scrape().expect("metrics");
    let forbidden = metric_value(
        &metrics,
        "gateway_turn_requests_total",
        "method=\"channel_bind\",outcome=\"forbidden\"",
    )
    .unwrap_or(0.0)
        + metric_value(
            &metrics,
            "gateway_turn_requests_total",
            "method=\"create_permission\",outcome=\"forbidden\"",
        )
        .unwrap_or(0.0);
    assert!(forbidden >= 1.0, "no 403 counted:\n{metrics}");
    let relayed = metric_value(
        &metrics,
        "gateway_relay_packets_total",
        "direction=\"client_to_peer\"",
    )
    .expect("counter");
    assert_eq!(relayed, 0.0, "nothing may reach a denied peer");
}

/// The Python environment `cargo xtask setup` makes for interop tests (aioice).
fn python() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let python = root.join("target/python/bin/python3");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it makes a venv with aioice from PyPI)",
        python.display()
    );
    python
}

#[test]
fn aioice_agents_connect_through_the_relay_and_exchange_data() {
    if !lab_available() {
        return;
    }
    let relay = relay_lab(&["--allow-peer", "192.0.2.0/24"]);
    let host = client_host(&relay.lab);
    let (alice, bob) = (
        gateway_tests::punch::credentials("alice"),
        gateway_tests::punch::credentials("bob"),
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/aioice_relay.py");
    let output = run(host
        .command(&python().to_string_lossy())
        .arg(script)
        .arg(SERVICE.ip().to_string())
        .arg("3478")
        .args([
            &alice.username,
            &alice.password,
            &bob.username,
            &bob.password,
        ])
        .arg("20"));
    let said = text(&output);
    assert!(
        output.status.success(),
        "aioice through the relay failed:\n{said}"
    );
    let result: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{said}"));
    assert_eq!(result["received_by_a"], 20, "{said}");
    assert_eq!(result["received_by_b"], 20, "{said}");
    for candidate in result["relay_candidates"].as_array().expect("list") {
        assert!(
            candidate
                .as_str()
                .is_some_and(|c| c.starts_with("192.0.2.10:50")),
            "relay candidates come from the gateway's relay range: {said}"
        );
    }
    let metrics = relay.gateway.scrape().expect("metrics");
    let created =
        metric_value(&metrics, "gateway_turn_allocations_total", "").expect("allocations");
    assert_eq!(created, 2.0, "one allocation per aioice agent");
}

#[test]
fn coturn_uclient_relays_over_tcp_and_allocations_end_with_the_connection() {
    if !lab_available() {
        return;
    }
    let relay = relay_lab(&["--allow-peer", "192.0.2.0/24"]);
    let host = client_host(&relay.lab);
    // TURN over TCP between client and gateway (-t), UDP on the relayed side.
    let channels = uclient(&host, &["-t", "-y", "-c"], 2, 200, 120);
    assert_all_delivered(&channels, 400);
    let indications = uclient(&host, &["-t", "-y", "-s", "-c"], 2, 50, 1200);
    assert_all_delivered(&indications, 100);
    let metrics = relay.gateway.scrape().expect("metrics");
    let created = metric_value(&metrics, "gateway_turn_allocations_total", "").expect("created");
    assert!(created >= 4.0, "allocations created over TCP: {created}");
    // uclient has closed its connections: RFC 8656 ends a TCP allocation with its
    // connection.
    assert_eq!(
        metric_value(&metrics, "gateway_turn_allocations", ""),
        Some(0.0),
        "{metrics}"
    );
}

#[test]
fn spoofed_allocate_flood_creates_nothing_and_leaves_memory_flat() {
    if !lab_available() {
        return;
    }
    let relay = relay_lab(&[]);
    let host = client_host(&relay.lab);
    let target = SocketAddr::from((SERVICE.ip(), 3478));
    // 200 sources x 100 unauthenticated Allocates each, as a spoofing attacker would
    // send them (it never sees the 401s, so it never echoes a nonce).
    let sockets: Vec<std::net::UdpSocket> = (0..200)
        .map(|_| host.udp_bind(0).expect("socket"))
        .collect();
    for socket in &sockets {
        socket.set_nonblocking(true).expect("nonblocking");
    }
    let mut request = Vec::new();
    let mut allocate = |tid: [u8; 12]| {
        request.clear();
        let mut writer = gateway::proto::stun::MessageWriter::new(
            &mut request,
            gateway::proto::stun::MessageType {
                method: gateway::proto::turn::method::ALLOCATE,
                class: gateway::proto::stun::Class::Request,
            },
            tid,
        );
        writer.attribute(
            gateway::proto::turn::attr::REQUESTED_TRANSPORT,
            &[17, 0, 0, 0],
        );
        writer.finish_with_fingerprint();
        request.clone()
    };
    // Warm up (first allocations of the daemon's buffers), then measure.
    let flood_start = std::time::Instant::now();
    for socket in sockets.iter().take(10) {
        socket.send_to(&allocate(rand::random()), target).ok();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = relay.gateway.rss_kib().expect("rss");
    let mut sent = 0u32;
    let mut replies = 0u32;
    let mut largest_reply = 0usize;
    let mut buf = [0u8; 1500];
    for round in 0..100 {
        for socket in &sockets {
            let datagram = allocate(rand::random());
            if socket.send_to(&datagram, target).is_ok() {
                sent += 1;
            }
            while let Ok((len, _)) = socket.recv_from(&mut buf) {
                replies += 1;
                largest_reply = largest_reply.max(len);
            }
        }
        if round % 10 == 9 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    for socket in &sockets {
        while let Ok((len, _)) = socket.recv_from(&mut buf) {
            replies += 1;
            largest_reply = largest_reply.max(len);
        }
    }
    let after = relay.gateway.rss_kib().expect("rss");
    eprintln!("rss before {before} KiB after {after} KiB, {sent} sent, {replies} replies");
    let metrics = relay.gateway.scrape().expect("metrics");
    assert_eq!(
        metric_value(&metrics, "gateway_turn_allocations", ""),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&metrics, "gateway_turn_allocations_total", ""),
        Some(0.0)
    );
    let challenged = metric_value(
        &metrics,
        "gateway_turn_requests_total",
        "method=\"allocate\",outcome=\"unauthorized\"",
    )
    .unwrap_or(0.0);
    // Every port is on one address: the source's reply budget (bursts of 100, then
    // 50 a second) bounds the 401s, not the 10,000 a second of all sources together.
    let bound = 100.0 + 50.0 * (flood_start.elapsed().as_secs_f64() + 1.0);
    assert!(
        (100.0..=bound).contains(&challenged),
        "challenges {challenged} of {sent} (bound {bound:.0})\n{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "gateway_turn_requests_total",
            "method=\"allocate\",outcome=\"throttled\"",
        )
        .unwrap_or(0.0)
            >= f64::from(sent) - bound,
        "the rest were throttled"
    );
    assert!(replies > 0, "the flood was answered at all");
    // A 401 here is at most 64 bytes longer than the 36-byte request.
    assert!(
        largest_reply <= 36 + 64,
        "largest reply {largest_reply} bytes"
    );
    // Memory stays flat: nothing is kept per source (measured: 0 KiB of growth; 512
    // KiB of slack for allocator noise, while remembering 20,000 sources at even 64
    // bytes each would take 1,250 KiB).
    assert!(
        after.saturating_sub(before) < 512,
        "RSS grew from {before} KiB to {after} KiB over {sent} spoofed Allocates"
    );
}

#[test]
fn ipv6_clients_get_ipv6_relayed_addresses() {
    use gateway::proto::turn::{
        AddressFamily,
        client::{ClientConfig, TurnClientEvent},
    };
    use gateway_tests::turn::BlockingClient;
    if !lab_available() {
        return;
    }
    // Dual-stack service socket; the client and its peer on the server's own IPv6
    // loopback (the lab's links are IPv4), which the operator allows.
    let relay = relay_lab(&["--listen", "[::]:3478", "--allow-peer", "::1/128"]);
    let server = relay.lab.server().clone();
    let alice = gateway_tests::punch::credentials("alice");
    let mut config = ClientConfig::new(
        "[::1]:3478".parse().expect("literal"),
        alice.username,
        alice.password,
    );
    config.family = AddressFamily::V6;
    let mut client = server
        .run(move || BlockingClient::new("[::1]:0".parse().expect("literal"), config))
        .expect("namespace")
        .expect("client socket");
    let peer = server
        .run(|| std::net::UdpSocket::bind("[::1]:0"))
        .expect("namespace")
        .expect("peer socket");
    peer.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("timeout");
    let wait = std::time::Duration::from_secs(5);
    client
        .client
        .allocate(std::time::Instant::now())
        .expect("idle");
    let relayed = match client.wait_event(wait, |e| {
        matches!(
            e,
            TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
        )
    }) {
        Ok(TurnClientEvent::Allocated { relayed, .. }) => relayed,
        other => panic!(
            "no IPv6 allocation: {other:?}\n{}",
            relay.gateway.log_text()
        ),
    };
    assert_eq!(
        relayed.ip(),
        "::1".parse::<std::net::IpAddr>().expect("literal")
    );
    let peer_addr = peer.local_addr().expect("bound");
    client
        .client
        .bind_channel(std::time::Instant::now(), peer_addr)
        .expect("allocated");
    let bound = client
        .wait_event(wait, |e| {
            matches!(
                e,
                TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
            )
        })
        .expect("channel answer");
    assert!(
        matches!(bound, TurnClientEvent::ChannelBound { .. }),
        "{bound:?}"
    );
    client.send(peer_addr, b"over IPv6").expect("send");
    let mut buf = [0u8; 64];
    let (len, from) = peer.recv_from(&mut buf).unwrap_or_else(|e| {
        panic!(
            "the peer gets nothing ({e}):\n{}",
            relay.gateway.scrape().unwrap_or_default()
        )
    });
    assert_eq!((&buf[..len], from), (&b"over IPv6"[..], relayed));
    peer.send_to(b"and back", relayed).expect("peer sends");
    assert_eq!(client.recv(wait).expect("data").data, b"and back");
    // An IPv4 peer on an IPv6 allocation is a family mismatch (443), not a relay.
    client
        .client
        .create_permission(std::time::Instant::now(), "127.0.0.1".parse().expect("ip"))
        .expect_err("the client itself refuses a family mismatch");
}
