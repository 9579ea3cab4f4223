//! What the agent tells the gateway about its attempts: the outcome of every
//! session (once), how each TCP punching technique did, and the TCP-Seq messages of
//! TCP techniques 3 and 4; each is resent once when the gateway answers with a fresh
//! nonce.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Agent, AgentEvent, PendingRequest};
use crate::rendezvous::{
    client,
    wire::{SessionOutcome, TcpTechnique, method},
};

/// A TCP-Seq as sent, kept to resend it once with a fresh nonce.
#[derive(Clone, Copy, Debug)]
pub(super) struct TcpSeqRequest {
    pub(super) intro_id: u64,
    isn: u32,
    expected: Option<SocketAddr>,
    /// Ask the gateway to forge the SYN-ACKs (technique 4) instead of forwarding.
    forge: bool,
    resent: bool,
}

/// An outcome report as sent, kept to resend it once with a fresh nonce.
#[derive(Clone, Copy, Debug)]
pub(super) struct Report {
    intro_id: u64,
    /// Set for a TCP punching report.
    technique: Option<TcpTechnique>,
    outcome: SessionOutcome,
    elapsed: Duration,
    probes: u32,
    resent: bool,
}

impl Agent {
    /// Reports the outcome of session `intro_id` to the gateway, once per session.
    pub(super) fn report(
        &mut self,
        now: Instant,
        intro_id: u64,
        outcome: SessionOutcome,
        elapsed: Duration,
        probes: u32,
    ) {
        match self.sessions.get_mut(&intro_id) {
            Some(session) if session.reported => return,
            Some(session) => session.reported = true,
            None => {}
        }
        self.send_report(
            now,
            Report {
                intro_id,
                technique: None,
                outcome,
                elapsed,
                probes,
                resent: false,
            },
        );
    }

    /// Sends (or resends) an outcome or TCP report.
    fn send_report(&mut self, now: Instant, report: Report) {
        let Report {
            intro_id,
            technique,
            outcome,
            elapsed,
            probes,
            ..
        } = report;
        let tid = self.tid();
        let ms = u32::try_from(elapsed.as_millis()).unwrap_or(u32::MAX);
        let payload = match technique {
            Some(technique) => client::tcp_outcome(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                intro_id,
                client::TcpReport {
                    technique,
                    connected: outcome == SessionOutcome::Direct,
                    elapsed_ms: ms,
                    attempts: probes,
                },
            ),
            None => client::outcome(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                intro_id,
                outcome,
                ms,
                probes,
            ),
        };
        // Pending only so a stale-nonce answer can resend it (once: a report is
        // not worth more than one retry); the clock starts at the last send.
        self.pending.insert(
            tid,
            PendingRequest {
                report: Some(report),
                ..PendingRequest::new(method::OUTCOME, now)
            },
        );
        self.send_to_server(payload);
    }

    /// Reports how a TCP punching technique did in introduction `intro_id` (the
    /// driver calls this once per technique it tried; the gateway counts the first
    /// report of each technique).
    pub fn report_tcp(
        &mut self,
        now: Instant,
        intro_id: u64,
        technique: TcpTechnique,
        connected: bool,
        elapsed: Duration,
        attempts: u32,
    ) {
        self.send_report(
            now,
            Report {
                intro_id,
                technique: Some(technique),
                outcome: if connected {
                    SessionOutcome::Direct
                } else {
                    SessionOutcome::Failed
                },
                elapsed,
                probes: attempts,
                resent: false,
            },
        );
    }

    /// Sends the initial sequence number `isn` of our low-TTL SYN toward `expected`
    /// (the other side's TCP candidate) to the other side of introduction
    /// `intro_id`, through the gateway (TCP-Seq; TCP technique 3). The gateway
    /// forwards it once per side per introduction. With `forge` (technique 4) the
    /// gateway forwards nothing and forges the SYN-ACKs into both NATs once both
    /// sides' numbers are in; a gateway that does not forge refuses it
    /// ([`AgentEvent::TcpSeqRefused`]).
    pub fn send_tcp_seq(
        &mut self,
        now: Instant,
        intro_id: u64,
        isn: u32,
        expected: Option<SocketAddr>,
        forge: bool,
    ) {
        self.send_tcp_seq_request(
            now,
            TcpSeqRequest {
                intro_id,
                isn,
                expected,
                forge,
                resent: false,
            },
        );
    }

    /// Sends (or resends) a TCP-Seq.
    fn send_tcp_seq_request(&mut self, now: Instant, request: TcpSeqRequest) {
        let tid = self.tid();
        let payload = client::tcp_seq(
            tid,
            &self.config.credentials,
            self.nonce.as_deref(),
            request.intro_id,
            request.isn,
            request.expected,
            request.forge,
        );
        self.pending.insert(
            tid,
            PendingRequest {
                tcp_seq: Some(request),
                ..PendingRequest::new(method::TCP_SEQ, now)
            },
        );
        self.send_to_server(payload);
    }

    /// A report the gateway answered with a fresh nonce: sent again, once.
    pub(super) fn resend_report(&mut self, now: Instant, report: Option<Report>) {
        if let Some(report) = report.filter(|r| !r.resent) {
            self.send_report(
                now,
                Report {
                    resent: true,
                    ..report
                },
            );
        }
    }

    /// A TCP-Seq the gateway answered with a fresh nonce: sent again, once.
    pub(super) fn resend_tcp_seq(&mut self, now: Instant, seq: Option<TcpSeqRequest>) {
        if let Some(seq) = seq.filter(|s| !s.resent) {
            self.send_tcp_seq_request(
                now,
                TcpSeqRequest {
                    resent: true,
                    ..seq
                },
            );
        }
    }

    /// The other side's TCP-Seq, forwarded by the gateway: passed on once per session
    /// (the gateway sends each twice).
    pub(super) fn tcp_seq_received(&mut self, seq: client::TcpSeq) {
        if let Some(session) = self.sessions.get_mut(&seq.intro_id)
            && session.peer_id == seq.peer_id
            && !std::mem::replace(&mut session.tcp_seq_seen, true)
        {
            self.events.push_back(AgentEvent::TcpSeq {
                peer_id: seq.peer_id,
                intro_id: seq.intro_id,
                isn: seq.isn,
                expected: seq.expected,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::RendezvousEvent as Event;
    use crate::sim::agents::*;

    #[test]
    fn tcp_candidates_reach_the_other_side_apart_from_the_udp_probes_and_outcomes_are_reported() {
        let mut sim = Sim::new(false);
        let tcp = [addr("198.51.100.2:4100"), addr("198.51.100.6:5100")];
        for (i, candidate) in tcp.iter().enumerate() {
            sim.agents[i].1.config.tcp_candidates = vec![*candidate];
        }
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let introduced = |i: usize| {
            sim.events.iter().find_map(|(j, e)| match e {
                AgentEvent::TcpIntroduced {
                    intro_id,
                    candidates,
                    start_at,
                    ..
                } if *j == i => Some((*intro_id, candidates.clone(), *start_at)),
                _ => None,
            })
        };
        let (intro_a, cands_a, start_a) = introduced(0).expect("alice's TCP introduction");
        let (intro_b, cands_b, start_b) = introduced(1).expect("bob's TCP introduction");
        assert_eq!(intro_a, intro_b);
        assert_eq!(cands_a, vec![tcp[1]]);
        assert_eq!(cands_b, vec![tcp[0]]);
        let skew = start_a.max(start_b) - start_a.min(start_b);
        assert!(skew <= Duration::from_millis(2), "{skew:?}");
        for (i, (_, agent)) in sim.agents.iter().enumerate() {
            for session in agent.sessions.values() {
                assert!(
                    !session.candidates.contains(&tcp[1 - i]),
                    "a TCP candidate is never probed over UDP"
                );
            }
        }
        assert!(sim.agents[0].1.path("bob").is_some(), "UDP still punches");
        let now = sim.now;
        sim.agents[0].1.report_tcp(
            now,
            intro_a,
            TcpTechnique::LowTtl,
            true,
            Duration::from_millis(200),
            2,
        );
        sim.run_for(Duration::from_millis(50));
        assert!(sim.server_events.iter().any(|e| matches!(
            e,
            Event::TcpOutcome {
                technique: TcpTechnique::LowTtl,
                success: true,
                ..
            }
        )));
    }

    #[test]
    fn a_tcp_mapping_reaches_the_other_sides_tcp_punch_after_the_reflexive_candidate() {
        use crate::tcp_punch::{TcpMode, TcpPunch, TcpPunchConfig, TcpPunchEvent};
        let mut sim = Sim::new(false);
        let reflexive = addr("198.51.100.6:5100");
        let mapped = addr("198.51.100.6:40000");
        sim.agents[0].1.config.tcp_candidates = vec![addr("198.51.100.2:4100")];
        sim.agents[1].1.config.tcp_candidates = vec![reflexive];
        // Bob's router granted a TCP mapping of his punching port.
        sim.agents[1].1.tcp_mapped = Some(mapped);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let (candidates, start_at) = sim
            .events
            .iter()
            .find_map(|(j, e)| match e {
                AgentEvent::TcpIntroduced {
                    candidates,
                    start_at,
                    ..
                } if *j == 0 => Some((candidates.clone(), *start_at)),
                _ => None,
            })
            .expect("alice's TCP introduction");
        assert_eq!(candidates, [reflexive, mapped]);
        // Alice's TCP punch connects to both at the start; a splice (one per
        // introduction) goes to the reflexive one, which the other side's TCP-Seq
        // and the gateway's forge name.
        let mut punch = TcpPunch::new(
            TcpMode::Only(TcpTechnique::SimultaneousOpen),
            &candidates,
            start_at,
            TcpPunchConfig::default(),
        );
        punch.handle_timeout(start_at);
        let connects: Vec<SocketAddr> = std::iter::from_fn(|| punch.poll_event())
            .filter_map(|e| match e {
                TcpPunchEvent::Connect { to, .. } => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(connects, [reflexive, mapped]);
        let mut splice = TcpPunch::new(
            TcpMode::Only(TcpTechnique::NatBlaster),
            &candidates,
            start_at,
            TcpPunchConfig::default(),
        );
        splice.handle_timeout(start_at);
        let spliced: Vec<SocketAddr> = std::iter::from_fn(|| splice.poll_event())
            .filter_map(|e| match e {
                TcpPunchEvent::Splice { to, .. } => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(spliced, [reflexive]);
        // The UDP probes never aim at either.
        for session in sim.agents[0].1.sessions.values() {
            assert!(!session.candidates.contains(&mapped));
        }
    }

    #[test]
    fn tcp_seq_reaches_the_other_side_through_the_gateway_once() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let intro = sim.agents[0]
            .1
            .sessions
            .keys()
            .next()
            .copied()
            .expect("an introduction");
        let expected = addr("198.51.100.6:5100");
        let now = sim.now;
        sim.agents[0]
            .1
            .send_tcp_seq(now, intro, 0x1234_5678, Some(expected), false);
        // A second one is refused by the gateway and never reaches bob.
        sim.agents[0]
            .1
            .send_tcp_seq(now, intro, 99, Some(expected), false);
        sim.run_for(Duration::from_millis(50));
        let received: Vec<_> = sim
            .events
            .iter()
            .filter_map(|(i, e)| match e {
                AgentEvent::TcpSeq {
                    peer_id,
                    intro_id,
                    isn,
                    expected,
                } => Some((*i, peer_id.clone(), *intro_id, *isn, *expected)),
                _ => None,
            })
            .collect();
        assert_eq!(
            received,
            vec![(1, "alice".to_string(), intro, 0x1234_5678, Some(expected))]
        );
    }

    #[test]
    fn a_forge_request_to_a_gateway_that_does_not_forge_is_reported_refused() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let now = sim.now;
        sim.agents[0].1.connect("bob", now);
        sim.run_for(Duration::from_millis(300));
        let intro = sim.agents[0]
            .1
            .sessions
            .keys()
            .next()
            .copied()
            .expect("an introduction");
        let now = sim.now;
        sim.agents[0]
            .1
            .send_tcp_seq(now, intro, 7, Some(addr("198.51.100.6:5100")), true);
        sim.run_for(Duration::from_millis(50));
        let refused: Vec<_> = sim
            .events
            .iter()
            .filter_map(|(i, e)| match e {
                AgentEvent::TcpSeqRefused { intro_id, code } => Some((*i, *intro_id, *code)),
                AgentEvent::TcpSeq { .. } => panic!("nothing may be forwarded: {e:?}"),
                _ => None,
            })
            .collect();
        assert_eq!(
            refused,
            vec![(0, intro, crate::rendezvous::wire::TCP_FORGE_DISABLED)]
        );
    }
}
