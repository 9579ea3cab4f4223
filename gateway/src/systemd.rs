//! systemd's notification protocol (`sd_notify(3)`), written out: one datagram of
//! `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`). Without `$NOTIFY_SOCKET` (not started
//! by systemd, or not `Type=notify`) every call does nothing.
//!
//! `gateway serve` sends `READY=1` once every socket is bound and the eBPF programs
//! are attached, `STOPPING=1` when it starts shutting down, and with `WatchdogSec=`
//! (`$WATCHDOG_USEC`) `WATCHDOG=1` at half that interval, but only while its driver
//! loops are running and its cores' locks can be taken: a wedged process stops
//! pinging and systemd kills and restarts it.
use std::{
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor an `@` abstract name.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    BadAddress(String),
    /// The socket could not be created or the datagram not sent.
    #[error("cannot notify systemd at {address}: {source}")]
    Io {
        /// `$NOTIFY_SOCKET`.
        address: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Where notifications go: the socket of `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    address: String,
    target: SocketAddr,
}

impl Notifier {
    /// The notifier of `$NOTIFY_SOCKET`, or `None` when it is unset or empty.
    pub fn from_env() -> Option<Result<Self, NotifyError>> {
        let address = std::env::var("NOTIFY_SOCKET").ok()?;
        (!address.is_empty()).then(|| Self::new(&address))
    }

    /// A notifier for `address`: an absolute path, or `@name` for the abstract
    /// namespace.
    pub fn new(address: &str) -> Result<Self, NotifyError> {
        let target = if let Some(name) = address.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address)
        } else {
            return Err(NotifyError::BadAddress(address.to_owned()));
        }
        .map_err(|_| NotifyError::BadAddress(address.to_owned()))?;
        Ok(Self {
            address: address.to_owned(),
            target,
        })
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) in one datagram.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let io = |source| NotifyError::Io {
            address: self.address.clone(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        let sent = socket
            .send_to_addr(state.as_bytes(), &self.target)
            .map_err(io)?;
        if sent != state.len() {
            return Err(io(io::Error::new(
                io::ErrorKind::WriteZero,
                "short datagram",
            )));
        }
        Ok(())
    }
}

/// Sends `state` to `$NOTIFY_SOCKET` if it is set; failures are logged, not fatal
/// (systemd then times the start out, which says more than a refusal to run).
/// Returns whether it was sent.
pub fn notify(state: &str) -> bool {
    match Notifier::from_env() {
        None => false,
        Some(Ok(notifier)) => match notifier.send(state) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "systemd notification failed");
                false
            }
        },
        Some(Err(e)) => {
            tracing::warn!(error = %e, "systemd notification failed");
            false
        }
    }
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// Tells systemd the service is up (`READY=1`) with a one-line `STATUS=`.
pub fn notify_ready(status: &str) -> bool {
    let status = status.replace('\n', " ");
    let sent = notify(&format!("READY=1\nSTATUS={status}"));
    if sent {
        tracing::info!("told systemd we are ready");
    }
    sent
}

/// Tells systemd the service is stopping (`STOPPING=1`), and stops the watchdog
/// pings (systemd watches the stop with `TimeoutStopSec=` instead).
pub fn notify_stopping() -> bool {
    STOPPING.store(true, Ordering::Relaxed);
    notify("STOPPING=1\nSTATUS=stopping")
}

/// Whether [`notify_stopping`] was called.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Relaxed)
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when it is set and
/// meant for this process (`$WATCHDOG_PID`, when set, is our pid).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the variables' values.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// A check run on a blocking thread before each ping: it returns once the state it
/// looks at answers (e.g. takes and releases a core's lock). One that never returns
/// stops the pings.
pub type Probe = Box<dyn Fn() + Send + Sync>;

/// What the watchdog looks at before each ping.
pub struct Liveness {
    /// Tasks that must still run (the driver loops).
    pub tasks: Vec<tokio::task::AbortHandle>,
    /// Checks that must complete within the interval.
    pub probes: Vec<Probe>,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness")
            .field("tasks", &self.tasks.len())
            .field("probes", &self.probes.len())
            .finish()
    }
}

/// Starts the watchdog task when `$WATCHDOG_USEC` asks for one (and
/// `$NOTIFY_SOCKET` is set): `WATCHDOG=1` every half interval while `liveness`
/// holds. Returns the task, or `None` without a watchdog.
pub fn spawn_watchdog(liveness: Liveness) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let notifier = match Notifier::from_env()? {
        Ok(notifier) => notifier,
        Err(e) => {
            tracing::warn!(error = %e, "WATCHDOG_USEC is set but NOTIFY_SOCKET is unusable");
            return None;
        }
    };
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog: pinging while the driver loops run"
    );
    Some(tokio::spawn(watchdog(notifier, interval, liveness)))
}

/// The watchdog loop: every `interval`, `WATCHDOG=1` if every task runs and every
/// probe completed within the interval; stops after [`notify_stopping`].
pub async fn watchdog(notifier: Notifier, interval: Duration, liveness: Liveness) {
    let probes = std::sync::Arc::new(liveness.probes);
    let mut pending: Option<tokio::task::JoinHandle<()>> = None;
    let mut healthy = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if stopping() {
            return;
        }
        let tasks_alive = liveness.tasks.iter().all(|t| !t.is_finished());
        // A probe still blocked since the last tick means a lock is held that long:
        // do not start another (the blocked thread would only be joined by more).
        let probe = match pending.take() {
            Some(previous) if !previous.is_finished() => {
                pending = Some(previous);
                false
            }
            _ => {
                let probes = probes.clone();
                let run = tokio::task::spawn_blocking(move || probes.iter().for_each(|p| p()));
                match tokio::time::timeout(interval, run).await {
                    Ok(finished) => finished.is_ok(),
                    Err(_) => false,
                }
            }
        };
        if tasks_alive && probe {
            if !healthy {
                tracing::info!("systemd watchdog: healthy again, pinging");
                healthy = true;
            }
            if let Err(e) = notifier.send("WATCHDOG=1") {
                tracing::warn!(error = %e, "systemd watchdog ping failed");
            }
        } else if healthy {
            healthy = false;
            tracing::error!(
                driver_loops_running = tasks_alive,
                locks_answer = probe,
                "systemd watchdog: not pinging (a driver loop ended or a core is wedged); systemd will restart the service"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (UnixDatagram, tempfile_path::TempPath) {
        let path = tempfile_path::TempPath::new();
        let socket = UnixDatagram::bind(&path.0).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        (socket, path)
    }

    /// A socket path in the temporary directory, removed on drop.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new() -> Self {
                Self(std::env::temp_dir().join(format!(
                    "gw-notify-{}-{}.sock",
                    std::process::id(),
                    rand::random::<u64>()
                )))
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let (socket, path) = receiver();
        let notifier = Notifier::new(&path.0.to_string_lossy()).expect("path");
        notifier.send("READY=1\nSTATUS=up").expect("sent");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("gw-notify-test-{}", rand::random::<u64>());
        let abstract_socket = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("name"),
        )
        .expect("bind abstract");
        abstract_socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        Notifier::new(&format!("@{name}"))
            .expect("abstract")
            .send("STOPPING=1")
            .expect("sent");
        assert_eq!(recv(&abstract_socket), "STOPPING=1");
    }

    #[test]
    fn refuses_relative_addresses() {
        assert!(matches!(
            Notifier::new("relative.sock"),
            Err(NotifyError::BadAddress(_))
        ));
    }

    #[test]
    fn watchdog_interval_is_half_and_for_this_pid_only() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    /// Counts the WATCHDOG=1 datagrams arriving within `window`.
    fn pings(socket: &UnixDatagram, window: Duration) -> usize {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let deadline = std::time::Instant::now() + window;
        let mut count = 0;
        let mut buf = [0u8; 64];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                assert_eq!(&buf[..n], b"WATCHDOG=1");
                count += 1;
            }
        }
        count
    }

    /// Drops what arrived so far, then counts the pings of the next `window`.
    async fn fresh_pings(socket: UnixDatagram, window: Duration) -> (UnixDatagram, usize) {
        tokio::task::spawn_blocking(move || {
            pings(&socket, Duration::from_millis(30));
            let n = pings(&socket, window);
            (socket, n)
        })
        .await
        .expect("counted")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "the test holds the lock across awaits on purpose, as a wedged driver would"
    )]
    async fn watchdog_pings_only_while_loops_run_and_locks_answer() {
        let interval = Duration::from_millis(40);
        let window = Duration::from_millis(400);
        // Healthy: a running task and a lock that answers.
        let (socket, path) = receiver();
        let running = tokio::spawn(std::future::pending::<()>());
        let lock = std::sync::Arc::new(std::sync::Mutex::new(()));
        let probe_lock = lock.clone();
        let dog = tokio::spawn(watchdog(
            Notifier::new(&path.0.to_string_lossy()).expect("notifier"),
            interval,
            Liveness {
                tasks: vec![running.abort_handle()],
                probes: vec![Box::new(move || drop(probe_lock.lock()))],
            },
        ));
        let (socket, healthy) = fresh_pings(socket, window).await;
        assert!(healthy >= 4, "pings while healthy: {healthy}");

        // Wedged: the lock is held (as by a stuck driver): no more pings.
        let guard = lock.lock().expect("lock");
        tokio::time::sleep(interval * 2).await;
        let (socket, wedged) = fresh_pings(socket, window).await;
        assert_eq!(wedged, 0, "no ping while a core's lock is held");
        drop(guard);
        let (socket, recovered) = fresh_pings(socket, window).await;
        assert!(
            recovered >= 2,
            "pings again once the lock answers: {recovered}"
        );

        // A driver loop ended: no more pings.
        running.abort();
        tokio::time::sleep(interval * 2).await;
        let (_socket, ended) = fresh_pings(socket, window).await;
        assert_eq!(ended, 0, "no ping once a loop ended");
        dog.abort();
    }
}
