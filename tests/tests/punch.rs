//! Hole punching end to end in the NAT lab: `gateway serve` on the public server,
//! two `gateway peer` agents behind real (nftables) NATs, and a UDP port forwarded
//! over the punched path. The expected outcome of each pair and its reason are in
//! docs/nat-matrix.md.
use std::{net::SocketAddr, time::Duration};

use gateway_tests::{
    daemon::{http_get, metric_value},
    lab::{NatPreset, lab_available},
    punch::{self, PunchLab, Topology},
};

fn start_pair(a: NatPreset, b: NatPreset, alice_args: &[&str], bob_args: &[&str]) -> PunchLab {
    punch::start(Topology::TwoSites(a, b), alice_args, bob_args).expect("punch lab")
}

/// The remote address named in a `path-up` line.
fn direct_remote(line: &str) -> SocketAddr {
    line.split_whitespace()
        .skip_while(|w| *w != "direct")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// Waits up to 8 s for each agent's `path-up` line.
fn both_paths_up(pair: &mut PunchLab) -> (String, String) {
    let up_a = pair
        .alice
        .wait_for("path-up", Duration::from_secs(8))
        .unwrap_or_else(|| panic!("alice: {:?}", pair.alice.seen()));
    let up_b = pair
        .bob
        .wait_for("path-up", Duration::from_secs(8))
        .unwrap_or_else(|| panic!("bob: {:?}", pair.bob.seen()));
    (up_a, up_b)
}

#[test]
fn punch_through_two_port_restricted_cones_and_forward_a_udp_port() {
    if !lab_available() {
        return;
    }
    let mut pair = start_pair(
        NatPreset::port_restricted_cone(),
        NatPreset::port_restricted_cone(),
        &["--forward-listen", "127.0.0.1:5000"],
        &["--forward-to", "127.0.0.1:6000"],
    );
    let (up_a, up_b) = both_paths_up(&mut pair);
    // The path is between the two NATs' public addresses: direct, not via the server.
    let wan_a = pair.lab.site("a").expect("a").wan_addr();
    let wan_b = pair.lab.site("b").expect("b").wan_addr();
    assert_eq!(direct_remote(&up_a).ip(), wan_b);
    assert_eq!(direct_remote(&up_b).ip(), wan_a);

    forward_both_ways(&pair);

    // Both sides report; the gateway counts one direct outcome for the pair.
    std::thread::sleep(Duration::from_millis(300));
    let text = pair.gateway.scrape().expect("scrape");
    assert_eq!(
        metric_value(
            &text,
            "gateway_punch_outcomes_total",
            "initiator_nat=\"endpoint_independent\",outcome=\"direct\",responder_nat=\"endpoint_independent\""
        ),
        Some(1.0),
        "{text}"
    );
}

/// Alice's app reaches bob's through the forwarders and bob's answer comes back.
fn forward_both_ways(pair: &PunchLab) {
    punch::udp_forward_both_ways(&pair.lab, "over the punched path");
}

#[test]
fn birthday_punch_through_a_random_port_symmetric_nat_and_forward_a_udp_port() {
    if !lab_available() {
        return;
    }
    // Alice behind a symmetric NAT with random ports: no probe of hers leaves from a
    // port bob could know, and bob's port-restricted cone admits only what he probed.
    let mut pair = start_pair(
        NatPreset::symmetric(),
        NatPreset::port_restricted_cone(),
        &["--forward-listen", "127.0.0.1:5000", "--no-relay"],
        &["--forward-to", "127.0.0.1:6000", "--no-relay"],
    );
    let (up_a, up_b) = both_paths_up(&mut pair);
    let seen = format!("alice {:?} bob {:?}", pair.alice.seen(), pair.bob.seen());
    assert!(
        pair.alice
            .seen()
            .iter()
            .any(|l| l.starts_with("birthday peer bob role sockets budget 256")),
        "{seen}"
    );
    let wan_a = pair.lab.site("a").expect("a").wan_addr();
    let wan_b = pair.lab.site("b").expect("b").wan_addr();
    assert_eq!(direct_remote(&up_a).ip(), wan_b);
    assert_eq!(direct_remote(&up_b).ip(), wan_a);
    let registered_a: SocketAddr = pair
        .alice
        .seen()
        .iter()
        .find_map(|l| l.strip_prefix("registered public ")?.parse().ok())
        .unwrap_or_else(|| panic!("{seen}"));
    // Alice's end of the path is one of her extra sockets, met by bob's sweep: bob
    // sees a port other than the one the gateway registered for her. The one other way
    // (about 0.4% of runs): one of her 257 random mappings toward bob took the same
    // public port number as her registered one, which bob probes from the start as her
    // reflexive candidate, so the path is up before his sweep begins (about one RTT
    // plus 110 ms after the start: some 120 ms on the lab's LAN).
    let bob_swept = pair
        .bob
        .seen()
        .iter()
        .any(|l| l.starts_with("birthday peer alice role probes budget 2048"));
    let bob_elapsed_ms: u64 = up_b
        .split_whitespace()
        .skip_while(|w| *w != "elapsed_ms")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{seen}"));
    if direct_remote(&up_b) == registered_a {
        assert!(!bob_swept && bob_elapsed_ms < 600, "{seen}");
    } else {
        assert!(bob_swept, "{seen}");
    }

    forward_both_ways(&pair);

    std::thread::sleep(Duration::from_millis(300));
    let text = pair.gateway.scrape().expect("scrape");
    assert_eq!(
        metric_value(
            &text,
            "gateway_punch_outcomes_total",
            "initiator_nat=\"address_and_port_dependent\",outcome=\"direct\",responder_nat=\"endpoint_independent\""
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn without_discovery_flags_a_random_port_nat_and_a_port_restricted_cone_punch_directly() {
    if !lab_available() {
        return;
    }
    // As a new user runs it (README, "Running the gateway yourself"): no
    // --discovery-listen on serve, no --discover on the agents. The gateway names its
    // discovery endpoints in the Register answer, each agent classifies its NAT, and
    // alice's random ports call for birthday punching instead of the relay.
    let mut pair = punch::start_without_discovery_flags(
        Topology::TwoSites(NatPreset::symmetric(), NatPreset::port_restricted_cone()),
        &["--forward-listen", "127.0.0.1:5000"],
        &["--forward-to", "127.0.0.1:6000"],
    )
    .expect("punch lab");
    let (up_a, up_b) = both_paths_up(&mut pair);
    let seen = format!("alice {:?} bob {:?}", pair.alice.seen(), pair.bob.seen());
    let classified = |lines: &[String]| {
        lines
            .iter()
            .find(|l| l.starts_with("nat mapping "))
            .cloned()
            .unwrap_or_else(|| panic!("not classified: {seen}"))
    };
    assert!(
        classified(pair.alice.seen()).starts_with("nat mapping address_and_port_dependent "),
        "{seen}"
    );
    assert!(
        classified(pair.bob.seen()).starts_with("nat mapping endpoint_independent "),
        "{seen}"
    );
    // Punched, not relayed: no relay line on either side.
    assert!(
        up_a.contains(" direct ") && up_b.contains(" direct "),
        "{seen}"
    );
    for lines in [pair.alice.seen(), pair.bob.seen()] {
        assert!(!lines.iter().any(|l| l.starts_with("relay-")), "{seen}");
    }
    let wan_b = pair.lab.site("b").expect("b").wan_addr();
    assert_eq!(direct_remote(&up_a).ip(), wan_b);
    let elapsed_ms: u64 = up_a
        .split_whitespace()
        .skip_while(|w| *w != "elapsed_ms")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{seen}"));
    eprintln!("punched without discovery flags in {elapsed_ms} ms: {up_a}");
    forward_both_ways(&pair);
}

#[test]
fn discovery_classifies_each_nat_preset() {
    if !lab_available() {
        return;
    }
    let cases = [
        ("no-nat", "none", None),
        ("firewall-only", "none", None),
        ("port-restricted-cone", "endpoint_independent", Some(true)),
        ("full-cone", "endpoint_independent", Some(true)),
        ("eim-random-port", "endpoint_independent", Some(false)),
        ("address-dependent", "address_dependent", Some(false)),
        ("symmetric", "address_and_port_dependent", Some(false)),
        (
            "symmetric-sequential",
            "address_and_port_dependent",
            Some(false),
        ),
    ];
    let mut failures = Vec::new();
    for (preset, class, preserved) in cases {
        // One lab per preset: alice behind it, bob on an open host.
        let mut pair = start_pair(
            preset.parse().expect("preset"),
            "no-nat".parse().expect("preset"),
            &[],
            &[],
        );
        let line = pair
            .alice
            .wait_for("nat mapping", Duration::from_secs(5))
            .unwrap_or_default();
        let expected = format!("nat mapping {class}");
        let ok = line.starts_with(&expected)
            && preserved.is_none_or(|p| line.ends_with(&format!("port_preserved {p}")));
        if !ok {
            failures.push(format!("{preset}: expected {expected} (preserved {preserved:?}), got {line:?}; alice said {:?}", pair.alice.seen()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The Rust library API: two in-process clients, each in its own lab host's namespace,
/// get a socket-like path and exchange datagrams over it.
#[test]
fn library_api_connects_and_exchanges_datagrams() {
    use gateway::{
        peer::{PathKind, PeerClient},
        proto::{
            agent::{AgentConfig, AgentEvent},
            rendezvous::client::PeerCredentials,
        },
    };
    if !lab_available() {
        return;
    }
    let pair = start_pair(
        NatPreset::port_restricted_cone(),
        NatPreset::full_cone(),
        &["--prediction-window", "0"],
        &[],
    );
    // The agent processes of start_pair are not used here; the library clients
    // register under other ids.
    let config = |peer: &str| {
        let issued = punch::credentials(peer);
        AgentConfig::new(
            "192.0.2.10:3478".parse().expect("addr"),
            PeerCredentials {
                username: issued.username,
                password: issued.password,
            },
        )
    };
    let (carol_config, dave_config) = (config("carol"), config("dave"));
    let host_c = pair
        .lab
        .site("a")
        .expect("a")
        .host(0)
        .expect("host")
        .clone();
    let host_d = pair
        .lab
        .site("b")
        .expect("b")
        .host(0)
        .expect("host")
        .clone();
    let dave = std::thread::spawn(move || {
        in_namespace(&host_d, async move {
            let mut client = PeerClient::start("0.0.0.0:0".parse().expect("addr"), dave_config)
                .await
                .expect("start");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let (peer, remote) = loop {
                let event = tokio::time::timeout_at(deadline, client.next_event())
                    .await
                    .expect("dave gets a path in time")
                    .expect("agent runs");
                if let AgentEvent::PathUp {
                    peer_id, remote, ..
                } = event
                {
                    break (peer_id, remote);
                }
            };
            let mut path = client
                .path(&peer, PathKind::Direct { remote })
                .expect("path");
            let got = tokio::time::timeout(Duration::from_secs(5), path.recv())
                .await
                .expect("a datagram in time")
                .expect("data");
            path.send(&[b"echo: ".as_slice(), &got].concat())
                .expect("send");
            // Stay up until carol has read the echo.
            tokio::time::sleep(Duration::from_secs(1)).await;
            peer
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let carol = in_namespace(&host_c, async move {
        let client = PeerClient::start("0.0.0.0:0".parse().expect("addr"), carol_config)
            .await
            .expect("start");
        let mut path = client
            .connect("dave", Duration::from_secs(8))
            .await
            .expect("path to dave");
        assert!(matches!(path.kind(), PathKind::Direct { .. }));
        let mut echo = None;
        for _ in 0..10 {
            path.send(b"hello dave").expect("send");
            if let Ok(Some(reply)) =
                tokio::time::timeout(Duration::from_millis(300), path.recv()).await
            {
                echo = Some(reply);
                break;
            }
        }
        echo
    });
    assert_eq!(carol.as_deref(), Some(b"echo: hello dave".as_slice()));
    assert_eq!(dave.join().expect("dave thread"), "carol");
}

/// Runs `work` to completion on a current-thread tokio runtime inside `host`'s
/// namespace (sockets it creates live there).
fn in_namespace<T: Send + 'static>(
    host: &gateway_tests::lab::Host,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    host.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    })
    .expect("namespace")
}

/// The remote address named in a relayed `path-up` line.
fn relayed_remote(line: &str) -> SocketAddr {
    line.split_whitespace()
        .skip_while(|w| *w != "relayed")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no relayed address in {line:?}"))
}

#[test]
fn pair_that_cannot_punch_falls_back_to_the_relay_and_forwards_traffic() {
    if !lab_available() {
        return;
    }
    // A port-restricted cone against a random-port symmetric NAT, both agents without
    // birthday punching: no direct path (docs/nat-matrix.md, rule 5 without its
    // technique), so the agents fall back to the gateway's TURN relay. (Both halves
    // off: a sweep alone still hits the symmetric side's one mapping toward us in about
    // 3% of runs.)
    // Both agents also serve their metrics and watch their interface in the kernel.
    let observe = [
        "--metrics-listen",
        "127.0.0.1:9479",
        "--ebpf-interface",
        "eth0",
    ];
    let mut pair = start_pair(
        NatPreset::port_restricted_cone(),
        NatPreset::symmetric(),
        &[
            &[
                "--forward-listen",
                "127.0.0.1:5000",
                "--birthday-probes",
                "0",
            ][..],
            &observe,
        ]
        .concat(),
        &[
            &["--forward-to", "127.0.0.1:6000", "--birthday-sockets", "0"][..],
            &observe,
        ]
        .concat(),
    );
    let up_a = pair
        .alice
        .wait_for("path-up", Duration::from_secs(14))
        .unwrap_or_else(|| {
            panic!(
                "alice: {:?}\nbob: {:?}\n{}",
                pair.alice.seen(),
                pair.bob.seen(),
                pair.gateway.scrape().unwrap_or_default()
            )
        });
    let up_b = pair
        .bob
        .wait_for("path-up", Duration::from_secs(4))
        .unwrap_or_else(|| panic!("bob: {:?}", pair.bob.seen()));
    assert!(up_a.contains(" relayed "), "{up_a}");
    assert!(up_b.contains(" relayed "), "{up_b}");
    assert!(
        pair.alice
            .seen()
            .iter()
            .any(|l| l.starts_with("punch-failed")),
        "the relay comes after a failed punch: {:?}",
        pair.alice.seen()
    );
    // Alice (the initiator) relays through her allocation: bob appears at his NAT's
    // public address; bob reaches alice at her relayed address on the gateway.
    let wan_b = pair.lab.site("b").expect("b").wan_addr();
    assert_eq!(relayed_remote(&up_a).ip(), wan_b);
    assert_eq!(relayed_remote(&up_b).ip(), punch::SERVICE.ip());

    punch::udp_forward_both_ways(&pair.lab, "over the relay");

    std::thread::sleep(Duration::from_millis(300));
    let text = pair.gateway.scrape().expect("scrape");
    assert_eq!(
        metric_value(
            &text,
            "gateway_punch_outcomes_total",
            "initiator_nat=\"endpoint_independent\",outcome=\"relayed\",responder_nat=\"address_and_port_dependent\""
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "gateway_turn_allocations", ""),
        Some(1.0)
    );
    let relayed = |direction: &str| {
        metric_value(
            &text,
            "gateway_relay_packets_total",
            &format!("direction=\"{direction}\""),
        )
        .unwrap_or(0.0)
    };
    assert!(
        relayed("client_to_peer") >= 2.0 && relayed("peer_to_client") >= 2.0,
        "data and probes crossed the relay both ways:\n{text}"
    );
    // The agents' own metrics: one relayed session each, bytes counted on the relayed
    // path; and their kernels count no punched flow (the relay is not a punch).
    let agent_metrics = |site: &str| {
        let host = pair.lab.site(site).expect("site").host(0).expect("host");
        http_get(host, "127.0.0.1:9479".parse().expect("addr"), "/metrics").expect("agent metrics")
    };
    for site in ["a", "b"] {
        let text = agent_metrics(site);
        assert_eq!(
            metric_value(&text, "gateway_peer_sessions_total", "path=\"relayed\""),
            Some(1.0),
            "site {site}:\n{text}"
        );
        assert_eq!(
            metric_value(&text, "gateway_peer_sessions_total", "path=\"direct\""),
            Some(0.0)
        );
        assert_eq!(metric_value(&text, "gateway_ebpf_loaded", ""), Some(1.0));
        assert_eq!(
            metric_value(&text, "gateway_punched_flows_total", ""),
            Some(0.0),
            "site {site}: a relayed path is not a punched flow\n{text}"
        );
    }
    let alice = agent_metrics("a");
    assert!(
        metric_value(
            &alice,
            "gateway_peer_path_bytes_total",
            "direction=\"sent\",path=\"relayed\""
        )
        .unwrap_or(0.0)
            > 0.0,
        "{alice}"
    );
}
