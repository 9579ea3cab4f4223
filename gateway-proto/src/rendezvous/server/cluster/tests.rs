//! The cluster half of the rendezvous server, tested on nodes joined by the
//! in-memory store of `sim::cluster`.
use std::{net::SocketAddr, time::Duration};

use proptest::prelude::*;

use super::*;
use crate::{
    rendezvous::{
        client::{self, *},
        cluster::{ClusterRequest, cross_node_start_delays},
        wire::{Candidate, CandidateKind, NatClass},
    },
    sim::{
        cluster::{ClusterSim, Sent, node_name},
        rendezvous::{NOW_UNIX, World, addr, creds},
    },
    stun::Message,
};

const ALICE: &str = "198.51.100.2:4000";
const BOB: &str = "198.51.100.6:5000";

fn host(a: &str) -> Candidate {
    Candidate {
        kind: CandidateKind::Host,
        addr: addr(a),
    }
}

fn tcp(a: &str) -> Candidate {
    Candidate {
        kind: CandidateKind::TcpServerReflexive,
        addr: addr(a),
    }
}

/// Alice on node 0 (RTT 40 ms), bob on node 1 (RTT 100 ms, a TCP mapping), with
/// a 10 ms transit between the nodes.
fn two_nodes() -> ClusterSim {
    let mut sim = ClusterSim::new(2);
    for node in &mut sim.nodes {
        node.server.set_cluster_transit(Duration::from_millis(10));
    }
    sim.register(
        0,
        "alice",
        addr(ALICE),
        &[host("10.0.1.2:4000")],
        NatClass::EndpointIndependent,
        40,
    );
    sim.register(
        1,
        "bob",
        addr(BOB),
        &[host("10.0.2.2:5000"), tcp("198.51.100.6:5001")],
        NatClass::AddressAndPortDependent,
        100,
    );
    sim.take_events(0);
    sim.take_events(1);
    sim
}

/// `peer` (from `from`, on `node`) asks to be introduced to `target`.
fn connect_from(
    sim: &mut ClusterSim,
    node: usize,
    peer: &str,
    from: &str,
    target: &str,
) -> RendezvousHandled {
    let nonce = sim.nonce(node, addr(from));
    sim.send(
        node,
        addr(from),
        &connect([2; 12], &creds(peer), Some(&nonce), target),
    )
}

/// The one answer among `out` that verifies for `peer`.
fn response_for(out: &[Transmit], peer: &str) -> client::Response {
    let password = creds(peer).password;
    let answers: Vec<_> = out
        .iter()
        .filter_map(|t| parse_response(&t.payload, &password))
        .collect();
    assert_eq!(answers.len(), 1, "one answer: {answers:?}");
    answers[0].clone()
}

/// The introductions among `out` to `peer`, checked to be one, sent twice.
fn introduction_for(out: &[Transmit], peer: &str, at: &str) -> Introduction {
    let password = creds(peer).password;
    let intros: Vec<_> = out
        .iter()
        .filter(|t| t.to == addr(at))
        .filter_map(|t| parse_introduction(&t.payload, &password))
        .collect();
    assert_eq!(intros.len(), 2, "sent twice to {peer}");
    assert_eq!(intros[0], intros[1]);
    intros[0].clone()
}

/// The reason phrase of an error answer.
fn reason(payload: &[u8]) -> String {
    let message = Message::parse(payload).expect("stun");
    let value = message
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == stun_attr::ERROR_CODE)
        .expect("error code")
        .value;
    String::from_utf8(crate::stun::error_reason(value).to_vec()).expect("utf-8")
}

/// Alice (node 0) connects to bob (node 1); returns the introduction id.
fn introduce(sim: &mut ClusterSim) -> u64 {
    assert_eq!(
        connect_from(sim, 0, "alice", ALICE, "bob"),
        RendezvousHandled::Locating
    );
    let reply = response_for(&sim.take(0), "alice");
    sim.take(1);
    sim.take_events(0);
    reply.intro_id.expect("introduced")
}

#[test]
fn registrations_are_stored_for_the_other_nodes() {
    let sim = two_nodes();
    let bob = sim.stored("bob").expect("stored");
    assert_eq!(
        bob,
        PeerEntry {
            peer_id: "bob".into(),
            node: node_name(1),
            addr: addr(BOB),
            expiry_unix: NOW_UNIX + 3600,
            candidates: vec![host("10.0.2.2:5000"), tcp("198.51.100.6:5001")],
            nat: NatClass::AddressAndPortDependent,
            rtt_ms: 100,
            registered_unix_ms: NOW_UNIX * 1000,
        }
    );
    assert_eq!(sim.stored("alice").map(|e| e.node), Some(node_name(0)));
}

#[test]
fn a_cross_node_introduction_reaches_both_sides_with_aligned_starts() {
    let mut sim = two_nodes();
    // The store is slow: the Connect waits, unanswered.
    sim.answering = false;
    assert_eq!(
        connect_from(&mut sim, 0, "alice", ALICE, "bob"),
        RendezvousHandled::Locating
    );
    assert!(
        sim.take(0).is_empty(),
        "no answer before the target is located"
    );
    assert!(sim.take_events(0).is_empty());
    sim.answering = true;
    sim.settle();
    let out_a = sim.take(0);
    let out_b = sim.take(1);
    let reply = response_for(&out_a, "alice");
    assert_eq!(reply.result, Ok(()));
    let ia = introduction_for(&out_a, "alice", ALICE);
    let ib = introduction_for(&out_b, "bob", BOB);
    assert_eq!(out_a.len(), 3, "alice's introduction twice and her answer");
    assert_eq!(out_b.len(), 2, "bob's introduction twice, from his node");
    assert_eq!(
        out_b[0].from_local,
        Some(IpAddr::from([192, 0, 2, 11])),
        "sent from where bob registered"
    );
    assert_eq!(reply.intro_id, Some(ia.intro_id));
    assert_eq!((ia.intro_id, ia.probe_key), (ib.intro_id, ib.probe_key));
    assert_eq!((ia.role, ib.role), (Role::Initiator, Role::Responder));
    assert_eq!((ia.peer_id.as_str(), ib.peer_id.as_str()), ("bob", "alice"));
    assert_eq!(
        ia.candidates,
        vec![
            Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: addr(BOB)
            },
            tcp("198.51.100.6:5001"),
            host("10.0.2.2:5000"),
        ]
    );
    assert_eq!(
        ib.candidates,
        vec![
            Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: addr(ALICE)
            },
            host("10.0.1.2:4000"),
        ]
    );
    assert_eq!(ia.peer_nat, NatClass::AddressAndPortDependent);
    assert_eq!(ib.peer_nat, NatClass::EndpointIndependent);
    // Alice's path: 20 ms. Bob's: 10 ms transit + 50 ms. Both start at the slower
    // path plus the 5 ms margin after alice's node acted.
    let ms = |d: Duration| d.as_millis() as u64;
    assert_eq!(20 + ms(ia.start_delay), 65);
    assert_eq!(10 + 50 + ms(ib.start_delay), 65);
    assert_eq!(
        (ms(ia.start_delay) as u32, ms(ib.start_delay) as u32),
        cross_node_start_delays(40, 100, Duration::from_millis(10), Duration::from_millis(5))
    );
    assert_eq!(
        sim.take_events(0),
        vec![
            RendezvousEvent::Introduced {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::AddressAndPortDependent
            },
            RendezvousEvent::CrossNode(CrossNodeOutcome::Introduced),
        ]
    );
    assert!(sim.take_events(1).is_empty(), "counted on the owner only");
    assert!(matches!(
        &sim.sent[..],
        [Sent { from: 0, to, message: ClusterMessage::Introduce { responder_delay_ms: 5, .. } }]
            if *to == node_name(1)
    ));
}

#[test]
fn a_slower_initiator_waits_less_than_the_responder() {
    let mut sim = ClusterSim::new(2);
    sim.register(0, "alice", addr(ALICE), &[], NatClass::None, 200);
    sim.register(1, "bob", addr(BOB), &[], NatClass::None, 20);
    connect_from(&mut sim, 0, "alice", ALICE, "bob");
    let ia = introduction_for(&sim.take(0), "alice", ALICE);
    let ib = introduction_for(&sim.take(1), "bob", BOB);
    // Default transit 2 ms: alice's path 100 ms is the slower; start at 105 ms.
    assert_eq!(ia.start_delay, Duration::from_millis(5));
    assert_eq!(
        Duration::from_millis(2 + 10) + ib.start_delay,
        Duration::from_millis(105)
    );
}

#[test]
fn relay_offers_and_tcp_seq_cross_nodes_signed_for_the_recipient() {
    let mut sim = two_nodes();
    let intro = introduce(&mut sim);
    let (a, b) = (addr(ALICE), addr(BOB));
    let (alice, bob) = (creds("alice"), creds("bob"));
    // An offer of anything but an allocation of the relay is refused: a peer cannot
    // aim the other side's agent at an address of its choosing.
    for elsewhere in ["192.0.2.1:9", "203.0.113.51:49152"] {
        let offer = relay_offer(
            [2; 12],
            &bob,
            Some(&sim.nonce(1, b)),
            intro,
            addr(elsewhere),
        );
        assert_eq!(
            sim.send(1, b, &offer),
            RendezvousHandled::Forbidden,
            "{elsewhere}"
        );
        assert_eq!(response_for(&sim.take(1), "bob").result, Err(403));
        assert!(sim.take(0).is_empty(), "nothing reaches alice");
    }
    // Bob's relay offer (to his node) reaches alice from hers, twice.
    let relayed = addr("203.0.113.50:49152");
    let offer = relay_offer([3; 12], &bob, Some(&sim.nonce(1, b)), intro, relayed);
    assert_eq!(sim.send(1, b, &offer), RendezvousHandled::RelayOffered);
    assert_eq!(response_for(&sim.take(1), "bob").result, Ok(()));
    let to_alice = sim.take(0);
    assert_eq!(to_alice.len(), 2);
    for t in &to_alice {
        assert_eq!(t.to, a);
        let offer = parse_relay_offer(&t.payload, &alice.password).expect("signed for alice");
        assert_eq!((offer.intro_id, offer.peer_id.as_str()), (intro, "bob"));
        assert_eq!(offer.relayed, relayed);
        assert!(parse_relay_offer(&t.payload, &bob.password).is_none());
    }
    // Alice's TCP-Seq reaches bob from his node, once per side.
    let expected = addr("198.51.100.6:5001");
    let seq = |sim: &ClusterSim, forge| {
        tcp_seq(
            [4; 12],
            &alice,
            Some(&sim.nonce(0, a)),
            intro,
            0xFEED,
            Some(expected),
            forge,
        )
    };
    assert_eq!(
        sim.send(0, a, &seq(&sim, false)),
        RendezvousHandled::TcpSeqForwarded
    );
    assert_eq!(response_for(&sim.take(0), "alice").result, Ok(()));
    let to_bob = sim.take(1);
    assert_eq!(to_bob.len(), 2);
    let forwarded = parse_tcp_seq(&to_bob[0].payload, &bob.password).expect("signed for bob");
    assert_eq!(
        forwarded,
        TcpSeq {
            intro_id: intro,
            peer_id: "alice".into(),
            isn: 0xFEED,
            expected: Some(expected),
        }
    );
    assert_eq!(
        sim.send(0, a, &seq(&sim, false)),
        RendezvousHandled::NotFound
    );
    assert_eq!(response_for(&sim.take(0), "alice").result, Err(404));
    assert!(sim.take(1).is_empty());
    // Forging needs both sides on one node: refused like forging switched off.
    sim.nodes[0].server.set_tcp_forge(true);
    assert_eq!(
        sim.send(0, a, &seq(&sim, true)),
        RendezvousHandled::TcpForgeDisabled
    );
    assert_eq!(response_for(&sim.take(0), "alice").result, Err(501));
    assert!(sim.nodes[0].drain_forged().next().is_none());
    // A Deliver for a peer not registered on the node is dropped.
    sim.inject(
        0,
        ClusterMessage::Deliver {
            peer_id: "carol".into(),
            payload: vec![1, 2, 3],
        },
    );
    assert!(sim.take(0).is_empty());
}

/// Side `peer` (from `from`, on `node`) reports `outcome` of `intro`.
fn report(
    sim: &mut ClusterSim,
    node: usize,
    peer: &str,
    from: &str,
    intro: u64,
    technique: Option<TcpTechnique>,
    ms: u32,
) -> RendezvousHandled {
    let nonce = sim.nonce(node, addr(from));
    let c = creds(peer);
    let request = match technique {
        None => client::outcome(
            [5; 12],
            &c,
            Some(&nonce),
            intro,
            SessionOutcome::Direct,
            ms,
            3,
        ),
        Some(technique) => tcp_outcome(
            [5; 12],
            &c,
            Some(&nonce),
            intro,
            TcpReport {
                technique,
                connected: true,
                elapsed_ms: ms,
                attempts: 1,
            },
        ),
    };
    let handled = sim.send(node, addr(from), &request);
    sim.take(node);
    handled
}

#[test]
fn outcomes_are_counted_once_on_the_owner_whoever_reports_first() {
    for responder_first in [true, false] {
        let mut sim = two_nodes();
        let intro = introduce(&mut sim);
        let mut sides = [(0, "alice", ALICE, 30), (1, "bob", BOB, 40)];
        if responder_first {
            sides.reverse();
        }
        for (node, peer, from, ms) in sides {
            assert_eq!(
                report(&mut sim, node, peer, from, intro, None, ms),
                RendezvousHandled::OutcomeAccepted
            );
            // Each node refuses its own side's repeat.
            assert_eq!(
                report(&mut sim, node, peer, from, intro, None, ms),
                RendezvousHandled::NotFound
            );
        }
        let first_ms = sides[0].3;
        assert_eq!(
            sim.take_events(0),
            vec![RendezvousEvent::Outcome {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::AddressAndPortDependent,
                direct: true,
                relayed: false,
                time_to_direct: Duration::from_millis(u64::from(first_ms)),
                probes: 3,
                mapped: false,
            }],
            "responder first: {responder_first}"
        );
        assert!(
            sim.take_events(1).is_empty(),
            "the responder's node counts nothing"
        );
        let forwarded: Vec<_> = sim
            .sent
            .iter()
            .filter(|s| matches!(s.message, ClusterMessage::Outcome { .. }))
            .collect();
        assert_eq!(
            forwarded.len(),
            1,
            "bob's one accepted report went to the owner"
        );
        assert_eq!((forwarded[0].from, forwarded[0].to.as_str()), (1, "gw-0"));
        // The stream delivering it again changes nothing.
        let again = forwarded[0].message.clone();
        sim.inject(0, again);
        assert!(sim.take_events(0).is_empty());
    }
}

#[test]
fn tcp_outcomes_are_counted_once_per_technique_on_the_owner() {
    let mut sim = two_nodes();
    let intro = introduce(&mut sim);
    let natblaster = Some(TcpTechnique::NatBlaster);
    let low_ttl = Some(TcpTechnique::LowTtl);
    report(&mut sim, 1, "bob", BOB, intro, natblaster, 100);
    report(&mut sim, 0, "alice", ALICE, intro, natblaster, 90);
    report(&mut sim, 0, "alice", ALICE, intro, low_ttl, 80);
    report(&mut sim, 1, "bob", BOB, intro, low_ttl, 70);
    let techniques: Vec<_> = sim
        .take_events(0)
        .into_iter()
        .map(|e| match e {
            RendezvousEvent::TcpOutcome { technique, .. } => technique,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        techniques,
        vec![TcpTechnique::NatBlaster, TcpTechnique::LowTtl]
    );
    assert!(sim.take_events(1).is_empty());
}

#[test]
fn an_outcome_message_counts_only_about_the_remote_side_of_an_owned_introduction() {
    let mut sim = two_nodes();
    let intro = introduce(&mut sim);
    let with_technique = |intro_id, side, technique| ClusterMessage::Outcome {
        intro_id,
        side,
        outcome: 0,
        ms: 10,
        probes: 1,
        technique,
    };
    let message = |intro_id, side| with_technique(intro_id, side, None);
    // About the owner's own side, an unknown introduction, or sent to the
    // responder's node: nothing.
    sim.inject(0, message(intro, 0));
    sim.inject(0, message(intro ^ 1, 1));
    sim.inject(1, message(intro, 0));
    sim.inject(1, message(intro, 1));
    assert!(sim.take_events(0).is_empty());
    assert!(sim.take_events(1).is_empty());
    // An unknown technique: nothing.
    sim.inject(0, with_technique(intro, 1, Some(9)));
    assert!(sim.take_events(0).is_empty());
    sim.inject(0, message(intro, 1));
    assert_eq!(sim.take_events(0).len(), 1);
    // Alice's own report is still hers to make, and not counted again.
    assert_eq!(
        report(&mut sim, 0, "alice", ALICE, intro, None, 5),
        RendezvousHandled::OutcomeAccepted
    );
    assert!(sim.take_events(0).is_empty());
}

#[test]
fn a_moved_peer_is_forgotten_by_its_old_node_and_found_on_the_new_one() {
    let mut sim = ClusterSim::new(3);
    sim.register(0, "bob", addr(BOB), &[], NatClass::None, 10);
    sim.register(
        2,
        "carol",
        addr("203.0.113.7:7000"),
        &[],
        NatClass::None,
        10,
    );
    assert_eq!(sim.nodes[0].server.peer_count(), 1);
    // Bob registers on node 1 later (another address: a new gateway resolved).
    let bob_now = addr("198.51.100.6:5999");
    sim.register_at(1, NOW_UNIX + 5, "bob", bob_now);
    assert_eq!(sim.stored("bob").map(|e| e.node), Some(node_name(1)));
    assert_eq!(sim.nodes[0].server.peer_count(), 0, "node 0 forgot bob");
    assert_eq!(sim.nodes[1].server.peer_count(), 1);
    // Carol on node 2 is introduced to bob through node 1.
    connect_from(&mut sim, 2, "carol", "203.0.113.7:7000", "bob");
    assert_eq!(
        response_for(&sim.take(2), "carol").result,
        Ok(()),
        "introduced"
    );
    introduction_for(&sim.take(1), "bob", "198.51.100.6:5999");
    assert!(sim.take(0).is_empty());
    // A notice older than the registration it would remove changes nothing.
    sim.inject(
        1,
        ClusterMessage::Moved {
            peer_id: "bob".into(),
            registered_unix_ms: NOW_UNIX * 1000,
        },
    );
    assert_eq!(sim.nodes[1].server.peer_count(), 1);
}

#[test]
fn connects_to_peers_registered_nowhere_get_404() {
    let mut sim = two_nodes();
    let not_found = |sim: &mut ClusterSim, target: &str| {
        assert_eq!(
            connect_from(sim, 0, "alice", ALICE, target),
            RendezvousHandled::Locating
        );
        let reply = sim.take(0);
        assert_eq!(response_for(&reply, "alice").result, Err(404));
        assert_eq!(reason(&reply[0].payload), "Peer Not Found");
        assert_eq!(
            sim.take_events(0),
            vec![RendezvousEvent::CrossNode(CrossNodeOutcome::NotFound)]
        );
    };
    not_found(&mut sim, "nobody");
    // A stale record naming this very node, which no longer has the peer.
    let mut ghost = sim.stored("bob").expect("bob");
    ghost.peer_id = "ghost".into();
    ghost.node = node_name(0);
    sim.store.insert("ghost".into(), ghost.encode());
    not_found(&mut sim, "ghost");
    // A record whose credentials expired.
    ghost.node = node_name(1);
    ghost.expiry_unix = NOW_UNIX;
    sim.store.insert("ghost".into(), ghost.encode());
    not_found(&mut sim, "ghost");
    assert!(sim.sent.is_empty(), "no introduction was asked of any node");
}

#[test]
fn a_target_that_registers_here_while_located_is_introduced_from_here() {
    let mut sim = two_nodes();
    sim.answering = false;
    connect_from(&mut sim, 0, "alice", ALICE, "bob");
    let bob_here = "198.51.100.6:6000";
    sim.register(0, "bob", addr(bob_here), &[], NatClass::None, 0);
    sim.take_events(0);
    sim.answering = true;
    sim.settle();
    let out = sim.take(0);
    assert_eq!(response_for(&out, "alice").result, Ok(()));
    introduction_for(&out, "bob", bob_here);
    assert!(
        !sim.sent
            .iter()
            .any(|s| matches!(s.message, ClusterMessage::Introduce { .. }))
    );
    assert_eq!(
        sim.take_events(0),
        vec![
            RendezvousEvent::Introduced {
                initiator_nat: NatClass::EndpointIndependent,
                responder_nat: NatClass::None
            },
            RendezvousEvent::CrossNode(CrossNodeOutcome::Introduced),
        ]
    );
}

#[test]
fn an_initiator_gone_before_its_target_is_located_gets_403() {
    let mut sim = two_nodes();
    sim.answering = false;
    connect_from(&mut sim, 0, "alice", ALICE, "bob");
    sim.register(
        0,
        "alice",
        addr("198.51.100.2:4999"),
        &[],
        NatClass::None,
        0,
    );
    sim.take_events(0);
    sim.answering = true;
    sim.settle();
    let out = sim.take(0);
    assert_eq!(out[0].to, addr(ALICE), "answered where it asked from");
    assert_eq!(response_for(&out, "alice").result, Err(403));
    assert_eq!(
        sim.take_events(0),
        vec![RendezvousEvent::CrossNode(CrossNodeOutcome::Failed)]
    );
    assert!(sim.sent.is_empty() && sim.take(1).is_empty());
}

#[test]
fn an_introduce_for_a_peer_gone_from_its_node_is_undone_on_the_owner() {
    let mut sim = two_nodes();
    // The store still names node 1 for dave, who is not registered there.
    let mut dave = sim.stored("bob").expect("bob");
    dave.peer_id = "dave".into();
    sim.store.insert("dave".into(), dave.encode());
    connect_from(&mut sim, 0, "alice", ALICE, "dave");
    let intro = response_for(&sim.take(0), "alice")
        .intro_id
        .expect("answered before the other node could say");
    assert!(sim.take(1).is_empty());
    assert!(matches!(
        sim.sent.last(),
        Some(Sent { from: 1, message: ClusterMessage::IntroduceFailed { intro_id, initiator_id }, .. })
            if *intro_id == intro && initiator_id == "alice"
    ));
    let events = sim.take_events(0);
    assert_eq!(
        events.last(),
        Some(&RendezvousEvent::CrossNode(CrossNodeOutcome::ResponderGone))
    );
    // The introduction is forgotten: a report about it counts nothing.
    assert_eq!(
        report(&mut sim, 0, "alice", ALICE, intro, None, 5),
        RendezvousHandled::NotFound
    );
}

#[test]
fn a_repeated_introduce_changes_nothing() {
    let mut sim = two_nodes();
    introduce(&mut sim);
    let introduce = sim
        .sent
        .iter()
        .find(|s| matches!(s.message, ClusterMessage::Introduce { .. }))
        .map(|s| s.message.clone())
        .expect("sent");
    sim.inject(1, introduce);
    assert!(sim.take(1).is_empty());
    assert_eq!(sim.sent.len(), 1, "no IntroduceFailed either");
}

#[test]
fn while_the_cluster_is_down_connects_elsewhere_get_503_at_once() {
    let mut sim = two_nodes();
    // One waiting when the store goes away: answered at once too.
    sim.answering = false;
    connect_from(&mut sim, 0, "alice", ALICE, "bob");
    assert!(sim.take(0).is_empty());
    sim.nodes[0].server.set_cluster_up(false);
    sim.settle();
    let reply = sim.take(0);
    assert_eq!(response_for(&reply, "alice").result, Err(503));
    assert_eq!(reason(&reply[0].payload), CLUSTER_UNAVAILABLE_REASON);
    assert_eq!(
        sim.take_events(0),
        vec![RendezvousEvent::CrossNode(CrossNodeOutcome::Unavailable)]
    );
    assert_eq!(
        connect_from(&mut sim, 0, "alice", ALICE, "bob"),
        RendezvousHandled::ClusterUnavailable
    );
    let reply = sim.take(0);
    assert_eq!(response_for(&reply, "alice").result, Err(503));
    assert_eq!(reason(&reply[0].payload), "Cluster Unavailable");
    assert_eq!(
        sim.take_events(0),
        vec![RendezvousEvent::CrossNode(CrossNodeOutcome::Unavailable)]
    );
    // The late answer to the first one finds nothing waiting.
    sim.answering = true;
    sim.settle();
    assert!(sim.take(0).is_empty() && sim.take(1).is_empty());
    // Peers registered here are still introduced.
    sim.register(0, "carol", addr("203.0.113.7:7000"), &[], NatClass::None, 0);
    assert_eq!(
        connect_from(&mut sim, 0, "alice", ALICE, "carol"),
        RendezvousHandled::Introduced
    );
    sim.take(0);
    sim.nodes[0].server.set_cluster_up(true);
    connect_from(&mut sim, 0, "alice", ALICE, "bob");
    assert_eq!(response_for(&sim.take(0), "alice").result, Ok(()));
}

#[test]
fn a_connect_not_located_in_time_gets_503() {
    let mut sim = two_nodes();
    sim.answering = false;
    let start = sim.nodes[0].now;
    connect_from(&mut sim, 0, "alice", ALICE, "bob");
    let deadline = start + LOCATE_TIMEOUT;
    assert_eq!(
        sim.nodes[0].server.poll_timeout(),
        Some(start + Duration::from_secs(1))
    );
    sim.advance(Duration::from_millis(1_999));
    assert!(sim.take(0).is_empty());
    assert_eq!(sim.nodes[0].server.poll_timeout(), Some(deadline));
    sim.advance(Duration::from_millis(1));
    let reply = sim.take(0);
    assert_eq!(response_for(&reply, "alice").result, Err(503));
    assert_eq!(reason(&reply[0].payload), CLUSTER_UNAVAILABLE_REASON);
    assert_eq!(
        sim.take_events(0),
        vec![RendezvousEvent::CrossNode(CrossNodeOutcome::TimedOut)]
    );
    // The answer that comes too late is ignored.
    sim.answering = true;
    sim.settle();
    assert!(sim.take(0).is_empty() && sim.take(1).is_empty());
    assert!(sim.sent.is_empty());
    // Registrations still expire on their own schedule.
    assert_eq!(sim.nodes[0].server.peer_count(), 1);
}

#[test]
fn the_table_of_waiting_connects_is_bounded() {
    let mut sim = two_nodes();
    sim.answering = false;
    let now = sim.nodes[0].now;
    let reply = ReplyTo {
        from: addr(ALICE),
        transport: crate::Transport::Udp,
        local: None,
        tid: [9; 12],
        password: creds("alice").password,
        next_nonce: sim.nonce(0, addr(ALICE)),
    };
    let server = &mut sim.nodes[0].server;
    for _ in 0..MAX_PARKED_CONNECTS {
        let parked = server.park_connect(now, "alice", "bob".into(), reply.clone());
        assert_eq!(parked, Ok((RendezvousHandled::Locating, None)));
    }
    let refused = server.park_connect(now, "alice", "bob".into(), reply);
    assert_eq!(
        refused,
        Err((
            RendezvousHandled::ClusterUnavailable,
            CLUSTER_UNAVAILABLE,
            CLUSTER_UNAVAILABLE_REASON
        ))
    );
    while server.poll_event().is_some() {}
}

#[test]
fn local_entries_are_the_registry_to_publish_again() {
    let mut sim = two_nodes();
    sim.register(0, "carol", addr("203.0.113.7:7000"), &[], NatClass::None, 0);
    let mut entries = sim.nodes[0].server.local_entries(NOW_UNIX);
    entries.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    assert_eq!(
        entries,
        vec![
            sim.stored("alice").expect("alice"),
            sim.stored("carol").expect("carol")
        ]
    );
    assert!(
        sim.nodes[0]
            .server
            .local_entries(NOW_UNIX + 3600)
            .is_empty(),
        "expired credentials are not published"
    );
    assert_eq!(sim.nodes[0].server.node_id(), Some("gw-0"));
    let single = World::new();
    assert_eq!(single.server.node_id(), None);
    assert!(single.server.local_entries(NOW_UNIX).is_empty());
}

/// A node of a cluster with an introduction in progress, for the properties.
fn busy_node() -> (ClusterSim, u64) {
    let mut sim = two_nodes();
    let intro = introduce(&mut sim);
    sim.sent.clear();
    (sim, intro)
}

/// Messages about peers no node has (ids with an `x-` prefix), and random ids.
fn unrelated_message() -> impl Strategy<Value = ClusterMessage> {
    let peer = "x-[a-z0-9]{1,10}";
    prop_oneof![
        (any::<u64>(), peer, any::<[u8; 16]>(), any::<u32>()).prop_map(
            |(intro_id, responder_id, probe_key, delay)| ClusterMessage::Introduce {
                intro_id,
                from_node: "gw-9".into(),
                initiator: PeerEntry {
                    peer_id: "x-initiator".into(),
                    node: "gw-9".into(),
                    addr: addr("192.0.2.99:9"),
                    expiry_unix: NOW_UNIX + 60,
                    candidates: Vec::new(),
                    nat: NatClass::Unknown,
                    rtt_ms: 0,
                    registered_unix_ms: 0,
                },
                responder_id,
                probe_key,
                responder_delay_ms: delay,
            }
        ),
        (any::<u64>(), peer).prop_map(|(intro_id, initiator_id)| {
            ClusterMessage::IntroduceFailed {
                intro_id,
                initiator_id,
            }
        }),
        (any::<u64>(), "(alice|bob)").prop_map(|(intro_id, initiator_id)| {
            ClusterMessage::IntroduceFailed {
                intro_id,
                initiator_id,
            }
        }),
        (peer, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(peer_id, payload)| ClusterMessage::Deliver { peer_id, payload }),
        (any::<u64>(), any::<u8>(), any::<u8>(), any::<Option<u8>>()).prop_map(
            |(intro_id, side, outcome, technique)| ClusterMessage::Outcome {
                intro_id,
                side,
                outcome,
                ms: 1,
                probes: 1,
                technique,
            }
        ),
        (peer, any::<u64>()).prop_map(|(peer_id, registered_unix_ms)| ClusterMessage::Moved {
            peer_id,
            registered_unix_ms,
        }),
        ("(alice|bob)", 0..=NOW_UNIX * 1000).prop_map(|(peer_id, registered_unix_ms)| {
            ClusterMessage::Moved {
                peer_id,
                registered_unix_ms,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn garbage_and_unrelated_messages_change_nothing(
        garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..4),
        messages in proptest::collection::vec(unrelated_message(), 0..6),
        node in 0usize..2,
    ) {
        let (mut sim, intro) = busy_node();
        // Whatever decodes among the garbage is handled like any message.
        let decoded = garbage.iter().filter_map(|b| ClusterMessage::decode(b).ok());
        let all: Vec<ClusterMessage> = decoded.chain(messages).collect();
        for message in all.clone() {
            // An unknown intro id matching the live one is astronomically unlikely
            // but would be a legitimate message: skip it.
            let live = matches!(&message,
                ClusterMessage::Outcome { intro_id, .. }
                | ClusterMessage::IntroduceFailed { intro_id, .. }
                | ClusterMessage::Introduce { intro_id, .. } if *intro_id == intro);
            if !live {
                sim.inject(node, message);
            }
        }
        prop_assert!(sim.take(0).is_empty() && sim.take(1).is_empty(), "nothing sent to peers");
        prop_assert!(sim.take_events(0).is_empty() && sim.take_events(1).is_empty());
        for sent in &sim.sent {
            // The only answer: the responder is not registered here.
            let is_introduce_failed = matches!(sent.message, ClusterMessage::IntroduceFailed { .. });
            prop_assert!(is_introduce_failed, "{:?}", sent);
        }
        prop_assert_eq!(sim.nodes[0].server.peer_count(), 1);
        prop_assert_eq!(sim.nodes[1].server.peer_count(), 1);
        // The introduction in progress still works, and counts once.
        prop_assert_eq!(report(&mut sim, 1, "bob", BOB, intro, None, 9), RendezvousHandled::OutcomeAccepted);
        prop_assert_eq!(report(&mut sim, 0, "alice", ALICE, intro, None, 9), RendezvousHandled::OutcomeAccepted);
        prop_assert_eq!(sim.take_events(0).len(), 1);
    }
}

/// One step of a random conversation with a single-node server.
#[derive(Clone, Debug)]
enum Step {
    Register(usize, usize),
    Connect(usize, usize),
    Outcome(usize, usize),
    RelayOffer(usize, usize),
    TcpSeq(usize, usize, bool),
    Wait(u64),
    Cluster(u64),
}

const PEERS: [&str; 4] = ["alice", "bob", "carol", "nobody"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..3, 0usize..3).prop_map(|(p, a)| Step::Register(p, a)),
        (0usize..4, 0usize..4).prop_map(|(p, t)| Step::Connect(p, t)),
        (0usize..4, 0usize..4).prop_map(|(p, i)| Step::Outcome(p, i)),
        (0usize..4, 0usize..4).prop_map(|(p, i)| Step::RelayOffer(p, i)),
        (0usize..4, 0usize..4, any::<bool>()).prop_map(|(p, i, f)| Step::TcpSeq(p, i, f)),
        (0u64..3_000).prop_map(Step::Wait),
        any::<u64>().prop_map(Step::Cluster),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn without_a_cluster_no_cluster_work_ever_appears(steps in proptest::collection::vec(step(), 0..40)) {
        let mut world = World::new();
        let from = |p: usize, a: usize| SocketAddr::new(IpAddr::from([198, 51, 100, 2 + p as u8]), 4000 + a as u16);
        let mut homes = [from(0, 0), from(1, 0), from(2, 0), from(3, 0)];
        let mut intros = vec![0u64];
        for step in steps {
            let handled = match step {
                Step::Register(p, a) => {
                    homes[p] = from(p, a);
                    let nonce = world.nonce(homes[p]);
                    let request = register([1; 12], &creds(PEERS[p]), Some(&nonce), &[], NatClass::None, 10);
                    world.send(homes[p], &request).0
                }
                Step::Connect(p, t) => {
                    let nonce = world.nonce(homes[p]);
                    let (handled, out) = world.send(homes[p], &connect([2; 12], &creds(PEERS[p]), Some(&nonce), PEERS[t]));
                    intros.extend(out.iter().filter_map(|t| parse_response(&t.payload, &creds(PEERS[p]).password)).filter_map(|r| r.intro_id));
                    handled
                }
                Step::Outcome(p, i) => {
                    let nonce = world.nonce(homes[p]);
                    let intro = intros[i % intros.len()];
                    world.send(homes[p], &client::outcome([3; 12], &creds(PEERS[p]), Some(&nonce), intro, SessionOutcome::Failed, 1, 1)).0
                }
                Step::RelayOffer(p, i) => {
                    let nonce = world.nonce(homes[p]);
                    let intro = intros[i % intros.len()];
                    world.send(homes[p], &relay_offer([4; 12], &creds(PEERS[p]), Some(&nonce), intro, addr("203.0.113.50:3000"))).0
                }
                Step::TcpSeq(p, i, forge) => {
                    let nonce = world.nonce(homes[p]);
                    let intro = intros[i % intros.len()];
                    world.send(homes[p], &tcp_seq([5; 12], &creds(PEERS[p]), Some(&nonce), intro, 7, Some(addr("198.51.100.9:1")), forge)).0
                }
                Step::Wait(ms) => {
                    world.now += Duration::from_millis(ms);
                    if world.server.poll_timeout().is_some_and(|at| at <= world.now) {
                        world.server.handle_timeout(world.now, NOW_UNIX);
                    }
                    world.collect();
                    RendezvousHandled::Registered
                }
                Step::Cluster(token) => {
                    // The cluster inputs do nothing on a single node.
                    world.server.handle_located(world.now, NOW_UNIX, token, None);
                    world.server.handle_cluster_message(world.now, NOW_UNIX, ClusterMessage::Moved { peer_id: "alice".into(), registered_unix_ms: u64::MAX });
                    world.server.set_cluster_up(false);
                    world.server.set_cluster_transit(Duration::from_secs(1));
                    prop_assert!(world.collect().is_empty());
                    RendezvousHandled::Registered
                }
            };
            prop_assert!(!matches!(handled, RendezvousHandled::Locating | RendezvousHandled::ClusterUnavailable));
            for event in world.drain_events() {
                prop_assert!(!matches!(event, RendezvousEvent::Cluster(_) | RendezvousEvent::CrossNode(_)), "{:?}", event);
            }
        }
        prop_assert!(world.server.local_entries(NOW_UNIX).is_empty());
    }
}

#[test]
fn store_requests_carry_every_registration_only_with_a_cluster() {
    let mut world = World::new();
    world.register("alice", addr(ALICE), &[], NatClass::None, 0);
    assert!(world.drain_events().next().is_none());
    world.server.enable_cluster("solo".into());
    world.register("alice", addr(ALICE), &[], NatClass::None, 0);
    let events: Vec<_> = world.drain_events().collect();
    assert!(matches!(
        &events[..],
        [RendezvousEvent::Cluster(ClusterRequest::Store(entry))]
            if entry.node == "solo" && entry.peer_id == "alice"
    ));
}
