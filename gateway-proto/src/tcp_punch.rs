//! TCP hole punching, sans-IO: what to send when, for one introduction.
//!
//! Both sides run the same schedule from the introduction's start instant (the one
//! the UDP probes use), so their SYNs cross. Each technique gets a window (RFC 5382
//! REQ-4: a NAT must hold an unsolicited inbound SYN's fate open for 6 s so that a
//! simultaneous open can complete); `auto` runs the techniques one after the other
//! in order of cost, each in its own window, so both sides switch together.
//!
//! The driver ([`crate::tcp_punch`]) performs the [`TcpPunchEvent`]s with real sockets
//! bound to the local port whose mapping the gateway saw, keeps a listener on that
//! port for the whole attempt, and tells the machine what happened
//! ([`TcpPunch::handle_connected`], [`TcpPunch::handle_connect_failed`], [`TcpPunch::accepted`]).
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

pub use super::rendezvous::wire::TcpTechnique;

/// Which technique(s) `gateway peer --tcp` tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpMode {
    /// One technique only.
    Only(TcpTechnique),
    /// Every technique in order of cost, each in its own window.
    Auto,
}

impl TcpMode {
    /// The techniques in the order they run.
    pub fn techniques(self) -> Vec<TcpTechnique> {
        match self {
            Self::Only(t) => vec![t],
            Self::Auto => TcpTechnique::AUTO.to_vec(),
        }
    }
}

impl std::str::FromStr for TcpMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "simultaneous-open" => Ok(Self::Only(TcpTechnique::SimultaneousOpen)),
            "low-ttl" => Ok(Self::Only(TcpTechnique::LowTtl)),
            "natblaster" => Ok(Self::Only(TcpTechnique::NatBlaster)),
            "server-assisted" => Ok(Self::Only(TcpTechnique::ServerAssisted)),
            other => Err(format!(
                "unknown TCP technique {other:?} (simultaneous-open, low-ttl, natblaster, server-assisted, auto)"
            )),
        }
    }
}

/// Tunables of a TCP punching attempt.
#[derive(Clone, Copy, Debug)]
pub struct TcpPunchConfig {
    /// How long each technique is tried (RFC 5382's 6 s).
    pub window: Duration,
    /// How long one connect() may stay unanswered before it is abandoned (long
    /// enough for the kernel's first SYN retransmission, 1 s after the SYN).
    pub attempt_timeout: Duration,
    /// Least time between two connect() starts toward one candidate.
    pub retry_gap: Duration,
    /// Most connect() calls per candidate per technique.
    pub max_attempts: u32,
    /// TTL of the low-TTL opener SYN (passes our NAT(s), dies before theirs).
    pub open_ttl: u8,
    /// Low-TTL: time between the opener SYN and the real connect() (covers the two
    /// sides' start skew: the other's opener must be out before our real SYN lands).
    pub open_lead: Duration,
    /// Most candidates of the other side tried.
    pub max_candidates: usize,
    /// NATBlaster: how long to wait for the other side's initial sequence number
    /// (through the gateway) after ours went out.
    pub seq_wait: Duration,
}

impl Default for TcpPunchConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(6),
            attempt_timeout: Duration::from_millis(2500),
            retry_gap: Duration::from_millis(300),
            max_attempts: 8,
            open_ttl: 2,
            open_lead: Duration::from_millis(200),
            max_candidates: 2,
            seq_wait: Duration::from_secs(3),
        }
    }
}

/// Something the driver must do: the TCP punch machine's output (it sends no
/// datagrams itself; every packet comes from a kernel socket the driver opens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpPunchEvent {
    /// Send a SYN toward `to` from the local port with IP TTL `ttl` (a connect() on
    /// a fresh socket), and drop that socket after `hold` (or when it fails, as it
    /// will when the ICMP time-exceeded comes back).
    Open {
        /// The other side's candidate.
        to: SocketAddr,
        /// The TTL.
        ttl: u8,
        /// How long to keep the socket.
        hold: Duration,
    },
    /// connect() from the local port to `to` with the normal TTL; report the result
    /// with [`TcpPunch::handle_connected`] or [`TcpPunch::handle_connect_failed`] naming `attempt`.
    Connect {
        /// The other side's candidate.
        to: SocketAddr,
        /// Identifies this connect.
        attempt: u32,
        /// Give up on it after this long (report it failed).
        timeout: Duration,
    },
    /// NATBlaster (technique 3), once per attempt toward the first candidate: a
    /// low-TTL connect() from the local port whose SYN's initial sequence number is
    /// captured and sent to the other side through the gateway; once the other
    /// side's arrives, crafted packets complete the handshake (the driver's
    /// `tcp_punch::splice`). Report the result like a connect, naming `attempt`.
    ///
    /// Server-assisted (technique 4, `forge`): the same low-TTL connect() and
    /// capture, but the ISN goes to the gateway with TCP-FORGE; the gateway forges
    /// the SYN-ACKs, and the driver only waits for its socket to synchronize.
    Splice {
        /// The other side's candidate.
        to: SocketAddr,
        /// Server-assisted: the gateway forges the SYN-ACKs (nothing is crafted here).
        forge: bool,
        /// Identifies this attempt.
        attempt: u32,
        /// TTL of the low-TTL SYN.
        ttl: u8,
        /// Give up after this long.
        timeout: Duration,
    },
    /// A technique's window is over: abandon every connect() in flight.
    CancelAll,
    /// Tell the gateway how a technique did.
    Report {
        /// The technique.
        technique: TcpTechnique,
        /// Whether it produced a connection.
        connected: bool,
        /// From the technique's start to the connection (or to giving up).
        elapsed: Duration,
        /// connect() calls made.
        attempts: u32,
    },
}

/// Where an attempt stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpPunchState {
    /// Techniques are still being tried.
    Running,
    /// A connection came up.
    Connected {
        /// The technique whose window it came up in.
        technique: TcpTechnique,
        /// The other side's endpoint.
        remote: SocketAddr,
        /// From that technique's start.
        elapsed: Duration,
    },
    /// Every technique failed (or there was nothing to connect to).
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The opener SYN goes out next (low-TTL only).
    Open,
    /// The real connect() goes out next.
    Connect,
    /// The NATBlaster splice goes out next (once; other candidates wait).
    Splice,
    /// Nothing more in this technique's window.
    Idle,
}

#[derive(Clone, Debug)]
struct Target {
    to: SocketAddr,
    stage: Stage,
    due: Instant,
    in_flight: Option<u32>,
    attempts: u32,
    last_start: Option<Instant>,
}

/// One TCP punching attempt.
#[derive(Debug)]
pub struct TcpPunch {
    config: TcpPunchConfig,
    techniques: Vec<TcpTechnique>,
    /// Index into `techniques` of the running one.
    phase: usize,
    phase_start: Instant,
    targets: Vec<Target>,
    next_attempt: u32,
    state: TcpPunchState,
    events: std::collections::VecDeque<TcpPunchEvent>,
}

impl TcpPunch {
    /// An attempt toward `candidates` starting at `start_at`.
    pub fn new(
        mode: TcpMode,
        candidates: &[SocketAddr],
        start_at: Instant,
        config: TcpPunchConfig,
    ) -> Self {
        let mut seen = Vec::new();
        for &c in candidates {
            if !seen.contains(&c) && seen.len() < config.max_candidates {
                seen.push(c);
            }
        }
        let mut punch = Self {
            config,
            techniques: mode.techniques(),
            phase: 0,
            phase_start: start_at,
            targets: seen
                .into_iter()
                .map(|to| Target {
                    to,
                    stage: Stage::Connect,
                    due: start_at,
                    in_flight: None,
                    attempts: 0,
                    last_start: None,
                })
                .collect(),
            next_attempt: 0,
            state: TcpPunchState::Running,
            events: std::collections::VecDeque::new(),
        };
        if punch.targets.is_empty() {
            // Nothing to connect to (the other side announced no TCP candidate):
            // every technique fails at once.
            for &technique in &punch.techniques {
                punch.events.push_back(TcpPunchEvent::Report {
                    technique,
                    connected: false,
                    elapsed: Duration::ZERO,
                    attempts: 0,
                });
            }
            punch.state = TcpPunchState::Failed;
        } else {
            punch.begin_phase(start_at);
        }
        punch
    }

    /// Where the attempt stands.
    pub fn state(&self) -> TcpPunchState {
        self.state
    }

    /// The technique being tried (None once finished).
    pub fn technique(&self) -> Option<TcpTechnique> {
        match self.state {
            TcpPunchState::Running => self.techniques.get(self.phase).copied(),
            _ => None,
        }
    }

    fn begin_phase(&mut self, at: Instant) {
        self.phase_start = at;
        let stage = match self.techniques.get(self.phase) {
            Some(TcpTechnique::LowTtl) if self.config.open_ttl > 0 => Stage::Open,
            Some(TcpTechnique::NatBlaster | TcpTechnique::ServerAssisted) => Stage::Splice,
            _ => Stage::Connect,
        };
        for (i, t) in self.targets.iter_mut().enumerate() {
            // One splice per introduction: the gateway forwards one sequence
            // number per side.
            t.stage = if stage == Stage::Splice && i > 0 {
                Stage::Idle
            } else {
                stage
            };
            t.due = at;
            t.in_flight = None;
            t.attempts = 0;
            t.last_start = None;
        }
    }

    fn phase_end(&self) -> Instant {
        self.phase_start + self.config.window
    }

    fn attempts(&self) -> u32 {
        self.targets.iter().map(|t| t.attempts).sum()
    }

    /// When [`TcpPunch::handle_timeout`] must run next (None once finished).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state != TcpPunchState::Running {
            return None;
        }
        let mut at = self.phase_end();
        for t in &self.targets {
            if t.in_flight.is_none()
                && t.attempts < self.config.max_attempts
                && t.stage != Stage::Idle
            {
                at = at.min(t.due);
            }
        }
        Some(at)
    }

    /// Runs the schedule: openers, connects, the end of a technique's window.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state != TcpPunchState::Running {
            return;
        }
        if now >= self.phase_end() {
            let Some(&technique) = self.techniques.get(self.phase) else {
                self.state = TcpPunchState::Failed;
                return;
            };
            self.events.push_back(TcpPunchEvent::CancelAll);
            self.events.push_back(TcpPunchEvent::Report {
                technique,
                connected: false,
                elapsed: self.config.window,
                attempts: self.attempts(),
            });
            let next_start = self.phase_end();
            self.phase += 1;
            if self.phase >= self.techniques.len() {
                self.state = TcpPunchState::Failed;
                return;
            }
            self.begin_phase(next_start);
        }
        let end = self.phase_end();
        for t in &mut self.targets {
            if t.in_flight.is_some() || t.attempts >= self.config.max_attempts || now < t.due {
                continue;
            }
            match t.stage {
                Stage::Idle => {}
                Stage::Splice => {
                    let forge =
                        self.techniques.get(self.phase) == Some(&TcpTechnique::ServerAssisted);
                    let attempt = self.next_attempt;
                    self.next_attempt = self.next_attempt.wrapping_add(1);
                    t.attempts += 1;
                    t.in_flight = Some(attempt);
                    t.last_start = Some(now);
                    t.stage = Stage::Idle;
                    self.events.push_back(TcpPunchEvent::Splice {
                        to: t.to,
                        forge,
                        attempt,
                        ttl: self.config.open_ttl.max(1),
                        timeout: end.saturating_duration_since(now),
                    });
                }
                Stage::Open => {
                    // Dropped well before the real connect(): the two would share
                    // one 4-tuple.
                    self.events.push_back(TcpPunchEvent::Open {
                        to: t.to,
                        ttl: self.config.open_ttl,
                        hold: self.config.open_lead / 2,
                    });
                    t.stage = Stage::Connect;
                    t.due = now + self.config.open_lead;
                }
                Stage::Connect => {
                    let attempt = self.next_attempt;
                    self.next_attempt = self.next_attempt.wrapping_add(1);
                    t.attempts += 1;
                    t.in_flight = Some(attempt);
                    t.last_start = Some(now);
                    self.events.push_back(TcpPunchEvent::Connect {
                        to: t.to,
                        attempt,
                        timeout: self
                            .config
                            .attempt_timeout
                            .min(end.saturating_duration_since(now)),
                    });
                }
            }
        }
    }

    /// The connect() named `attempt` failed (refused, unreachable, timed out): the
    /// next one to that candidate goes out after the retry gap.
    pub fn handle_connect_failed(&mut self, now: Instant, attempt: u32) {
        let low_ttl = self.technique() == Some(TcpTechnique::LowTtl) && self.config.open_ttl > 0;
        if let Some(t) = self
            .targets
            .iter_mut()
            .find(|t| t.in_flight == Some(attempt))
        {
            t.in_flight = None;
            t.due = t
                .last_start
                .map_or(now, |s| (s + self.config.retry_gap).max(now));
            // Every low-TTL retry opens our mapping again first (a RST that passed
            // our NAT may have closed it).
            t.stage = match t.stage {
                // A splice is never repeated (one sequence number per side).
                Stage::Idle | Stage::Splice => Stage::Idle,
                _ if low_ttl => Stage::Open,
                _ => Stage::Connect,
            };
        }
    }

    /// The connect() named `attempt` succeeded: the attempt is over. Returns false
    /// (and changes nothing) for an attempt that is not in flight.
    pub fn handle_connected(&mut self, now: Instant, attempt: u32) -> bool {
        let Some(remote) = self
            .targets
            .iter()
            .find(|t| t.in_flight == Some(attempt))
            .map(|t| t.to)
        else {
            return false;
        };
        self.succeed(now, remote);
        true
    }

    /// Whether a connection from `from` may be ours: the attempt is running and
    /// `from`'s address is one of the other side's candidates' (a NAT may change the
    /// port; the address is what the gateway vouched for).
    pub fn admits(&self, from: SocketAddr) -> bool {
        self.state == TcpPunchState::Running
            && self
                .targets
                .iter()
                .any(|t| t.to.ip().to_canonical() == from.ip().to_canonical())
    }

    /// The listener accepted a connection from `from`: it counts only when it comes
    /// from one of the other side's candidate addresses (a NAT may change the port;
    /// the address is what the gateway vouched for). Returns whether it counted.
    pub fn handle_accepted(&mut self, now: Instant, from: SocketAddr) -> bool {
        if !self.admits(from) {
            return false;
        }
        self.succeed(now, from);
        true
    }

    fn succeed(&mut self, now: Instant, remote: SocketAddr) {
        let Some(&technique) = self.techniques.get(self.phase) else {
            return;
        };
        if self.state != TcpPunchState::Running {
            return;
        }
        let elapsed = now.saturating_duration_since(self.phase_start);
        self.events.push_back(TcpPunchEvent::CancelAll);
        self.events.push_back(TcpPunchEvent::Report {
            technique,
            connected: true,
            elapsed,
            attempts: self.attempts(),
        });
        self.state = TcpPunchState::Connected {
            technique,
            remote,
            elapsed,
        };
    }

    /// The next thing the driver must do (sockets to open, connects, reports).
    pub fn poll_event(&mut self) -> Option<TcpPunchEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn drain(p: &mut TcpPunch) -> Vec<TcpPunchEvent> {
        std::iter::from_fn(|| p.poll_event()).collect()
    }

    #[test]
    fn simultaneous_open_connects_at_the_start_and_retries_after_the_gap() {
        let t0 = Instant::now();
        let to = addr("203.0.113.5:4000");
        let config = TcpPunchConfig::default();
        let mut p = TcpPunch::new(
            TcpMode::Only(TcpTechnique::SimultaneousOpen),
            &[to, to],
            t0,
            config,
        );
        assert_eq!(p.poll_timeout(), Some(t0));
        p.handle_timeout(t0);
        let actions = drain(&mut p);
        assert_eq!(actions.len(), 1, "duplicates are tried once: {actions:?}");
        let TcpPunchEvent::Connect { attempt, .. } = actions[0] else {
            panic!("{actions:?}");
        };
        // Refused at once (a RST): the retry waits for the gap.
        p.handle_connect_failed(t0 + Duration::from_millis(1), attempt);
        assert_eq!(p.poll_timeout(), Some(t0 + config.retry_gap));
        p.handle_timeout(t0 + config.retry_gap);
        let actions = drain(&mut p);
        let [
            TcpPunchEvent::Connect {
                attempt: second, ..
            },
        ] = actions[..]
        else {
            panic!("{actions:?}");
        };
        assert!(p.handle_connected(t0 + Duration::from_millis(400), second));
        let actions = drain(&mut p);
        assert_eq!(
            actions,
            vec![
                TcpPunchEvent::CancelAll,
                TcpPunchEvent::Report {
                    technique: TcpTechnique::SimultaneousOpen,
                    connected: true,
                    elapsed: Duration::from_millis(400),
                    attempts: 2
                }
            ]
        );
        assert!(matches!(p.state(), TcpPunchState::Connected { .. }));
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn low_ttl_opens_first_then_connects_after_the_lead() {
        let t0 = Instant::now();
        let to = addr("203.0.113.5:4000");
        let config = TcpPunchConfig::default();
        let mut p = TcpPunch::new(TcpMode::Only(TcpTechnique::LowTtl), &[to], t0, config);
        p.handle_timeout(t0);
        assert_eq!(
            drain(&mut p),
            vec![TcpPunchEvent::Open {
                to,
                ttl: 2,
                hold: config.open_lead / 2
            }]
        );
        assert_eq!(p.poll_timeout(), Some(t0 + config.open_lead));
        p.handle_timeout(t0 + config.open_lead);
        let actions = drain(&mut p);
        let [TcpPunchEvent::Connect { attempt, .. }] = actions[..] else {
            panic!("{actions:?}");
        };
        // A failed real connect: the retry opens again first.
        p.handle_connect_failed(t0 + config.open_lead, attempt);
        p.handle_timeout(t0 + config.open_lead + config.retry_gap);
        assert!(matches!(drain(&mut p)[..], [TcpPunchEvent::Open { .. }]));
    }

    #[test]
    fn auto_moves_to_the_next_technique_when_a_window_ends_and_fails_after_the_last() {
        let t0 = Instant::now();
        let to = addr("203.0.113.5:4000");
        let config = TcpPunchConfig::default();
        let mut p = TcpPunch::new(TcpMode::Auto, &[to], t0, config);
        p.handle_timeout(t0);
        drain(&mut p);
        let t1 = t0 + config.window;
        assert_eq!(p.poll_timeout(), Some(t1), "a connect is in flight");
        p.handle_timeout(t1);
        let actions = drain(&mut p);
        assert_eq!(actions[0], TcpPunchEvent::CancelAll);
        assert_eq!(
            actions[1],
            TcpPunchEvent::Report {
                technique: TcpTechnique::SimultaneousOpen,
                connected: false,
                elapsed: config.window,
                attempts: 1
            }
        );
        assert!(
            matches!(actions[2], TcpPunchEvent::Open { .. }),
            "{actions:?}"
        );
        assert_eq!(p.technique(), Some(TcpTechnique::LowTtl));
        p.handle_timeout(t1 + config.window);
        let actions = drain(&mut p);
        assert!(actions.contains(&TcpPunchEvent::Report {
            technique: TcpTechnique::LowTtl,
            connected: false,
            elapsed: config.window,
            attempts: 0
        }));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, TcpPunchEvent::Splice { to: t, .. } if *t == to)),
            "{actions:?}"
        );
        assert_eq!(p.technique(), Some(TcpTechnique::NatBlaster));
        p.handle_timeout(t1 + config.window * 2);
        let actions = drain(&mut p);
        assert!(actions.contains(&TcpPunchEvent::Report {
            technique: TcpTechnique::NatBlaster,
            connected: false,
            elapsed: config.window,
            attempts: 1
        }));
        assert_eq!(p.state(), TcpPunchState::Failed);
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn attempts_are_bounded_and_unknown_results_change_nothing() {
        let t0 = Instant::now();
        let to = addr("203.0.113.5:4000");
        let config = TcpPunchConfig {
            max_attempts: 3,
            ..TcpPunchConfig::default()
        };
        let mut p = TcpPunch::new(
            TcpMode::Only(TcpTechnique::SimultaneousOpen),
            &[to],
            t0,
            config,
        );
        assert!(!p.handle_connected(t0, 99), "nothing in flight");
        let mut now = t0;
        let mut connects = 0;
        while now < t0 + config.window {
            p.handle_timeout(now);
            for a in drain(&mut p) {
                if let TcpPunchEvent::Connect { attempt, .. } = a {
                    connects += 1;
                    p.handle_connect_failed(now, attempt);
                }
            }
            now += Duration::from_millis(50);
        }
        assert_eq!(connects, 3);
        // A connection from an address that is no candidate is not ours.
        assert!(!p.handle_accepted(now, addr("198.51.100.9:4000")));
        assert!(p.handle_accepted(now, addr("203.0.113.5:4999")));
    }

    #[test]
    fn no_candidate_fails_every_technique_at_once() {
        let mut p = TcpPunch::new(
            TcpMode::Auto,
            &[],
            Instant::now(),
            TcpPunchConfig::default(),
        );
        assert_eq!(p.state(), TcpPunchState::Failed);
        assert_eq!(drain(&mut p).len(), TcpTechnique::AUTO.len());
    }

    #[test]
    fn natblaster_splices_once_toward_the_first_candidate_and_never_retries() {
        let t0 = Instant::now();
        let (first, second) = (addr("203.0.113.5:4000"), addr("203.0.113.6:4000"));
        let config = TcpPunchConfig::default();
        let mut p = TcpPunch::new(
            TcpMode::Only(TcpTechnique::NatBlaster),
            &[first, second],
            t0,
            config,
        );
        p.handle_timeout(t0);
        let actions = drain(&mut p);
        let [
            TcpPunchEvent::Splice {
                to,
                forge,
                attempt,
                ttl,
                timeout,
            },
        ] = actions.as_slice()
        else {
            panic!("one splice expected: {actions:?}");
        };
        assert_eq!(
            (*to, *forge, *ttl, *timeout),
            (first, false, config.open_ttl, config.window)
        );
        // It fails: nothing more until the window ends, then the report.
        p.handle_connect_failed(t0 + Duration::from_millis(10), *attempt);
        assert_eq!(p.poll_timeout(), Some(t0 + config.window));
        p.handle_timeout(t0 + Duration::from_secs(1));
        assert!(drain(&mut p).is_empty());
        p.handle_timeout(t0 + config.window);
        assert_eq!(
            drain(&mut p),
            vec![
                TcpPunchEvent::CancelAll,
                TcpPunchEvent::Report {
                    technique: TcpTechnique::NatBlaster,
                    connected: false,
                    elapsed: config.window,
                    attempts: 1
                }
            ]
        );
        assert_eq!(p.state(), TcpPunchState::Failed);
    }

    #[test]
    fn server_assisted_is_one_forged_splice_and_never_part_of_auto() {
        let t0 = Instant::now();
        let (first, second) = (addr("203.0.113.5:4000"), addr("203.0.113.6:4000"));
        let config = TcpPunchConfig::default();
        let mut p = TcpPunch::new(
            TcpMode::Only(TcpTechnique::ServerAssisted),
            &[first, second],
            t0,
            config,
        );
        p.handle_timeout(t0);
        let actions = drain(&mut p);
        let [
            TcpPunchEvent::Splice {
                to,
                forge: true,
                attempt,
                ..
            },
        ] = actions.as_slice()
        else {
            panic!("one forged splice expected: {actions:?}");
        };
        assert_eq!(*to, first);
        assert!(p.handle_connected(t0 + Duration::from_millis(40), *attempt));
        assert!(drain(&mut p).contains(&TcpPunchEvent::Report {
            technique: TcpTechnique::ServerAssisted,
            connected: true,
            elapsed: Duration::from_millis(40),
            attempts: 1
        }));
        assert!(
            !TcpMode::Auto
                .techniques()
                .contains(&TcpTechnique::ServerAssisted)
        );
        assert_eq!(
            "server-assisted".parse::<TcpMode>(),
            Ok(TcpMode::Only(TcpTechnique::ServerAssisted))
        );
    }

    #[test]
    fn auto_ends_with_natblaster() {
        let t0 = Instant::now();
        let to = addr("203.0.113.5:4000");
        let config = TcpPunchConfig::default();
        let mut p = TcpPunch::new(TcpMode::Auto, &[to], t0, config);
        let end = t0 + config.window * 2;
        let mut now = t0;
        while now < end {
            p.handle_timeout(now);
            for a in drain(&mut p) {
                if let TcpPunchEvent::Connect { attempt, .. } = a {
                    p.handle_connect_failed(now, attempt);
                }
            }
            now += Duration::from_millis(100);
        }
        p.handle_timeout(end);
        assert_eq!(p.technique(), Some(TcpTechnique::NatBlaster));
        let splice = drain(&mut p)
            .into_iter()
            .find_map(|a| match a {
                TcpPunchEvent::Splice { attempt, .. } => Some(attempt),
                _ => None,
            })
            .expect("a splice");
        assert!(p.handle_connected(end + Duration::from_millis(30), splice));
        assert!(matches!(
            p.state(),
            TcpPunchState::Connected {
                technique: TcpTechnique::NatBlaster,
                ..
            }
        ));
    }
}
