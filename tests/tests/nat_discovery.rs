//! NAT behaviour discovery with the real binaries: `gateway serve` with a discovery
//! socket on another port and one on its second address answers RFC 5780
//! CHANGE-REQUEST tests, and a `gateway peer` behind each lab preset reports the
//! mapping, filtering and port preservation that the preset is built with (RFC 4787
//! terms, see `tests/src/lab/preset.rs`). Also: an unauthenticated CHANGE-REQUEST gets
//! a 401 and nothing from another endpoint unless the operator allows it.
use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use gateway::proto::{
    binding::{self, ChangeRequest, attr5780},
    stun::{Class, Message, MessageType, MessageWriter, attr, method},
};
use gateway_tests::{
    daemon::{GatewayProcess, PeerProcess},
    lab::{Filtering, Lab, Mapping, NatPreset, PortAllocation, RouterKind, lab_available},
    punch::{self, SECRET},
};

/// The service port and the discovery sockets: CHANGE-REQUEST answers from another
/// port of the first address and from another address and port (the first matching
/// socket in this order answers), and a socket for the agents' mapping tests that
/// never sends an unsolicited answer.
const SERVE_ARGS: &[&str] = &[
    "--listen",
    "0.0.0.0:3478",
    "--discovery-listen",
    "192.0.2.10:3480",
    "--discovery-listen",
    "192.0.2.11:3480",
    "--discovery-listen",
    "192.0.2.10:3479",
    "--no-ebpf",
    "--no-relay",
];

/// A secret file removed on drop.
struct SecretFile(PathBuf);

impl SecretFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "gw-discovery-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        gateway_tests::daemon::write_secret(&path, SECRET).expect("write the secret");
        Self(path)
    }

    fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

/// The mapping class the agent must report behind `p`.
fn expected_mapping(p: &NatPreset) -> &'static str {
    match p.kind {
        RouterKind::NoNat | RouterKind::FirewallOnly => "none",
        RouterKind::Nat => match p.mapping {
            Mapping::EndpointIndependent => "endpoint_independent",
            Mapping::AddressDependent => "address_dependent",
            Mapping::AddressAndPortDependent => "address_and_port_dependent",
        },
    }
}

/// The filtering class the agent must report behind `p`: a plain router filters
/// nothing; a firewall admits only established flows (the exact address and port).
fn expected_filtering(p: &NatPreset) -> &'static str {
    match p.kind {
        RouterKind::NoNat => "endpoint_independent",
        RouterKind::FirewallOnly => "address_and_port_dependent",
        RouterKind::Nat => match p.filtering {
            Filtering::EndpointIndependent => "endpoint_independent",
            Filtering::AddressDependent => "address_dependent",
            Filtering::AddressAndPortDependent => "address_and_port_dependent",
        },
    }
}

/// Whether the agent's public port equals its local one behind `p`.
fn expected_preserved(p: &NatPreset) -> bool {
    p.kind != RouterKind::Nat || p.ports == PortAllocation::Preserve
}

#[test]
fn agents_report_the_filtering_and_port_preservation_of_each_preset() {
    if !lab_available() {
        return;
    }
    let names = [
        "no-nat",
        "firewall-only",
        "full-cone",
        "restricted-cone",
        "port-restricted-cone",
        "eim-random-port",
        "address-dependent",
        "symmetric",
        "symmetric-sequential",
        // Swallows unsolicited answers itself: the filtering tests must not hold a
        // port that the mapping tests need.
        "router-accepts-unsolicited",
    ];
    let presets: Vec<NatPreset> = names.iter().map(|n| n.parse().expect("preset")).collect();
    let mut builder = Lab::builder();
    for (i, preset) in presets.iter().enumerate() {
        builder = builder.site(&format!("s{i}"), preset.clone());
    }
    let lab = builder.build().expect("lab");
    let secret = SecretFile::new();
    let secret_arg = secret.arg();
    let mut args = SERVE_ARGS.to_vec();
    args.extend(["--secret-file", &secret_arg]);
    let gateway = GatewayProcess::start(
        lab.server(),
        SocketAddr::from((punch::SERVICE.ip(), 9478)),
        &args,
    )
    .expect("gateway");
    let mut agents = Vec::new();
    for (i, preset) in presets.iter().enumerate() {
        let host = lab
            .site(&format!("s{i}"))
            .and_then(|s| s.host(0))
            .expect("host");
        let creds = punch::credentials(&format!("peer{i}"));
        let agent = PeerProcess::start(
            host,
            punch::SERVICE,
            &creds.username,
            &creds.password,
            &[
                "--bind",
                "0.0.0.0:4000",
                "--discover",
                "192.0.2.10:3479",
                "--discover",
                "192.0.2.11:3478",
                "--discover-filtering",
            ],
        )
        .expect("agent");
        agents.push((preset, agent));
    }
    let mut failures = Vec::new();
    println!("| preset | mapping | filtering | port preserved |");
    println!("|---|---|---|---|");
    for (preset, agent) in &mut agents {
        let line = agent
            .wait_for("nat mapping", Duration::from_secs(10))
            .unwrap_or_default();
        let expected = format!(
            "nat mapping {} filtering {} port_preserved {}",
            expected_mapping(preset),
            expected_filtering(preset),
            expected_preserved(preset)
        );
        println!(
            "| {} | {} |",
            preset.name(),
            line.strip_prefix("nat mapping ")
                .unwrap_or("(none)")
                .replace(" filtering ", " | ")
                .replace(" port_preserved ", " | ")
        );
        if line != expected {
            failures.push(format!(
                "{}: expected {expected:?}, got {line:?}; it said {:?}",
                preset.name(),
                agent.seen()
            ));
        }
    }
    let metrics = gateway.scrape().expect("scrape");
    let answered = gateway_tests::daemon::metric_value(
        &metrics,
        "gateway_stun_datagrams_total",
        "outcome=\"change_request_answered\"",
    )
    .unwrap_or(0.0);
    // Two tests per agent at least (more with retransmissions).
    assert!(
        answered >= 2.0 * presets.len() as f64,
        "{answered} CHANGE-REQUESTs answered"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// An unsigned Binding request with CHANGE-REQUEST "change IP and port".
fn unsigned_change_request(tid: [u8; 12]) -> Vec<u8> {
    let mut request = Vec::new();
    let mut writer = MessageWriter::new(
        &mut request,
        MessageType {
            method: method::BINDING,
            class: Class::Request,
        },
        tid,
    );
    let change = ChangeRequest {
        change_ip: true,
        change_port: true,
    };
    writer.attribute(attr5780::CHANGE_REQUEST, &change.to_value());
    writer.finish_with_fingerprint();
    request
}

/// Every datagram `socket` receives within `window`, with its source.
fn receive_all(socket: &UdpSocket, window: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => got.push((from, buf[..len].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

fn error_code(datagram: &[u8]) -> Option<u16> {
    let message = Message::parse(datagram).ok()?;
    let value = message
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == attr::ERROR_CODE)?
        .value;
    Some(u16::from(*value.get(2)? & 7) * 100 + u16::from(*value.get(3)?))
}

#[test]
fn unauthenticated_change_requests_are_refused_unless_allowed() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("open", NatPreset::no_nat())
        .build()
        .expect("lab");
    let secret = SecretFile::new();
    let secret_arg = secret.arg();
    // The default gateway, and one that allows unauthenticated CHANGE-REQUEST, side
    // by side on other ports.
    let mut args = SERVE_ARGS.to_vec();
    args.extend(["--secret-file", &secret_arg]);
    let _strict = GatewayProcess::start(
        lab.server(),
        SocketAddr::from((punch::SERVICE.ip(), 9478)),
        &args,
    )
    .expect("gateway");
    let _open = GatewayProcess::start(
        lab.server(),
        SocketAddr::from((punch::SERVICE.ip(), 9479)),
        &[
            "--listen",
            "0.0.0.0:4478",
            "--discovery-listen",
            "192.0.2.10:4479",
            "--discovery-listen",
            "192.0.2.11:4479",
            "--no-ebpf",
            "--no-relay",
            "--secret-file",
            &secret_arg,
            "--discovery-unauthenticated",
        ],
    )
    .expect("gateway allowing unauthenticated CHANGE-REQUEST");
    let host = lab.site("open").and_then(|s| s.host(0)).expect("host");
    let socket = host.udp_bind(5000).expect("socket");
    let me = SocketAddr::from((host.addr(), 5000));

    // Default: a small 401 from the service port, nothing from anywhere else.
    socket
        .send_to(&unsigned_change_request([1; 12]), punch::SERVICE)
        .expect("send");
    let got = receive_all(&socket, Duration::from_millis(700));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, punch::SERVICE);
    assert_eq!(error_code(&got[0].1), Some(401));
    assert!(got[0].1.len() <= 48, "{} bytes", got[0].1.len());

    // Allowed: the answer comes from the other address and port, says so, and is
    // not much larger than the request.
    let request = unsigned_change_request([2; 12]);
    let service: SocketAddr = "192.0.2.10:4478".parse().expect("addr");
    socket.send_to(&request, service).expect("send");
    let got = receive_all(&socket, Duration::from_millis(700));
    assert_eq!(got.len(), 1, "{got:?}");
    let (from, answer) = &got[0];
    let other: SocketAddr = "192.0.2.11:4479".parse().expect("addr");
    assert_eq!(*from, other);
    assert_eq!(binding::parse_binding_success(answer, [2; 12]), Some(me));
    let origin = Message::parse(answer)
        .expect("answer")
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == attr5780::RESPONSE_ORIGIN)
        .and_then(|a| binding::decode_address(a.value));
    assert_eq!(origin, Some(other));
    assert!(
        answer.len() <= 2 * request.len(),
        "{} bytes for {}",
        answer.len(),
        request.len()
    );
}
