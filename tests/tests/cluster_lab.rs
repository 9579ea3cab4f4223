//! Several gateway nodes as one service, in the NAT lab: three `gateway serve` nodes
//! on three public server hosts share the rendezvous through a real Redis on the
//! lab's Redis host (`gateway_tests::cluster_lab`), and `gateway peer` agents behind
//! real (nftables) NATs register with different nodes. Each test proves the work was
//! cross-node (the initiator's node counted the Connect as `introduced` in
//! `gateway_cluster_introductions_total`, no other node counted any, and the
//! responder's node received the introduction from Redis) and that the outcome was
//! counted once over all three nodes, on the initiator's:
//!
//! - a direct UDP punch between two port-restricted cones, carrying a forwarded UDP
//!   port both ways;
//! - a pair that cannot punch (two random-port symmetric NATs, docs/nat-matrix.md
//!   rule 6) relayed through the initiator's allocation on the initiator's own node
//!   (the relay is node-local), carrying the forwarded port both ways;
//! - a TCP simultaneous open between two port-restricted cones, carrying a forwarded
//!   TCP port both ways.
//!
//! The initiator and responder sit on a different pair of nodes in each test. Needs
//! root (network namespaces) and Debian's redis-server, like the other lab tests.
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use gateway_tests::{
    cluster_lab::{self, ClusterLab},
    daemon::PeerProcess,
    lab::{Lab, NatPreset, lab_available},
    tcp,
};

/// Gateway nodes in every test.
const NODES: usize = 3;

fn start(alice_nat: NatPreset, bob_nat: NatPreset) -> ClusterLab {
    ClusterLab::start(
        Lab::builder().site("a", alice_nat).site("b", bob_nat),
        NODES,
        &[],
    )
    .expect("cluster lab")
}

/// Bob on `bob_node` (site b), registered and classified, then alice on
/// `alice_node` (site a) connecting to him.
fn start_peers(
    cluster: &ClusterLab,
    alice_node: usize,
    bob_node: usize,
    alice_args: &[&str],
    bob_args: &[&str],
) -> (PeerProcess, PeerProcess) {
    let host = |site: &str| {
        cluster
            .lab
            .site(site)
            .and_then(|s| s.host(0))
            .expect("host")
            .clone()
    };
    let mut bob = cluster
        .start_peer(&host("b"), bob_node, "bob", bob_args)
        .expect("bob");
    // Alice's Connect must find bob's entry in Redis: wait until he is registered
    // (his node stores the entry at once) and has classified his NAT.
    assert!(
        bob.wait_for("nat mapping", Duration::from_secs(5))
            .is_some(),
        "bob never registered: {:?}\n{}",
        bob.seen(),
        cluster.logs()
    );
    let mut args = vec!["--connect", "bob"];
    args.extend_from_slice(alice_args);
    let alice = cluster
        .start_peer(&host("a"), alice_node, "alice", &args)
        .expect("alice");
    (alice, bob)
}

/// The address after `kind` (`direct` or `relayed`) in a `path-up` line.
fn remote(line: &str, kind: &str) -> SocketAddr {
    line.split_whitespace()
        .skip_while(|w| *w != kind)
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {kind} address in {line:?}"))
}

/// A UDP "application" on each side: alice's sends to her forwarder on
/// 127.0.0.1:5000, bob's listens on 127.0.0.1:6000 where his forwarder delivers.
/// Alice's datagram must reach bob's application and bob's answer come back.
fn udp_forward_both_ways(cluster: &ClusterLab, what: &str) {
    let app = |site: &str, bind: &'static str| -> UdpSocket {
        let app: UdpSocket = cluster
            .lab
            .site(site)
            .and_then(|s| s.host(0))
            .expect("host")
            .run(move || UdpSocket::bind(bind))
            .expect("namespace")
            .expect("bind");
        app.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        app
    };
    let (app_a, app_b) = (app("a", "127.0.0.1:0"), app("b", "127.0.0.1:6000"));
    let mut buf = [0u8; 1500];
    let mut from_forwarder = None;
    for attempt in 0..10 {
        let message = format!("{what} #{attempt}");
        app_a
            .send_to(message.as_bytes(), "127.0.0.1:5000")
            .expect("send");
        if let Ok((len, from)) = app_b.recv_from(&mut buf) {
            assert_eq!(&buf[..len], message.as_bytes());
            from_forwarder = Some(from);
            break;
        }
    }
    let from = from_forwarder.unwrap_or_else(|| panic!("alice's app never reached bob's ({what})"));
    app_b.send_to(b"pong", from).expect("reply");
    let (len, _) = app_a
        .recv_from(&mut buf)
        .expect("bob's answer reaches alice's app");
    assert_eq!(&buf[..len], b"pong");
}

/// Waits (up to 5 s) until the per-node sums of `metric` are exactly 1 on `owner`
/// and 0 elsewhere, and stay so for another 500 ms (a late second count would show).
fn assert_counted_once_on(cluster: &ClusterLab, metric: &str, owner: usize) {
    let want: Vec<f64> = (0..NODES)
        .map(|k| if k == owner { 1.0 } else { 0.0 })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.per_node(metric) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        cluster.per_node(metric),
        want,
        "{metric} per node (node 0 first): once, on the initiator's node {owner}\n{}",
        cluster.logs()
    );
}

/// The introduction crossed nodes: the initiator's node counted one Connect to a
/// peer of another node as `introduced` (and nothing else), no other node counted a
/// cross-node Connect, and the responder's node received messages through Redis.
fn assert_cross_node(cluster: &ClusterLab, initiator: usize, responder: usize) {
    assert_eq!(
        cluster.metric(
            initiator,
            "gateway_cluster_introductions_total",
            "outcome=\"introduced\""
        ),
        Some(1.0),
        "the initiator's node introduced across nodes once\n{}",
        cluster.scrape(initiator)
    );
    let want: Vec<f64> = (0..NODES)
        .map(|k| if k == initiator { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(
        cluster.per_node("gateway_cluster_introductions_total"),
        want,
        "cross-node Connects per node, every outcome"
    );
    // Each peer is registered with the node it was given, and only there.
    let registered: Vec<f64> = (0..NODES)
        .map(|k| f64::from(u8::from(k == initiator || k == responder)))
        .collect();
    assert_eq!(
        cluster.per_node("gateway_registered_peers"),
        registered,
        "registered peers per node"
    );
    let received = cluster
        .metric(
            responder,
            "gateway_cluster_messages_total",
            "direction=\"received\"",
        )
        .unwrap_or(0.0);
    assert!(
        received >= 1.0,
        "the responder's node got the Introduce through Redis: {received}"
    );
    for k in 0..NODES {
        assert_eq!(
            cluster.metric(k, "gateway_cluster_up", ""),
            Some(1.0),
            "node {k} still reaches Redis"
        );
        assert_eq!(
            cluster.metric(k, "gateway_cluster_nodes", ""),
            Some(NODES as f64),
            "node {k} sees every node"
        );
    }
}

#[test]
fn peers_on_different_nodes_punch_directly_through_two_nats() {
    if !lab_available() {
        return;
    }
    let (initiator, responder) = (0, 1);
    let cluster = start(
        NatPreset::port_restricted_cone(),
        NatPreset::port_restricted_cone(),
    );
    let (mut alice, mut bob) = start_peers(
        &cluster,
        initiator,
        responder,
        &["--forward-listen", "127.0.0.1:5000"],
        &["--forward-to", "127.0.0.1:6000"],
    );
    let up_a = alice
        .wait_for("path-up", Duration::from_secs(8))
        .unwrap_or_else(|| panic!("alice: {:?}\n{}", alice.seen(), cluster.logs()));
    let up_b = bob
        .wait_for("path-up", Duration::from_secs(4))
        .unwrap_or_else(|| panic!("bob: {:?}", bob.seen()));
    // Direct, between the two NATs' public addresses: not through any node.
    let wan_a = cluster.lab.site("a").expect("a").wan_addr();
    let wan_b = cluster.lab.site("b").expect("b").wan_addr();
    assert!(up_a.contains(" direct "), "{up_a}");
    assert_eq!(remote(&up_a, "direct").ip(), wan_b);
    assert_eq!(remote(&up_b, "direct").ip(), wan_a);

    udp_forward_both_ways(&cluster, "over the punched path");

    assert_cross_node(&cluster, initiator, responder);
    assert_counted_once_on(&cluster, "gateway_punch_outcomes_total", initiator);
    assert_eq!(
        cluster.metric(
            initiator,
            "gateway_punch_outcomes_total",
            "initiator_nat=\"endpoint_independent\",outcome=\"direct\",responder_nat=\"endpoint_independent\""
        ),
        Some(1.0)
    );
    // Nothing was relayed anywhere.
    assert_eq!(
        cluster.per_node("gateway_turn_allocations"),
        vec![0.0; NODES]
    );
}

#[test]
fn peers_on_different_nodes_that_cannot_punch_are_relayed_by_the_initiators_node() {
    if !lab_available() {
        return;
    }
    // Two random-port symmetric NATs: each probe to a new destination takes a new
    // unpredictable port on the prober's own NAT, so no direct path (docs/nat-matrix.md,
    // rule 6); the agents go to the relay. Birthday punching needs an
    // endpoint-independent side and never starts here; it is off on both sides anyway,
    // so a NAT misclassified under load cannot start a sweep.
    let (initiator, responder) = (1, 2);
    let cluster = start(NatPreset::symmetric(), NatPreset::symmetric());
    let no_birthday = ["--birthday-sockets", "0", "--birthday-probes", "0"];
    let (mut alice, mut bob) = start_peers(
        &cluster,
        initiator,
        responder,
        &[&["--forward-listen", "127.0.0.1:5000"][..], &no_birthday].concat(),
        &[&["--forward-to", "127.0.0.1:6000"][..], &no_birthday].concat(),
    );
    let up_a = alice
        .wait_for("path-up", Duration::from_secs(14))
        .unwrap_or_else(|| {
            panic!(
                "alice: {:?}\nbob: {:?}\n{}",
                alice.seen(),
                bob.seen(),
                cluster.logs()
            )
        });
    let up_b = bob
        .wait_for("path-up", Duration::from_secs(4))
        .unwrap_or_else(|| panic!("bob: {:?}", bob.seen()));
    assert!(up_a.contains(" relayed "), "{up_a}");
    assert!(up_b.contains(" relayed "), "{up_b}");
    // Both NATs were classified address-and-port-dependent (each agent's discovery
    // with its own node), so alice falls back to the relay without a punch window.
    assert!(
        alice
            .seen()
            .iter()
            .any(|l| l.starts_with("relay-fallback peer bob")),
        "alice fell back to the relay: {:?}",
        alice.seen()
    );
    // Alice (the initiator) relays through her allocation on her own node: bob
    // appears at his NAT's public address, and bob (registered on another node)
    // reaches alice at her relayed address on alice's node, whose Relay-Offer his
    // node delivered.
    let wan_b = cluster.lab.site("b").expect("b").wan_addr();
    assert_eq!(remote(&up_a, "relayed").ip(), wan_b);
    assert_eq!(
        remote(&up_b, "relayed").ip(),
        cluster_lab::service(initiator).ip(),
        "bob's relayed peer is on the initiator's node"
    );

    udp_forward_both_ways(&cluster, "over the relay");

    assert_cross_node(&cluster, initiator, responder);
    assert_counted_once_on(&cluster, "gateway_punch_outcomes_total", initiator);
    assert_eq!(
        cluster.metric(
            initiator,
            "gateway_punch_outcomes_total",
            "initiator_nat=\"address_and_port_dependent\",outcome=\"relayed\",responder_nat=\"address_and_port_dependent\""
        ),
        Some(1.0)
    );
    // The relay is node-local: one allocation, on the initiator's node; only that node
    // relayed anything, both ways.
    let allocations: Vec<f64> = (0..NODES)
        .map(|k| if k == initiator { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(cluster.per_node("gateway_turn_allocations"), allocations);
    let relayed = |k: usize, direction: &str| {
        cluster
            .metric(
                k,
                "gateway_relay_packets_total",
                &format!("direction=\"{direction}\""),
            )
            .unwrap_or(0.0)
    };
    assert!(
        relayed(initiator, "client_to_peer") >= 2.0 && relayed(initiator, "peer_to_client") >= 2.0,
        "data crossed the initiator's node's relay both ways:\n{}",
        cluster.scrape(initiator)
    );
    for k in (0..NODES).filter(|&k| k != initiator) {
        assert_eq!(
            cluster.per_node("gateway_relay_packets_total")[k],
            0.0,
            "node {k} relayed nothing"
        );
    }
}

#[test]
fn peers_on_different_nodes_punch_tcp_by_simultaneous_open() {
    if !lab_available() {
        return;
    }
    // Port-restricted cones drop an unsolicited SYN silently, so the later side's SYN
    // finds the earlier side's mapping and both complete a simultaneous open
    // (docs/tcp-splicing.md); the technique needs nothing from the gateway but the
    // introduction, which crosses nodes here.
    let (initiator, responder) = (2, 0);
    let cluster = start(
        NatPreset::port_restricted_cone(),
        NatPreset::port_restricted_cone(),
    );
    let (mut alice, mut bob) = start_peers(
        &cluster,
        initiator,
        responder,
        &[
            "--tcp",
            "simultaneous-open",
            "--tcp-forward-listen",
            tcp::FORWARD_LISTEN,
        ],
        &[
            "--tcp",
            "simultaneous-open",
            "--tcp-forward-to",
            tcp::FORWARD_TO,
        ],
    );
    let verdict_a = alice.wait_for("tcp-p", Duration::from_secs(15));
    let verdict_b = bob.wait_for("tcp-p", Duration::from_secs(5));
    let up = |v: &Option<String>| v.as_deref().is_some_and(|l| l.starts_with("tcp-path-up"));
    assert!(
        up(&verdict_a) && up(&verdict_b),
        "alice: {:?}\nbob: {:?}\n{}",
        alice.seen(),
        bob.seen(),
        cluster.logs()
    );
    tcp::forward_both_ways(
        &cluster.lab,
        0,
        b"hello over punched TCP across nodes",
        b"and back",
    )
    .unwrap_or_else(|e| panic!("forwarded TCP: {e}"));

    assert_cross_node(&cluster, initiator, responder);
    assert_counted_once_on(&cluster, "gateway_tcp_punch_attempts_total", initiator);
    let metrics = cluster.scrape(initiator);
    assert_eq!(
        tcp::counted(&metrics, "simultaneous-open", "success"),
        1.0,
        "{metrics}"
    );
}
