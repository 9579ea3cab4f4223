//! `gateway serve` in the NAT lab: replies leave from the address they were sent to
//! (a multi-homed server), and two peers behind NATs register and get introduced.
use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use gateway::proto::{
    credentials::SharedSecret,
    rendezvous::{
        client::{self, PeerCredentials, Role},
        wire::{CandidateKind, NatClass, SessionOutcome},
    },
};
use gateway_tests::{
    daemon::{GatewayProcess, metric_value, stun_binding},
    lab::{Lab, NatPreset, lab_available},
};

#[test]
fn binding_replies_come_from_the_address_asked() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let server = lab.server();
    let [primary, secondary] = [server.addrs()[0], server.addrs()[1]];
    let _gateway = GatewayProcess::start(
        server,
        SocketAddr::from((primary, 9478)),
        &["--listen", "0.0.0.0:3478", "--no-ebpf"],
    )
    .expect("gateway");
    let host = lab.site("a").expect("site").host(0).expect("host");
    let socket: UdpSocket = host.udp_bind(0).expect("socket");
    // stun_binding only accepts an answer from the exact address it asked.
    let seen_primary = stun_binding(
        &socket,
        SocketAddr::from((primary, 3478)),
        Duration::from_millis(500),
    );
    let seen_secondary = stun_binding(
        &socket,
        SocketAddr::from((secondary, 3478)),
        Duration::from_millis(500),
    );
    let wan = lab.site("a").expect("site").wan_addr();
    assert_eq!(seen_primary.map(|a| a.ip()), Some(wan.into()));
    assert_eq!(
        seen_secondary, seen_primary,
        "EIM: the same mapping for both server addresses"
    );
}

fn credentials(secret: &SharedSecret, peer: &str) -> PeerCredentials {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let issued = secret.issue(peer, expiry).expect("issue");
    PeerCredentials {
        username: issued.username,
        password: issued.password,
    }
}

fn exchange(
    socket: &UdpSocket,
    to: SocketAddr,
    request: &[u8],
    password: &str,
) -> client::Response {
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        socket.send_to(request, to).expect("send");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        while let Ok((len, from)) = socket.recv_from(&mut buf) {
            if from == to
                && let Some(response) = client::parse_response(&buf[..len], password)
            {
                return response;
            }
        }
    }
    panic!("no response from {to}");
}

#[test]
fn peers_behind_nats_register_and_are_introduced() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .site("b", NatPreset::symmetric())
        .build()
        .expect("lab");
    let server = lab.server();
    let primary = server.addrs()[0];
    let secret_text = "lab operator secret";
    let secret_path = std::env::temp_dir().join(format!("gw-secret-{}", std::process::id()));
    gateway_tests::daemon::write_secret(&secret_path, secret_text).expect("secret");
    let gateway = GatewayProcess::start(
        server,
        SocketAddr::from((primary, 9478)),
        &[
            "--listen",
            "0.0.0.0:3478",
            "--no-ebpf",
            // Two driver loops share the socket and the core (server.threads): every
            // other lab test runs the default single loop.
            "--threads",
            "2",
            "--secret-file",
            &secret_path.to_string_lossy(),
        ],
    )
    .expect("gateway");
    let secret = SharedSecret::new(secret_text.as_bytes());
    let to = SocketAddr::from((primary, 3478));
    let alice = credentials(&secret, "alice");
    let bob = credentials(&secret, "bob");
    let host_a = lab.site("a").expect("a").host(0).expect("host");
    let host_b = lab.site("b").expect("b").host(0).expect("host");
    let socket_a: UdpSocket = host_a.udp_bind(40_000).expect("socket");
    let socket_b: UdpSocket = host_b.udp_bind(40_000).expect("socket");

    let local_a = SocketAddr::from((host_a.addr(), 40_000));
    let register_a = |tid, nonce: Option<&str>| {
        client::register(
            tid,
            &alice,
            nonce,
            &[local_a],
            NatClass::EndpointIndependent,
            2,
        )
    };
    // First contact: a signed Register without a nonce is answered with one (401,
    // authenticated), and nothing is registered yet.
    let challenge = exchange(&socket_a, to, &register_a([1; 12], None), &alice.password);
    assert_eq!(challenge.result, Err(401));
    let nonce_a = challenge
        .nonce
        .expect("an authenticated 401 carries a nonce");
    let ra = exchange(
        &socket_a,
        to,
        &register_a([6; 12], Some(&nonce_a)),
        &alice.password,
    );
    assert_eq!(ra.result, Ok(()));
    let nonce_a = ra.nonce.expect("every answer brings a fresh nonce");
    let mapped_a = ra.mapped.expect("mapped");
    assert_eq!(mapped_a.ip(), lab.site("a").expect("a").wan_addr());
    // The same signed Register replayed from another host (bob's, behind another
    // NAT) does not move alice's registration: the nonce belongs to alice's address.
    let replayed = exchange(
        &socket_b,
        to,
        &register_a([7; 12], Some(&nonce_a)),
        &alice.password,
    );
    assert_eq!(replayed.result, Err(438));
    let bob_challenge = exchange(
        &socket_b,
        to,
        &client::register(
            [2; 12],
            &bob,
            None,
            &[],
            NatClass::AddressAndPortDependent,
            2,
        ),
        &bob.password,
    );
    let nonce_b = bob_challenge.nonce.expect("nonce");
    let rb = exchange(
        &socket_b,
        to,
        &client::register(
            [8; 12],
            &bob,
            Some(&nonce_b),
            &[],
            NatClass::AddressAndPortDependent,
            2,
        ),
        &bob.password,
    );
    let mapped_b = rb.mapped.expect("mapped");
    let nonce_b = rb.nonce.expect("nonce");

    // Wrong password: refused, no state.
    let mut forged = bob.clone();
    forged.password = "guess".into();
    let refused = exchange(
        &socket_b,
        to,
        &client::connect([3; 12], &forged, Some(&nonce_b), "alice"),
        &forged.password,
    );
    assert_eq!(refused.result, Err(401));

    let connected = exchange(
        &socket_a,
        to,
        &client::connect([4; 12], &alice, Some(&nonce_a), "bob"),
        &alice.password,
    );
    assert_eq!(
        connected.result,
        Ok(()),
        "alice is still registered at her own address after the replay"
    );
    let nonce_a = connected.nonce.expect("nonce");
    let intro_id = connected.intro_id.expect("intro id");
    let mut buf = [0u8; 1500];
    socket_b
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let intro_b = loop {
        let (len, _) = socket_b
            .recv_from(&mut buf)
            .expect("bob gets an introduction through his NAT");
        if let Some(intro) = client::parse_introduction(&buf[..len], &bob.password) {
            break intro;
        }
    };
    assert_eq!(intro_b.intro_id, intro_id);
    assert_eq!(intro_b.role, Role::Responder);
    assert_eq!(intro_b.peer_id, "alice");
    assert_eq!(intro_b.candidates[0].kind, CandidateKind::ServerReflexive);
    assert_eq!(intro_b.candidates[0].addr, mapped_a);
    assert_eq!(intro_b.candidates[1].addr, local_a);
    assert_eq!(intro_b.peer_nat, NatClass::EndpointIndependent);
    assert_eq!(mapped_b.ip(), lab.site("b").expect("b").wan_addr());

    let reported = exchange(
        &socket_a,
        to,
        &client::outcome(
            [5; 12],
            &alice,
            Some(&nonce_a),
            intro_id,
            SessionOutcome::Direct,
            42,
            3,
        ),
        &alice.password,
    );
    assert_eq!(reported.result, Ok(()));
    let text = gateway.scrape().expect("scrape");
    let pair =
        "initiator_nat=\"endpoint_independent\",responder_nat=\"address_and_port_dependent\"";
    assert_eq!(
        metric_value(&text, "gateway_punch_attempts_total", pair),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        // The prometheus crate prints labels sorted by name.
        metric_value(
            &text,
            "gateway_punch_outcomes_total",
            "initiator_nat=\"endpoint_independent\",outcome=\"direct\",responder_nat=\"address_and_port_dependent\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&text, "gateway_registered_peers", ""),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "gateway_stun_datagrams_total",
            "outcome=\"unauthorized\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "gateway_stun_datagrams_total",
            "outcome=\"stale_nonce\""
        ),
        Some(3.0),
        "two first contacts and one replay"
    );
    std::fs::remove_file(&secret_path).ok();
}
