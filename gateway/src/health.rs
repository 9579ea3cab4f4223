//! Liveness and readiness of `gateway serve`, answered on the metrics listener:
//! `GET /healthz` (alive: every driver loop is running) and `GET /readyz` (ready
//! for new work: started, every readiness check passing, not draining). Both
//! answer 200 or 503 with one short line of plain text saying why.
//!
//! Driver loops are run through [`Health::watch`], which notes when one ends (or
//! panics); the daemon waits on [`Health::loop_ended`] and exits non-zero, so the
//! supervisor restarts it. Readiness checks are small closures reading state kept
//! elsewhere (the cluster's Redis link, the eBPF programs); the lock around them
//! is a leaf held only to call them, never across a system call.
use std::{
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

/// A readiness condition: the reason given while it fails, and the test.
type ReadyCheck = (String, Box<dyn Fn() -> bool + Send + Sync>);

/// One watched driver loop.
struct LoopEntry {
    name: String,
    alive: bool,
}

#[derive(Default)]
struct Inner {
    loops: Mutex<Vec<LoopEntry>>,
    checks: Mutex<Vec<ReadyCheck>>,
    /// Wakes [`Health::loop_ended`] when a loop ends.
    ended: tokio::sync::Notify,
    /// Start-up finished: sockets bound, programs loaded, loops running.
    started: AtomicBool,
    /// Draining: no new registrations or allocations.
    draining: AtomicBool,
}

/// The daemon's health, shared by its tasks and the HTTP endpoint (cheap to clone).
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("started", &self.inner.started.load(Ordering::Relaxed))
            .field("draining", &self.inner.draining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Marks its loop as ended when dropped: when the loop returns, and when it
/// panics (the task's future is dropped while unwinding).
struct LoopGuard {
    inner: Arc<Inner>,
    index: usize,
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Some(entry) = lock(&self.inner.loops).get_mut(self.index) {
            entry.alive = false;
        }
        self.inner.ended.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// A new health record: not started, nothing watched.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps a driver loop so its end is noticed; spawn what this returns. The
    /// loop counts as running from this call on.
    pub fn watch<N, F>(&self, name: N, driver: F) -> impl Future<Output = ()> + use<N, F>
    where
        N: Into<String>,
        F: Future<Output = ()>,
    {
        let index = {
            let mut loops = lock(&self.inner.loops);
            loops.push(LoopEntry {
                name: name.into(),
                alive: true,
            });
            loops.len() - 1
        };
        let guard = LoopGuard {
            inner: self.inner.clone(),
            index,
        };
        async move {
            let _guard = guard;
            driver.await;
        }
    }

    /// Adds a readiness condition: while `check` returns false, `/readyz` answers
    /// 503 with `reason`.
    pub fn add_check(
        &self,
        reason: impl Into<String>,
        check: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        lock(&self.inner.checks).push((reason.into(), Box::new(check)));
    }

    /// Start-up is over: every socket is bound and every loop runs.
    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::Relaxed);
    }

    /// Draining (new work refused) or not.
    pub fn set_draining(&self, draining: bool) {
        self.inner.draining.store(draining, Ordering::Relaxed);
    }

    /// Whether the daemon is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// The first watched loop that ended, if any.
    pub fn ended_loop(&self) -> Option<String> {
        lock(&self.inner.loops)
            .iter()
            .find(|l| !l.alive)
            .map(|l| l.name.clone())
    }

    /// Waits until a watched loop ends; returns its name.
    pub async fn loop_ended(&self) -> String {
        loop {
            let notified = self.inner.ended.notified();
            if let Some(name) = self.ended_loop() {
                return name;
            }
            notified.await;
        }
    }

    /// `/healthz`: alive when every watched loop is running.
    pub fn healthz(&self) -> (bool, String) {
        match self.ended_loop() {
            Some(name) => (false, format!("unhealthy: driver loop {name} ended\n")),
            None => {
                let running = lock(&self.inner.loops).len();
                (true, format!("ok: {running} driver loops running\n"))
            }
        }
    }

    /// `/readyz`: ready when started, alive, every check passing and not draining;
    /// otherwise every reason, separated by "; ".
    pub fn readyz(&self) -> (bool, String) {
        let mut reasons = Vec::new();
        if !self.inner.started.load(Ordering::Relaxed) {
            reasons.push("starting".to_owned());
        }
        if let Some(name) = self.ended_loop() {
            reasons.push(format!("driver loop {name} ended"));
        }
        for (reason, check) in lock(&self.inner.checks).iter() {
            if !check() {
                reasons.push(reason.clone());
            }
        }
        if self.is_draining() {
            reasons.push("draining: new registrations and allocations are refused".into());
        }
        if reasons.is_empty() {
            (true, "ready\n".into())
        } else {
            (false, format!("not ready: {}\n", reasons.join("; ")))
        }
    }
}

/// Spawns a driver loop, watched by `health` when given.
pub fn spawn<F>(health: Option<&Health>, name: &str, driver: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    match health {
        Some(health) => tokio::spawn(health.watch(name.to_owned(), driver)),
        None => tokio::spawn(driver),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loop_that_ends_makes_the_daemon_unhealthy_and_unready() {
        let health = Health::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn(health.watch("udp-service-0", async {
            let _ = stopped.await;
        }));
        let _second = tokio::spawn(health.watch("metrics-http", std::future::pending()));
        assert_eq!(health.readyz(), (false, "not ready: starting\n".into()));
        health.set_started();
        assert_eq!(health.readyz(), (true, "ready\n".into()));
        assert_eq!(
            health.healthz(),
            (true, "ok: 2 driver loops running\n".into())
        );
        let _ = stop.send(());
        first.await.expect("joins");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), health.loop_ended())
            .await
            .expect("noticed");
        assert_eq!(ended, "udp-service-0");
        let (alive, why) = health.healthz();
        assert!(!alive && why.contains("udp-service-0 ended"), "{why}");
        assert!(!health.readyz().0);
    }

    #[tokio::test]
    async fn a_panicking_loop_counts_as_ended() {
        let health = Health::new();
        let task = tokio::spawn(health.watch("turn-tcp", async { panic!("boom") }));
        assert!(task.await.is_err());
        assert_eq!(health.ended_loop().as_deref(), Some("turn-tcp"));
    }

    #[test]
    fn checks_and_draining_give_their_reasons() {
        let health = Health::new();
        health.set_started();
        let up = Arc::new(AtomicBool::new(false));
        let seen = up.clone();
        health.add_check("cluster: Redis unreachable", move || {
            seen.load(Ordering::Relaxed)
        });
        assert_eq!(
            health.readyz(),
            (false, "not ready: cluster: Redis unreachable\n".into())
        );
        up.store(true, Ordering::Relaxed);
        assert!(health.readyz().0);
        health.set_draining(true);
        let (ready, why) = health.readyz();
        assert!(!ready && why.contains("draining"), "{why}");
        assert!(health.healthz().0, "draining is alive");
    }
}
