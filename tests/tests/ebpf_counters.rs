//! The eBPF pipeline end to end: `gateway serve` in the lab's server namespace loads
//! and attaches its tc programs, a peer behind a NAT sends datagrams, and the kernel's
//! counters exported on /metrics equal exactly what was sent.
use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use gateway_tests::{
    daemon::{GatewayProcess, metric_value},
    lab::{Lab, NatPreset, lab_available},
};

const SERVICE_PORT: u16 = 3478;
/// IP length of one Binding request: IPv4 20 + UDP 8 + STUN header 20 + FINGERPRINT 8.
const REQUEST_IP_LEN: u64 = 56;
/// IP length of one Binding success: 20 + 8 + 20 + XOR-MAPPED-ADDRESS (IPv4) 12 + 8.
const RESPONSE_IP_LEN: u64 = 68;

fn counter(text: &str, name: &str, direction: &str) -> u64 {
    metric_value(text, name, &format!("direction=\"{direction}\""))
        .unwrap_or_else(|| panic!("{name}{{direction={direction}}} missing from:\n{text}"))
        as u64
}

#[test]
fn ebpf_counters_equal_datagrams_sent_through_the_interface() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let server = lab.server();
    let server_ip = server.addrs()[0];
    let metrics_addr = SocketAddr::from((server_ip, 9478));
    let gateway = GatewayProcess::start(
        server,
        metrics_addr,
        &[
            "--listen",
            &format!("0.0.0.0:{SERVICE_PORT}"),
            "--require-ebpf",
        ],
    )
    .expect("gateway starts with eBPF (is the object embedded? run `cargo xtask build-ebpf`)");

    let before = gateway.scrape().expect("scrape");
    assert_eq!(
        metric_value(&before, "gateway_ebpf_loaded", ""),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        counter(&before, "gateway_ebpf_udp_packets_total", "ingress"),
        0
    );

    let host = lab.site("a").expect("site").host(0).expect("host");
    let socket: UdpSocket = host.udp_bind(0).expect("socket");
    let to = SocketAddr::from((server_ip, SERVICE_PORT));
    const REQUESTS: u64 = 50;
    for answered in 0..REQUESTS {
        // One request per call; a lost one would be retried and counted again, so
        // the lab preset has no loss and every request must be answered at once.
        let mut request = Vec::new();
        let tid: [u8; 12] = rand_tid(answered);
        gateway::proto::binding::binding_request(tid, &mut request);
        socket.send_to(&request, to).expect("send");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 1500];
        let (len, from) = socket
            .recv_from(&mut buf)
            .expect("every request is answered");
        assert_eq!(from, to);
        assert!(gateway::proto::binding::parse_binding_success(&buf[..len], tid).is_some());
    }
    // Traffic to a port the gateway does not own is not counted.
    let other = SocketAddr::from((server_ip, 9999));
    for _ in 0..7 {
        socket.send_to(b"not for the gateway", other).expect("send");
    }
    // And datagrams that are not STUN are counted (the kernel sees them) but get no answer.
    for _ in 0..3 {
        socket.send_to(b"garbage", to).expect("send");
    }
    std::thread::sleep(Duration::from_millis(200));

    let after = gateway.scrape().expect("scrape");
    let garbage_ip_len = 20 + 8 + b"garbage".len() as u64;
    assert_eq!(
        counter(&after, "gateway_ebpf_udp_packets_total", "ingress"),
        REQUESTS + 3,
        "{after}"
    );
    assert_eq!(
        counter(&after, "gateway_ebpf_udp_packets_total", "egress"),
        REQUESTS,
        "{after}"
    );
    assert_eq!(
        counter(&after, "gateway_ebpf_udp_bytes_total", "ingress"),
        REQUESTS * REQUEST_IP_LEN + 3 * garbage_ip_len
    );
    assert_eq!(
        counter(&after, "gateway_ebpf_udp_bytes_total", "egress"),
        REQUESTS * RESPONSE_IP_LEN
    );
    // The daemon's own view agrees with the kernel's.
    assert_eq!(
        metric_value(
            &after,
            "gateway_stun_datagrams_total",
            "outcome=\"binding_success\""
        ),
        Some(REQUESTS as f64)
    );
    assert_eq!(
        metric_value(
            &after,
            "gateway_stun_datagrams_total",
            "outcome=\"not_stun\""
        ),
        Some(3.0)
    );

    // SIGTERM: clean exit, programs detached (the log says so).
    let log_before_stop = gateway.log_text();
    assert!(
        log_before_stop.contains("eBPF counters attached"),
        "{log_before_stop}"
    );
    let status = gateway.stop().expect("stops");
    assert!(status.success(), "exit status {status}");
}

fn rand_tid(n: u64) -> [u8; 12] {
    let mut tid = [0u8; 12];
    tid[..8].copy_from_slice(&n.to_be_bytes());
    tid[8..].copy_from_slice(&std::process::id().to_be_bytes());
    tid
}

#[test]
fn gateway_reports_when_ebpf_is_required_but_disabled() {
    // No lab needed: the contradiction is refused before anything starts.
    let output = std::process::Command::new(gateway_tests::daemon::gateway_binary())
        .args(["serve", "--no-ebpf", "--require-ebpf"])
        .output()
        .expect("run gateway");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
