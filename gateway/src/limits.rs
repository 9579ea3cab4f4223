//! File descriptors: the soft `RLIMIT_NOFILE` raised to the hard limit at start, a
//! budget that keeps relay sockets and TURN-over-TCP clients below the limit minus a
//! reserve, and accept-error logging that speaks once per change of state.
//!
//! Each allocation holds one UDP socket and each TURN TCP client one more
//! connection. Without a budget they take every descriptor the process may open, and
//! then the `/metrics` listener (and the TCP listener) can no longer accept: the
//! monitoring goes blind exactly when the relay is full. With it, a relay socket or
//! TCP client that would eat into [`RESERVED_FDS`] is refused (508 Insufficient
//! Capacity, or the TCP connection closed at once), and the reserve stays for the
//! HTTP endpoint, the cluster's Redis connections and the listeners' accepts.
//!
//! The budget is process-wide because the descriptor table and its limit are.
use std::{
    io,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use prometheus::{
    IntCounter, IntGauge,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Descriptors kept free for everything that is not a relay socket or a TURN TCP
/// client: up to 32 `/metrics` (and health) connections at once, the listeners'
/// accepts, Redis connections, a configuration file read on reload, with room to
/// spare.
pub const RESERVED_FDS: usize = 64;

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub soft_before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the ceiling an unprivileged process may raise the soft one to).
    pub hard: u64,
}

/// Reads `RLIMIT_NOFILE`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (shells start processes with a
/// soft limit of 1024 whatever the hard one is), and logs what it did.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let (soft_before, hard) = nofile_limit()?;
    if soft_before < hard {
        let limit = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        tracing::info!(
            from = soft_before,
            to = hard,
            "raised the open-files soft limit (RLIMIT_NOFILE) to the hard limit"
        );
    }
    let (soft, hard) = nofile_limit()?;
    Ok(NofileLimit {
        soft_before,
        soft,
        hard,
    })
}

/// Descriptors this process has open now (entries of `/proc/self/fd`, less the one
/// reading it), or `None` without procfs.
pub fn open_fds() -> Option<usize> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.count().saturating_sub(1))
}

/// What relay sockets and TURN TCP clients may hold with `soft` descriptors allowed,
/// `open` already open and [`RESERVED_FDS`] kept back.
pub fn budget_for(soft: u64, open: usize) -> usize {
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    soft.saturating_sub(open).saturating_sub(RESERVED_FDS)
}

/// The process-wide budget of descriptors for relay sockets and TURN TCP clients.
#[derive(Debug)]
pub struct FdBudget {
    capacity: AtomicUsize,
    used: AtomicUsize,
    refused: AtomicU64,
    exhausted: AtomicBool,
}

static FD_BUDGET: FdBudget = FdBudget::unlimited();

/// The process-wide budget (unlimited until [`seal_fd_budget`] sets it).
pub fn fd_budget() -> &'static FdBudget {
    &FD_BUDGET
}

/// Sets the process-wide budget from the soft limit and what is open now: call it
/// once every listener, socket and eBPF map is open, before serving. Warns when
/// `wanted` relay sockets (`relay.max_allocations`; `None` without a relay) do not
/// fit; returns the budget.
pub fn seal_fd_budget(wanted: Option<usize>) -> usize {
    let soft = match nofile_limit() {
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; relay sockets are not budgeted");
            return usize::MAX;
        }
    };
    let open = open_fds().unwrap_or(0);
    let capacity = budget_for(soft, open);
    FD_BUDGET.capacity.store(capacity, Ordering::Relaxed);
    match wanted {
        Some(wanted) if wanted > capacity => tracing::warn!(
            limit = soft,
            open,
            reserved = RESERVED_FDS,
            relay_sockets = capacity,
            relay_max_allocations = wanted,
            "the open-files limit (RLIMIT_NOFILE) leaves room for {capacity} relay sockets and TURN TCP clients, fewer than relay.max_allocations = {wanted}: allocations beyond get 508 Insufficient Capacity; raise the hard limit (LimitNOFILE= in the systemd unit, `ulimit -Hn` in a shell) to at least {}",
            wanted.saturating_add(open).saturating_add(RESERVED_FDS)
        ),
        _ => tracing::info!(
            limit = soft,
            open,
            reserved = RESERVED_FDS,
            relay_sockets = capacity,
            "file descriptors budgeted for relay sockets and TURN TCP clients"
        ),
    }
    capacity
}

/// One descriptor of the budget, given back when dropped.
#[derive(Debug)]
pub struct FdPermit {
    budget: &'static FdBudget,
}

impl Drop for FdPermit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FdBudget {
    /// A budget without a limit.
    pub const fn unlimited() -> Self {
        Self::with_capacity(usize::MAX)
    }

    /// A budget of `capacity` descriptors.
    pub const fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity: AtomicUsize::new(capacity),
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
        }
    }

    /// Takes one descriptor, or `None` when the budget is spent. The first refusal
    /// after a success logs a warning, the first success after refusals logs that
    /// the budget has room again: once per change of state, never per attempt.
    pub fn try_acquire(&'static self) -> Option<FdPermit> {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used < capacity).then_some(used + 1)
            });
        match taken {
            Ok(_) => {
                if self.exhausted.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        capacity,
                        refused_total = self.refused.load(Ordering::Relaxed),
                        "file descriptors for relay sockets and TURN TCP clients available again"
                    );
                }
                Some(FdPermit { budget: self })
            }
            Err(used) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if !self.exhausted.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        capacity,
                        used,
                        reserved = RESERVED_FDS,
                        "file descriptor budget for relay sockets and TURN TCP clients spent: new allocations get 508 and new TCP clients are closed until some go (metrics and listeners keep their reserve); logged again when it has room"
                    );
                }
                None
            }
        }
    }

    /// Descriptors relay sockets and TCP clients may hold.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Descriptors they hold now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Descriptors refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Logs a listener's accept errors once per change of state: the first failure
/// (or a failure with another cause), and the first success after failures with how
/// many attempts failed meanwhile. An accept loop retrying every few milliseconds
/// while the process is out of descriptors thus logs two lines, not thousands.
#[derive(Debug)]
pub struct AcceptErrors {
    what: &'static str,
    failing: Option<(Option<i32>, u64)>,
}

impl AcceptErrors {
    /// For the listener named `what` (e.g. "metrics", "TURN TCP").
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            failing: None,
        }
    }

    /// Records a failed accept; returns whether it was logged.
    pub fn failed(&mut self, error: &io::Error) -> bool {
        let code = error.raw_os_error();
        match &mut self.failing {
            Some((failing_code, count)) if *failing_code == code => {
                *count += 1;
                false
            }
            _ => {
                tracing::warn!(
                    listener = self.what,
                    error = %error,
                    "{} accept failed; retrying, logged again when this changes",
                    self.what
                );
                self.failing = Some((code, 1));
                true
            }
        }
    }

    /// Records a successful accept; returns whether it was logged.
    pub fn accepted(&mut self) -> bool {
        match self.failing.take() {
            Some((_, count)) => {
                tracing::info!(
                    listener = self.what,
                    failed_attempts = count,
                    "{} accepting again",
                    self.what
                );
                true
            }
            None => false,
        }
    }
}

/// Exports the open-files limit and the budget at scrape time:
/// `gateway_open_files_limit`, `gateway_relay_fd_budget`,
/// `gateway_relay_fd_budget_used` and `gateway_relay_fd_budget_refused_total`.
pub struct FdCollector {
    limit: IntGauge,
    capacity: IntGauge,
    used: IntGauge,
    refused: Mutex<IntCounter>,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for FdCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdCollector").finish_non_exhaustive()
    }
}

impl FdCollector {
    /// The collector of the process-wide budget.
    pub fn new() -> Result<Self, prometheus::Error> {
        let limit = IntGauge::new(
            "gateway_open_files_limit",
            "Soft RLIMIT_NOFILE: file descriptors this process may have open",
        )?;
        let capacity = IntGauge::new(
            "gateway_relay_fd_budget",
            "File descriptors relay sockets and TURN TCP clients may hold together (the limit less what was open at start and a reserve)",
        )?;
        let used = IntGauge::new(
            "gateway_relay_fd_budget_used",
            "File descriptors relay sockets and TURN TCP clients hold now",
        )?;
        let refused = IntCounter::new(
            "gateway_relay_fd_budget_refused_total",
            "Relay sockets and TURN TCP clients refused because the file descriptor budget was spent",
        )?;
        let descs = [limit.desc(), capacity.desc(), used.desc(), refused.desc()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        Ok(Self {
            limit,
            capacity,
            used,
            refused: Mutex::new(refused),
            descs,
        })
    }
}

impl Collector for FdCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Ok((soft, _)) = nofile_limit() {
            self.limit.set(clamp(soft));
        }
        let budget = fd_budget();
        self.capacity.set(clamp(budget.capacity() as u64));
        self.used.set(clamp(budget.used() as u64));
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        refused.inc_by(budget.refused().saturating_sub(refused.get()));
        let mut families = self.limit.collect();
        families.extend(self.capacity.collect());
        families.extend(self.used.collect());
        families.extend(refused.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_beyond_capacity_and_recovers() {
        static BUDGET: FdBudget = FdBudget::with_capacity(2);
        let a = BUDGET.try_acquire().expect("first");
        let b = BUDGET.try_acquire().expect("second");
        assert!(BUDGET.try_acquire().is_none());
        assert!(BUDGET.try_acquire().is_none());
        assert_eq!(BUDGET.refused(), 2);
        assert!(BUDGET.exhausted.load(Ordering::Relaxed));
        drop(a);
        let c = BUDGET.try_acquire().expect("room again after a release");
        assert!(!BUDGET.exhausted.load(Ordering::Relaxed));
        assert_eq!(BUDGET.used(), 2);
        drop((b, c));
        assert_eq!(BUDGET.used(), 0);
    }

    #[test]
    fn budget_keeps_the_reserve() {
        assert_eq!(budget_for(1024, 30), 1024 - 30 - RESERVED_FDS);
        assert_eq!(budget_for(50, 30), 0);
        assert_eq!(budget_for(u64::MAX, 10), usize::MAX - 10 - RESERVED_FDS);
    }

    #[test]
    fn accept_errors_log_once_per_change() {
        let mut log = AcceptErrors::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(log.failed(&emfile));
        for _ in 0..100 {
            assert!(!log.failed(&emfile), "repeats are not logged");
        }
        assert!(log.failed(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(log.accepted(), "the recovery is logged");
        assert!(!log.accepted(), "and only once");
        assert!(
            log.failed(&emfile),
            "a new failure after recovering is logged"
        );
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_nofile_limit().expect("rlimit");
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.soft_before);
        assert!(open_fds().is_some_and(|n| n >= 3));
    }

    #[test]
    fn collector_exports_the_budget() {
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(FdCollector::new().expect("collector")))
            .expect("register");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "gateway_open_files_limit",
            "gateway_relay_fd_budget",
            "gateway_relay_fd_budget_used",
            "gateway_relay_fd_budget_refused_total",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
}
