//! Running the real `gateway` binary inside a lab namespace, talking to it, and
//! reading its metrics, for integration tests and the demo.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{Host, LabError};

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The lab could not run something in a namespace.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon did not become ready in time, or exited.
    #[error("gateway not ready: {0}")]
    NotReady(String),
    /// The Redis a cluster of daemons shares did not start.
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Writes a shared-secret file as the gateway demands it: readable by its owner
/// only (mode 0600; `gateway serve` refuses looser permissions).
pub fn write_secret(path: &std::path::Path, secret: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, secret)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Path of the `gateway` binary under test: `$GATEWAY_BIN`, else `gateway` in the
/// cargo profile directory this test executable was built into.
pub fn gateway_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GATEWAY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("gateway");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the gateway binary was not found next to {}; build it first (`cargo build -p gateway`, \
         which `cargo xtask test` does) or set GATEWAY_BIN",
        exe.display()
    );
}

/// How [`GatewayProcess::start_with`] runs the binary.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// A program and its arguments that exec the gateway's command line given after
    /// them (e.g. `setpriv --reuid=65534 ...` or `prlimit --nofile=256:256`); it must
    /// exec, so the child's pid is the gateway's.
    pub wrapper: Vec<String>,
    /// The binary to run [default: [`gateway_binary`]].
    pub binary: Option<PathBuf>,
    /// Environment variables to add.
    pub env: Vec<(String, String)>,
}

/// A `gateway serve` (or `gateway watch`) process running in a lab host's namespace;
/// killed on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    /// `gateway serve` (ready once /readyz no longer says "starting").
    serve: bool,
    child: Option<Child>,
    /// The lab host it runs in; `None`: this test's own namespace.
    host: Option<Host>,
    metrics_addr: SocketAddr,
    log: PathBuf,
}

impl GatewayProcess {
    /// Starts `gateway serve` in `host`'s namespace with `args` added, serving metrics
    /// on `metrics_addr`, logging to a temporary file, and waits until every listener
    /// is bound (/readyz no longer says "starting").
    pub fn start(
        host: &Host,
        metrics_addr: SocketAddr,
        args: &[&str],
    ) -> Result<Self, DaemonError> {
        Self::launch(host, metrics_addr, "serve", args)
    }

    /// Starts `gateway watch` (the eBPF punch observers of a host that runs no agent,
    /// e.g. a NAT router) in `host`'s namespace with `args` added, serving metrics on
    /// `metrics_addr`, and waits until /metrics answers.
    pub fn start_watch(
        host: &Host,
        metrics_addr: SocketAddr,
        args: &[&str],
    ) -> Result<Self, DaemonError> {
        Self::launch(host, metrics_addr, "watch", args)
    }

    /// Starts `gateway serve` in this test's own namespace (loopback tests that need
    /// no lab) with `args` added, serving metrics on `metrics_addr`, and waits until
    /// /metrics answers. It logs at its configuration's `log.filter` (default info):
    /// no GATEWAY_LOG or RUST_LOG is passed on.
    pub fn start_here(metrics_addr: SocketAddr, args: &[&str]) -> Result<Self, DaemonError> {
        Self::spawn(
            Command::new(gateway_binary()),
            None,
            metrics_addr,
            "serve",
            args,
            &[],
        )
    }

    /// Starts `gateway serve` in `host`'s namespace as [`GatewayProcess::start`] does,
    /// but through `launch`: under a wrapper that execs it (`setpriv`, `prlimit`), from
    /// another copy of the binary, with more environment variables.
    pub fn start_with(
        host: &Host,
        metrics_addr: SocketAddr,
        launch: &Launch,
        args: &[&str],
    ) -> Result<Self, DaemonError> {
        Self::launch_with(host, metrics_addr, "serve", args, launch)
    }

    fn launch(
        host: &Host,
        metrics_addr: SocketAddr,
        subcommand: &str,
        args: &[&str],
    ) -> Result<Self, DaemonError> {
        Self::launch_with(host, metrics_addr, subcommand, args, &Launch::default())
    }

    fn launch_with(
        host: &Host,
        metrics_addr: SocketAddr,
        subcommand: &str,
        args: &[&str],
        launch: &Launch,
    ) -> Result<Self, DaemonError> {
        let binary = launch.binary.clone().unwrap_or_else(gateway_binary);
        let command = match launch.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = host.command(program);
                command.args(wrapper_args).arg(&binary);
                command
            }
            None => host.command(&binary.to_string_lossy()),
        };
        Self::spawn(
            command,
            Some(host),
            metrics_addr,
            subcommand,
            args,
            &launch.env,
        )
    }

    fn spawn(
        mut command: Command,
        host: Option<&Host>,
        metrics_addr: SocketAddr,
        subcommand: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Self, DaemonError> {
        let log = std::env::temp_dir().join(format!(
            "gateway-{}-{}.log",
            std::process::id(),
            rand::random::<u32>()
        ));
        let log_file = std::fs::File::create(&log).map_err(io("creating the daemon log"))?;
        match host {
            Some(_) => command.env("GATEWAY_LOG", "info"),
            // Here the configuration's log.filter decides (a reload can change it).
            None => command.env_remove("GATEWAY_LOG").env_remove("RUST_LOG"),
        };
        command
            .args([subcommand, "--metrics-listen", &metrics_addr.to_string()])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = command.spawn().map_err(io("spawning the gateway"))?;
        let mut process = Self {
            serve: subcommand == "serve",
            child: Some(child),
            host: host.cloned(),
            metrics_addr,
            log,
        };
        process.wait_ready(Duration::from_secs(10))?;
        Ok(process)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(DaemonError::NotReady(format!(
                    "exited with {status}; log:\n{}",
                    self.log_text()
                )));
            }
            // `serve` answers /metrics before every listener is bound; /readyz says
            // "starting" until then (and may say other things later, e.g. a cluster
            // without Redis, which a test may want). Other subcommands have /metrics.
            let up = if self.serve {
                matches!(self.fetch("/readyz"), Ok((status, body))
                    if status == 200 || !body.contains("starting"))
            } else {
                self.scrape().is_ok()
            };
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DaemonError::NotReady(format!(
                    "not started after {timeout:?}; log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id (for /proc measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// CPU time the daemon has used so far, from /proc (see [`cpu_time_of`]).
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(self.pid()?)
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fetches `/metrics` from inside the daemon's namespace.
    pub fn scrape(&self) -> Result<String, DaemonError> {
        match self.fetch("/metrics")? {
            (200, body) => Ok(body),
            (status, _) => Err(DaemonError::NotReady(format!("HTTP status {status}"))),
        }
    }

    /// GETs `path` from the metrics listener (e.g. `/healthz`, `/readyz`): the
    /// status code and the body, whatever the status.
    pub fn fetch(&self, path: &str) -> Result<(u16, String), DaemonError> {
        http_request(self.host.as_ref(), self.metrics_addr, path)
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the daemon.
    pub fn signal(&self, signal: i32) -> Result<(), DaemonError> {
        let pid = self
            .pid()
            .ok_or_else(|| DaemonError::NotReady("already stopped".into()))?;
        let pid = i32::try_from(pid).unwrap_or(i32::MAX);
        // SAFETY: plain kill(2) on our own child's pid.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(DaemonError::Io {
                what: format!("sending signal {signal}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit by itself; its status, or
    /// `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, DaemonError> {
        let Some(child) = self.child.as_mut() else {
            return Err(DaemonError::NotReady("already stopped".into()));
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for the gateway"))? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon (SIGKILL) and reaps it; scrapes fail from then on.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon with SIGTERM (and a second one after 2 s if it is still
    /// draining) and returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus, DaemonError> {
        let Some(mut child) = self.child.take() else {
            return Err(DaemonError::NotReady("already stopped".into()));
        };
        // The child is `ip netns exec`, which execs the gateway: same pid.
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        // SIGTERM drains `serve` while peers are registered (up to drain_timeout); a
        // second SIGTERM stops it at once, as an operator's second signal does.
        let mut second = Some(Instant::now() + Duration::from_secs(2));
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for the gateway"))? {
                return Ok(status);
            }
            if second.is_some_and(|at| Instant::now() > at) {
                second = None;
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(DaemonError::NotReady(format!(
                    "did not stop within 10 s of SIGTERM; log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A minimal HTTP/1.1 GET from inside `host`'s namespace; returns the body of a 200.
pub fn http_get(host: &Host, addr: SocketAddr, path: &str) -> Result<String, DaemonError> {
    match http_request(Some(host), addr, path)? {
        (200, body) => Ok(body),
        (status, _) => Err(DaemonError::NotReady(format!("HTTP status {status}"))),
    }
}

/// A minimal HTTP/1.1 GET from inside `host`'s namespace (or this test's own, for
/// `None`): the status code and the body, whatever the status.
pub fn http_request(
    host: Option<&Host>,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), DaemonError> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let connect = move || TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    let stream = match host {
        Some(host) => host.run(connect)?,
        None => connect(),
    }
    .map_err(io(format!("connecting to {addr}")))?;
    let mut stream = stream;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io("setting a timeout"))?;
    stream
        .write_all(request.as_bytes())
        .map_err(io("sending the request"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(io("reading the response"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| DaemonError::NotReady("malformed HTTP response".into()))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| DaemonError::NotReady(format!("malformed status line: {head}")))?;
    Ok((status, body.to_owned()))
}

/// The value of the sample `name{labels}` in Prometheus text; `labels` is the exact
/// label text without braces (`""` for none).
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == series).then(|| value.parse().ok()).flatten()
    })
}

/// Sends a STUN Binding request from `socket` to `to` and returns the reflexive
/// address the server saw, retrying a few times (the lab may drop packets).
pub fn stun_binding(socket: &UdpSocket, to: SocketAddr, timeout: Duration) -> Option<SocketAddr> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        let tid: [u8; 12] = rand::random();
        gateway::proto::binding::binding_request(tid, &mut request);
        socket.send_to(&request, to).ok()?;
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(received) => received,
                // Seen under parallel test load: retry rather than give up.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if from != to {
                continue;
            }
            if let Some(mapped) = gateway::proto::binding::parse_binding_success(&buf[..len], tid) {
                return Some(mapped);
            }
        }
    }
    None
}

/// A `gateway peer` agent running in a lab host's namespace, its status lines
/// collected as they are printed; killed on drop.
#[derive(Debug)]
pub struct PeerProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl PeerProcess {
    /// Starts `gateway peer --server SERVER ARGS...` in `host`'s namespace with the
    /// given credentials.
    pub fn start(
        host: &Host,
        server: SocketAddr,
        username: &str,
        password: &str,
        args: &[&str],
    ) -> Result<Self, DaemonError> {
        let mut command = host.command(&gateway_binary().to_string_lossy());
        command
            .args(["peer", "--server", &server.to_string()])
            .args(args);
        Self::spawn(command, username, password)
    }

    /// Starts `gateway peer ARGS...` in this test's own namespace (loopback tests
    /// that need no lab; `args` carry the `--server`s) with the given credentials.
    pub fn start_here(username: &str, password: &str, args: &[&str]) -> Result<Self, DaemonError> {
        let mut command = Command::new(gateway_binary());
        command.arg("peer").args(args);
        Self::spawn(command, username, password)
    }

    /// Spawns `command` (a `gateway peer` command line) with the credentials in its
    /// environment and collects its status lines.
    fn spawn(mut command: Command, username: &str, password: &str) -> Result<Self, DaemonError> {
        command
            .env("GATEWAY_USERNAME", username)
            .env("GATEWAY_PASSWORD", password)
            .stdout(Stdio::piped());
        // GATEWAY_TEST_PEER_LOG=debug shows the agents' logs on the test's stderr.
        match std::env::var("GATEWAY_TEST_PEER_LOG") {
            Ok(level) => command.env("GATEWAY_LOG", level).stderr(Stdio::inherit()),
            Err(_) => command.env("GATEWAY_LOG", "warn").stderr(Stdio::null()),
        };
        let mut child = command.spawn().map_err(io("spawning gateway peer"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| DaemonError::NotReady("no stdout".into()))?;
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits up to `timeout` for a status line starting with `prefix` (also among the
    /// lines already seen) and returns it.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        if let Some(line) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Some(line.clone());
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the agent (`ip netns exec` execs
    /// it, so the child's pid is the agent's).
    pub fn signal(&self, signal: i32) -> Result<(), DaemonError> {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        // SAFETY: plain kill(2) on our own child's pid.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(DaemonError::Io {
                what: format!("sending signal {signal}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Every status line seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits up to `timeout` for the agent to exit (collecting the lines it printed)
    /// and returns its exit status; `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reader thread ends with the pipe: take its last lines.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/PID/stat`:
/// lets a test tell a process that waits from one that spins.
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; after it come the
    // state (field 3) ... utime (field 14) and stime (field 15).
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&t| t > 0)?;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}
