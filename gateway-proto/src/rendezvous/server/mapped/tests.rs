//! The mapped candidate's check, driven through the test world of `sim::rendezvous`.
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::{
    binding::Alternates,
    rendezvous::{
        client::*,
        wire::{NatClass, SessionOutcome},
    },
    sim::rendezvous::*,
};

const ALICE: &str = "198.51.100.2:4000";
const BOB: &str = "203.0.113.7:5000";
const EXTERNAL: &str = "198.51.100.2:30000";

/// The lab's layout: the service socket and a discovery socket on another port.
fn world() -> World {
    let mut world = World::new();
    world.server.set_alternates(
        Alternates::new(addr("0.0.0.0:3478"), vec![addr("0.0.0.0:3479")]),
        false,
    );
    world
}

/// Alice registers announcing `mapped` (and one host candidate).
fn register_alice(world: &mut World, mapped: Option<SocketAddr>) -> RendezvousHandled {
    let alice = creds("alice");
    let from = addr(ALICE);
    let candidates: Vec<Candidate> = mapped
        .map(|addr| Candidate {
            kind: CandidateKind::Mapped,
            addr,
        })
        .into_iter()
        .chain(std::iter::once(Candidate {
            kind: CandidateKind::Host,
            addr: addr("10.0.1.2:4000"),
        }))
        .collect();
    let request = register_with_candidates(
        [1; 12],
        &alice,
        Some(&world.nonce(from)),
        &candidates,
        NatClass::AddressAndPortDependent,
        20,
    );
    world.send(from, &request).0
}

/// The probes sent from discovery sockets since the last call: (to, token).
fn probes(world: &mut World) -> Vec<(SocketAddr, [u8; 16])> {
    let password = creds("alice").password;
    world
        .drain_redirected()
        .filter_map(
            |r| match parse_mapped_check(&r.transmit.payload, &password) {
                Some(MappedCheck::Probe { token }) => {
                    assert_eq!(r.endpoint, 0, "from the discovery socket");
                    Some((r.transmit.to, token))
                }
                _ => None,
            },
        )
        .collect()
}

/// Bob connects to alice: the candidates of alice his introduction carries.
fn bob_meets_alice(world: &mut World) -> Vec<Candidate> {
    let bob = creds("bob");
    let from = addr(BOB);
    let request = connect([2; 12], &bob, Some(&world.nonce(from)), "alice");
    let (handled, out) = world.send(from, &request);
    assert_eq!(handled, RendezvousHandled::Introduced);
    out.iter()
        .find_map(|t| parse_introduction(&t.payload, &bob.password))
        .expect("bob's introduction")
        .candidates
}

fn mapped_of(candidates: &[Candidate]) -> Vec<SocketAddr> {
    candidates
        .iter()
        .filter(|c| c.kind == CandidateKind::Mapped)
        .map(|c| c.addr)
        .collect()
}

/// Alice's answer to a probe with `token`, from her registered address.
fn answer(world: &mut World, peer: &str, from: &str, token: &[u8; 16]) -> RendezvousHandled {
    let c = creds(peer);
    let from = addr(from);
    let request = mapped_check([3; 12], &c, Some(&world.nonce(from)), token);
    world.send(from, &request).0
}

fn tick(world: &mut World, by: Duration) {
    world.now += by;
    world.server.handle_timeout(world.now, NOW_UNIX);
    world.collect();
}

#[test]
fn a_mapped_candidate_is_introduced_only_once_its_probe_is_answered() {
    let mut world = world();
    let external = addr(EXTERNAL);
    world.register("bob", addr(BOB), &[], NatClass::EndpointIndependent, 20);
    assert_eq!(
        register_alice(&mut world, Some(external)),
        RendezvousHandled::Registered
    );
    let sent = probes(&mut world);
    assert_eq!(sent.len(), 1, "one probe at once");
    assert_eq!(sent[0].0, external);
    // Not yet answered: bob's introduction leaves it out.
    assert!(mapped_of(&bob_meets_alice(&mut world)).is_empty());
    assert!(world.server.mapped.is_pending("alice"));
    assert_eq!(
        answer(&mut world, "alice", ALICE, &sent[0].1),
        RendezvousHandled::MappedChecked
    );
    assert!(
        world
            .drain_events()
            .any(|e| e == RendezvousEvent::MappedCandidate { verified: true })
    );
    assert_eq!(mapped_of(&bob_meets_alice(&mut world)), [external]);
    // A refresh with the same candidate keeps it, without another probe.
    register_alice(&mut world, Some(external));
    assert!(probes(&mut world).is_empty());
    tick(&mut world, Duration::from_secs(5));
    assert!(probes(&mut world).is_empty());
    assert_eq!(mapped_of(&bob_meets_alice(&mut world)), [external]);
    // A Register without it withdraws it.
    register_alice(&mut world, None);
    assert!(mapped_of(&bob_meets_alice(&mut world)).is_empty());
}

#[test]
fn punch_outcomes_say_whether_a_mapped_candidate_was_introduced() {
    let mut world = world();
    world.register("bob", addr(BOB), &[], NatClass::EndpointIndependent, 20);
    register_alice(&mut world, Some(addr(EXTERNAL)));
    let token = probes(&mut world)[0].1;
    answer(&mut world, "alice", ALICE, &token);
    bob_meets_alice(&mut world);
    world.drain_events().for_each(drop);
    let intro_id = world
        .server
        .intros
        .keys()
        .copied()
        .next()
        .expect("an introduction");
    let bob = creds("bob");
    let report = outcome(
        [4; 12],
        &bob,
        Some(&world.nonce(addr(BOB))),
        intro_id,
        SessionOutcome::Direct,
        30,
        2,
    );
    assert_eq!(
        world.send(addr(BOB), &report).0,
        RendezvousHandled::OutcomeAccepted
    );
    let mapped: Vec<bool> = world
        .drain_events()
        .filter_map(|e| match e {
            RendezvousEvent::Outcome { mapped, .. } => Some(mapped),
            _ => None,
        })
        .collect();
    assert_eq!(mapped, [true]);
}

#[test]
fn an_unanswered_probe_is_retried_then_dropped_and_the_peer_told() {
    let mut world = world();
    let external = addr(EXTERNAL);
    world.register("bob", addr(BOB), &[], NatClass::EndpointIndependent, 20);
    register_alice(&mut world, Some(external));
    let mut sent = probes(&mut world).len();
    let mut told = Vec::new();
    let alice = creds("alice");
    for _ in 0..10 {
        world.now += Duration::from_millis(500);
        world.server.handle_timeout(world.now, NOW_UNIX);
        for t in world.collect() {
            if let Some(MappedCheck::Unreachable { external }) =
                parse_mapped_check(&t.payload, &alice.password)
            {
                assert_eq!(t.to, addr(ALICE), "told at its registered address");
                told.push(external);
            }
        }
        sent += probes(&mut world).len();
    }
    assert_eq!(sent, usize::from(MAPPED_PROBE_TRIES));
    assert_eq!(told, [external], "told once");
    assert_eq!(
        world
            .drain_events()
            .filter(|e| matches!(e, RendezvousEvent::MappedCandidate { .. }))
            .collect::<Vec<_>>(),
        [RendezvousEvent::MappedCandidate { verified: false }]
    );
    assert!(mapped_of(&bob_meets_alice(&mut world)).is_empty());
    // The refresh with the same candidate is not probed again, nor introduced.
    register_alice(&mut world, Some(external));
    tick(&mut world, Duration::from_secs(5));
    assert!(probes(&mut world).is_empty());
    assert!(mapped_of(&bob_meets_alice(&mut world)).is_empty());
}

#[test]
fn only_the_token_of_the_probe_verifies_and_only_for_its_peer() {
    let mut world = world();
    let external = addr(EXTERNAL);
    world.register("bob", addr(BOB), &[], NatClass::EndpointIndependent, 20);
    register_alice(&mut world, Some(external));
    let token = probes(&mut world)[0].1;
    let mut wrong = token;
    wrong[0] ^= 1;
    assert_eq!(
        answer(&mut world, "alice", ALICE, &wrong),
        RendezvousHandled::NotFound
    );
    // Bob saw the probe (say): his own credentials verify nothing of alice's.
    assert_eq!(
        answer(&mut world, "bob", BOB, &token),
        RendezvousHandled::NotFound
    );
    // Unsigned or someone else's signature: not even looked at.
    let mut forged = mapped_check([5; 12], &creds("alice"), None, &token);
    let last = forged.len() - 13;
    forged[last] ^= 1;
    assert_ne!(
        world.send(addr(ALICE), &forged).0,
        RendezvousHandled::MappedChecked
    );
    assert!(mapped_of(&bob_meets_alice(&mut world)).is_empty());
    assert!(
        world
            .drain_events()
            .all(|e| !matches!(e, RendezvousEvent::MappedCandidate { verified: true }))
    );
    // The real answer still does.
    assert_eq!(
        answer(&mut world, "alice", ALICE, &token),
        RendezvousHandled::MappedChecked
    );
    assert_eq!(mapped_of(&bob_meets_alice(&mut world)), [external]);
}

#[test]
fn without_discovery_sockets_the_probe_leaves_from_the_service_socket() {
    let mut again = World::new();
    let from = addr(ALICE);
    let c = creds("alice");
    let request = register_with_candidates(
        [1; 12],
        &c,
        Some(&again.nonce(from)),
        &[Candidate {
            kind: CandidateKind::Mapped,
            addr: addr(EXTERNAL),
        }],
        NatClass::Unknown,
        0,
    );
    let (_, out) = again.send(from, &request);
    assert!(again.drain_redirected().next().is_none());
    assert!(out.iter().any(|t| t.to == addr(EXTERNAL)
        && matches!(
            parse_mapped_check(&t.payload, &c.password),
            Some(MappedCheck::Probe { .. })
        )));
}

proptest! {
    /// Whatever mapped candidates a peer registers, and whenever, the gateway
    /// probes it at most once per interval: announcing a third party's address
    /// buys a peer no more than that.
    #[test]
    fn probes_to_a_peer_are_an_interval_apart(
        steps in proptest::collection::vec((0u8..4, 0u64..1_500, any::<bool>()), 1..40),
    ) {
        let mut world = world();
        let mut at = Vec::new();
        let mut last_token = None;
        for (choice, wait, answers) in steps {
            let mapped = (choice > 0).then(|| SocketAddr::from(([198, 51, 100, 2], 30_000 + u16::from(choice))));
            register_alice(&mut world, mapped);
            for (_, token) in probes(&mut world) {
                at.push(world.now);
                last_token = Some(token);
            }
            if answers && let Some(token) = last_token {
                answer(&mut world, "alice", ALICE, &token);
            }
            prop_assert!(world.server.mapped.consistent());
            world.now += Duration::from_millis(wait);
            world.server.handle_timeout(world.now, NOW_UNIX);
            world.collect();
            for (_, token) in probes(&mut world) {
                at.push(world.now);
                last_token = Some(token);
            }
            prop_assert!(world.server.mapped.consistent());
        }
        for pair in at.windows(2) {
            prop_assert!(pair[1] - pair[0] >= MAPPED_PROBE_INTERVAL, "{:?}", pair[1] - pair[0]);
        }
    }

    /// No guessed token verifies a candidate.
    #[test]
    fn a_guessed_token_verifies_nothing(guess in any::<[u8; 16]>()) {
        let mut world = world();
        register_alice(&mut world, Some(addr(EXTERNAL)));
        let token = probes(&mut world)[0].1;
        prop_assume!(guess != token);
        prop_assert_eq!(answer(&mut world, "alice", ALICE, &guess), RendezvousHandled::NotFound);
        prop_assert!(world.server.mapped.is_pending("alice"));
    }
}
