//! Port mapping against a real router daemon: Debian's miniupnpd (nftables backend)
//! on a random-port symmetric NAT in the lab. Its STUN self-check passes against the
//! gateway's three discovery sockets, it grants a mapping to the agent's
//! port-mapping client (PCP or NAT-PMP, whichever answers the probe first), and an
//! unsolicited datagram from the outside reaches the host through that mapping
//! only, until the client deletes it. Then `gateway peer` agents with it (issue
//! 18): two random-port symmetric NATs with birthday punching off punch directly
//! when both routers run miniupnpd, or only one, and are relayed without it; a
//! SIGTERM deletes the mapping before the agent exits. The gateway checks a mapped
//! candidate before introducing it: a real mapping is verified, one a lying router
//! reports (NAT-PMP "granted" on a port it never mapped) is never introduced. With
//! `--tcp`, the agents also map their TCP punching port: the same random-port pair
//! punches TCP (simultaneous open) through a TCP mapping on both sides or one, and
//! fails without port mapping.
use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use gateway::{
    portmap::upnp_map,
    proto::{
        portmap::{
            MappedTransport, Mapping, MappingProtocol, PortMapClient, PortMapConfig, PortMapEvent,
            ProtocolOutcome,
        },
        rendezvous::{
            client::{self, PeerCredentials},
            wire::{self, Candidate},
        },
    },
};
use gateway_tests::{
    daemon::{GatewayProcess, PeerProcess, http_get, metric_value, write_secret},
    lab::{Lab, NatPreset, PortMappingProtocols, lab_available},
    punch,
};

/// The gateway on the lab's server with the three discovery sockets miniupnpd's
/// STUN self-check needs (another port, another address, both), answering
/// CHANGE-REQUEST without credentials.
fn gateway(lab: &Lab) -> (GatewayProcess, PathBuf) {
    gateway_with(lab, &[])
}

/// [`gateway`] with extra `gateway serve` flags.
fn gateway_with(lab: &Lab, extra: &[&str]) -> (GatewayProcess, PathBuf) {
    let secret = std::env::temp_dir().join(format!(
        "gw-portmap-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    write_secret(&secret, punch::SECRET).expect("secret");
    let secret_arg = secret.to_string_lossy().into_owned();
    let args = [
        "--listen",
        "192.0.2.10:3478",
        "--discovery-listen",
        "192.0.2.10:3479",
        "--discovery-listen",
        "192.0.2.11:3478",
        "--discovery-listen",
        "192.0.2.11:3479",
        "--discovery-unauthenticated",
        "--no-ebpf",
        "--secret-file",
        &secret_arg,
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    let server = lab.server();
    let gateway = GatewayProcess::start(server, SocketAddr::from((server.addr(), 9478)), &args)
        .expect("gateway serve");
    (gateway, secret)
}

/// Drives `client` on `socket` until an event comes or `wait` passes.
fn next_event(
    client: &mut PortMapClient,
    socket: &UdpSocket,
    wait: Duration,
) -> Option<PortMapEvent> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        while let Some(t) = client.poll_transmit() {
            socket
                .send_to(&t.payload, t.to)
                .expect("send to the router");
        }
        if let Some(event) = client.poll_event() {
            return Some(event);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let until = client.poll_timeout().map_or(deadline, |t| t.min(deadline));
        let wait = until
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait)).expect("timeout");
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            client.handle_datagram(Instant::now(), from, &buf[..n]);
        }
        client.handle_timeout(Instant::now());
    }
}

/// Whether a datagram sent from the server to `to` reaches `inside`.
fn reaches(outside: &UdpSocket, inside: &UdpSocket, to: SocketAddr, text: &[u8]) -> bool {
    let mut buf = [0u8; 1500];
    outside.send_to(text, to).expect("send");
    inside
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    matches!(inside.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == text)
}

#[test]
fn miniupnpd_grants_the_agents_client_a_mapping_through_a_symmetric_nat() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .build()
        .expect("lab");
    let (gateway, secret) = gateway(&lab);
    let site = lab.site("a").expect("site a");
    let host = site.host(0).expect("host").clone();
    let router = site.router().addrs()[1];
    let outside = lab.server().udp_bind(40000).expect("server socket");
    outside
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let inside = host.udp_bind(4500).expect("host socket");

    // Without a mapping the symmetric NAT drops what nobody asked for. (From another
    // port: the router's conntrack would keep this flow un-NATed for 30 s.)
    let wan = site.wan_addr();
    let early = lab.server().udp_bind(40002).expect("server socket");
    assert!(!reaches(
        &early,
        &inside,
        (wan, 4500).into(),
        b"unsolicited"
    ));

    let daemon = site
        .start_port_mapping(punch::SERVICE)
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()));
    let config = PortMapConfig::udp(router.into(), host.addr().into(), 4500);
    let mut client = PortMapClient::new(Instant::now(), config, rand::random(), false);
    // Bounds, not expected times: on a loaded machine the first request or answer
    // can be late and the client retransmits after 250 ms, doubling (RFC 6886 §3.1).
    let mapping = match next_event(&mut client, &inside, Duration::from_secs(10)) {
        Some(PortMapEvent::Mapped(mapping)) => mapping,
        other => panic!("no mapping: {other:?}\n{}", daemon.log_text()),
    };
    let Mapping {
        protocol,
        external,
        lifetime,
    } = mapping;
    assert!(
        matches!(protocol, MappingProtocol::Pcp | MappingProtocol::NatPmp),
        "{mapping:?}"
    );
    assert_eq!(external.ip(), wan, "the router's real external address");
    assert!(lifetime > Duration::ZERO);

    // Through the mapping: in to the host, and its answer leaves from the mapped
    // endpoint.
    assert!(
        reaches(&outside, &inside, external, b"through the mapping"),
        "nothing came through {external}:\n{}\n{}",
        site.ruleset().unwrap_or_default(),
        daemon.log_text()
    );
    inside
        .send_to(b"answer", (lab.server().addr(), 40000))
        .expect("answer");
    let mut buf = [0u8; 64];
    let (n, from) = outside.recv_from(&mut buf).expect("the answer arrives");
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(from, external, "the answer leaves from the mapped endpoint");

    // Deleted at close: the outside is shut out again (a new port of the server, so
    // no conntrack entry of the earlier exchange lets it in).
    client.close(Instant::now());
    assert_eq!(
        next_event(&mut client, &inside, Duration::from_secs(15)),
        Some(PortMapEvent::Closed)
    );
    let late = lab.server().udp_bind(40001).expect("server socket");
    assert!(
        !reaches(&late, &inside, external, b"after the delete"),
        "{mapping:?} still open:\n{}\n{}",
        site.ruleset().unwrap_or_default(),
        daemon.log_text()
    );
    drop(daemon);
    std::fs::remove_file(secret).ok();
}

#[test]
fn upnp_igd_maps_through_miniupnpd_and_deletes() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .build()
        .expect("lab");
    let (gateway, secret) = gateway(&lab);
    let site = lab.site("a").expect("site a");
    let host = site.host(0).expect("host").clone();
    let inside = host.udp_bind(4600).expect("host socket");
    let daemon = site
        .start_port_mapping(punch::SERVICE)
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()));
    let local = SocketAddr::from((host.addr(), 4600));
    let held = host
        .run(move || upnp_map(local, MappedTransport::Udp, Duration::from_secs(120)))
        .expect("namespace")
        .unwrap_or_else(|e| panic!("UPnP: {e}\n{}", daemon.log_text()));
    assert_eq!(held.mapping.protocol, MappingProtocol::Upnp);
    let external = held.mapping.external;
    assert_eq!(
        external,
        SocketAddr::from((site.wan_addr(), 4600)),
        "the router's address, the agent's own port"
    );
    let outside = lab.server().udp_bind(40010).expect("server socket");
    assert!(
        reaches(&outside, &inside, external, b"through UPnP"),
        "{}\n{}",
        site.ruleset().unwrap_or_default(),
        daemon.log_text()
    );
    host.run(move || held.delete())
        .expect("namespace")
        .expect("DeletePortMapping");
    let late = lab.server().udp_bind(40011).expect("server socket");
    assert!(!reaches(&late, &inside, external, b"after the delete"));
    drop(daemon);
    std::fs::remove_file(secret).ok();
}

#[test]
fn routers_that_speak_one_protocol_get_asked_in_it() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("pcp", NatPreset::symmetric())
        .site("natpmp", NatPreset::symmetric())
        .site("upnp", NatPreset::symmetric())
        .build()
        .expect("lab");
    let (gateway, secret) = gateway(&lab);
    for (site_name, protocols, expected) in [
        ("pcp", PortMappingProtocols::PCP, Some(MappingProtocol::Pcp)),
        (
            "natpmp",
            PortMappingProtocols::NAT_PMP,
            Some(MappingProtocol::NatPmp),
        ),
        ("upnp", PortMappingProtocols::UPNP, None),
    ] {
        let site = lab.site(site_name).expect("site");
        let host = site.host(0).expect("host").clone();
        let inside = host.udp_bind(4500).expect("host socket");
        let daemon = site
            .start_port_mapping_with(punch::SERVICE, protocols)
            .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()));
        let router = site.router().addrs()[1];
        let config = PortMapConfig::udp(router.into(), host.addr().into(), 4500);
        let mut client = PortMapClient::new(Instant::now(), config, rand::random(), false);
        let event = next_event(&mut client, &inside, Duration::from_secs(6));
        match expected {
            Some(protocol) => assert!(
                matches!(event, Some(PortMapEvent::Mapped(Mapping { protocol: p, .. })) if p == protocol),
                "{site_name}: {event:?}\n{}",
                daemon.log_text()
            ),
            None => {
                assert_eq!(
                    event,
                    Some(PortMapEvent::Unavailable(vec![
                        (MappingProtocol::Pcp, ProtocolOutcome::NoAnswer),
                        (MappingProtocol::NatPmp, ProtocolOutcome::NoAnswer),
                    ])),
                    "{site_name}"
                );
                let local = SocketAddr::from((host.addr(), 4500));
                let held = host
                    .run(move || upnp_map(local, MappedTransport::Udp, Duration::from_secs(60)))
                    .expect("namespace")
                    .unwrap_or_else(|e| panic!("UPnP: {e}\n{}", daemon.log_text()));
                assert_eq!(held.mapping.external.ip(), site.wan_addr());
            }
        }
    }
    std::fs::remove_file(secret).ok();
}

#[test]
fn a_router_without_port_mapping_costs_a_bounded_wait() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .build()
        .expect("lab");
    let site = lab.site("a").expect("site a");
    let host = site.host(0).expect("host").clone();
    let inside = host.udp_bind(4500).expect("host socket");
    let router = site.router().addrs()[1];
    let started = Instant::now();
    let config = PortMapConfig::udp(router.into(), host.addr().into(), 4500);
    let mut client = PortMapClient::new(started, config, rand::random(), false);
    let event = next_event(&mut client, &inside, Duration::from_secs(10));
    assert_eq!(
        event,
        Some(PortMapEvent::Unavailable(vec![
            (MappingProtocol::Pcp, ProtocolOutcome::NoAnswer),
            (MappingProtocol::NatPmp, ProtocolOutcome::NoAnswer),
        ]))
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(3700)..Duration::from_secs(6)).contains(&waited),
        "{waited:?}"
    );
    // UPnP-IGD: SSDP discovery finds nobody within its bounded wait.
    let local = SocketAddr::from((host.addr(), 4500));
    let started = Instant::now();
    let upnp = host
        .run(move || upnp_map(local, MappedTransport::Udp, Duration::from_secs(120)))
        .expect("namespace");
    assert!(matches!(upnp, Err(ProtocolOutcome::NoAnswer)), "{upnp:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// Two agents, alice (`--connect bob`) on site a and bob on site b, both behind a
/// random-port symmetric NAT, with birthday punching off (`--birthday-probes 0` on
/// alice, `--birthday-sockets 0` on bob) so only a port mapping can make the path
/// direct; miniupnpd on the routers of `mapped` sites. Returns the gateway, the
/// daemons, the agents and the secret file.
struct MappedPair {
    lab: Lab,
    gateway: GatewayProcess,
    _daemons: Vec<gateway_tests::lab::PortMappingDaemon>,
    alice: PeerProcess,
    bob: PeerProcess,
    secret: PathBuf,
}

impl MappedPair {
    /// Alice's TCP punch verdict (`tcp-path-up ...` or `tcp-punch-failed ...`),
    /// within 15 s.
    fn tcp_verdict(&mut self) -> String {
        let alice = self
            .alice
            .wait_for("tcp-p", Duration::from_secs(15))
            .unwrap_or_else(|| panic!("alice: {:?}", self.alice.seen()));
        eprintln!("alice: {alice}");
        alice
    }

    /// Both sides punched TCP, and the forwarded connection carries `hello` to bob's
    /// application and an answer back; alice's and bob's `tcp-path-up` lines.
    fn tcp_connected_both_ways(&mut self, hello: &[u8]) -> (String, String) {
        let alice = self.tcp_verdict();
        let bob = self
            .bob
            .wait_for("tcp-p", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("bob: {:?}", self.bob.seen()));
        assert!(
            alice.starts_with("tcp-path-up") && bob.starts_with("tcp-path-up"),
            "alice: {:?}\nbob: {:?}",
            self.alice.seen(),
            self.bob.seen()
        );
        gateway_tests::tcp::forward_both_ways(&self.lab, 0, hello, b"back")
            .unwrap_or_else(|e| panic!("{e}\nalice: {:?}", self.alice.seen()));
        (alice, bob)
    }
}

impl Drop for MappedPair {
    fn drop(&mut self) {
        std::fs::remove_file(&self.secret).ok();
    }
}

fn mapped_pair(mapped: &[&str], alice_extra: &[&str]) -> MappedPair {
    mapped_pair_with(
        mapped,
        alice_extra,
        &[],
        "port-mapping",
        PortMappingProtocols::ALL,
    )
}

/// [`mapped_pair`] with extra flags for bob too, and the prefix of bob's line that
/// says his mapping is registered (when his site is mapped) before alice starts.
fn mapped_pair_with(
    mapped: &[&str],
    alice_extra: &[&str],
    bob_extra: &[&str],
    bob_mapped: &str,
    protocols: PortMappingProtocols,
) -> MappedPair {
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .site("b", NatPreset::symmetric())
        .build()
        .expect("lab");
    // The relay may reach the lab's "public" (documentation) ranges: the control
    // pair is relayed.
    let (gateway, secret) = gateway_with(
        &lab,
        &[
            "--allow-peer",
            "198.51.100.0/24",
            "--allow-peer",
            "203.0.113.0/24",
            "--allow-peer",
            "192.0.2.0/24",
        ],
    );
    let daemons = mapped
        .iter()
        .map(|name| {
            lab.site(name)
                .expect("site")
                .start_port_mapping_with(punch::SERVICE, protocols)
                .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()))
        })
        .collect();
    let host = |name: &str| {
        lab.site(name)
            .and_then(|s| s.host(0))
            .expect("host")
            .clone()
    };
    let (alice_creds, bob_creds) = (punch::credentials("alice"), punch::credentials("bob"));
    let mut args = punch::DISCOVER.to_vec();
    args.extend_from_slice(&["--birthday-sockets", "0"]);
    args.extend_from_slice(bob_extra);
    let mut bob = PeerProcess::start(
        &host("b"),
        punch::SERVICE,
        &bob_creds.username,
        &bob_creds.password,
        &args,
    )
    .expect("bob");
    assert!(
        bob.wait_for("nat mapping", Duration::from_secs(5))
            .is_some(),
        "bob: {:?}\n{}",
        bob.seen(),
        gateway.log_text()
    );
    if mapped.contains(&"b") && !bob_mapped.is_empty() {
        // Bob's mapped candidate is registered before alice asks for him.
        let line = bob.wait_for(bob_mapped, Duration::from_secs(5));
        assert!(
            line.as_deref().is_some_and(|l| l.contains(" protocol ")),
            "bob: {:?}",
            bob.seen()
        );
    }
    let mut args = vec!["--connect", "bob", "--birthday-probes", "0"];
    args.extend_from_slice(punch::DISCOVER);
    args.extend_from_slice(alice_extra);
    let alice = PeerProcess::start(
        &host("a"),
        punch::SERVICE,
        &alice_creds.username,
        &alice_creds.password,
        &args,
    )
    .expect("alice");
    MappedPair {
        lab,
        gateway,
        _daemons: daemons,
        alice,
        bob,
        secret,
    }
}

impl MappedPair {
    /// The first path-up line of each agent: (alice's, bob's).
    fn paths(&mut self) -> (String, String) {
        let alice = self
            .alice
            .wait_for("path-up", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("alice: {:?}", self.alice.seen()));
        let bob = self
            .bob
            .wait_for("path-up", Duration::from_secs(3))
            .unwrap_or_else(|| panic!("bob: {:?}", self.bob.seen()));
        // For docs/nat-matrix.md (`-- --nocapture`).
        eprintln!("alice: {alice}\nbob:   {bob}");
        (alice, bob)
    }

    /// Waits for both agents' direct path: the first path, or the upgrade that a
    /// new mapping brings forward when the grant came after the agent's one-second
    /// hold (a loaded machine); `None` when either never went direct.
    fn direct_paths(&mut self) -> Option<(String, String)> {
        let alice = self
            .alice
            .wait_for("path-up peer bob direct", Duration::from_secs(12))?;
        let bob = self
            .bob
            .wait_for("path-up peer alice direct", Duration::from_secs(5))?;
        eprintln!("alice: {alice}\nbob:   {bob}");
        Some((alice, bob))
    }
}

/// The external endpoint of an agent's `port-mapping protocol P external ADDR
/// lifetime S` line.
fn external_of(line: &str) -> SocketAddr {
    line.split_whitespace()
        .skip_while(|w| *w != "external")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no external endpoint in {line:?}"))
}

#[test]
fn two_random_port_nats_with_port_mapping_punch_directly_and_delete_at_exit() {
    if !lab_available() {
        return;
    }
    let mut pair = mapped_pair(&["a", "b"], &["--metrics-listen", "0.0.0.0:9479"]);
    let Some((alice, bob)) = pair.direct_paths() else {
        panic!(
            "no direct path\nalice: {:?}\nbob: {:?}",
            pair.alice.seen(),
            pair.bob.seen()
        )
    };
    assert!(alice.contains(" direct ") && bob.contains(" direct "));
    let mapping = pair
        .alice
        .wait_for("port-mapping", Duration::from_secs(1))
        .expect("alice's port-mapping line");
    assert!(mapping.starts_with("port-mapping protocol "), "{mapping}");
    let external = external_of(&mapping);
    let site_a = pair.lab.site("a").expect("site a");
    assert_eq!(external.ip(), site_a.wan_addr(), "{mapping}");
    // The gateway checked it before introducing it.
    assert_eq!(
        pair.alice
            .wait_for("port-mapping external", Duration::from_secs(1))
            .as_deref(),
        Some(format!("port-mapping external {external} verified by the gateway").as_str()),
        "{:?}",
        pair.alice.seen()
    );
    // The gateway counts the outcome as one that used a mapped candidate.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mapped_direct = loop {
        let metrics = pair.gateway.scrape().expect("the gateway's /metrics");
        let value = metric_value(
            &metrics,
            "gateway_punch_mapped_outcomes_total",
            "outcome=\"direct\"",
        );
        if value.is_some_and(|v| v >= 1.0) || Instant::now() >= deadline {
            break value;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(mapped_direct.is_some_and(|v| v >= 1.0), "{mapped_direct:?}");
    // The path runs through a mapping: to one of the mapped endpoints, or from one
    // (the side probed first answers to the other's random-port source).
    let bob_mapping = pair
        .bob
        .wait_for("port-mapping", Duration::from_secs(1))
        .expect("bob's port-mapping line");
    let remotes = [&alice, &bob].map(|l| {
        l.split_whitespace()
            .nth(4)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no remote in {l}"))
    });
    assert!(
        remotes.contains(&external) || remotes.contains(&external_of(&bob_mapping)),
        "{remotes:?} {mapping} {bob_mapping}"
    );
    // Alice's metrics count the grant by protocol.
    let host = site_a.host(0).expect("host").clone();
    let metrics = http_get(&host, SocketAddr::from((host.addr(), 9479)), "/metrics")
        .expect("alice's /metrics");
    let protocol = mapping.split_whitespace().nth(2).expect("protocol");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_peer_port_mappings_total{")
                && l.contains(&format!("protocol=\"{protocol}\""))
                && l.contains("outcome=\"mapped\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // SIGTERM: the mapping is deleted (the router answered) before the agent exits.
    pair.alice.signal(libc::SIGTERM).expect("SIGTERM");
    let status = pair
        .alice
        .wait_exit(Duration::from_secs(5))
        .expect("alice exits");
    assert!(status.success(), "{status:?}");
    assert!(
        pair.alice
            .seen()
            .iter()
            .any(|l| l == "port-mapping deleted"),
        "{:?}",
        pair.alice.seen()
    );
}

#[test]
fn two_random_port_nats_without_port_mapping_are_relayed() {
    if !lab_available() {
        return;
    }
    let mut pair = mapped_pair(&[], &[]);
    let (alice, bob) = pair.paths();
    assert!(
        alice.contains(" relayed ") && bob.contains(" relayed "),
        "{alice}\n{bob}\n{}",
        pair.gateway.log_text()
    );
}

#[test]
fn one_mapped_side_is_enough_for_a_random_port_pair() {
    if !lab_available() {
        return;
    }
    let mut pair = mapped_pair(&["a"], &[]);
    let Some((alice, bob)) = pair.direct_paths() else {
        panic!(
            "no direct path\nalice: {:?}\nbob: {:?}",
            pair.alice.seen(),
            pair.bob.seen()
        )
    };
    assert!(alice.contains(" direct ") && bob.contains(" direct "));
    let bob_mapping = pair
        .bob
        .wait_for("port-mapping none", Duration::from_secs(8))
        .unwrap_or_else(|| panic!("bob: {:?}", pair.bob.seen()));
    assert!(bob_mapping.contains("pcp no answer"), "{bob_mapping}");
}

#[test]
fn an_agent_refused_for_good_deletes_its_mapping_before_it_exits() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .build()
        .expect("lab");
    let (gateway, secret) = gateway(&lab);
    let site = lab.site("a").expect("site a");
    let _daemon = site
        .start_port_mapping(punch::SERVICE)
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()));
    // Credentials of another secret: the gateway refuses them for good.
    let wrong = gateway::proto::credentials::SharedSecret::new(b"another secret")
        .issue("alice", 4_000_000_000)
        .expect("credentials");
    let host = site.host(0).expect("host").clone();
    let mut alice = PeerProcess::start(
        &host,
        punch::SERVICE,
        &wrong.username,
        &wrong.password,
        &["--no-discover"],
    )
    .expect("alice");
    let status = alice
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running: {:?}", alice.seen()));
    assert!(!status.success(), "{status:?}");
    let seen = alice.seen();
    let mapped = seen
        .iter()
        .position(|l| l.starts_with("port-mapping protocol "));
    let deleted = seen.iter().position(|l| l == "port-mapping deleted");
    assert!(
        mapped.is_some() && deleted.is_some() && mapped < deleted,
        "{seen:?}"
    );
    std::fs::remove_file(secret).ok();
}

#[test]
fn no_port_mapping_asks_nothing_even_of_a_router_that_maps() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .build()
        .expect("lab");
    let (gateway, secret) = gateway(&lab);
    let site = lab.site("a").expect("site a");
    let _daemon = site
        .start_port_mapping(punch::SERVICE)
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()));
    let creds = punch::credentials("alice");
    let host = site.host(0).expect("host").clone();
    let mut alice = PeerProcess::start(
        &host,
        punch::SERVICE,
        &creds.username,
        &creds.password,
        &["--no-discover", "--no-port-mapping"],
    )
    .expect("alice");
    assert!(
        alice
            .wait_for("registered", Duration::from_secs(5))
            .is_some(),
        "{:?}",
        alice.seen()
    );
    // The router would grant within milliseconds (the tests above): nothing comes.
    assert!(
        alice
            .wait_for("port-mapping protocol", Duration::from_millis(1500))
            .is_none()
    );
    assert!(
        alice
            .seen()
            .iter()
            .any(|l| l == "port-mapping none: turned off (--no-port-mapping)"),
        "{:?}",
        alice.seen()
    );
    std::fs::remove_file(secret).ok();
}

/// The external port a lying router reports (nothing is mapped there).
const LIED_PORT: u16 = 40404;

/// A router that lies: a NAT-PMP server (RFC 6886) on a site router's LAN address
/// that grants every UDP mapping asked of it, reporting the router's real external
/// address but [`LIED_PORT`] as the external port, without mapping anything. It
/// answers no PCP, so the agent's client takes NAT-PMP. Stops on drop.
struct LyingRouter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LyingRouter {
    fn start(site: &gateway_tests::lab::Site) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let router = site.router().clone();
        let (wan, lan) = (router.addrs()[0], router.addrs()[1]);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let serve = move || {
                let socket = UdpSocket::bind((lan, 5351)).expect("bind 5351");
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut buf = [0u8; 1100];
                while !stopping.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let epoch = 100u32.to_be_bytes();
                    let answer = match &buf[..n] {
                        // External address request.
                        [0, 0] => {
                            let mut a = vec![0, 128, 0, 0];
                            a.extend_from_slice(&epoch);
                            a.extend_from_slice(&wan.octets());
                            a
                        }
                        // UDP mapping request: "granted", on a port never mapped.
                        [0, 1, _, _, ip0, ip1, _, _, l0, l1, l2, l3] => {
                            let mut a = vec![0, 129, 0, 0];
                            a.extend_from_slice(&epoch);
                            a.extend_from_slice(&[*ip0, *ip1]);
                            a.extend_from_slice(&LIED_PORT.to_be_bytes());
                            a.extend_from_slice(&[*l0, *l1, *l2, *l3]);
                            a
                        }
                        _ => continue,
                    };
                    socket.send_to(&answer, from).expect("answer");
                }
            };
            router.run(serve).expect("in the router's namespace");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the lying router listens");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LyingRouter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the gateway introduces of `peers` to an observer ("carol", a bare
/// rendezvous client on the server's namespace): each one's candidates, from the
/// Introduction its Connect brings.
fn introduced_candidates(lab: &Lab, peers: &[&'static str]) -> Vec<Vec<Candidate>> {
    let peers = peers.to_vec();
    let creds = punch::credentials("carol");
    let creds = PeerCredentials {
        username: creds.username,
        password: creds.password,
    };
    lab.server()
        .run(move || {
            let socket = UdpSocket::bind((punch::SERVICE.ip(), 0)).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let mut nonce: Option<String> = None;
            let mut buf = [0u8; 1500];
            let mut registered = false;
            for attempt in 0u8..10 {
                let tid = [attempt; 12];
                let request = client::register(
                    tid,
                    &creds,
                    nonce.as_deref(),
                    &[],
                    wire::NatClass::Unknown,
                    0,
                );
                socket.send_to(&request, punch::SERVICE).expect("send");
                while let Ok(n) = socket.recv(&mut buf) {
                    let Some(response) = client::parse_response(&buf[..n], &creds.password) else {
                        continue;
                    };
                    if response.transaction_id != tid {
                        continue;
                    }
                    if response.nonce.is_some() {
                        nonce = response.nonce;
                    }
                    registered = response.result.is_ok();
                    break;
                }
                if registered {
                    break;
                }
            }
            assert!(registered, "carol registers");
            peers
                .iter()
                .enumerate()
                .map(|(i, peer)| {
                    let tid = [0x40 + u8::try_from(i).expect("few"); 12];
                    let request = client::connect(tid, &creds, nonce.as_deref(), peer);
                    socket.send_to(&request, punch::SERVICE).expect("send");
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < deadline {
                        let Ok(n) = socket.recv(&mut buf) else {
                            continue;
                        };
                        if let Some(response) = client::parse_response(&buf[..n], &creds.password)
                            && response.nonce.is_some()
                        {
                            nonce = response.nonce;
                        }
                        if let Some(intro) = client::parse_introduction(&buf[..n], &creds.password)
                            && intro.peer_id == *peer
                        {
                            return intro.candidates;
                        }
                    }
                    panic!("no introduction to {peer}");
                })
                .collect()
        })
        .expect("in the server's namespace")
}

/// The mapped candidates among `candidates`.
fn mapped_of(candidates: &[Candidate]) -> Vec<SocketAddr> {
    candidates
        .iter()
        .filter(|c| c.kind == wire::CandidateKind::Mapped)
        .map(|c| c.addr)
        .collect()
}

#[test]
fn a_mapping_a_router_lies_about_is_never_introduced_and_a_real_one_is() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::symmetric())
        .site("b", NatPreset::symmetric())
        .build()
        .expect("lab");
    let (gateway, secret) = gateway(&lab);
    let (site_a, site_b) = (lab.site("a").expect("a"), lab.site("b").expect("b"));
    let _miniupnpd = site_a
        .start_port_mapping(punch::SERVICE)
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log_text()));
    let _liar = LyingRouter::start(site_b);
    let start = |site: &gateway_tests::lab::Site, peer: &str| {
        let creds = punch::credentials(peer);
        let host = site.host(0).expect("host").clone();
        PeerProcess::start(
            &host,
            punch::SERVICE,
            &creds.username,
            &creds.password,
            punch::DISCOVER,
        )
        .expect(peer)
    };
    let (mut alice, mut bob) = (start(site_a, "alice"), start(site_b, "bob"));
    // Alice's router maps for real: the gateway's probe gets through.
    let granted = alice
        .wait_for("port-mapping protocol", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("alice: {:?}", alice.seen()));
    let real = external_of(&granted);
    let asked = Instant::now();
    let verdict = alice
        .wait_for("port-mapping external", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("alice: {:?}\n{}", alice.seen(), gateway.log_text()));
    assert_eq!(
        verdict,
        format!("port-mapping external {real} verified by the gateway")
    );
    // For docs/nat-matrix.md (`-- --nocapture`): from the grant line on.
    eprintln!("alice verified after {:?}", asked.elapsed());
    // Bob's router lies about the port: granted, announced, probed, dropped.
    let granted = bob
        .wait_for("port-mapping protocol nat-pmp", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("bob: {:?}", bob.seen()));
    let lie = external_of(&granted);
    let asked = Instant::now();
    assert_eq!(lie, SocketAddr::from((site_b.wan_addr(), LIED_PORT)));
    let verdict = bob
        .wait_for("port-mapping external", Duration::from_secs(8))
        .unwrap_or_else(|| panic!("bob: {:?}\n{}", bob.seen(), gateway.log_text()));
    assert_eq!(
        verdict,
        format!("port-mapping external {lie} not reachable from the gateway; not announced")
    );
    eprintln!("bob told unreachable after {:?}", asked.elapsed());
    let metrics = gateway.scrape().expect("the gateway's /metrics");
    let checks = |outcome: &str| {
        metric_value(
            &metrics,
            "gateway_rendezvous_mapped_candidates_total",
            &format!("outcome=\"{outcome}\""),
        )
    };
    assert_eq!(
        (checks("verified"), checks("unreachable")),
        (Some(1.0), Some(1.0)),
        "{metrics}"
    );
    // What another peer is told: alice's real mapping, nothing of bob's lie.
    let [to_alice, to_bob]: [Vec<Candidate>; 2] = introduced_candidates(&lab, &["alice", "bob"])
        .try_into()
        .expect("two introductions");
    assert_eq!(mapped_of(&to_alice), [real], "{to_alice:?}");
    assert!(mapped_of(&to_bob).is_empty(), "{to_bob:?}");
    assert!(to_bob.iter().all(|c| c.addr != lie), "{to_bob:?}");
    std::fs::remove_file(secret).ok();
}

/// TCP punching flags (simultaneous open) for alice (her forwarder on
/// 127.0.0.1:5100) and bob (delivering to 127.0.0.1:6100), plus `extra`.
fn tcp_args<'a>(forward: [&'a str; 2], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--tcp", "simultaneous-open", forward[0], forward[1]];
    args.extend_from_slice(extra);
    args
}

/// Issue 18's "also for the TCP port when `--tcp` is on": two random-port NATs,
/// whose TCP punching fails without a mapping (the next test), punch TCP through
/// the TCP mappings their routers grant: each agent announces its TCP mapping as a
/// TCP candidate, the other's connect() to it passes the router's DNAT (and, both
/// sides mapped, the two SYNs meet on one 4-tuple since each router keeps a mapped
/// flow's external port), and the forwarded TCP port carries bytes both ways. The
/// TCP mapping is counted under `transport="tcp"` and deleted at SIGTERM.
#[test]
fn two_random_port_nats_punch_tcp_through_their_tcp_mappings() {
    if !lab_available() {
        return;
    }
    let alice_extra = tcp_args(
        ["--tcp-forward-listen", gateway_tests::tcp::FORWARD_LISTEN],
        &["--metrics-listen", "0.0.0.0:9479"],
    );
    let bob_extra = tcp_args(["--tcp-forward-to", gateway_tests::tcp::FORWARD_TO], &[]);
    let mut pair = mapped_pair_with(
        &["a", "b"],
        &alice_extra,
        &bob_extra,
        "port-mapping tcp protocol",
        PortMappingProtocols::ALL,
    );
    let (alice, bob) = pair.tcp_connected_both_ways(b"hello through the mapping");
    // Each side's TCP mapping is on its router's public address; the connection
    // runs to one of them.
    let tcp_mapping = |peer: &mut PeerProcess| {
        let line = peer
            .wait_for("port-mapping tcp protocol", Duration::from_secs(1))
            .unwrap_or_else(|| panic!("{:?}", peer.seen()));
        external_of(&line)
    };
    let (alice_tcp, bob_tcp) = (tcp_mapping(&mut pair.alice), tcp_mapping(&mut pair.bob));
    let site_a = pair.lab.site("a").expect("site a");
    assert_eq!(alice_tcp.ip(), site_a.wan_addr());
    assert_eq!(bob_tcp.ip(), pair.lab.site("b").expect("site b").wan_addr());
    let remote = |line: &str| {
        line.split_whitespace()
            .skip_while(|w| *w != "remote")
            .nth(1)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no remote in {line}"))
    };
    assert!(
        remote(&alice) == bob_tcp || remote(&bob) == alice_tcp,
        "{alice}\n{bob}\n{alice_tcp} {bob_tcp}"
    );
    // The UDP mapping is the UDP candidate's, separate from the TCP one.
    let udp = pair
        .alice
        .wait_for("port-mapping protocol", Duration::from_secs(1))
        .expect("alice's UDP mapping");
    assert_ne!(external_of(&udp), alice_tcp);
    // Alice's metrics count the TCP grant under its transport.
    let host = site_a.host(0).expect("host").clone();
    let metrics = http_get(&host, SocketAddr::from((host.addr(), 9479)), "/metrics")
        .expect("alice's /metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_peer_port_mappings_total{")
                && l.contains("transport=\"tcp\"")
                && l.contains("outcome=\"mapped\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // SIGTERM: both mappings are deleted before the agent exits.
    pair.alice.signal(libc::SIGTERM).expect("SIGTERM");
    let status = pair
        .alice
        .wait_exit(Duration::from_secs(5))
        .expect("alice exits");
    assert!(status.success(), "{status:?}");
    let seen = pair.alice.seen();
    for deleted in ["port-mapping deleted", "port-mapping tcp deleted"] {
        assert!(seen.iter().any(|l| l == deleted), "{deleted}: {seen:?}");
    }
}

/// One mapped side is enough for TCP too: bob's router maps nothing (no
/// miniupnpd), so his TCP candidate is only his reflexive one, which alice's SYNs
/// cannot use; his connect() to alice's TCP mapping gets in, and her listener
/// accepts it (from bob's address, which the gateway vouched for).
#[test]
fn one_tcp_mapped_side_is_enough_for_a_random_port_pair() {
    if !lab_available() {
        return;
    }
    let alice_extra = tcp_args(
        ["--tcp-forward-listen", gateway_tests::tcp::FORWARD_LISTEN],
        &[],
    );
    let bob_extra = tcp_args(["--tcp-forward-to", gateway_tests::tcp::FORWARD_TO], &[]);
    let mut pair = mapped_pair_with(
        &["a"],
        &alice_extra,
        &bob_extra,
        "",
        PortMappingProtocols::ALL,
    );
    let (_, bob) = pair.tcp_connected_both_ways(b"one side mapped");
    let alice_tcp = pair
        .alice
        .wait_for("port-mapping tcp protocol", Duration::from_secs(1))
        .map(|l| external_of(&l))
        .unwrap_or_else(|| panic!("{:?}", pair.alice.seen()));
    assert!(
        bob.contains(&format!(" remote {alice_tcp} ")),
        "{bob} {alice_tcp}"
    );
    assert!(
        pair.bob
            .wait_for("port-mapping tcp none", Duration::from_secs(8))
            .is_some_and(|l| l.contains("pcp no answer")),
        "bob: {:?}",
        pair.bob.seen()
    );
}

/// The control: the same pair and routers, the agents with `--no-port-mapping`:
/// random-port NATs on both sides, so neither side's TCP candidate is where the
/// other's SYNs come from or go to, and simultaneous open fails (as
/// docs/tcp-splicing.md's table says for a random-port NAT).
#[test]
fn two_random_port_nats_without_port_mapping_fail_tcp_punching() {
    if !lab_available() {
        return;
    }
    let alice_extra = tcp_args(
        ["--tcp-forward-listen", gateway_tests::tcp::FORWARD_LISTEN],
        &["--no-port-mapping"],
    );
    let bob_extra = tcp_args(
        ["--tcp-forward-to", gateway_tests::tcp::FORWARD_TO],
        &["--no-port-mapping"],
    );
    let mut pair = mapped_pair_with(
        &["a", "b"],
        &alice_extra,
        &bob_extra,
        "",
        PortMappingProtocols::ALL,
    );
    let alice = pair.tcp_verdict();
    assert!(
        alice.starts_with("tcp-punch-failed"),
        "alice: {:?}\nbob: {:?}",
        pair.alice.seen(),
        pair.bob.seen()
    );
    assert!(
        pair.alice
            .seen()
            .iter()
            .any(|l| l == "port-mapping tcp none: turned off (--no-port-mapping)"),
        "{:?}",
        pair.alice.seen()
    );
}

/// The TCP mapping by UPnP-IGD alone (routers that speak neither PCP nor NAT-PMP):
/// the driver's second UPnP side maps the TCP punching port, the agent announces it,
/// and the pair connects through it; SIGTERM deletes it (DeletePortMapping).
#[test]
fn a_tcp_mapping_by_upnp_alone_carries_the_tcp_punch() {
    if !lab_available() {
        return;
    }
    let alice_extra = tcp_args(
        ["--tcp-forward-listen", gateway_tests::tcp::FORWARD_LISTEN],
        &[],
    );
    let bob_extra = tcp_args(["--tcp-forward-to", gateway_tests::tcp::FORWARD_TO], &[]);
    let mut pair = mapped_pair_with(
        &["a", "b"],
        &alice_extra,
        &bob_extra,
        "port-mapping tcp protocol",
        PortMappingProtocols::UPNP,
    );
    let bob_tcp = pair
        .bob
        .wait_for("port-mapping tcp protocol", Duration::from_secs(1))
        .unwrap_or_else(|| panic!("{:?}", pair.bob.seen()));
    assert!(
        bob_tcp.starts_with("port-mapping tcp protocol upnp "),
        "{bob_tcp}"
    );
    let alice = pair.tcp_verdict();
    assert!(
        alice.starts_with("tcp-path-up"),
        "alice: {:?}\nbob: {:?}",
        pair.alice.seen(),
        pair.bob.seen()
    );
    gateway_tests::tcp::forward_both_ways(&pair.lab, 0, b"through UPnP", b"back")
        .unwrap_or_else(|e| panic!("{e}\nalice: {:?}", pair.alice.seen()));
    let alice_tcp = pair
        .alice
        .wait_for("port-mapping tcp protocol", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{:?}", pair.alice.seen()));
    assert!(
        alice_tcp.starts_with("port-mapping tcp protocol upnp "),
        "{alice_tcp}"
    );
    pair.alice.signal(libc::SIGTERM).expect("SIGTERM");
    let status = pair
        .alice
        .wait_exit(Duration::from_secs(5))
        .expect("alice exits");
    assert!(status.success(), "{status:?}");
    let seen = pair.alice.seen();
    assert!(
        seen.iter().any(|l| l == "port-mapping tcp deleted"),
        "{seen:?}"
    );
}
