//! Refusals and silence, said in words: what the gateway (or its relay) refused, what
//! it means, and what the agent does next; and the retry schedules that keep a
//! refusal from turning into a tight loop (a Connect to an unknown peer, an attempt
//! the relay cannot carry) or into retries that cannot help (wrong credentials).
use std::time::Duration;

use crate::{rendezvous::wire::method, turn};

/// What the agent does after a refusal, so its driver can say so on one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// The same request goes again after this long (backing off).
    RetryIn(Duration),
    /// The agent registers again at once (the gateway forgot it).
    RegisterAgain,
    /// Nothing the agent can do will help: it has stopped ([`super::Agent::stopped`]).
    Stop,
    /// No relay fallback for this long; punching is still tried.
    NoRelayFor(Duration),
    /// The relay cannot carry this peer; the next attempt at it waits this long.
    PeerRetryIn(Duration),
    /// Nothing: the request was a report or an optional step.
    Continue,
}

impl std::fmt::Display for NextStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |d: &Duration| d.as_secs_f64();
        match self {
            Self::RetryIn(d) => write!(f, "retrying in {:.0} s, then less often", secs(d).max(1.0)),
            Self::RegisterAgain => f.write_str("registering again"),
            Self::Stop => f.write_str("stopping"),
            Self::NoRelayFor(d) => write!(f, "no relay fallback for {:.0} s", secs(d)),
            Self::PeerRetryIn(d) => {
                write!(f, "next attempt at this peer in {:.0} s", secs(d).max(1.0))
            }
            Self::Continue => f.write_str("carrying on"),
        }
    }
}

/// The method's name as an operator reads it (rendezvous and TURN methods do not
/// share numbers).
pub fn method_name(m: u16) -> &'static str {
    match m {
        method::REGISTER => "register",
        method::CONNECT => "connect",
        method::OUTCOME => "outcome",
        method::RELAY_OFFER => "relay-offer",
        method::TCP_SEQ => "tcp-seq",
        turn::method::ALLOCATE => "allocate",
        turn::method::REFRESH => "refresh",
        turn::method::CREATE_PERMISSION => "create-permission",
        turn::method::CHANNEL_BIND => "channel-bind",
        _ => "request",
    }
}

/// What an error code means to the agent that got it, in words.
pub fn reason(m: u16, code: u16) -> &'static str {
    let relay = matches!(
        m,
        turn::method::ALLOCATE
            | turn::method::REFRESH
            | turn::method::CREATE_PERMISSION
            | turn::method::CHANNEL_BIND
    );
    match (code, relay) {
        (401, _) => {
            "wrong or expired credentials (check GATEWAY_USERNAME/GATEWAY_PASSWORD against the gateway's secret)"
        }
        (403, true) => "the relay's peer policy denies this peer's address",
        (403, false) => "not registered from this address",
        (404, _) if m == method::CONNECT => {
            "peer not registered with the gateway (or not in this peer's group)"
        }
        (404, _) => "unknown introduction",
        (437, _) => "allocation mismatch (the relay holds another allocation for us)",
        (486, _) => "relay allocation quota reached for these credentials",
        (508, _) => "the relay has no capacity left",
        (429, _) => "too many requests",
        (503, _) if m == method::REGISTER => "the gateway's registry is full",
        (503, _) => {
            "cluster unavailable: the gateway cannot reach the node the peer is registered on"
        }
        (501, _) => "not supported by this gateway",
        (300, _) => "the gateway is draining",
        (400, _) => "bad request",
        _ => "refused",
    }
}

/// First wait before asking again for a peer after a 404 or an attempt that ended
/// without a path.
pub const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// Longest wait between two attempts at a peer that were tried and found no path
/// (or that the relay refuses): retries stay slow but never stop (the network may
/// change).
pub const MAX_CONNECT_RETRY: Duration = Duration::from_secs(30);

/// Longest wait between two Connects to a peer the gateway does not know (404): the
/// peer may come any moment, and a Connect is one small datagram.
pub const MAX_UNKNOWN_PEER_RETRY: Duration = Duration::from_secs(8);

/// The first wait before another attempt at a peer the relay refuses: an attempt
/// costs a punch window and a relay leg that cannot work, so retries start slow.
pub const RELAY_DENIED_RETRY: Duration = Duration::from_secs(16);

/// How many unauthenticated 401 answers in a row end the agent: an answer to a
/// Register signed with a key the gateway does not derive is never going to change
/// by retrying; one more than one tolerates a stray answer.
pub const FATAL_CREDENTIAL_REFUSALS: u32 = 2;

/// How long the gateway may answer nothing before the agent says so.
pub const NO_ANSWER_AFTER: Duration = Duration::from_secs(5);

/// The wait after `previous`: doubled, at most `cap`.
pub fn next_connect_retry(previous: Duration, cap: Duration) -> Duration {
    (previous.max(CONNECT_RETRY / 2) * 2).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_retries_double_up_to_the_cap() {
        let mut wait = CONNECT_RETRY;
        let mut waits = vec![wait];
        for _ in 0..7 {
            wait = next_connect_retry(wait, MAX_CONNECT_RETRY);
            waits.push(wait);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(
            next_connect_retry(Duration::from_secs(8), MAX_UNKNOWN_PEER_RETRY),
            Duration::from_secs(8)
        );
    }

    #[test]
    fn every_refusal_an_agent_meets_has_words() {
        for (m, code) in [
            (method::REGISTER, 401),
            (method::CONNECT, 404),
            (turn::method::CREATE_PERMISSION, 403),
            (turn::method::ALLOCATE, 486),
            (turn::method::ALLOCATE, 508),
            (turn::method::ALLOCATE, 437),
        ] {
            assert_ne!(reason(m, code), "refused", "{m:#x} {code}");
            assert_ne!(method_name(m), "request");
        }
        assert_eq!(
            NextStep::RetryIn(Duration::from_millis(200)).to_string(),
            "retrying in 1 s, then less often"
        );
    }
}

#[cfg(test)]
mod agent_tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        agent::{Agent, AgentConfig, AgentEvent},
        rendezvous::client::PeerCredentials,
        sim::agents::*,
    };

    /// The instants (from the start) of agent `i`'s refusals matching `f`.
    fn refusals(sim: &Sim, start: Instant, i: usize, f: impl Fn(u16, u16) -> bool) -> Vec<f64> {
        sim.timed_events
            .iter()
            .filter(|(_, n, e)| {
                *n == i
                    && matches!(e, AgentEvent::Refused { method, code, .. } if f(*method, *code))
            })
            .map(|(at, ..)| at.saturating_duration_since(start).as_secs_f64())
            .collect()
    }

    #[test]
    fn wrong_credentials_stop_the_agent_with_one_refusal() {
        let mut sim = Sim::new(false);
        let start = sim.now;
        let mut config = AgentConfig::new(
            sim.server_addr,
            PeerCredentials {
                username: "1900000000:alice".into(),
                password: "not the password".into(),
            },
        );
        config.relay = false;
        sim.agents[0].1 = Agent::new(config, start, 9);
        sim.agents[0].1.connect("bob", start);
        sim.run_for(Duration::from_secs(20));
        let refused: Vec<&AgentEvent> = sim
            .events
            .iter()
            .filter(|(i, e)| *i == 0 && matches!(e, AgentEvent::Refused { .. }))
            .map(|(_, e)| e)
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(matches!(
            refused[0],
            AgentEvent::Refused {
                code: 401,
                next: NextStep::Stop,
                ..
            }
        ));
        let at = refusals(&sim, start, 0, |_, c| c == 401);
        assert!(at[0] < 2.0, "{at:?}");
        assert!(sim.agents[0].1.stopped());
        assert_eq!(sim.agents[0].1.poll_timeout(), None);
        // Nothing more left it after the refusal.
        let stop = start + Duration::from_secs_f64(at[0]);
        assert!(!sim.sent.iter().any(|s| s.agent == 0 && s.at > stop));
        // The other agent, with good credentials, was never refused.
        assert!(refusals(&sim, start, 1, |_, _| true).is_empty());
    }

    #[test]
    fn an_unknown_peer_is_asked_for_less_and_less_often() {
        let mut sim = Sim::new(false);
        sim.run_for(Duration::from_millis(100));
        let start = sim.now;
        sim.agents[0].1.connect("nobody", start);
        sim.run_for(Duration::from_secs(30));
        let at = refusals(&sim, start, 0, |m, c| {
            m == crate::rendezvous::wire::method::CONNECT && c == 404
        });
        // 0, 1, 3, 7, 15, 23 s: doubling gaps up to 8 s, never two within a second.
        assert_eq!(at.len(), 6, "{at:?}");
        let gaps: Vec<u64> = at
            .windows(2)
            .map(|w| (w[1] - w[0]).round() as u64)
            .collect();
        assert_eq!(gaps, vec![1, 2, 4, 8, 8], "{at:?}");
        // Every refusal says when the next try goes.
        assert!(sim.events.iter().any(|(_, e)| matches!(
            e,
            AgentEvent::Refused { code: 404, next: NextStep::RetryIn(d), .. } if *d == Duration::from_secs(8)
        )));
        // A peer that comes is still found (retries never stop).
        assert!(sim.agents[0].1.poll_timeout().is_some());
    }

    #[test]
    fn a_silent_server_is_reported_after_a_bounded_wait_then_rarely() {
        let mut sim = Sim::new(false);
        // Over UDP only (with the fallback, `transport` says it: "no answer over udp
        // for 3 s; trying tcp").
        sim.reconfigure(0, |c| c.transport_fallback = false);
        sim.nodes[0].silent = true;
        let start = sim.now;
        sim.run_for(Duration::from_secs(25));
        let said: Vec<(f64, Duration)> = sim
            .timed_events
            .iter()
            .filter_map(|(at, i, e)| match e {
                AgentEvent::NoAnswer { silent, server, .. } if *i == 0 => {
                    assert_eq!(*server, sim.server_addr);
                    Some((at.saturating_duration_since(start).as_secs_f64(), *silent))
                }
                _ => None,
            })
            .collect();
        // After 5 s, then when the silence doubled (10 s, 20 s).
        let secs: Vec<u64> = said.iter().map(|(_, s)| s.as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20], "{said:?}");
        // The Register kept going meanwhile (with backoff), and once the server
        // answers, the agent registers and the silence is over.
        sim.nodes[0].silent = false;
        sim.run_for(Duration::from_secs(20));
        assert!(sim.has(0, |e| matches!(e, AgentEvent::Registered { .. })));
        let after = sim.timed_events.iter().filter(|(at, i, e)| {
            *i == 0
                && *at > start + Duration::from_secs(45)
                && matches!(e, AgentEvent::NoAnswer { .. })
        });
        assert_eq!(after.count(), 0);
    }

    #[test]
    fn a_peer_the_relay_denies_is_said_once_and_retried_slowly() {
        let mut sim = Sim::new(true);
        // Bob (198.51.100.6) is outside what the relay may send to.
        sim.relay_allows_only("198.51.100.2/32");
        sim.run_for(Duration::from_millis(100));
        let start = sim.now;
        sim.agents[0].1.connect("bob", start);
        sim.run_for(Duration::from_secs(120));
        let denied = refusals(&sim, start, 0, |m, c| {
            m == crate::turn::method::CREATE_PERMISSION && c == 403
        });
        assert_eq!(denied.len(), 1, "{denied:?}");
        // Attempts at bob (introductions) back off: few in two minutes, and the
        // gaps grow.
        let intros: Vec<f64> = sim
            .timed_events
            .iter()
            .filter(|(_, i, e)| *i == 0 && matches!(e, AgentEvent::Introduced { .. }))
            .map(|(at, ..)| at.saturating_duration_since(start).as_secs_f64())
            .collect();
        assert!((3..=7).contains(&intros.len()), "{intros:?}");
        let gaps: Vec<f64> = intros.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.last() > gaps.first(), "{gaps:?}");
        assert!(!sim.has(0, |e| matches!(e, AgentEvent::PathUp { .. })));
    }

    #[test]
    fn a_relay_quota_is_said_with_the_wait_before_the_next_fallback() {
        let mut sim = Sim::new(true);
        sim.relay_quota(0);
        sim.run_for(Duration::from_millis(100));
        let start = sim.now;
        sim.agents[0].1.connect("bob", start);
        sim.run_for(Duration::from_secs(30));
        let quota: Vec<&AgentEvent> = sim
            .events
            .iter()
            .filter(|(i, e)| *i == 0 && matches!(e, AgentEvent::Refused { code: 486, .. }))
            .map(|(_, e)| e)
            .collect();
        assert_eq!(quota.len(), 1, "{quota:?}");
        assert_eq!(
            quota[0],
            &AgentEvent::Refused {
                method: crate::turn::method::ALLOCATE,
                code: 486,
                reason: "relay allocation quota reached for these credentials",
                next: NextStep::NoRelayFor(Duration::from_secs(60)),
            }
        );
    }
}
