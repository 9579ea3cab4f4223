//! The rendezvous server's tests, driven through the test world of `rendezvous::sim`.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proptest::prelude::*;

use super::*;
use crate::rendezvous::client::{self, *};
use crate::sim::rendezvous::*;

/// The lab's layout: service on every address, a discovery socket on another port
/// of every address, one on another address and port.
fn discovery_world(unauthenticated: bool) -> World {
    let mut world = World::new();
    world.server.set_alternates(
        binding::Alternates::new(
            addr("0.0.0.0:3478"),
            vec![addr("0.0.0.0:3479"), addr("192.0.2.11:3480")],
        ),
        unauthenticated,
    );
    world
}

fn change(change_ip: bool, change_port: bool) -> binding::ChangeRequest {
    binding::ChangeRequest {
        change_ip,
        change_port,
    }
}

fn address_attr(datagram: &[u8], ty: u16) -> Option<SocketAddr> {
    Message::parse(datagram)
        .ok()?
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == ty)
        .and_then(|a| binding::decode_address(a.value))
}

#[test]
fn change_requests_are_answered_from_the_endpoint_asked_for() {
    let mut world = discovery_world(false);
    let alice = creds("alice");
    let home = addr("198.51.100.2:4000");
    let nonce = world.nonce(home);
    for (ip, port, endpoint, origin) in [
        (false, true, 0, "192.0.2.10:3479"),
        (true, true, 1, "192.0.2.11:3480"),
    ] {
        let request = change_request([4; 12], &alice, Some(&nonce), change(ip, port));
        let (handled, out) = world.send(home, &request);
        assert_eq!(handled, RendezvousHandled::ChangeAnswered);
        assert!(out.is_empty(), "nothing leaves from the service socket");
        let redirected: Vec<Redirected> = world.drain_redirected().collect();
        assert_eq!(redirected.len(), 1);
        let answer = &redirected[0];
        assert_eq!(answer.endpoint, endpoint);
        assert_eq!(answer.transmit.to, home);
        let response = parse_response(&answer.transmit.payload, &alice.password).expect("signed");
        assert_eq!((response.result, response.mapped), (Ok(()), Some(home)));
        let payload = &answer.transmit.payload;
        assert_eq!(
            address_attr(payload, binding::attr5780::RESPONSE_ORIGIN),
            Some(addr(origin))
        );
        assert_eq!(
            address_attr(payload, binding::attr5780::OTHER_ADDRESS),
            Some(addr("192.0.2.11:3480"))
        );
        assert!(payload.len() <= request.len(), "no amplification");
        assert!(payload.len() <= binding::MAX_CHANGE_RESPONSE);
    }
    // The wildcard endpoint sends from the address the request reached.
    let request = change_request([5; 12], &alice, Some(&nonce), change(false, true));
    world.send(home, &request);
    let redirected: Vec<Redirected> = world.drain_redirected().collect();
    assert_eq!(
        redirected[0].transmit.from_local,
        Some(IpAddr::from([192, 0, 2, 10]))
    );
    // No flag: answered from the service socket itself.
    let request = change_request([6; 12], &alice, Some(&nonce), change(false, false));
    let (handled, out) = world.send(home, &request);
    assert_eq!(handled, RendezvousHandled::ChangeAnswered);
    assert_eq!(out.len(), 1);
    assert_eq!(world.drain_redirected().count(), 0);
    // "Change IP" alone (same port, another address) has no endpoint here: 420,
    // signed, listing CHANGE-REQUEST.
    let request = change_request([7; 12], &alice, Some(&nonce), change(true, false));
    let (handled, out) = world.send(home, &request);
    assert_eq!(
        handled,
        RendezvousHandled::Binding(binding::Outcome::UnknownAttribute)
    );
    assert_eq!(world.drain_redirected().count(), 0);
    let response = parse_response(&out[0].payload, &alice.password).expect("signed");
    assert_eq!(response.result, Err(420));
    let unknown = Message::parse(&out[0].payload)
        .expect("reply")
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == stun_attr::UNKNOWN_ATTRIBUTES)
        .map(|a| a.value.to_vec());
    assert_eq!(unknown, Some(vec![0x00, 0x03, 0x00, 0x03]));
}

#[test]
fn a_gateway_without_discovery_endpoints_answers_change_requests_with_420() {
    let mut world = World::new();
    let alice = creds("alice");
    let home = addr("198.51.100.2:4000");
    let nonce = world.nonce(home);
    let request = change_request([4; 12], &alice, Some(&nonce), change(false, true));
    let (handled, out) = world.send(home, &request);
    assert_eq!(
        handled,
        RendezvousHandled::Binding(binding::Outcome::UnknownAttribute)
    );
    assert_eq!(
        parse_response(&out[0].payload, &alice.password).map(|r| r.result),
        Some(Err(420))
    );
    assert_eq!(world.drain_redirected().count(), 0);
}

fn unauthenticated_change_request(tid: [u8; 12], flags: binding::ChangeRequest) -> Vec<u8> {
    let mut request = Vec::new();
    let mut writer = MessageWriter::new(
        &mut request,
        MessageType {
            method: stun_method::BINDING,
            class: Class::Request,
        },
        tid,
    );
    writer.attribute(binding::attr5780::CHANGE_REQUEST, &flags.to_value());
    writer.finish_with_fingerprint();
    request
}

#[test]
fn change_requests_need_credentials_and_a_nonce_by_default() {
    let mut world = discovery_world(false);
    let victim = addr("198.51.100.99:53");
    // No credentials: a small 401 from the service socket, nothing redirected.
    let request = unauthenticated_change_request([1; 12], change(true, true));
    let (handled, out) = world.send(victim, &request);
    assert_eq!(handled, RendezvousHandled::Unauthorized);
    assert_eq!(world.drain_redirected().count(), 0);
    assert_eq!(out.len(), 1);
    // Header, ERROR-CODE 401 "Unauthorized", FINGERPRINT (and within the global
    // budget of unauthenticated replies).
    assert!(out[0].payload.len() <= 48, "{} bytes", out[0].payload.len());
    assert_eq!(
        parse_response(&out[0].payload, "").map(|r| r.result),
        Some(Err(401))
    );
    // A wrong password: the same.
    let mut forged = creds("alice");
    forged.password = "guess".into();
    let nonce = world.nonce(victim);
    let (handled, _) = world.send(
        victim,
        &change_request([2; 12], &forged, Some(&nonce), change(true, true)),
    );
    assert_eq!(handled, RendezvousHandled::Unauthorized);
    assert_eq!(world.drain_redirected().count(), 0);
    // Valid credentials but a nonce issued to another address (a replayed or
    // spoofed request): challenged, nothing redirected.
    let alice = creds("alice");
    let nonce = world.nonce(addr("198.51.100.2:4000"));
    let (handled, out) = world.send(
        victim,
        &change_request([3; 12], &alice, Some(&nonce), change(true, true)),
    );
    assert_eq!(handled, RendezvousHandled::StaleNonce);
    assert_eq!(world.drain_redirected().count(), 0);
    assert_eq!(
        parse_response(&out[0].payload, &alice.password).map(|r| r.result),
        Some(Err(438))
    );
    // A malformed CHANGE-REQUEST value: 400.
    let mut request = Vec::new();
    let mut writer = MessageWriter::new(
        &mut request,
        MessageType {
            method: stun_method::BINDING,
            class: Class::Request,
        },
        [4; 12],
    );
    writer.attribute(binding::attr5780::CHANGE_REQUEST, &[6]);
    writer.finish_with_fingerprint();
    assert_eq!(
        world.send(victim, &request).0,
        RendezvousHandled::BadRequest
    );
    assert_eq!(world.drain_redirected().count(), 0);
}

#[test]
fn unauthenticated_change_requests_only_when_the_operator_allows_them() {
    let mut world = discovery_world(true);
    let from = addr("198.51.100.2:4000");
    let request = unauthenticated_change_request([1; 12], change(true, true));
    let (handled, out) = world.send(from, &request);
    assert_eq!(handled, RendezvousHandled::ChangeAnswered);
    assert!(out.is_empty());
    let redirected: Vec<Redirected> = world.drain_redirected().collect();
    assert_eq!(redirected[0].endpoint, 1);
    let payload = &redirected[0].transmit.payload;
    assert_eq!(binding::parse_binding_success(payload, [1; 12]), Some(from));
    // Unsigned, and bounded: header, three IPv4 addresses, FINGERPRINT.
    assert_eq!(payload.len(), 20 + 3 * 12 + 8);
    // A request that carries credentials must still prove them.
    let mut forged = creds("alice");
    forged.password = "guess".into();
    let (handled, _) = world.send(
        from,
        &change_request([2; 12], &forged, None, change(true, true)),
    );
    assert_eq!(handled, RendezvousHandled::Unauthorized);
    // The unauthenticated answers share the global budget of unauthenticated
    // replies: a flood gets at most that many per second.
    let budget = RendezvousConfig::default().max_error_replies_per_second;
    let mut answered = 0;
    for _ in 0..budget + 50 {
        let (handled, _) = world.send(from, &request);
        answered += u32::from(handled == RendezvousHandled::ChangeAnswered);
    }
    assert!(answered < budget, "{answered} answered");
    assert_eq!(
        world.drain_redirected().count(),
        usize::try_from(answered).expect("count")
    );
}

proptest! {
    /// Whatever the flags and credentials, an answer to a CHANGE-REQUEST stays
    /// within the bound, and nothing is redirected without valid credentials.
    #[test]
    fn change_answers_are_bounded(
        ip in any::<bool>(),
        port in any::<bool>(),
        v6 in any::<bool>(),
        signed in any::<bool>(),
        peer in "[a-z]{1,12}",
    ) {
        let mut world = World::new();
        world.server.set_alternates(
            binding::Alternates::new(
                addr("[::]:3478"),
                vec![addr("[::]:3479"), addr("[2001:db8::11]:3480")],
            ),
            false,
        );
        let from = if v6 { addr("[2001:db8:1::2]:4000") } else { addr("198.51.100.2:4000") };
        let c = creds(&peer);
        let request = if signed {
            change_request([1; 12], &c, Some(&world.nonce(from)), change(ip, port))
        } else {
            unauthenticated_change_request([1; 12], change(ip, port))
        };
        let local = Some(if v6 { "2001:db8::10".parse().expect("ip") } else { IpAddr::from([192, 0, 2, 10]) });
        let (_, out) = world.deliver(NOW_UNIX, from, local, &request);
        let redirected: Vec<Redirected> = world.drain_redirected().collect();
        prop_assert!(signed || redirected.is_empty());
        for payload in out.iter().map(|t| &t.payload).chain(redirected.iter().map(|r| &r.transmit.payload)) {
            prop_assert!(payload.len() <= binding::MAX_CHANGE_RESPONSE, "{} bytes", payload.len());
        }
    }
}

#[test]
fn signed_requests_need_a_nonce_bound_to_the_sender_and_fresh() {
    let mut world = World::new();
    let alice = creds("alice");
    let home = addr("198.51.100.2:4000");
    let elsewhere = addr("203.0.113.66:4000");
    // First contact: an authenticated 401 carrying the nonce; no state.
    let (handled, out) = world.send(
        home,
        &register([1; 12], &alice, None, &[], NatClass::Unknown, 0),
    );
    assert_eq!(handled, RendezvousHandled::StaleNonce);
    let challenge = parse_response(&out[0].payload, &alice.password).expect("signed");
    assert_eq!(challenge.result, Err(401));
    let nonce = challenge.nonce.expect("nonce");
    assert_eq!(world.server.peer_count(), 0);
    // A forged password cannot extract a nonce-bearing answer.
    let mut forged = alice.clone();
    forged.password = "guess".into();
    let (handled, out) = world.send(
        home,
        &register([1; 12], &forged, None, &[], NatClass::Unknown, 0),
    );
    assert_eq!(handled, RendezvousHandled::Unauthorized);
    assert_eq!(
        parse_response(&out[0].payload, &alice.password).and_then(|r| r.nonce),
        None
    );
    // With the nonce: registered, and the answer brings the next nonce.
    let signed = register([2; 12], &alice, Some(&nonce), &[], NatClass::Unknown, 0);
    let (handled, out) = world.send(home, &signed);
    assert_eq!(handled, RendezvousHandled::Registered);
    let next = parse_response(&out[0].payload, &alice.password)
        .and_then(|r| r.nonce)
        .expect("fresh nonce");
    // The captured request replayed from elsewhere: 438, registration unmoved.
    let (handled, out) = world.send(elsewhere, &signed);
    assert_eq!(handled, RendezvousHandled::StaleNonce);
    assert_eq!(
        parse_response(&out[0].payload, &alice.password).map(|r| r.result),
        Some(Err(438))
    );
    assert_eq!(world.server.peers.get("alice").map(|p| p.addr), Some(home));
    // Nonces expire: the same request after the nonce lifetime gets 438 too.
    let later = NOW_UNIX + RendezvousConfig::default().nonce_lifetime.as_secs();
    let (handled, _) = world.deliver(
        later,
        home,
        None,
        &register([3; 12], &alice, Some(&next), &[], NatClass::Unknown, 0),
    );
    assert_eq!(handled, RendezvousHandled::StaleNonce);
}

#[test]
fn registration_needs_valid_credentials_and_creates_no_state_otherwise() {
    let mut world = World::new();
    let mut bad = creds("alice");
    bad.password = "wrong".into();
    let (handled, out) = world.send(
        addr("198.51.100.2:4000"),
        &register(
            [1; 12],
            &bad,
            Some(&world.nonce(addr("198.51.100.2:4000"))),
            &[],
            NatClass::Unknown,
            0,
        ),
    );
    assert_eq!(handled, RendezvousHandled::Unauthorized);
    assert_eq!(
        parse_response(&out[0].payload, "x").expect("error").result,
        Err(401)
    );
    let expired = secret().issue("alice", NOW_UNIX - 1).expect("issue");
    let expired = PeerCredentials {
        username: expired.username,
        password: expired.password,
    };
    let (handled, _) = world.send(
        addr("198.51.100.2:4000"),
        &register(
            [1; 12],
            &expired,
            Some(&world.nonce(addr("198.51.100.2:4000"))),
            &[],
            NatClass::Unknown,
            0,
        ),
    );
    assert_eq!(handled, RendezvousHandled::Unauthorized);
    assert_eq!(world.server.peer_count(), 0);
    world.register(
        "alice",
        addr("198.51.100.2:4000"),
        &[],
        NatClass::Unknown,
        0,
    );
    assert_eq!(world.server.peer_count(), 1);
}

#[test]
fn connect_introduces_both_sides_with_candidates_and_aligned_start() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    world.register(
        "alice",
        a,
        &[addr("10.0.1.2:4000")],
        NatClass::EndpointIndependent,
        40,
    );
    world.register(
        "bob",
        b,
        &[addr("10.0.2.2:5000")],
        NatClass::AddressAndPortDependent,
        100,
    );
    let alice = creds("alice");
    let (handled, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
    assert_eq!(handled, RendezvousHandled::Introduced);
    assert_eq!(
        out.len(),
        5,
        "two introductions, each sent twice, and the reply"
    );
    let to_alice = out
        .iter()
        .find(|t| t.to == a && parse_introduction(&t.payload, &alice.password).is_some())
        .expect("intro to alice");
    let to_bob = out.iter().find(|t| t.to == b).expect("intro to bob");
    let ia = parse_introduction(&to_alice.payload, &alice.password).expect("verifies");
    let ib = parse_introduction(&to_bob.payload, &creds("bob").password).expect("verifies");
    assert!(
        parse_introduction(&to_bob.payload, &alice.password).is_none(),
        "signed for bob only"
    );
    assert_eq!(ia.intro_id, ib.intro_id);
    assert_eq!(ia.probe_key, ib.probe_key);
    assert_eq!(ia.role, Role::Initiator);
    assert_eq!(ib.role, Role::Responder);
    assert_eq!(ia.peer_id, "bob");
    assert_eq!(
        ia.candidates[0],
        Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: b
        }
    );
    assert_eq!(
        ia.candidates[1],
        Candidate {
            kind: CandidateKind::Host,
            addr: addr("10.0.2.2:5000")
        }
    );
    assert_eq!(ib.candidates[0].addr, a);
    assert_eq!(
        to_bob.from_local,
        Some(IpAddr::from([192, 0, 2, 10])),
        "sent from where bob registered"
    );
    assert_eq!(ia.peer_nat, NatClass::AddressAndPortDependent);
    // Both start at max(RTT)/2 + 5 ms (the default margin) after the gateway sent: alice's one-way
    // delay is 20 ms, bob's 50 ms.
    assert_eq!(
        ia.start_delay + Duration::from_millis(20),
        Duration::from_millis(55)
    );
    assert_eq!(
        ib.start_delay + Duration::from_millis(50),
        Duration::from_millis(55)
    );
    let reply = out
        .iter()
        .find_map(|t| parse_response(&t.payload, &alice.password))
        .expect("reply");
    assert_eq!(reply.intro_id, Some(ia.intro_id));
    let events: Vec<RendezvousEvent> = world.drain_events().collect();
    assert_eq!(
        events,
        vec![RendezvousEvent::Introduced {
            initiator_nat: NatClass::EndpointIndependent,
            responder_nat: NatClass::AddressAndPortDependent
        }]
    );
}

#[test]
fn unauthenticated_error_replies_are_budgeted_per_source_and_in_total() {
    let mut world = World::new();
    let mut bad = creds("alice");
    bad.password = "wrong".into();
    let request = register([1; 12], &bad, None, &[], NatClass::Unknown, 0);
    // One source: its burst of 100, however many it sends.
    let mut replies = 0;
    for _ in 0..1_500 {
        let (handled, out) = world.send(addr("198.51.100.2:4000"), &request);
        assert_eq!(handled, RendezvousHandled::Unauthorized);
        replies += out.len();
    }
    assert_eq!(replies, 100);
    // Many (forged) sources: the total of 1,000 per second in all.
    let limit = RendezvousConfig::default().max_error_replies_per_second as usize;
    let mut replies = 0;
    for i in 0..5_000u32 {
        let from = SocketAddr::new(IpAddr::from((0x0A00_0000 + i).to_be_bytes()), 4000);
        replies += world.send(from, &request).1.len();
    }
    assert_eq!(replies, limit - 100);
    world.now += Duration::from_secs(1);
    assert_eq!(
        world.send(addr("198.51.100.3:4000"), &request).1.len(),
        1,
        "budget refilled"
    );
    assert_eq!(world.server.peer_count(), 0);
}

#[test]
fn signed_requests_without_a_nonce_get_their_401_within_a_per_source_budget() {
    let mut world = World::new();
    let alice = creds("alice");
    let victim = addr("198.51.100.77:4000");
    // Anyone with a credential can sign a nonce-less Register from a forged source:
    // the (larger) 401 Nonce Required answers are bounded per source.
    let request = register([1; 12], &alice, None, &[], NatClass::Unknown, 0);
    let mut replies = 0;
    for _ in 0..2_500 {
        let (handled, out) = world.send(victim, &request);
        assert_eq!(handled, RendezvousHandled::StaleNonce);
        replies += out.len();
    }
    assert_eq!(replies, 100);
    // Another source is answered, and the victim again once its bucket refills.
    assert_eq!(world.send(addr("198.51.100.78:4000"), &request).1.len(), 1);
    world.now += Duration::from_secs(1);
    let (_, out) = world.send(victim, &request);
    assert_eq!(out.len(), 1);
}

#[test]
fn binding_answers_are_budgeted_per_source() {
    let mut world = World::new();
    let mut request = Vec::new();
    binding::binding_request([9; 12], &mut request);
    let from = addr("198.51.100.5:4000");
    let mut answered = 0;
    for _ in 0..300 {
        let (handled, out) = world.send(from, &request);
        if out.is_empty() {
            assert_eq!(
                handled,
                RendezvousHandled::Binding(binding::Outcome::Throttled)
            );
        } else {
            assert_eq!(
                handled,
                RendezvousHandled::Binding(binding::Outcome::BindingSuccess)
            );
        }
        answered += out.len();
    }
    assert_eq!(answered, 100, "a burst of 300 from one source");
    // Others are answered meanwhile; the source again after a second (its rate).
    assert_eq!(world.send(addr("198.51.100.6:4000"), &request).1.len(), 1);
    world.now += Duration::from_secs(1);
    let answered: usize = (0..300).map(|_| world.send(from, &request).1.len()).sum();
    assert_eq!(answered, 50);
}

#[test]
fn with_the_same_group_policy_peers_meet_only_their_group() {
    let mut world = World::configured(
        7,
        RendezvousConfig {
            connect_policy: ConnectPolicy::SameGroup,
            ..RendezvousConfig::default()
        },
    );
    let peers = [
        ("red/alice", "198.51.100.2:4000"),
        ("red/bob", "198.51.100.3:4000"),
        ("blue/carol", "198.51.100.4:4000"),
        ("dave", "198.51.100.5:4000"),
        ("erin", "198.51.100.6:4000"),
    ];
    for (peer, at) in peers {
        world.register(peer, addr(at), &[], NatClass::Unknown, 0);
    }
    let connect_from = |world: &mut World, from: &str, to: &str| {
        let at = addr(peers.iter().find(|(p, _)| *p == from).expect("known").1);
        let request = connect([2; 12], &creds(from), Some(&world.nonce(at)), to);
        world.send(at, &request).0
    };
    assert_eq!(
        connect_from(&mut world, "red/alice", "red/bob"),
        RendezvousHandled::Introduced
    );
    // Across groups, or without one: as if the peer did not exist.
    for (from, to) in [
        ("red/alice", "blue/carol"),
        ("blue/carol", "red/bob"),
        ("red/alice", "dave"),
        ("dave", "erin"),
        ("dave", "red/alice"),
        ("red/alice", "red/nobody"),
    ] {
        assert_eq!(
            connect_from(&mut world, from, to),
            RendezvousHandled::NotFound,
            "{from} -> {to}"
        );
    }
    // The default policy introduces anyone to anyone.
    assert!(ConnectPolicy::Any.allows("dave", "blue/carol"));
}

#[test]
fn connect_refusals() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    world.register("alice", a, &[], NatClass::Unknown, 0);
    let alice = creds("alice");
    assert_eq!(
        world
            .send(
                a,
                &connect([2; 12], &alice, Some(&world.nonce(a)), "nobody")
            )
            .0,
        RendezvousHandled::NotFound
    );
    assert_eq!(
        world
            .send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "alice"))
            .0,
        RendezvousHandled::NotFound
    );
    // Valid credentials from another address than the registration: 403.
    assert_eq!(
        world
            .send(
                addr("203.0.113.9:1"),
                &connect(
                    [2; 12],
                    &alice,
                    Some(&world.nonce(addr("203.0.113.9:1"))),
                    "alice"
                )
            )
            .0,
        RendezvousHandled::Forbidden
    );
    // An unregistered peer cannot ask.
    let carol = creds("carol");
    assert_eq!(
        world
            .send(
                addr("203.0.113.9:1"),
                &connect(
                    [2; 12],
                    &carol,
                    Some(&world.nonce(addr("203.0.113.9:1"))),
                    "alice"
                )
            )
            .0,
        RendezvousHandled::Forbidden
    );
}

#[test]
fn connects_are_rate_limited_per_peer() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    world.register("alice", a, &[], NatClass::Unknown, 0);
    world.register("bob", b, &[], NatClass::Unknown, 0);
    let alice = creds("alice");
    let limit = RendezvousConfig::default().max_connects_per_second;
    let mut introduced = 0;
    for _ in 0..limit + 5 {
        if world
            .send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"))
            .0
            == RendezvousHandled::Introduced
        {
            introduced += 1;
        }
    }
    assert_eq!(introduced, limit);
    world.now += Duration::from_secs(1);
    assert_eq!(
        world
            .send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"))
            .0,
        RendezvousHandled::Introduced
    );
}

#[test]
fn tcp_candidates_pass_on_only_from_the_registering_address_and_first() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    let tcp = |addr| Candidate {
        kind: CandidateKind::TcpServerReflexive,
        addr,
    };
    let host = |addr| Candidate {
        kind: CandidateKind::Host,
        addr,
    };
    // Alice announces her TCP mapping (same public address as her UDP one), a
    // TCP "mapping" on a third party's address, and seven host candidates.
    let mut candidates = vec![tcp(addr("198.51.100.2:4100")), tcp(addr("203.0.113.99:80"))];
    candidates.extend((0..5).map(|i| host(addr(&format!("10.0.1.2:{}", 4000 + i)))));
    let alice = creds("alice");
    let (handled, _) = world.send(
        a,
        &register_with_candidates(
            [1; 12],
            &alice,
            Some(&world.nonce(a)),
            &candidates,
            NatClass::EndpointIndependent,
            0,
        ),
    );
    assert_eq!(handled, RendezvousHandled::Registered);
    world.register("bob", b, &[], NatClass::None, 0);
    let bob = creds("bob");
    let (_, out) = world.send(b, &connect([2; 12], &bob, Some(&world.nonce(b)), "alice"));
    let intro = out
        .iter()
        .filter(|t| t.to == b)
        .find_map(|t| parse_introduction(&t.payload, &bob.password))
        .expect("bob's introduction");
    let kinds: Vec<CandidateKind> = intro.candidates.iter().map(|c| c.kind).collect();
    assert_eq!(kinds[0], CandidateKind::ServerReflexive);
    assert_eq!(
        intro.candidates[1],
        tcp(addr("198.51.100.2:4100")),
        "the TCP candidate comes right after the reflexive one"
    );
    assert!(
        !intro
            .candidates
            .iter()
            .any(|c| c.addr.ip() == addr("203.0.113.99:80").ip()),
        "a TCP candidate on another address than the sender's is dropped"
    );
    assert_eq!(intro.candidates.len(), 7);
}

#[test]
fn tcp_mapped_candidates_pass_on_unchecked_but_only_on_the_senders_address() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    let candidate = |kind, addr| Candidate { kind, addr };
    let reflexive = candidate(CandidateKind::TcpServerReflexive, addr("198.51.100.2:4100"));
    let mapped = candidate(CandidateKind::TcpMapped, addr("198.51.100.2:40000"));
    // A TCP mapping on a third party's address: dropped like a TCP reflexive one.
    let elsewhere = candidate(CandidateKind::TcpMapped, addr("203.0.113.99:80"));
    let alice = creds("alice");
    let (handled, out) = world.send(
        a,
        &register_with_candidates(
            [1; 12],
            &alice,
            Some(&world.nonce(a)),
            &[reflexive, mapped, elsewhere],
            NatClass::EndpointIndependent,
            0,
        ),
    );
    assert_eq!(handled, RendezvousHandled::Registered);
    // No Mapped-Check probe goes out for a TCP mapped candidate.
    assert!(out.iter().all(|t| t.to == a), "{out:?}");
    world.register("bob", b, &[], NatClass::None, 0);
    let bob = creds("bob");
    let (_, out) = world.send(b, &connect([2; 12], &bob, Some(&world.nonce(b)), "alice"));
    let intro = out
        .iter()
        .filter(|t| t.to == b)
        .find_map(|t| parse_introduction(&t.payload, &bob.password))
        .expect("bob's introduction");
    let tcp: Vec<Candidate> = intro
        .candidates
        .iter()
        .filter(|c| c.kind.is_tcp())
        .copied()
        .collect();
    assert_eq!(tcp, [reflexive, mapped], "introduced at once, in order");
}

#[test]
fn tcp_outcomes_count_once_per_technique_and_leave_the_udp_outcome_alone() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    let m = addr("203.0.113.5:6000");
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    world.register("bob", b, &[], NatClass::None, 0);
    world.register("mallory", m, &[], NatClass::None, 0);
    let alice = creds("alice");
    let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
    let intro = out
        .iter()
        .find_map(|t| parse_response(&t.payload, &alice.password))
        .and_then(|r| r.intro_id)
        .expect("id");
    world.drain_events().for_each(drop);
    let report = |world: &World, who: &str, from, technique, connected| {
        tcp_outcome(
            [4; 12],
            &creds(who),
            Some(&world.nonce(from)),
            intro,
            TcpReport {
                technique,
                connected,
                elapsed_ms: 200,
                attempts: 2,
            },
        )
    };
    let so = TcpTechnique::SimultaneousOpen;
    let low = TcpTechnique::LowTtl;
    // Not a side of the introduction: nothing.
    let spoofed = report(&world, "mallory", m, so, true);
    assert_eq!(world.send(m, &spoofed).0, RendezvousHandled::NotFound);
    let first = report(&world, "alice", a, so, false);
    assert_eq!(world.send(a, &first).0, RendezvousHandled::OutcomeAccepted);
    let again = report(&world, "alice", a, so, true);
    assert_eq!(
        world.send(a, &again).0,
        RendezvousHandled::NotFound,
        "duplicate"
    );
    let other_side = report(&world, "bob", b, so, false);
    assert_eq!(
        world.send(b, &other_side).0,
        RendezvousHandled::OutcomeAccepted
    );
    let second_technique = report(&world, "bob", b, low, true);
    assert_eq!(
        world.send(b, &second_technique).0,
        RendezvousHandled::OutcomeAccepted
    );
    // The UDP outcome is still open.
    let udp = outcome(
        [5; 12],
        &alice,
        Some(&world.nonce(a)),
        intro,
        SessionOutcome::Direct,
        20,
        3,
    );
    assert_eq!(world.send(a, &udp).0, RendezvousHandled::OutcomeAccepted);
    let events: Vec<RendezvousEvent> = world.drain_events().collect();
    assert_eq!(
        events,
        vec![
            RendezvousEvent::TcpOutcome {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::None,
                technique: so,
                success: false
            },
            RendezvousEvent::TcpOutcome {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::None,
                technique: low,
                success: true
            },
            RendezvousEvent::Outcome {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::None,
                direct: true,
                relayed: false,
                time_to_direct: Duration::from_millis(20),
                probes: 3,
                mapped: false,
            }
        ]
    );
    // An unknown technique is a bad request.
    let bad = {
        let c = creds("alice");
        client::request(method::OUTCOME, [6; 12], &c, Some(&world.nonce(a)), |w| {
            w.attribute(attr::INTRO_ID, &intro.to_be_bytes());
            w.attribute(attr::OUTCOME, &[0; 9]);
            w.attribute(attr::TECHNIQUE, &[9]);
        })
    };
    assert_eq!(world.send(a, &bad).0, RendezvousHandled::BadRequest);
}

#[test]
fn tcp_seq_is_forwarded_once_per_side_signed_for_the_other_side_only() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    let m = addr("203.0.113.5:6000");
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    world.register("bob", b, &[], NatClass::None, 0);
    world.register("mallory", m, &[], NatClass::None, 0);
    let alice = creds("alice");
    let bob = creds("bob");
    let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
    let intro = out
        .iter()
        .find_map(|t| parse_response(&t.payload, &alice.password))
        .and_then(|r| r.intro_id)
        .expect("id");
    let expected = addr("198.51.100.6:5100");
    let seq = |world: &World, who: &str, from, intro_id, isn| {
        tcp_seq(
            [7; 12],
            &creds(who),
            Some(&world.nonce(from)),
            intro_id,
            isn,
            Some(expected),
            false,
        )
    };
    // Not a side, or an unknown introduction: refused, nothing forwarded.
    let (handled, out) = world.send(m, &seq(&world, "mallory", m, intro, 1));
    assert_eq!(handled, RendezvousHandled::NotFound);
    assert!(out.iter().all(|t| t.to == m));
    let (handled, out) = world.send(a, &seq(&world, "alice", a, intro ^ 1, 1));
    assert_eq!(handled, RendezvousHandled::NotFound);
    assert!(out.iter().all(|t| t.to == a));
    // From another address than the registration: forbidden.
    let elsewhere = addr("198.51.100.2:4001");
    let (handled, _) = world.send(elsewhere, &seq(&world, "alice", elsewhere, intro, 1));
    assert_eq!(handled, RendezvousHandled::Forbidden);
    // Alice's ISN reaches bob, signed for him (not for alice).
    let (handled, out) = world.send(a, &seq(&world, "alice", a, intro, 0xDEAD_BEEF));
    assert_eq!(handled, RendezvousHandled::TcpSeqForwarded);
    let to_bob: Vec<_> = out.iter().filter(|t| t.to == b).collect();
    assert_eq!(to_bob.len(), 2, "sent twice");
    let forwarded = parse_tcp_seq(&to_bob[0].payload, &bob.password).expect("signed for bob");
    assert_eq!(
        forwarded,
        TcpSeq {
            intro_id: intro,
            peer_id: "alice".into(),
            isn: 0xDEAD_BEEF,
            expected: Some(expected),
        }
    );
    assert!(parse_tcp_seq(&to_bob[0].payload, &alice.password).is_none());
    assert!(out.iter().filter(|t| t.to == a).any(|t| {
        parse_response(&t.payload, &alice.password).is_some_and(|r| r.result.is_ok())
    }));
    // Once per side.
    let (handled, out) = world.send(a, &seq(&world, "alice", a, intro, 2));
    assert_eq!(handled, RendezvousHandled::NotFound);
    assert!(out.iter().all(|t| t.to == a));
    // Bob's own goes to alice.
    let (handled, out) = world.send(b, &seq(&world, "bob", b, intro, 7));
    assert_eq!(handled, RendezvousHandled::TcpSeqForwarded);
    assert!(out.iter().filter(|t| t.to == a).any(|t| {
        parse_tcp_seq(&t.payload, &alice.password).is_some_and(|s| s.isn == 7 && s.peer_id == "bob")
    }));
    // Without an ISN: a bad request.
    let bad = client::request(method::TCP_SEQ, [8; 12], &bob, Some(&world.nonce(b)), |w| {
        w.attribute(attr::INTRO_ID, &intro.to_be_bytes());
    });
    assert_eq!(world.send(b, &bad).0, RendezvousHandled::BadRequest);
}

#[test]
fn outcome_reports_count_once_and_only_from_the_sides() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    world.register("bob", b, &[], NatClass::None, 0);
    world.register("mallory", addr("203.0.113.5:6000"), &[], NatClass::None, 0);
    let alice = creds("alice");
    let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
    let intro = out
        .iter()
        .find_map(|t| parse_response(&t.payload, &alice.password))
        .and_then(|r| r.intro_id)
        .expect("id");
    world.drain_events().for_each(drop);
    let mallory = creds("mallory");
    assert_eq!(
        world
            .send(
                addr("203.0.113.5:6000"),
                &outcome(
                    [3; 12],
                    &mallory,
                    Some(&world.nonce(addr("203.0.113.5:6000"))),
                    intro,
                    SessionOutcome::Direct,
                    5,
                    1
                )
            )
            .0,
        RendezvousHandled::NotFound
    );
    assert_eq!(
        world
            .send(
                a,
                &outcome(
                    [3; 12],
                    &alice,
                    Some(&world.nonce(a)),
                    intro + 1,
                    SessionOutcome::Direct,
                    5,
                    1
                )
            )
            .0,
        RendezvousHandled::NotFound
    );
    assert_eq!(
        world
            .send(
                a,
                &outcome(
                    [3; 12],
                    &alice,
                    Some(&world.nonce(a)),
                    intro,
                    SessionOutcome::Direct,
                    35,
                    4
                )
            )
            .0,
        RendezvousHandled::OutcomeAccepted
    );
    assert_eq!(
        world
            .send(
                a,
                &outcome(
                    [3; 12],
                    &alice,
                    Some(&world.nonce(a)),
                    intro,
                    SessionOutcome::Direct,
                    35,
                    4
                )
            )
            .0,
        RendezvousHandled::NotFound,
        "replay"
    );
    assert_eq!(
        world
            .send(
                b,
                &outcome(
                    [3; 12],
                    &creds("bob"),
                    Some(&world.nonce(b)),
                    intro,
                    SessionOutcome::Direct,
                    30,
                    4
                )
            )
            .0,
        RendezvousHandled::OutcomeAccepted
    );
    let events: Vec<RendezvousEvent> = world.drain_events().collect();
    assert_eq!(
        events,
        vec![RendezvousEvent::Outcome {
            initiator_nat: NatClass::EndpointIndependent,
            responder_nat: NatClass::None,
            direct: true,
            relayed: false,
            time_to_direct: Duration::from_millis(35),
            probes: 4,
            mapped: false,
        }],
        "one outcome per introduction"
    );
}

#[test]
fn introductions_are_forgotten_after_their_memory_even_when_idle() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    world.register("bob", b, &[], NatClass::None, 0);
    let alice = creds("alice");
    let (handled, _) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
    assert_eq!(handled, RendezvousHandled::Introduced);
    assert_eq!(world.server.intros.len(), 1);
    // A sweep stamps it; the peers leave; a timer still comes for the introduction.
    let t0 = world.now;
    world.server.handle_timeout(t0, NOW_UNIX);
    world
        .server
        .handle_timeout(t0 + Duration::from_secs(61), NOW_UNIX);
    assert_eq!(world.server.peer_count(), 0);
    assert_eq!(world.server.intros.len(), 1, "kept for its reports");
    assert_eq!(
        world.server.poll_timeout(),
        Some(t0 + INTRODUCTION_MEMORY),
        "idle, yet the introduction's end is a timer"
    );
    world
        .server
        .handle_timeout(t0 + INTRODUCTION_MEMORY, NOW_UNIX);
    assert!(world.server.intros.is_empty() && world.server.intro_order.is_empty());
    assert_eq!(world.server.poll_timeout(), None);
}

#[test]
fn silent_peers_expire() {
    let mut world = World::new();
    world.register(
        "alice",
        addr("198.51.100.2:4000"),
        &[],
        NatClass::Unknown,
        0,
    );
    let deadline = world.server.poll_timeout().expect("sweep armed");
    world.server.handle_timeout(deadline, NOW_UNIX);
    assert_eq!(world.server.peer_count(), 1);
    world
        .server
        .handle_timeout(world.now + Duration::from_secs(61), NOW_UNIX);
    assert_eq!(world.server.peer_count(), 0);
    assert_eq!(world.server.poll_timeout(), None);
}

proptest! {
    #[test]
    fn any_datagram_is_handled_without_panic_or_state(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut world = World::new();
        let (_, out) = world.send(addr("198.51.100.2:4000"), &bytes);
        prop_assert_eq!(world.server.peer_count(), 0);
        for t in out {
            prop_assert!(t.payload.len() <= 96);
        }
    }
}

#[test]
fn draining_refuses_newcomers_and_keeps_registered_peers_introducible() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    world.register("bob", b, &[], NatClass::EndpointIndependent, 0);
    let alternate = addr("203.0.113.9:3478");
    world.server.set_draining(Some(crate::drain::Draining {
        alternate: Some(alternate),
    }));
    assert!(world.server.is_draining());
    // A registered peer's refresh still succeeds, even from a new address.
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    // A new peer id is sent to the other node, in a signed answer.
    let c = addr("198.51.100.9:6000");
    let carol = creds("carol");
    let request = register(
        [3; 12],
        &carol,
        Some(&world.nonce(c)),
        &[],
        NatClass::None,
        0,
    );
    let (handled, out) = world.send(c, &request);
    assert_eq!(handled, RendezvousHandled::Draining);
    let response = parse_response(&out[0].payload, &carol.password).expect("signed");
    assert_eq!(response.result, Err(300));
    assert_eq!(
        address_attr(&out[0].payload, crate::stun::attr::ALTERNATE_SERVER),
        Some(alternate)
    );
    assert_eq!(world.server.peer_count(), 2, "nothing registered");
    // Registered peers are still introduced to each other.
    let alice = creds("alice");
    let (handled, _) = world.send(a, &connect([4; 12], &alice, Some(&world.nonce(a)), "bob"));
    assert_eq!(handled, RendezvousHandled::Introduced);
    // Without an alternate: 503 "Draining".
    world
        .server
        .set_draining(Some(crate::drain::Draining { alternate: None }));
    let (handled, out) = world.send(c, &request);
    assert_eq!(handled, RendezvousHandled::Draining);
    let response = parse_response(&out[0].payload, &carol.password).expect("signed");
    assert_eq!(response.result, Err(503));
    assert_eq!(
        address_attr(&out[0].payload, crate::stun::attr::ALTERNATE_SERVER),
        None
    );
    world.server.set_draining(None);
    world.register("carol", c, &[], NatClass::None, 0);
}

#[test]
fn a_rotated_secret_keeps_registrations_and_signs_for_each_peer_with_its_own() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    let old = b"operator secret";
    let new = SharedSecret::new(b"next secret").with_previous(old);
    world.server.set_secret(new.clone());
    let issued = new.issue("bob", NOW_UNIX + 3600).expect("issue");
    let bob = PeerCredentials {
        username: issued.username,
        password: issued.password,
    };
    let request = register([5; 12], &bob, Some(&world.nonce(b)), &[], NatClass::None, 0);
    assert_eq!(world.send(b, &request).0, RendezvousHandled::Registered);
    // Another rotation moves alice's secret to a new place in the list.
    let newer = SharedSecret::new(b"third secret")
        .with_previous(b"next secret")
        .with_previous(old);
    world.server.set_secret(newer);
    let alice = creds("alice");
    let (handled, out) = world.send(a, &connect([6; 12], &alice, Some(&world.nonce(a)), "bob"));
    assert_eq!(handled, RendezvousHandled::Introduced);
    assert!(
        out.iter()
            .any(|t| t.to == a && parse_introduction(&t.payload, &alice.password).is_some()),
        "alice's introduction is signed with her (old) secret's password"
    );
    assert!(
        out.iter()
            .any(|t| t.to == b && parse_introduction(&t.payload, &bob.password).is_some()),
        "bob's with his (newer) secret's password"
    );
    // Alice's refresh is accepted under the old secret still.
    world.register("alice", a, &[], NatClass::EndpointIndependent, 0);
    // Once the old secret goes, alice's credentials stop working.
    world
        .server
        .set_secret(SharedSecret::new(b"third secret").with_previous(b"next secret"));
    let request = register(
        [7; 12],
        &alice,
        Some(&world.nonce(a)),
        &[],
        NatClass::None,
        0,
    );
    assert_eq!(world.send(a, &request).0, RendezvousHandled::Unauthorized);
}

/// Hands `datagram` from `from` over `transport` to the server (received on
/// 192.0.2.10); what became of it and everything it queued for the service.
fn send_over(
    world: &mut World,
    from: SocketAddr,
    transport: Transport,
    datagram: &[u8],
) -> (RendezvousHandled, Vec<Transmit>) {
    let local = Some(IpAddr::from([192, 0, 2, 10]));
    let now = world.now;
    let handled = world
        .server
        .handle_message(now, NOW_UNIX, from, transport, local, datagram);
    (handled, world.collect())
}

#[test]
fn a_registration_over_a_stream_gets_its_answers_and_introductions_on_it() {
    let mut world = World::new();
    // Alice registers over TLS, bob over UDP, carol over TCP from bob's address and
    // port number (another socket: TCP and UDP ports are separate).
    let a = addr("198.51.100.2:4000");
    let b = addr("198.51.100.6:5000");
    let alice = creds("alice");
    let bob = creds("bob");
    let carol = creds("carol");
    let register_a = register(
        [1; 12],
        &alice,
        Some(&world.nonce(a)),
        &[],
        NatClass::Unknown,
        0,
    );
    let (handled, out) = send_over(&mut world, a, Transport::Tls, &register_a);
    assert_eq!(handled, RendezvousHandled::Registered);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].to, out[0].transport), (a, Transport::Tls));
    world.register("bob", b, &[], NatClass::Unknown, 0);
    let register_c = register(
        [2; 12],
        &carol,
        Some(&world.nonce(b)),
        &[],
        NatClass::Unknown,
        0,
    );
    let (_, out) = send_over(&mut world, b, Transport::Tcp, &register_c);
    assert_eq!(
        out[0].transport,
        Transport::Tcp,
        "the answer on carol's connection"
    );
    // Bob (UDP) connects to alice: alice's introduction goes on her TLS connection,
    // once (a stream does not lose it); bob's and the answer over UDP, as before.
    let (handled, out) = world.send(b, &connect([3; 12], &bob, Some(&world.nonce(b)), "alice"));
    assert_eq!(handled, RendezvousHandled::Introduced);
    let to_alice: Vec<&Transmit> = out.iter().filter(|t| t.to == a).collect();
    assert_eq!(to_alice.len(), 1, "{out:?}");
    assert_eq!(to_alice[0].transport, Transport::Tls);
    assert!(parse_introduction(&to_alice[0].payload, &alice.password).is_some());
    let to_bob: Vec<&Transmit> = out.iter().filter(|t| t.to == b).collect();
    assert_eq!(to_bob.len(), 3, "two introductions and the answer");
    assert!(to_bob.iter().all(|t| t.transport == Transport::Udp));
    // Alice connects to carol over her stream: the answer and her introduction on
    // TLS, carol's on TCP, nothing over UDP.
    let request = connect([4; 12], &alice, Some(&world.nonce(a)), "carol");
    let (handled, out) = send_over(&mut world, a, Transport::Tls, &request);
    assert_eq!(handled, RendezvousHandled::Introduced);
    assert_eq!(out.len(), 3, "{out:?}");
    for transmit in &out {
        let expected = if transmit.to == a {
            Transport::Tls
        } else {
            Transport::Tcp
        };
        assert_eq!(transmit.transport, expected, "{transmit:?}");
    }
    // The same address over another transport does not speak for a registration:
    // alice's Connect over UDP from her TLS address is refused.
    let (handled, out) = world.send(a, &connect([5; 12], &alice, Some(&world.nonce(a)), "bob"));
    assert_eq!(handled, RendezvousHandled::Forbidden);
    assert_eq!(
        out[0].transport,
        Transport::Udp,
        "answered where it came from"
    );
}

#[test]
fn a_closed_connection_takes_its_registration_with_it() {
    let mut world = World::new();
    let a = addr("198.51.100.2:4000");
    let alice = creds("alice");
    let register_a = register(
        [1; 12],
        &alice,
        Some(&world.nonce(a)),
        &[],
        NatClass::Unknown,
        0,
    );
    send_over(&mut world, a, Transport::Tls, &register_a);
    assert_eq!(world.server.peer_count(), 1);
    // Another connection (or the same address over TCP) closing changes nothing.
    assert!(!world.server.connection_closed(a, Transport::Tcp));
    assert!(
        !world
            .server
            .connection_closed(addr("198.51.100.2:4001"), Transport::Tls)
    );
    assert_eq!(world.server.peer_count(), 1);
    assert!(world.server.connection_closed(a, Transport::Tls));
    assert_eq!(world.server.peer_count(), 0);
    // Registered over TLS, then over UDP from elsewhere: the old connection's close
    // leaves the new registration alone.
    send_over(&mut world, a, Transport::Tls, &register_a);
    let b = addr("198.51.100.2:5000");
    world.register("alice", b, &[], NatClass::Unknown, 0);
    assert!(!world.server.connection_closed(a, Transport::Tls));
    assert_eq!(world.server.peer_count(), 1);
    // Nothing is remembered per UDP registration.
    assert!(world.server.stream_peers.is_empty());
}
