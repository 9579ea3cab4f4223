//! Running coturn's `turnserver` on loopback, for the TURN client's interop tests and
//! the relay benchmark (coturn is the reference the gateway's relay is compared with).
//!
//! Each instance gets its own port, relay port range, temporary directory (log, pid
//! file, SQLite user database) and is killed on drop. No configuration file is read
//! (`-n`): every setting is an explicit flag, listed by [`Coturn::command_line`].
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gateway::proto::binding;

/// The binary Debian's `coturn` package installs (`cargo xtask setup` installs it).
pub const TURNSERVER: &str = "turnserver";

/// Why coturn could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CoturnError {
    /// `turnserver` is not installed.
    #[error("`{TURNSERVER}` was not found: install Debian's coturn (`cargo xtask setup` does)")]
    Missing,
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// It exited or did not answer a STUN Binding in time.
    #[error("turnserver did not come up: {0}")]
    NotReady(String),
}

/// How to run coturn.
#[derive(Clone, Debug)]
pub struct CoturnConfig {
    /// `--static-auth-secret` (TURN REST credentials, `--use-auth-secret`).
    pub secret: String,
    /// `--realm`.
    pub realm: String,
    /// `--listening-ip`.
    pub listen_ip: IpAddr,
    /// `--relay-ip` (repeatable: add `::1` for IPv6 allocations).
    pub relay_ips: Vec<IpAddr>,
    /// `--min-port` and `--max-port` of the relay range.
    pub relay_ports: (u16, u16),
    /// Further flags, appended as given.
    pub extra_args: Vec<String>,
}

impl CoturnConfig {
    /// Loopback, IPv4 relay on 127.0.0.1, a 200-port relay window picked at random
    /// above Linux's ephemeral range (61000..=65535) so concurrent instances and
    /// other programs' sockets rarely collide.
    pub fn loopback(secret: &str, realm: &str) -> Self {
        let start = 61_000 + rand::random_range(0..21u16) * 200;
        Self {
            secret: secret.to_owned(),
            realm: realm.to_owned(),
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            relay_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            relay_ports: (start, start + 199),
            extra_args: Vec::new(),
        }
    }
}

/// A running `turnserver`; killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct Coturn {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    command_line: String,
}

/// Whether `turnserver` can be run.
pub fn available() -> bool {
    Command::new(TURNSERVER)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_udp_port(ip: IpAddr) -> Result<u16, CoturnError> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(|source| CoturnError::Io {
        what: "finding a free port",
        source,
    })?;
    socket
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| CoturnError::Io {
            what: "finding a free port",
            source,
        })
}

/// Sends Binding requests to `addr` until one is answered or `timeout` passes.
pub fn wait_for_binding(addr: SocketAddr, timeout: Duration) -> bool {
    let bind = if addr.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let Ok(socket) = UdpSocket::bind(bind) else {
        return false;
    };
    if socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .is_err()
    {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut request = Vec::new();
    let mut reply = [0u8; 512];
    // One transaction id for every retry: an answer slower than the read timeout
    // still counts when it arrives (with a fresh id per retry, a server that is
    // consistently late would always be answering the previous one).
    let tid: [u8; 12] = rand::random();
    binding::binding_request(tid, &mut request);
    while Instant::now() < deadline {
        if socket.send_to(&request, addr).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if let Ok((len, from)) = socket.recv_from(&mut reply)
            && from == addr
            && binding::parse_binding_success(&reply[..len], tid).is_some()
        {
            return true;
        }
    }
    false
}

impl Coturn {
    /// Starts `turnserver` on a free UDP port of `config.listen_ip` and waits until it
    /// answers a STUN Binding (up to 10 s). Tries three ports before giving up.
    pub fn start(config: &CoturnConfig) -> Result<Self, CoturnError> {
        if !available() {
            return Err(CoturnError::Missing);
        }
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(config)? {
                Ok(coturn) => return Ok(coturn),
                Err(why) => last_error = why,
            }
        }
        Err(CoturnError::NotReady(last_error))
    }

    fn try_start(config: &CoturnConfig) -> Result<Result<Self, String>, CoturnError> {
        let port = free_udp_port(config.listen_ip)?;
        let addr = SocketAddr::new(config.listen_ip, port);
        let dir = std::env::temp_dir().join(format!(
            "coturn-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| CoturnError::Io {
            what: "creating coturn's directory",
            source,
        })?;
        let args = Self::args(config, port, &dir);
        let command_line = format!("{TURNSERVER} {}", args.join(" "));
        let child = Command::new(TURNSERVER)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| CoturnError::Io {
                what: "starting turnserver",
                source,
            })?;
        let mut coturn = Self {
            child,
            addr,
            dir,
            command_line,
        };
        if wait_for_binding(addr, Duration::from_secs(10)) {
            return Ok(Ok(coturn));
        }
        let status = coturn.child.try_wait().ok().flatten();
        Ok(Err(format!(
            "no Binding answer on {addr} (exit status {status:?}); log:\n{}",
            coturn.log_tail(30)
        )))
    }

    fn args(config: &CoturnConfig, port: u16, dir: &Path) -> Vec<String> {
        let mut args: Vec<String> = [
            "-n",
            "--listening-ip",
            &config.listen_ip.to_string(),
            "--listening-port",
            &port.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for ip in &config.relay_ips {
            args.extend(["--relay-ip".to_owned(), ip.to_string()]);
        }
        let path = |name: &str| dir.join(name).display().to_string();
        args.extend(
            [
                "--min-port",
                &config.relay_ports.0.to_string(),
                "--max-port",
                &config.relay_ports.1.to_string(),
                "--use-auth-secret",
                "--static-auth-secret",
                &config.secret,
                "--realm",
                &config.realm,
                "--no-tls",
                "--no-dtls",
                "--no-tcp",
                "--no-cli",
                "--allow-loopback-peers",
                "--log-file",
                &path("turn.log"),
                "--simple-log",
                "--pidfile",
                &path("turn.pid"),
                "--userdb",
                &path("turndb"),
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        args.extend(config.extra_args.iter().cloned());
        args
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id (for CPU time and RSS from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exact command it was started with (the secret included: test secrets only).
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("turn.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
