//! Server-assisted TCP splicing (technique 4; lab only, off by default): pairing the
//! TCP-Seq halves the two sides of an introduction send, and the SYN-ACKs to forge
//! once both are in. The server checks who may send a half (registered, a side of
//! a remembered introduction, once); this module checks that a half names the other
//! side's endpoint and pairs it. Crafting and injecting the segments (raw sockets,
//! spoofed sources) is the driver's.
use std::net::SocketAddr;

use super::{
    server::{Refusal, RendezvousHandled},
    wire::{Candidate, CandidateKind},
};

/// SYN-ACKs the gateway forges per introduction at most: each side's twice.
pub const MAX_FORGED_PER_INTRODUCTION: usize = 4;
/// Copies of each forged SYN-ACK (one lost copy must not cost the technique).
const FORGED_COPIES: usize = 2;
const _: () = assert!(2 * FORGED_COPIES == MAX_FORGED_PER_INTRODUCTION);

/// A SYN-ACK the gateway must forge (TCP technique 4): a raw TCP segment from `src`
/// (spoofed: the other side's public TCP endpoint) to `dst` (this side's public TCP
/// endpoint), sequence number `seq` (the other side's ISN) acknowledging `ack` (this
/// side's ISN + 1). The driver crafts and injects it; the core never does I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForgedSynAck {
    /// Source (the other side's public TCP endpoint).
    pub src: SocketAddr,
    /// Destination (this side's public TCP endpoint).
    pub dst: SocketAddr,
    /// Sequence number: the other side's initial sequence number.
    pub seq: u32,
    /// Acknowledgement number: this side's initial sequence number + 1.
    pub ack: u32,
}

/// One side's part of a server-assisted splice.
#[derive(Clone, Copy, Debug)]
pub(super) struct ForgeHalf {
    /// The initial sequence number of its low-TTL SYN.
    isn: u32,
    /// Its public TCP endpoint (its registered TCP candidate).
    own: SocketAddr,
    /// Where its SYN went (the other side's registered TCP candidate).
    target: SocketAddr,
}

/// The halves of one introduction's splice, each kept until the other side's arrives.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ForgePair {
    halves: [Option<ForgeHalf>; 2],
}

/// `addr` with an IPv4-mapped IPv6 address as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A peer's public TCP endpoint: its TCP reflexive candidate (the mapping of its
/// punching port the gateway saw, which its spliced SYNs leave from), else its
/// first registered TCP candidate, canonical.
pub(super) fn tcp_endpoint(candidates: &[Candidate]) -> Option<SocketAddr> {
    candidates
        .iter()
        .find(|c| c.kind == CandidateKind::TcpServerReflexive)
        .or_else(|| candidates.iter().find(|c| c.kind.is_tcp()))
        .map(|c| canonical(c.addr))
}

/// The half of a sender whose TCP endpoint is `own` (`None`: it registered none),
/// whose SYN with initial sequence number `isn` went to `target`; refused unless
/// `target` is the other side's TCP endpoint `other` (in the same family as `own`),
/// so a sender can never aim forged segments at a third party.
pub(super) fn half(
    isn: u32,
    own: Option<SocketAddr>,
    target: SocketAddr,
    other: SocketAddr,
) -> Result<ForgeHalf, Refusal> {
    let Some(own) = own else {
        return Err((RendezvousHandled::BadRequest, 400, "No TCP Candidate"));
    };
    let target = canonical(target);
    if target != other || own.is_ipv4() != target.is_ipv4() {
        return Err((RendezvousHandled::BadRequest, 400, "Wrong Target"));
    }
    Ok(ForgeHalf { isn, own, target })
}

impl ForgePair {
    /// Adds `side`'s half. When the other side's is in and names this one's endpoint
    /// (both sides' candidates are what they were when each half arrived), returns
    /// the SYN-ACKs to forge: into this side's NAT, then the other's, each
    /// [`FORGED_COPIES`] times. A mismatched pair (a candidate moved in between)
    /// forges nothing and keeps nothing.
    pub(super) fn offer(
        &mut self,
        side: usize,
        half: ForgeHalf,
    ) -> Option<[ForgedSynAck; MAX_FORGED_PER_INTRODUCTION]> {
        match self.halves[1 - side].take() {
            Some(theirs) if theirs.target == half.own && theirs.own == half.target => {
                let forge = |to: ForgeHalf, by: ForgeHalf| ForgedSynAck {
                    src: by.own,
                    dst: to.own,
                    seq: by.isn,
                    ack: to.isn.wrapping_add(1),
                };
                let (mine, other) = (forge(half, theirs), forge(theirs, half));
                Some(std::array::from_fn(|i| {
                    if i < FORGED_COPIES { mine } else { other }
                }))
            }
            Some(_) => None,
            None => {
                self.halves[side] = Some(half);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::rendezvous::{
        RendezvousHandled,
        client::{self, *},
        wire::{CandidateKind, NatClass, TCP_FORGE_DISABLED, attr, method},
    };
    use crate::sim::rendezvous::*;

    /// Alice at `a` and bob at `b` registered with TCP candidates `ta` and `tb`, and
    /// introduced; mallory registered elsewhere. Returns the introduction id.
    fn forge_world(forge: bool) -> (World, u64) {
        let mut world = World::new();
        world.server.set_tcp_forge(forge);
        let tcp = |addr| Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr,
        };
        for (who, from, tcp_at) in [
            (
                "alice",
                addr("198.51.100.2:4000"),
                addr("198.51.100.2:4100"),
            ),
            ("bob", addr("198.51.100.6:5000"), addr("198.51.100.6:5100")),
            (
                "mallory",
                addr("203.0.113.5:6000"),
                addr("203.0.113.5:6100"),
            ),
        ] {
            let (handled, _) = world.send(
                from,
                &register_with_candidates(
                    [1; 12],
                    &creds(who),
                    Some(&world.nonce(from)),
                    &[tcp(tcp_at)],
                    NatClass::EndpointIndependent,
                    0,
                ),
            );
            assert_eq!(handled, RendezvousHandled::Registered);
        }
        let a = addr("198.51.100.2:4000");
        let alice = creds("alice");
        let (_, out) = world.send(a, &connect([2; 12], &alice, Some(&world.nonce(a)), "bob"));
        let intro = out
            .iter()
            .find_map(|t| parse_response(&t.payload, &alice.password))
            .and_then(|r| r.intro_id)
            .expect("id");
        (world, intro)
    }

    fn forge_request(
        world: &World,
        who: &str,
        from: SocketAddr,
        intro: u64,
        isn: u32,
        target: &str,
    ) -> Vec<u8> {
        tcp_seq(
            [9; 12],
            &creds(who),
            Some(&world.nonce(from)),
            intro,
            isn,
            Some(addr(target)),
            true,
        )
    }

    #[test]
    fn forged_synacks_answer_each_side_s_syn_once_both_isns_are_in() {
        let (mut world, intro) = forge_world(true);
        let (a, b) = (addr("198.51.100.2:4000"), addr("198.51.100.6:5000"));
        let (ta, tb) = (addr("198.51.100.2:4100"), addr("198.51.100.6:5100"));
        // Alice's half alone: kept, acknowledged, nothing forwarded or forged.
        let (handled, out) = world.send(
            a,
            &forge_request(&world, "alice", a, intro, 1000, "198.51.100.6:5100"),
        );
        assert_eq!(handled, RendezvousHandled::TcpForgeQueued);
        assert!(
            out.iter().all(|t| t.to == a),
            "nothing goes to bob: {out:?}"
        );
        assert!(
            parse_response(&out[0].payload, &creds("alice").password)
                .is_some_and(|r| r.result.is_ok())
        );
        assert_eq!(world.drain_forged().count(), 0);
        // Bob's completes it: into alice's NAT the SYN-ACK answering her SYN (from
        // bob's endpoint, seq = bob's ISN, ack = hers + 1), and the mirror image,
        // each twice; bob's ISN is not forwarded to alice either.
        let (handled, out) = world.send(
            b,
            &forge_request(&world, "bob", b, intro, u32::MAX, "198.51.100.2:4100"),
        );
        assert_eq!(handled, RendezvousHandled::TcpSynAckForged);
        assert!(out.iter().all(|t| t.to == b));
        let forged: Vec<ForgedSynAck> = world.drain_forged().collect();
        let to_alice = ForgedSynAck {
            src: tb,
            dst: ta,
            seq: u32::MAX,
            ack: 1001,
        };
        let to_bob = ForgedSynAck {
            src: ta,
            dst: tb,
            seq: 1000,
            ack: 0,
        };
        assert_eq!(forged.len(), MAX_FORGED_PER_INTRODUCTION);
        assert_eq!(forged.iter().filter(|f| **f == to_alice).count(), 2);
        assert_eq!(forged.iter().filter(|f| **f == to_bob).count(), 2);
        // Once per side per introduction: a second round forges nothing.
        for (who, from, target) in [
            ("alice", a, "198.51.100.6:5100"),
            ("bob", b, "198.51.100.2:4100"),
        ] {
            let (handled, _) =
                world.send(from, &forge_request(&world, who, from, intro, 5, target));
            assert_eq!(handled, RendezvousHandled::NotFound);
        }
        assert_eq!(world.drain_forged().count(), 0);
    }

    #[test]
    fn bad_forge_requests_forge_nothing_and_leave_no_state() {
        let (mut world, intro) = forge_world(true);
        let (a, b, m) = (
            addr("198.51.100.2:4000"),
            addr("198.51.100.6:5000"),
            addr("203.0.113.5:6000"),
        );
        let cases: [(&str, SocketAddr, u64, &str, RendezvousHandled); 5] = [
            // A foreign sender (not a side of the introduction).
            (
                "mallory",
                m,
                intro,
                "198.51.100.6:5100",
                RendezvousHandled::NotFound,
            ),
            // An introduction the gateway does not know.
            (
                "alice",
                a,
                intro ^ 1,
                "198.51.100.6:5100",
                RendezvousHandled::NotFound,
            ),
            // A target that is not the other side's TCP endpoint (a third party's).
            (
                "alice",
                a,
                intro,
                "203.0.113.5:6100",
                RendezvousHandled::BadRequest,
            ),
            (
                "alice",
                a,
                intro,
                "198.51.100.6:5101",
                RendezvousHandled::BadRequest,
            ),
            // From another address than the registration.
            (
                "alice",
                addr("198.51.100.2:4001"),
                intro,
                "198.51.100.6:5100",
                RendezvousHandled::Forbidden,
            ),
        ];
        for (who, from, id, target, expected) in cases {
            let (handled, _) = world.send(from, &forge_request(&world, who, from, id, 7, target));
            assert_eq!(handled, expected, "{who} from {from} for {target}");
        }
        // Without the target: a bad request.
        let bare = client::request(
            method::TCP_SEQ,
            [8; 12],
            &creds("bob"),
            Some(&world.nonce(b)),
            |w| {
                w.attribute(attr::INTRO_ID, &intro.to_be_bytes());
                w.attribute(attr::TCP_SEQ, &7u32.to_be_bytes());
                w.attribute(attr::TCP_FORGE, &[1]);
            },
        );
        assert_eq!(world.send(b, &bare).0, RendezvousHandled::BadRequest);
        // None of that left state: the two real halves still pair up.
        let (handled, _) = world.send(
            a,
            &forge_request(&world, "alice", a, intro, 1, "198.51.100.6:5100"),
        );
        assert_eq!(handled, RendezvousHandled::TcpForgeQueued);
        assert_eq!(world.drain_forged().count(), 0);
        let (handled, _) = world.send(
            b,
            &forge_request(&world, "bob", b, intro, 2, "198.51.100.2:4100"),
        );
        assert_eq!(handled, RendezvousHandled::TcpSynAckForged);
        assert!(world.drain_forged().all(|f| f.seq == 1 || f.seq == 2));
    }

    #[test]
    fn forging_is_refused_with_its_own_code_unless_enabled() {
        let (mut world, intro) = forge_world(false);
        let (a, b) = (addr("198.51.100.2:4000"), addr("198.51.100.6:5000"));
        for (who, from, target) in [
            ("alice", a, "198.51.100.6:5100"),
            ("bob", b, "198.51.100.2:4100"),
        ] {
            let (handled, out) =
                world.send(from, &forge_request(&world, who, from, intro, 3, target));
            assert_eq!(handled, RendezvousHandled::TcpForgeDisabled);
            let response = parse_response(&out[0].payload, &creds(who).password).expect("signed");
            assert_eq!(response.result, Err(TCP_FORGE_DISABLED));
        }
        assert_eq!(world.drain_forged().count(), 0);
        // The refusal kept nothing: a NATBlaster TCP-Seq of the same side still passes.
        let plain = tcp_seq(
            [7; 12],
            &creds("alice"),
            Some(&world.nonce(a)),
            intro,
            3,
            Some(addr("198.51.100.6:5100")),
            false,
        );
        assert_eq!(world.send(a, &plain).0, RendezvousHandled::TcpSeqForwarded);
    }
}
