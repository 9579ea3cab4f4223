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
/// The coturn release vendored beside the workspace (`../shared/vendor`), the
/// relay's performance baseline: built by [`build_vendored`].
pub const VENDORED_VERSION: &str = "4.17.1";

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
    /// The vendored source could not be built.
    #[error("building coturn {VENDORED_VERSION} from {tarball}: {why}")]
    Build {
        /// The source tarball.
        tarball: PathBuf,
        /// What failed (with the tail of the build's output).
        why: String,
    },
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
    /// The `turnserver` binary: [`TURNSERVER`] from `PATH` (Debian's), or a vendored
    /// build's ([`VendoredCoturn::turnserver`]).
    pub turnserver: PathBuf,
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
            turnserver: PathBuf::from(TURNSERVER),
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
    runs(Path::new(TURNSERVER))
}

/// Whether `binary --version` can be run.
fn runs(binary: &Path) -> bool {
    Command::new(binary)
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
        if !runs(&config.turnserver) {
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
        let command_line = format!("{} {}", config.turnserver.display(), args.join(" "));
        let child = Command::new(&config.turnserver)
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

/// A coturn built from the vendored source: where its binaries are.
#[derive(Clone, Debug)]
pub struct VendoredCoturn {
    bin: PathBuf,
}

impl VendoredCoturn {
    /// Its `turnserver`.
    pub fn turnserver(&self) -> PathBuf {
        self.bin.join("turnserver")
    }

    /// Its load generator, `turnutils_uclient` (with `-Y packet`, the packet flood).
    pub fn uclient(&self) -> PathBuf {
        self.bin.join("turnutils_uclient")
    }

    /// Its UDP reflector, `turnutils_peer` (echoes batches with GSO).
    pub fn peer(&self) -> PathBuf {
        self.bin.join("turnutils_peer")
    }
}

/// The workspace this crate belongs to.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The vendored tarball: `../shared/vendor/coturn-4.17.1.tar.gz` beside the
/// workspace (from a git worktree elsewhere, beside its main checkout), or under
/// `$GATEWAY_SHARED_DIR/vendor` when that is set.
pub fn vendored_tarball() -> PathBuf {
    let name = format!("coturn-{VENDORED_VERSION}.tar.gz");
    if let Some(shared) = std::env::var_os("GATEWAY_SHARED_DIR") {
        return PathBuf::from(shared).join("vendor").join(name);
    }
    let beside = |root: &Path| {
        root.parent()
            .map(|p| p.join("shared").join("vendor").join(&name))
    };
    let root = workspace_root();
    let here = beside(&root).unwrap_or_else(|| PathBuf::from("../shared/vendor").join(&name));
    if here.is_file() {
        return here;
    }
    // A worktree: the main checkout is the parent of the common git directory.
    let common = Command::new("git")
        .args(["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    common
        .as_deref()
        .and_then(Path::parent)
        .and_then(beside)
        .filter(|p| p.is_file())
        .unwrap_or(here)
}

/// Builds coturn [`VENDORED_VERSION`] from [`vendored_tarball`] into
/// `target/coturn-4.17.1` (`./configure && make`, optimised with `-O2` like a
/// distribution's build; needs Debian's libevent-dev, libssl-dev and pkg-config), once:
/// later calls find the binaries and return at once. Concurrent callers (test
/// threads, processes) wait for one build under a lock file.
pub fn build_vendored() -> Result<VendoredCoturn, CoturnError> {
    let tarball = vendored_tarball();
    let fail = |why: String| CoturnError::Build {
        tarball: tarball.clone(),
        why,
    };
    let home = workspace_root()
        .join("target")
        .join(format!("coturn-{VENDORED_VERSION}"));
    let built = VendoredCoturn {
        bin: home.join("bin"),
    };
    let done = |b: &VendoredCoturn| {
        [b.turnserver(), b.uclient(), b.peer()]
            .iter()
            .all(|p| p.is_file())
    };
    if done(&built) {
        return Ok(built);
    }
    std::fs::create_dir_all(&home)
        .map_err(|e| fail(format!("creating {}: {e}", home.display())))?;
    let lock = std::fs::File::create(home.join(".lock"))
        .map_err(|e| fail(format!("creating the lock file: {e}")))?;
    // SAFETY: flock on a descriptor this function owns; released when it closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(fail(format!(
            "locking: {}",
            std::io::Error::last_os_error()
        )));
    }
    if done(&built) {
        return Ok(built);
    }
    if !tarball.is_file() {
        return Err(fail("the tarball is missing".to_owned()));
    }
    let source = home.join("src");
    let _ = std::fs::remove_dir_all(&source);
    std::fs::create_dir_all(&source).map_err(|e| fail(format!("creating the source dir: {e}")))?;
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let configure = source.join("configure").display().to_string();
    let steps: [(&str, Vec<String>); 3] = [
        (
            "tar",
            vec![
                "-xzf".to_owned(),
                tarball.display().to_string(),
                "-C".to_owned(),
                source.display().to_string(),
                "--strip-components=1".to_owned(),
            ],
        ),
        (configure.as_str(), Vec::new()),
        ("make", vec![format!("-j{jobs}")]),
    ];
    let log_path = home.join("build.log");
    for (program, args) in steps {
        let log = std::fs::File::create(&log_path)
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| fail(format!("creating {}: {e}", log_path.display())))?;
        let status = Command::new(program)
            .args(&args)
            .current_dir(&source)
            .env("CFLAGS", "-O2")
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .status()
            .map_err(|e| fail(format!("running {program}: {e}")))?;
        if !status.success() {
            let output = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = output.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            return Err(fail(format!(
                "{program} {} failed ({status}); needs libevent-dev libssl-dev pkg-config (cargo xtask setup):\n{tail}",
                args.join(" ")
            )));
        }
    }
    let bin = home.join("bin");
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).map_err(|e| fail(format!("creating bin: {e}")))?;
    for name in ["turnserver", "turnutils_uclient", "turnutils_peer"] {
        std::fs::copy(source.join("bin").join(name), bin.join(name))
            .map_err(|e| fail(format!("copying {name}: {e}")))?;
    }
    // The sources and objects are not needed once the binaries are out.
    let _ = std::fs::remove_dir_all(&source);
    Ok(built)
}
