//! The kernel's view of punches: the tc programs' flow table, punch and bounce counts.
//!
//! Two kinds of test, both needing root (they fail loudly without it):
//! * `BPF_PROG_TEST_RUN`: hand-made IPv4 and IPv6 frames run through the loaded (not
//!   attached) programs, one at a time, so every rule is checked exactly, including
//!   IPv6 and ICMPv6, which the IPv4-only lab cannot carry.
//! * The NAT lab: scripted datagrams and connections from the lab's hosts, watched by
//!   `gateway watch` on a host and on a NAT router's WAN, and two `gateway peer`
//!   agents punching with their own programs; exact counts are asserted against what
//!   the script did (or what the agents report).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use gateway::ebpf::{AttachMode, EbpfProbe, Flow, ProgramRole, WatchSpec};
use gateway_ebpf::{BounceReason, PUNCH_TIME_SLOTS};
use gateway_tests::{
    daemon::{GatewayProcess, http_get, metric_value},
    lab::{Host, Lab, NatPreset, lab_available},
    punch::{self, Topology},
};

// ---------------------------------------------------------------------------------
// Frames for BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------

const UDP: u8 = 17;
const TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;

/// An IP packet (no Ethernet header) from `src` to `dst` carrying `l4` as `protocol`.
fn ip_packet(src: SocketAddr, dst: SocketAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + l4.len()).expect("small packet");
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let payload = u16::try_from(l4.len()).expect("small packet");
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&payload.to_be_bytes());
            p.extend_from_slice(&[protocol, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    p.extend_from_slice(l4);
    p
}

fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(
        &u16::try_from(8 + payload.len())
            .expect("small")
            .to_be_bytes(),
    );
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ip_packet(src, dst, UDP, &l4)
}

fn tcp_packet(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    ip_packet(src, dst, TCP, &l4)
}

/// An ICMP (IPv4) or ICMPv6 error from `router` to `to` quoting `quoted`'s start.
fn icmp_error(router: IpAddr, to: IpAddr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![kind, code, 0, 0, 0, 0, 0, 0];
    let quote_len = if router.is_ipv4() { 28 } else { 48 };
    l4.extend_from_slice(&quoted[..quoted.len().min(quote_len + 8)]);
    let protocol = if router.is_ipv4() { 1 } else { 58 };
    ip_packet(
        SocketAddr::new(router, 0),
        SocketAddr::new(to, 0),
        protocol,
        &l4,
    )
}

/// An Ethernet frame around an IP packet.
fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    let ether_type: u16 = if ip[0] >> 4 == 4 { 0x0800 } else { 0x86DD };
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// A STUN Binding request (magic cookie at payload offset 4).
fn stun(n: u64) -> Vec<u8> {
    let mut tid = [0u8; 12];
    tid[..8].copy_from_slice(&n.to_be_bytes());
    let mut out = Vec::new();
    gateway::proto::binding::binding_request(tid, &mut out);
    out
}

struct Kernel {
    probe: EbpfProbe,
}

impl Kernel {
    fn load(watch: WatchSpec) -> Self {
        let probe = EbpfProbe::load(&watch, &[], AttachMode::Auto)
            .expect("load the embedded programs (run `cargo xtask build-ebpf`, then rebuild)");
        Self { probe }
    }

    fn run(&mut self, role: ProgramRole, ip: &[u8]) {
        let outcome = self.probe.test_run(role, &frame(ip), 1).expect("test run");
        assert_eq!(
            outcome.return_value,
            gateway_ebpf::TC_ACT_UNSPEC as u32,
            "programs always let the packet go on to the next tc program"
        );
    }

    fn egress(&mut self, ip: &[u8]) {
        self.run(ProgramRole::Egress, ip);
    }

    fn ingress(&mut self, ip: &[u8]) {
        self.run(ProgramRole::Ingress, ip);
    }

    fn punched(&self) -> u64 {
        self.probe.read_punch_totals().expect("totals").punched()
    }

    fn bounced(&self) -> [u64; 7] {
        let totals = self.probe.read_punch_totals().expect("totals");
        BounceReason::ALL.map(|r| totals.bounced(r))
    }

    fn bounced_by(&self, reason: BounceReason) -> u64 {
        self.probe
            .read_punch_totals()
            .expect("totals")
            .bounced(reason)
    }

    fn flows(&self) -> Vec<Flow> {
        self.probe.flow_table().flows().expect("flows")
    }
}

fn bounces(pairs: &[(BounceReason, u64)]) -> [u64; 7] {
    let mut expected = [0u64; 7];
    for &(reason, n) in pairs {
        expected[reason as usize] = n;
    }
    expected
}

/// Local and two remote addresses of one family.
fn endpoints(v6: bool) -> (IpAddr, IpAddr, IpAddr) {
    if v6 {
        (
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 9)),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
        )
    }
}

#[test]
fn test_run_a_punch_is_counted_once_after_egress_in_both_families() {
    if !lab_available() {
        return;
    }
    for v6 in [false, true] {
        let (local_ip, remote_ip, _) = endpoints(v6);
        let local = SocketAddr::new(local_ip, 4000);
        let remote = SocketAddr::new(remote_ip, 5000);
        let mut k = Kernel::load(WatchSpec {
            punch_udp_ports: vec![4000],
            ..WatchSpec::default()
        });
        // Their probe arrives first: a bounce, and no flow is created by it.
        k.ingress(&udp_packet(remote, local, b"early"));
        assert_eq!(k.bounced(), bounces(&[(BounceReason::BeforeEgress, 1)]));
        assert!(k.flows().is_empty());
        // Ours goes out: the hole is open on this side.
        k.egress(&udp_packet(local, remote, b"probe"));
        assert_eq!(k.flows().len(), 1);
        assert_eq!(k.punched(), 0);
        std::thread::sleep(Duration::from_millis(3));
        // Theirs arrives: punched, once, however many follow.
        for _ in 0..3 {
            k.ingress(&udp_packet(remote, local, b"answer"));
        }
        assert_eq!(k.punched(), 1, "v6={v6}");
        let flows = k.flows();
        assert_eq!(flows.len(), 1);
        let flow = flows[0];
        assert_eq!(
            (flow.local, flow.remote, flow.protocol),
            (local, remote, UDP)
        );
        assert_eq!(flow.state.egress_packets, 1);
        assert_eq!(flow.state.ingress_packets, 3);
        let punch_time = flow.punch_time().expect("punched");
        assert!(
            punch_time >= Duration::from_millis(3) && punch_time < Duration::from_secs(5),
            "{punch_time:?}"
        );
        let totals = k.probe.read_punch_totals().expect("totals");
        assert_eq!(totals.punch_time_sum_ns, punch_time.as_nanos() as u64);
        // 3 ms lands in the (2.5 ms, 5 ms] bucket unless the machine stalled.
        assert_eq!(totals.punch_time_buckets.iter().sum::<u64>(), 1);
        assert_eq!(totals.punch_time_buckets.len(), PUNCH_TIME_SLOTS);
        // Traffic on a port nobody watches is ignored in both directions.
        let other = SocketAddr::new(local_ip, 4001);
        k.egress(&udp_packet(other, remote, b"x"));
        k.ingress(&udp_packet(remote, other, b"y"));
        assert_eq!(k.flows().len(), 1);
        assert_eq!(k.bounced(), bounces(&[(BounceReason::BeforeEgress, 1)]));

        // The same through the collector, under the exported names.
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(k.probe.collector().expect("collector")))
            .expect("register");
        let text = String::from_utf8(gateway::metrics::render(&registry)).expect("utf8");
        for (series, value) in [
            ("gateway_punched_flows_total", 1.0),
            (
                "gateway_bounced_packets_total{reason=\"before_egress\"}",
                1.0,
            ),
            (
                "gateway_bounced_packets_total{reason=\"icmp_port_unreachable\"}",
                0.0,
            ),
            ("gateway_bounced_packets_total{reason=\"tcp_rst\"}", 0.0),
            ("gateway_ebpf_flow_table_entries", 1.0),
            ("gateway_ebpf_punch_time_seconds_count", 1.0),
            ("gateway_ebpf_punch_time_seconds_bucket{le=\"+Inf\"}", 1.0),
            ("gateway_ebpf_punch_time_seconds_bucket{le=\"0.001\"}", 0.0),
            ("gateway_ebpf_punch_time_seconds_bucket{le=\"10\"}", 1.0),
        ] {
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            assert_eq!(
                metric_value(&text, name, labels),
                Some(value),
                "{series} in\n{text}"
            );
        }
    }
}

#[test]
fn test_run_icmp_errors_bounce_with_their_reason_in_both_families() {
    if !lab_available() {
        return;
    }
    use BounceReason::*;
    let v4: &[(u8, u8, Option<BounceReason>)] = &[
        (3, 3, Some(IcmpPortUnreachable)),
        (3, 1, Some(IcmpHostUnreachable)),
        (3, 7, Some(IcmpHostUnreachable)),
        (3, 0, Some(IcmpNetUnreachable)),
        (3, 9, Some(IcmpAdminProhibited)),
        (3, 10, Some(IcmpAdminProhibited)),
        (3, 13, Some(IcmpAdminProhibited)),
        (11, 0, Some(IcmpTimeExceeded)),
        (3, 4, None),  // fragmentation needed: not a bounce
        (3, 2, None),  // protocol unreachable: not for UDP/TCP probes
        (0, 0, None),  // echo reply
        (12, 0, None), // parameter problem
    ];
    let v6: &[(u8, u8, Option<BounceReason>)] = &[
        (1, 4, Some(IcmpPortUnreachable)),
        (1, 3, Some(IcmpHostUnreachable)),
        (1, 0, Some(IcmpNetUnreachable)),
        (1, 1, Some(IcmpAdminProhibited)),
        (1, 5, Some(IcmpAdminProhibited)),
        (1, 6, Some(IcmpAdminProhibited)),
        (3, 0, Some(IcmpTimeExceeded)),
        (2, 0, None),   // packet too big
        (129, 0, None), // echo reply
    ];
    for (v6_family, table) in [(false, v4), (true, v6)] {
        let (local_ip, remote_ip, router) = endpoints(v6_family);
        let mut k = Kernel::load(WatchSpec {
            punch_udp_ports: vec![4000],
            punch_tcp_ports: vec![4000],
            ..WatchSpec::default()
        });
        let local = SocketAddr::new(local_ip, 4000);
        let mut expected = [0u64; 7];
        for (i, &(kind, code, reason)) in table.iter().enumerate() {
            // A fresh flow per error, UDP and TCP alternately.
            let remote = SocketAddr::new(remote_ip, 6000 + u16::try_from(i).expect("small"));
            let sent = if i % 2 == 0 {
                udp_packet(local, remote, b"probe")
            } else {
                tcp_packet(local, remote, TCP_SYN)
            };
            k.egress(&sent);
            k.ingress(&icmp_error(router, local_ip, kind, code, &sent));
            if let Some(reason) = reason {
                expected[reason as usize] += 1;
            }
            assert_eq!(
                k.bounced(),
                expected,
                "v6={v6_family} type {kind} code {code}"
            );
        }
        // An error quoting a flow we never sent is not ours to count.
        let stranger = udp_packet(local, SocketAddr::new(remote_ip, 9), b"never sent");
        k.ingress(&icmp_error(
            router, local_ip, table[0].0, table[0].1, &stranger,
        ));
        assert_eq!(k.bounced(), expected);
        assert_eq!(k.punched(), 0, "an ICMP error never punches a flow");
        let bounced_flows = k
            .flows()
            .iter()
            .filter(|f| f.state.bounced_packets == 1)
            .count();
        assert_eq!(
            bounced_flows,
            table.iter().filter(|(_, _, r)| r.is_some()).count()
        );
    }
}

#[test]
fn test_run_tcp_rst_bounces_a_syn_and_a_syn_ack_punches() {
    if !lab_available() {
        return;
    }
    for v6 in [false, true] {
        let (local_ip, remote_ip, _) = endpoints(v6);
        let local = SocketAddr::new(local_ip, 4100);
        let refused = SocketAddr::new(remote_ip, 7000);
        let open = SocketAddr::new(remote_ip, 7001);
        let mut k = Kernel::load(WatchSpec {
            punch_tcp_ports: vec![4100],
            ..WatchSpec::default()
        });
        for _ in 0..2 {
            k.egress(&tcp_packet(local, refused, TCP_SYN));
            k.ingress(&tcp_packet(refused, local, TCP_RST | TCP_ACK));
        }
        assert_eq!(k.bounced(), bounces(&[(BounceReason::TcpRst, 2)]));
        assert_eq!(k.punched(), 0);
        k.egress(&tcp_packet(local, open, TCP_SYN));
        k.ingress(&tcp_packet(open, local, TCP_SYN | TCP_ACK));
        assert_eq!(k.punched(), 1);
        // A RST after the flow punched is an ordinary close, not a bounce.
        k.ingress(&tcp_packet(open, local, TCP_RST));
        assert_eq!(k.bounced_by(BounceReason::TcpRst), 2);
        // UDP on that port is not watched (only TCP was asked for).
        k.egress(&udp_packet(local, open, b"udp"));
        assert_eq!(k.flows().len(), 2);
    }
}

#[test]
fn test_run_stun_cookie_and_ignored_remotes_decide_what_is_a_punch_flow() {
    if !lab_available() {
        return;
    }
    for v6 in [false, true] {
        let (local_ip, remote_ip, other_ip) = endpoints(v6);
        let gateway = SocketAddr::new(other_ip, 3478);
        let mut k = Kernel::load(WatchSpec {
            stun_cookie: true,
            ignored_remotes: vec![gateway],
            ..WatchSpec::default()
        });
        let local = SocketAddr::new(local_ip, 7777);
        let remote = SocketAddr::new(remote_ip, 8888);
        // STUN on any port is a punch packet; other UDP is not.
        k.egress(&udp_packet(local, remote, b"plain datagram, no cookie"));
        assert!(k.flows().is_empty());
        k.egress(&udp_packet(local, remote, &stun(1)));
        assert_eq!(k.flows().len(), 1);
        // The rendezvous server's flows are not punch flows, even with STUN.
        k.egress(&udp_packet(local, gateway, &stun(2)));
        k.ingress(&udp_packet(gateway, local, &stun(3)));
        assert_eq!(k.flows().len(), 1);
        assert_eq!(k.bounced(), [0; 7]);
        // Unsolicited STUN is recognised too (a router's WAN before its NAT opened).
        let stranger = SocketAddr::new(remote_ip, 9999);
        k.ingress(&udp_packet(stranger, local, &stun(4)));
        k.ingress(&udp_packet(stranger, local, b"no cookie"));
        assert_eq!(k.bounced(), bounces(&[(BounceReason::BeforeEgress, 1)]));
        k.ingress(&udp_packet(remote, local, &stun(5)));
        assert_eq!(k.punched(), 1);
    }
}

#[test]
fn test_run_idle_flows_expire_and_return_as_new_flows() {
    if !lab_available() {
        return;
    }
    let (local_ip, remote_ip, _) = endpoints(false);
    let local = SocketAddr::new(local_ip, 4000);
    let remote = SocketAddr::new(remote_ip, 5000);
    let mut k = Kernel::load(WatchSpec {
        punch_udp_ports: vec![4000],
        ..WatchSpec::default()
    });
    k.egress(&udp_packet(local, remote, b"a"));
    k.ingress(&udp_packet(remote, local, b"b"));
    let table = k.probe.flow_table();
    assert_eq!(table.expire(Duration::from_secs(3600)), 0);
    assert_eq!(table.len(), 1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(table.expire(Duration::from_millis(10)), 1);
    assert!(table.is_empty());
    // After expiry the same 5-tuple is judged afresh: early ingress bounces again.
    k.ingress(&udp_packet(remote, local, b"c"));
    assert_eq!(k.bounced_by(BounceReason::BeforeEgress), 1);
    k.egress(&udp_packet(local, remote, b"d"));
    k.ingress(&udp_packet(remote, local, b"e"));
    assert_eq!(k.punched(), 2);
}

// ---------------------------------------------------------------------------------
// The NAT lab
// ---------------------------------------------------------------------------------

/// Where every `gateway watch` and agent of these tests serves metrics (each namespace
/// has its own loopback).
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9479);
const WAIT: Duration = Duration::from_secs(2);
/// Time for packets still crossing the lab's namespaces to reach the programs.
const SETTLE: Duration = Duration::from_millis(300);

/// The kernel's counts as exported on one host's /metrics.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    punched: u64,
    bounced: HashMap<&'static str, u64>,
    entries: u64,
    punch_times: u64,
}

impl Seen {
    fn scrape(host: &Host) -> (Self, String) {
        Self::scrape_at(host, METRICS)
    }

    fn scrape_at(host: &Host, metrics: SocketAddr) -> (Self, String) {
        let text = http_get(host, metrics, "/metrics")
            .unwrap_or_else(|e| panic!("metrics of {}: {e}", host.role()));
        let value = |name: &str, labels: &str| -> u64 {
            metric_value(&text, name, labels)
                .unwrap_or_else(|| panic!("{name}{{{labels}}} missing on {}:\n{text}", host.role()))
                as u64
        };
        assert_eq!(value("gateway_ebpf_loaded", ""), 1, "{text}");
        let bounced = BounceReason::ALL
            .iter()
            .map(|r| {
                (
                    r.as_str(),
                    value(
                        "gateway_bounced_packets_total",
                        &format!("reason=\"{}\"", r.as_str()),
                    ),
                )
            })
            .collect();
        let seen = Self {
            punched: value("gateway_punched_flows_total", ""),
            bounced,
            entries: value("gateway_ebpf_flow_table_entries", ""),
            punch_times: value("gateway_ebpf_punch_time_seconds_count", ""),
        };
        (seen, text)
    }

    /// `punched` flows, these bounces (every other reason zero), `entries` flows.
    fn expect(punched: u64, bounced: &[(&'static str, u64)], entries: u64) -> Self {
        let mut all: HashMap<&'static str, u64> =
            BounceReason::ALL.iter().map(|r| (r.as_str(), 0)).collect();
        for &(reason, n) in bounced {
            assert!(all.insert(reason, n).is_some(), "unknown reason {reason}");
        }
        Self {
            punched,
            bounced: all,
            entries,
            punch_times: punched,
        }
    }
}

fn watch(host: &Host, args: &[&str]) -> GatewayProcess {
    GatewayProcess::start_watch(host, METRICS, args).unwrap_or_else(|e| {
        panic!(
            "gateway watch on {} (is the eBPF object embedded? run `cargo xtask build-ebpf`): {e}",
            host.role()
        )
    })
}

/// Stops a watcher with SIGTERM and checks it exited cleanly, detaching its programs.
fn stop_cleanly(process: GatewayProcess) {
    let log = process.log_text();
    assert!(log.contains("eBPF punch observers attached"), "{log}");
    let status = process.stop().expect("stops");
    assert!(status.success(), "exit status {status}");
}

fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut buf = [0u8; 1500];
    let (len, from) = socket.recv_from(&mut buf).expect("datagram arrives");
    (buf[..len].to_vec(), from)
}

fn sh(host: &Host, command: &str) {
    host.sh(command)
        .unwrap_or_else(|e| panic!("{command} on {}: {e}", host.role()));
}

#[test]
fn early_probes_bounce_on_a_public_host_then_its_flow_punches_once() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::no_nat())
        .site("b", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let a = lab.site("a").and_then(|s| s.host(0)).expect("host a");
    let b = lab.site("b").and_then(|s| s.host(0)).expect("host b");
    let watcher = watch(a, &["--interface", "eth0", "--udp-port", "4000"]);
    // A second observer on the same interface sees the same: the programs hand every
    // packet on to the next tc program instead of ending the chain.
    let second_metrics = SocketAddr::new(METRICS.ip(), METRICS.port() + 1);
    let second = GatewayProcess::start_watch(
        a,
        second_metrics,
        &["--interface", "eth0", "--udp-port", "4000"],
    )
    .expect("a second gateway watch");
    let (sa, sb) = (
        a.udp_bind(4000).expect("socket"),
        b.udp_bind(5000).expect("socket"),
    );
    let a_public = SocketAddr::from((a.addr(), 4000));
    let b_public = SocketAddr::from((lab.site("b").expect("b").wan_addr(), 5000));

    // b's probes reach a before a has sent anything on this flow: a stateful
    // firewall on a would have dropped them (a has none, so they arrive).
    for n in 0..3 {
        sb.send_to(&stun(n), a_public).expect("send");
        recv(&sa);
    }
    // a answers (b's NAT lets it in: b sent first), then b probes again.
    sa.send_to(&stun(10), b_public).expect("send");
    assert_eq!(recv(&sb).1, a_public);
    sb.send_to(&stun(11), a_public).expect("send");
    recv(&sa);
    std::thread::sleep(SETTLE);

    let expected = Seen::expect(1, &[("before_egress", 3)], 1);
    let (seen, text) = Seen::scrape(a);
    assert_eq!(seen, expected, "host a saw:\n{text}");
    let (seen, text) = Seen::scrape_at(a, second_metrics);
    assert_eq!(seen, expected, "the second observer on host a saw:\n{text}");
    stop_cleanly(watcher);
    stop_cleanly(second);
}

#[test]
fn a_nat_routers_wan_sees_probes_that_arrive_before_its_host_opened_the_nat() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::no_nat())
        .site("b", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let a = lab.site("a").and_then(|s| s.host(0)).expect("host a");
    let site_b = lab.site("b").expect("site b");
    let (b, router) = (site_b.host(0).expect("host b"), site_b.router());
    // The router runs no agent: it recognises punch packets by the STUN cookie.
    let on_router = watch(router, &["--interface", "wan", "--stun-cookie"]);
    let on_host = watch(b, &["--interface", "eth0", "--udp-port", "5001"]);
    let (sa, sb) = (
        a.udp_bind(4000).expect("socket"),
        b.udp_bind(5001).expect("socket"),
    );
    let a_public = SocketAddr::from((a.addr(), 4000));
    let b_public = SocketAddr::from((site_b.wan_addr(), 5001));

    // a probes b's public endpoint before b's NAT has a mapping: the router's WAN
    // sees them (before conntrack), the NAT drops them, host b never does.
    for n in 0..2 {
        sa.send_to(&stun(n), b_public).expect("send");
    }
    std::thread::sleep(SETTLE);
    // b opens its NAT toward a; a's next probe gets through.
    sb.send_to(&stun(10), a_public).expect("send");
    assert_eq!(recv(&sa).1, b_public, "port-preserving NAT");
    sa.send_to(&stun(11), b_public).expect("send");
    assert_eq!(recv(&sb).1, a_public);
    std::thread::sleep(SETTLE);

    let (seen, text) = Seen::scrape(router);
    assert_eq!(
        seen,
        Seen::expect(1, &[("before_egress", 2)], 1),
        "router b's WAN saw:\n{text}"
    );
    let (seen, text) = Seen::scrape(b);
    assert_eq!(
        seen,
        Seen::expect(1, &[], 1),
        "host b (behind the NAT) saw:\n{text}"
    );
    stop_cleanly(on_router);
    stop_cleanly(on_host);
}

/// `path-up` line field `key`'s value.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn two_agents_punching_agree_with_their_kernels() {
    if !lab_available() {
        return;
    }
    let observe = [
        "--ebpf-interface",
        "eth0",
        "--metrics-listen",
        "127.0.0.1:9479",
        "--require-ebpf",
    ];
    let preset = NatPreset::port_restricted_cone;
    let mut scenario =
        punch::start(Topology::TwoSites(preset(), preset()), &observe, &observe).expect("lab");
    let alice_line = scenario
        .alice
        .wait_for("path-up", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("alice: no path-up: {:?}", scenario.alice.seen()));
    let bob_line = scenario
        .bob
        .wait_for("path-up", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("bob: no path-up: {:?}", scenario.bob.seen()));
    std::thread::sleep(SETTLE);
    for (name, site, line) in [("alice", "a", &alice_line), ("bob", "b", &bob_line)] {
        let host = scenario
            .lab
            .site(site)
            .and_then(|s| s.host(0))
            .expect("host");
        let (seen, text) = Seen::scrape(host);
        eprintln!("{name}'s kernel: {seen:?}; agent: {line}");
        // One path up, one punched flow: the flows with the gateway (registration,
        // discovery) are ignored, and the private host candidate never answers.
        assert_eq!(seen.punched, 1, "{name}:\n{text}");
        assert_eq!(seen.punch_times, 1, "{name}:\n{text}");
        // Behind a port-restricted NAT nothing reaches the host before it sent.
        assert_eq!(seen.bounced["before_egress"], 0, "{name}:\n{text}");
        // The low-TTL opener (TTL 2) expires at the core router, which says so.
        assert!(
            seen.bounced["icmp_time_exceeded"] >= 1,
            "{name}: the opener's time-exceeded:\n{text}"
        );
        // The kernel's punch time (first packet out to first packet in on the flow)
        // lies within the agent's (introduction to first valid response).
        let kernel_s = metric_value(&text, "gateway_ebpf_punch_time_seconds_sum", "").expect("sum");
        let agent_ms: f64 = field(line, "elapsed_ms").parse().expect("elapsed_ms");
        assert!(
            kernel_s > 0.0 && kernel_s <= (agent_ms + 1.0) / 1000.0,
            "{name}: kernel {kernel_s} s vs agent {agent_ms} ms ({line})"
        );
        let egress = metric_value(
            &text,
            "gateway_ebpf_udp_packets_total",
            "direction=\"egress\"",
        )
        .expect("udp counter");
        assert!(
            egress >= 3.0,
            "{name}: the agent socket's datagrams\n{text}"
        );
    }
}

#[test]
fn birthday_punching_is_seen_by_the_random_port_sides_kernel_on_its_extra_socket() {
    if !lab_available() {
        return;
    }
    let observe = [
        "--ebpf-interface",
        "eth0",
        "--metrics-listen",
        "127.0.0.1:9479",
        "--require-ebpf",
    ];
    // Alice endpoint-independent, bob random-port: bob opens 256 extra sockets, and
    // the path ends up on one of them, not on his agent socket.
    let mut scenario = punch::start(
        Topology::TwoSites(NatPreset::port_restricted_cone(), NatPreset::symmetric()),
        &observe,
        &observe,
    )
    .expect("lab");
    let bob_line = scenario
        .bob
        .wait_for("path-up", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("bob: no path-up: {:?}", scenario.bob.seen()));
    assert!(bob_line.contains(" direct "), "{bob_line}");
    assert!(
        scenario
            .bob
            .seen()
            .iter()
            .any(|l| l.starts_with("birthday ")),
        "{:?}",
        scenario.bob.seen()
    );
    std::thread::sleep(SETTLE);
    let host = scenario
        .lab
        .site("b")
        .and_then(|s| s.host(0))
        .expect("host");
    let (seen, text) = Seen::scrape(host);
    eprintln!("bob's kernel: {seen:?}; agent: {bob_line}");
    // The extra sockets' ports were watched while open: their flows toward alice were
    // tracked, and the one that met her sweep punched.
    assert!(seen.punched >= 1, "bob:\n{text}");
    assert!(
        seen.entries >= 200,
        "bob's extra sockets' flows tracked:\n{text}"
    );
}

#[test]
fn reject_mode_nat_answers_with_icmp_errors_that_bounce_with_their_reason() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .site("b", NatPreset::reject_icmp())
        .build()
        .expect("lab");
    let site_a = lab.site("a").expect("site a");
    let (a, router_a) = (site_a.host(0).expect("host a"), site_a.router());
    let site_b = lab.site("b").expect("site b");
    let router_b = site_b.router();
    // Exact counts: no ICMP rate limit in the routers that answer.
    for host in [router_b, lab.core()] {
        sh(host, "sysctl -qw net.ipv4.icmp_ratelimit=0");
    }
    // The preset answers unsolicited UDP with port unreachable; two ports get other
    // answers, as other firewalls give.
    sh(
        router_b,
        "nft insert rule ip lab input iifname wan udp dport 7001 reject with icmp type admin-prohibited \
         && nft insert rule ip lab input iifname wan udp dport 7002 reject with icmp type host-unreachable",
    );
    let on_host = watch(a, &["--interface", "eth0", "--udp-port", "4000"]);
    // The router's watcher attaches with netlink (the TCX fallback) for coverage.
    let on_router = watch(
        router_a,
        &["--interface", "wan", "--stun-cookie", "--attach", "netlink"],
    );
    let socket = a.udp_bind(4000).expect("socket");
    let b_wan = site_b.wan_addr();
    let mut n = 0;
    let mut send = |to: SocketAddr, times: u64| {
        for _ in 0..times {
            n += 1;
            socket.send_to(&stun(n), to).expect("send");
        }
    };
    send(SocketAddr::from((b_wan, 7000)), 3);
    send(SocketAddr::from((b_wan, 7001)), 2);
    send(SocketAddr::from((b_wan, 7002)), 1);
    // b's private address: the core has no route to it.
    send(
        SocketAddr::from((site_b.host(0).expect("b").addr(), 7003)),
        1,
    );
    std::thread::sleep(SETTLE);

    let expected = Seen::expect(
        0,
        &[
            ("icmp_port_unreachable", 3),
            ("icmp_admin_prohibited", 2),
            ("icmp_host_unreachable", 1),
            ("icmp_net_unreachable", 1),
        ],
        4,
    );
    // The host sees the errors after its NAT translated them back; the router's WAN
    // sees them before, quoting its own external address: the same counts.
    for host in [a, router_a] {
        let (seen, text) = Seen::scrape(host);
        assert_eq!(seen, expected, "{}:\n{text}", host.role());
    }
    let log = on_router.log_text();
    assert!(
        log.contains("via=\"netlink\"") || log.contains("via=netlink"),
        "{log}"
    );
    stop_cleanly(on_host);
    stop_cleanly(on_router);
}

#[test]
fn rst_mode_nat_answers_a_tcp_punch_with_a_reset() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .site("b", NatPreset::reject_rst())
        .build()
        .expect("lab");
    let site_a = lab.site("a").expect("site a");
    let (a, router_a) = (site_a.host(0).expect("host a"), site_a.router());
    let b_wan = lab.site("b").expect("site b").wan_addr();
    let on_host = watch(a, &["--interface", "eth0", "--tcp-port", "4100"]);
    // The NAT preserves ports, so the router watches the same port on its WAN.
    let on_router = watch(router_a, &["--interface", "wan", "--tcp-port", "4100"]);
    let server = lab.server();
    let _listener = server
        .tcp_listen_on(SocketAddr::from((server.addr(), 7100)))
        .expect("listener");
    let connect_from_4100 = |to: SocketAddr| {
        a.run(move || {
            use socket2::{Domain, Socket, Type};
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 4100)).into())?;
            socket.connect_timeout(&to.into(), WAIT)?;
            Ok::<Socket, std::io::Error>(socket)
        })
        .expect("namespace")
    };
    for _ in 0..2 {
        let refused = connect_from_4100(SocketAddr::from((b_wan, 7000)));
        let kind = refused.err().map(|e| e.kind());
        assert_eq!(kind, Some(std::io::ErrorKind::ConnectionRefused));
    }
    // A TCP flow that does get an answer punches.
    let _open = connect_from_4100(SocketAddr::from((server.addr(), 7100))).expect("connects");
    std::thread::sleep(SETTLE);
    let expected = Seen::expect(1, &[("tcp_rst", 2)], 2);
    for host in [a, router_a] {
        let (seen, text) = Seen::scrape(host);
        assert_eq!(seen, expected, "{}:\n{text}", host.role());
    }
    stop_cleanly(on_host);
    stop_cleanly(on_router);
}

#[test]
fn low_ttl_probes_expire_in_the_core_and_bounce_as_time_exceeded() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let site_a = lab.site("a").expect("site a");
    let (a, router_a) = (site_a.host(0).expect("host a"), site_a.router());
    sh(lab.core(), "sysctl -qw net.ipv4.icmp_ratelimit=0");
    let on_host = watch(a, &["--interface", "eth0", "--udp-port", "4000"]);
    let on_router = watch(router_a, &["--interface", "wan", "--stun-cookie"]);
    let socket = a.udp_bind(4000).expect("socket");
    let server = SocketAddr::from((lab.server().addr(), 3478));
    // TTL 2 passes a's router and expires at the core, as the agent's opener does.
    socket.set_ttl(2).expect("ttl");
    for n in 0..3 {
        socket.send_to(&stun(n), server).expect("send");
    }
    // A full TTL reaches the server, whose closed port answers port unreachable.
    socket.set_ttl(64).expect("ttl");
    socket.send_to(&stun(3), server).expect("send");
    std::thread::sleep(SETTLE);
    let expected = Seen::expect(
        0,
        &[("icmp_time_exceeded", 3), ("icmp_port_unreachable", 1)],
        1,
    );
    for host in [a, router_a] {
        let (seen, text) = Seen::scrape(host);
        assert_eq!(seen, expected, "{}:\n{text}", host.role());
    }
    stop_cleanly(on_host);
    stop_cleanly(on_router);
}

/// Runs the gateway binary as user `nobody` (uid/gid 65534) through `setpriv`.
fn as_nobody(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(gateway_tests::daemon::gateway_binary())
        .args(args)
        .env("GATEWAY_LOG", "info");
    command
}

#[test]
fn without_root_watch_refuses_clearly_and_the_agent_runs_on_without_ebpf() {
    if !lab_available() {
        return;
    }
    // `gateway watch` exists for its programs: it stops, saying why.
    let output = as_nobody(&[
        "watch",
        "--interface",
        "lo",
        "--udp-port",
        "4000",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .output()
    .expect("run setpriv (util-linux)");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    // It names the capabilities it lacks (root, or a unit that grants them).
    assert!(
        stderr.contains("needs CAP_BPF") && stderr.contains("missing: CAP_BPF"),
        "{stderr}"
    );

    // The agent keeps working and says so in its log and its metrics.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("gw-nobody-{}.log", std::process::id()));
    let mut agent = as_nobody(&[
        "peer",
        "--server",
        "127.0.0.1:9",
        "--username",
        "0:nobody",
        "--password",
        "x",
        "--ebpf-interface",
        "lo",
        "--metrics-listen",
        &metrics,
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(&log).expect("log file"))
    .spawn()
    .expect("spawn the agent");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        use std::io::{Read, Write};
        let attempt = std::net::TcpStream::connect(&metrics).and_then(|mut s| {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            Ok(response)
        });
        match attempt {
            Ok(response) => break response,
            Err(e) if std::time::Instant::now() > deadline => {
                let _ = agent.kill();
                panic!(
                    "agent metrics never answered: {e}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let still_running = agent.try_wait().expect("wait").is_none();
    let _ = agent.kill();
    let _ = agent.wait();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(still_running, "the agent exited; log:\n{log_text}");
    assert_eq!(
        metric_value(&text, "gateway_ebpf_loaded", ""),
        Some(0.0),
        "{text}"
    );
    assert!(
        log_text.contains("eBPF punch observers unavailable") && log_text.contains("needs CAP_BPF"),
        "{log_text}"
    );
}
