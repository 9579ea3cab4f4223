//! The daemon's life after start-up: signals and the drain.
//!
//! - **SIGHUP** reloads the configuration ([`crate::reload::Reloader`]); nothing
//!   established is dropped.
//! - **SIGTERM** starts a drain: both cores refuse new registrations and
//!   allocations (300 Try Alternate to `server.alternate`, or an error saying the
//!   gateway is draining), `/readyz` answers 503 and `gateway_draining` is 1, while
//!   existing allocations keep relaying and registered peers stay introducible
//!   until none is left or `server.drain_timeout` passes; then the daemon exits 0.
//!   A second SIGTERM, or a SIGINT, during the drain stops it at once.
//! - **SIGINT** (Ctrl-C at a terminal) stops at once, without draining.
//! - A driver loop that ends ([`Health::loop_ended`]) stops the daemon with an
//!   error, so the supervisor restarts it.
use std::{sync::Arc, time::Duration};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    health::Health,
    metrics::Metrics,
    proto::drain::Draining,
    reload::Reloader,
    rendezvous::{SharedRendezvous, lock},
    turn::RelayShared,
};

/// How often a drain looks whether anything is left.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// A signal the daemon acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: reload.
    Reload,
    /// SIGTERM: drain (the second: stop now).
    Terminate,
    /// SIGINT: stop now.
    Interrupt,
}

/// The daemon's signal handlers, installed once at start (until then SIGHUP would
/// kill the process, as it does any process that does not handle it).
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs handlers for SIGHUP, SIGTERM and SIGINT. Must run inside a tokio
    /// runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Reload,
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
        }
    }
}

/// What the drain acts on: the cores, the health record and the metrics (cheap to
/// clone).
#[derive(Clone)]
pub struct Services {
    /// The rendezvous core, when the rendezvous runs.
    pub rendezvous: Option<SharedRendezvous>,
    /// The relay, when it runs.
    pub relay: Option<Arc<RelayShared>>,
    /// The daemon's health (`/readyz` reports draining).
    pub health: Health,
    /// The daemon's metrics (`gateway_draining`).
    pub metrics: Metrics,
    /// The TLS listeners' certificate, when they run (reloaded on SIGHUP).
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Services {
    /// Starts draining both cores, with `alternate` as the node newcomers are sent
    /// to (called again with a new alternate after a reload during the drain).
    pub fn start_draining(&self, alternate: Option<std::net::SocketAddr>) {
        let draining = Some(Draining { alternate });
        if let Some(core) = &self.rendezvous {
            lock(core).set_draining(draining);
        }
        if let Some(relay) = &self.relay {
            relay.set_draining(draining);
        }
        self.health.set_draining(true);
        self.metrics.draining.set(1);
    }

    /// What is still being served: live allocations and registered peers.
    pub fn remaining(&self) -> (usize, usize) {
        let allocations = self.relay.as_ref().map_or(0, |r| r.allocation_count());
        let peers = self.rendezvous.as_ref().map_or(0, |c| lock(c).peer_count());
        (allocations, peers)
    }
}

/// Why the daemon stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT while serving: stop at once.
    Interrupted,
    /// The drain ended: nothing left to serve.
    Drained,
    /// The drain ended: `server.drain_timeout` passed with work left.
    DrainTimeout {
        /// Allocations still live.
        allocations: usize,
        /// Peers still registered.
        peers: usize,
    },
    /// A second SIGTERM, or a SIGINT, during the drain.
    Forced,
    /// A driver loop ended: the daemon cannot serve and must be restarted.
    LoopEnded(String),
}

impl Stop {
    /// Whether the daemon should exit with success (everything but a dead loop).
    pub fn is_clean(&self) -> bool {
        !matches!(self, Stop::LoopEnded(_))
    }
}

/// Serves until a signal or a dead loop ends it: reloads on SIGHUP, drains on
/// SIGTERM (module docs). Returns why it stopped; the caller then stops the loops.
pub async fn run(signals: &mut Signals, reloader: &mut Reloader, services: &Services) -> Stop {
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Reload => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    reloader.reload();
                }
                Signal::Interrupt => {
                    tracing::info!("SIGINT received: stopping now (SIGTERM drains)");
                    crate::systemd::notify_stopping();
                    return Stop::Interrupted;
                }
                Signal::Terminate => break,
            },
            name = services.health.loop_ended() => return Stop::LoopEnded(name),
        }
    }
    let timeout = Duration::from_secs(reloader.current().server.drain_timeout);
    let mut alternate = reloader.current().server.alternate;
    // systemd: STOPPING=1 as the drain starts (the watchdog stops pinging too).
    crate::systemd::notify_stopping();
    services.start_draining(alternate);
    let (allocations, peers) = services.remaining();
    tracing::info!(
        allocations,
        peers,
        alternate = ?alternate,
        timeout_seconds = timeout.as_secs(),
        "SIGTERM received: draining (new registrations and allocations refused; a second SIGTERM or SIGINT stops at once)"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = tokio::time::interval(DRAIN_POLL);
    loop {
        let (allocations, peers) = services.remaining();
        if allocations == 0 && peers == 0 {
            tracing::info!("drained: no allocation or registration left");
            return Stop::Drained;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                allocations,
                peers,
                "drain timeout (server.drain_timeout) passed; stopping with work left"
            );
            return Stop::DrainTimeout { allocations, peers };
        }
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Reload => {
                    tracing::info!("SIGHUP received while draining: reloading the configuration");
                    reloader.reload();
                    let now = reloader.current().server.alternate;
                    if now != alternate {
                        alternate = now;
                        services.start_draining(alternate);
                    }
                }
                Signal::Terminate | Signal::Interrupt => {
                    tracing::info!(allocations, peers, "{signal:?} received while draining: stopping now");
                    return Stop::Forced;
                }
            },
            _ = poll.tick() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            name = services.health.loop_ended() => return Stop::LoopEnded(name),
        }
    }
}
