//! The relay's kernel fast path across hosts, in the NAT lab: the gateway on the
//! lab's server (192.0.2.10, interface `eth0`) with `--relay-fast-path ebpf
//! --relay-fast-path-interface eth0`, a TURN client (the project's own sans-IO client)
//! on a host behind a NAT of site `a`, and a plain UDP peer socket on a host of site
//! `b` (public addresses, no NAT). Neither end is on the server, so every rewritten
//! datagram leaves the way it came in: the program's FIB lookup and
//! `bpf_redirect_neigh` route it out of `eth0` toward the core router.
//!
//! The kernel answers that FIB lookup only when forwarding is enabled on the
//! interface the datagram arrived on (`net.ipv4.conf.eth0.forwarding`, off on the
//! lab's server). The test first proves the fallback with forwarding off (one message
//! each way, carried by the userspace relay, the kernel's counters untouched), then
//! enables forwarding on the server's `eth0` and proves that messages of every size
//! class cross both ways intact in the kernel alone.
//!
//! Needs root (namespaces, a tc program) and a gateway binary built with its eBPF
//! object (`cargo xtask build-ebpf && cargo build --workspace`).
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use gateway::proto::turn::client::{ClientConfig, TurnClientEvent};
use gateway_tests::{
    daemon::{GatewayProcess, metric_value},
    lab::{Lab, NatPreset, require_root},
    punch::{SERVICE, credentials, start_gateway},
    turn::{BlockingClient, channel_round_trip},
};

const WAIT: Duration = Duration::from_secs(5);

fn metric(gateway: &GatewayProcess, name: &str, labels: &str) -> f64 {
    let text = gateway.scrape().expect("scrape the lab gateway");
    metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}} missing"))
}

fn per_direction(gateway: &GatewayProcess, name: &str) -> [f64; 2] {
    ["client_to_peer", "peer_to_client"]
        .map(|direction| metric(gateway, name, &format!("direction=\"{direction}\"")))
}

/// Waits past the relay's one-second sweep, which folds the kernel's counters.
fn settle() {
    std::thread::sleep(Duration::from_millis(1300));
}

#[test]
fn a_bound_channel_across_hosts_is_routed_out_by_the_kernel_once_forwarding_is_on() {
    require_root();
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .site("b", NatPreset::no_nat())
        .build()
        .expect("build the lab");
    let (gateway, secret) = start_gateway(
        &lab,
        &[
            "--no-relay-tcp",
            "--relay-fast-path",
            "ebpf",
            "--relay-fast-path-interface",
            "eth0",
        ],
    )
    .expect("start the gateway on the lab's server");
    let _secret = SecretFile(secret);
    let server = lab.server();
    let forwarding = |on: bool| {
        server
            .sh(&format!(
                "sysctl -qw net.ipv4.conf.eth0.forwarding={}",
                u8::from(on)
            ))
            .expect("set forwarding on the server's eth0");
    };
    forwarding(false);

    // The client, behind site a's NAT; the peer, a plain UDP socket on site b.
    let host_a = lab.site("a").and_then(|s| s.host(0)).expect("site a host");
    let host_b = lab.site("b").and_then(|s| s.host(0)).expect("site b host");
    let creds = credentials("alice");
    let config = ClientConfig::new(SERVICE, creds.username, creds.password);
    let mut client = host_a
        .run(move || BlockingClient::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), config))
        .expect("enter site a's host")
        .expect("client socket");
    let peer_socket = host_b.udp_bind(0).expect("peer socket");
    peer_socket
        .set_read_timeout(Some(WAIT))
        .expect("read timeout");
    let peer = SocketAddr::from((
        host_b.addr(),
        peer_socket.local_addr().expect("peer address").port(),
    ));

    client.client.allocate(Instant::now()).expect("idle");
    let relayed = match client.wait_event(WAIT, |e| {
        matches!(
            e,
            TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
        )
    }) {
        Ok(TurnClientEvent::Allocated { relayed, .. }) => relayed,
        other => panic!("allocation failed: {other:?}\n{}", gateway.log_text()),
    };
    assert_eq!(
        relayed.ip(),
        SERVICE.ip(),
        "relayed on the server's address"
    );
    let channel = client
        .client
        .bind_channel(Instant::now(), peer)
        .expect("allocated");
    match client.wait_event(WAIT, |e| {
        matches!(
            e,
            TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
        )
    }) {
        Ok(TurnClientEvent::ChannelBound { peer: bound, .. }) if bound == peer => {}
        other => panic!("ChannelBind failed: {other:?}\n{}", gateway.log_text()),
    }
    assert_eq!(
        metric(&gateway, "gateway_relay_fast_path_entries", ""),
        1.0,
        "one entry for the bound channel"
    );

    let round_trip = |client: &mut BlockingClient, len: usize, round: usize| {
        channel_round_trip(client, &peer_socket, peer, relayed, channel, len, round);
    };

    // Forwarding off on eth0: the FIB lookup answers nothing, the program leaves the
    // datagrams alone and the userspace relay carries them (still correct).
    round_trip(&mut client, 100, 0);
    settle();
    assert_eq!(
        per_direction(&gateway, "gateway_relay_fast_path_packets_total"),
        [0.0, 0.0],
        "forwarding off: nothing through the kernel"
    );
    assert_eq!(
        per_direction(&gateway, "gateway_relay_packets_total"),
        [1.0, 1.0],
        "forwarding off: the userspace relay carried one message each way"
    );
    assert_eq!(
        metric(
            &gateway,
            "gateway_stun_datagrams_total",
            "outcome=\"channel_data\""
        ),
        1.0
    );

    // What the program's FIB lookup needs (docs/operations.md): forwarding on the
    // interface the datagrams arrive on.
    forwarding(true);
    // Every size class of the program's shifting, up to what fits the lab's
    // 1500-byte MTU once grown by the ChannelData header.
    let sizes = [1usize, 3, 4, 17, 127, 128, 129, 600, 1001, 1200, 1468];
    for (round, &len) in sizes.iter().enumerate() {
        round_trip(&mut client, len, round + 1);
    }
    settle();
    let messages = sizes.len() as f64;
    assert_eq!(
        per_direction(&gateway, "gateway_relay_fast_path_packets_total"),
        [messages, messages],
        "every message routed out by the kernel, each way:\n{}",
        gateway.log_text()
    );
    assert_eq!(
        per_direction(&gateway, "gateway_relay_packets_total"),
        [messages + 1.0, messages + 1.0],
        "the userspace relay carried none of them (only the first message)"
    );
    assert_eq!(
        metric(
            &gateway,
            "gateway_stun_datagrams_total",
            "outcome=\"channel_data\""
        ),
        1.0,
        "no more ChannelData reached the userspace service loop"
    );
}

/// Deletes the gateway's secret file on drop.
struct SecretFile(std::path::PathBuf);

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
