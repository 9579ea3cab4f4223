//! Real Redis for the cluster tests: Debian's `redis-server`, one server or a Redis
//! Cluster of several shards on loopback, or one server inside a NAT lab host (the
//! lab's Redis host, listening on the public segment), with no persistence (a
//! restart starts empty, as the tests want), stopped and cleaned up on drop.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::lab::Host;

/// Why a Redis could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `redis-server` or `redis-cli` is not installed.
    #[error(
        "{0} not found: the cluster tests need Debian's redis-server (cargo xtask setup installs it)"
    )]
    Missing(&'static str),
    /// It did not start or did not answer in time.
    #[error("redis: {0}")]
    Start(String),
}

/// A free TCP port on loopback (and its cluster bus port, +10000, when asked).
fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        // Cluster bus ports are port + 10000: keep both in range.
        if port != 0 && port < 55_000 {
            return port;
        }
    }
}

fn which(binary: &'static str) -> Result<(), RedisError> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(RedisError::Missing(binary))
    }
}

/// The port Redis listens on inside a lab host (its own namespace: always free).
pub const LAB_PORT: u16 = 6379;

/// One `redis-server` process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    /// Its port (on 127.0.0.1, or on the lab host's address).
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
    password: Option<String>,
    /// Serve TLS only, with these files (`rediss://`).
    tls: Option<TlsFiles>,
    /// The lab host it runs in (`None`: this process's namespace, on loopback).
    host: Option<Host>,
}

/// A test CA and a server certificate for 127.0.0.1 it signed (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA certificate clients must trust.
    pub ca: PathBuf,
    /// The server's certificate (SAN IP 127.0.0.1).
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes a CA and a server certificate in `dir` with the openssl command.
    pub fn generate(dir: &Path) -> Result<Self, RedisError> {
        let openssl = |args: &[&str]| -> Result<(), RedisError> {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| RedisError::Start(format!("cannot run openssl: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(RedisError::Start(format!("openssl {args:?} failed")))
            }
        };
        std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n")
            .map_err(|e| RedisError::Start(e.to_string()))?;
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=gateway-test-ca",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        ])?;
        Ok(Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        })
    }
}

impl RedisServer {
    /// Starts a Redis that speaks TLS only (`rediss://`), with a certificate from
    /// `tls`.
    pub fn start_tls(dir: &Path, tls: TlsFiles) -> Result<Self, RedisError> {
        which("redis-server")?;
        let port = free_port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).map_err(|e| RedisError::Start(e.to_string()))?;
        let mut server = Self {
            child: None,
            port,
            dir,
            cluster: false,
            password: None,
            tls: Some(tls),
            host: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts a plain Redis that requires `password` (AUTH).
    pub fn start_with_password(dir: &Path, password: &str) -> Result<Self, RedisError> {
        let mut server = Self::start(dir)?;
        server.password = Some(password.to_owned());
        server.restart()?;
        Ok(server)
    }

    /// Starts a plain Redis on a free loopback port (no persistence).
    pub fn start(dir: &Path) -> Result<Self, RedisError> {
        Self::start_on(dir, free_port(), false)
    }

    /// Starts a plain Redis inside the lab host `host` (no persistence), listening on
    /// the host's first address, port [`LAB_PORT`]: reachable from every namespace
    /// routed to that address (the lab's Redis host is on the servers' segment).
    /// Dropping the lab kills it too.
    pub fn start_in(host: &Host, dir: &Path) -> Result<Self, RedisError> {
        Self::start_in_on(host, dir, LAB_PORT, false)
    }

    /// [`Self::start_in`] on `port`, cluster-enabled if `cluster` (its bus on
    /// `port + 10000`, same address).
    fn start_in_on(host: &Host, dir: &Path, port: u16, cluster: bool) -> Result<Self, RedisError> {
        which("redis-server")?;
        let dir = dir.join(format!("redis-{}-{port}", host.netns()));
        std::fs::create_dir_all(&dir).map_err(|e| RedisError::Start(e.to_string()))?;
        let mut server = Self {
            child: None,
            port,
            dir,
            cluster,
            password: None,
            tls: None,
            host: Some(host.clone()),
        };
        server.spawn()?;
        Ok(server)
    }

    fn start_on(dir: &Path, port: u16, cluster: bool) -> Result<Self, RedisError> {
        which("redis-server")?;
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).map_err(|e| RedisError::Start(e.to_string()))?;
        let mut server = Self {
            child: None,
            port,
            dir,
            cluster,
            password: None,
            tls: None,
            host: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The address it listens on.
    fn ip(&self) -> IpAddr {
        self.host
            .as_ref()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |h| IpAddr::V4(h.addr()))
    }

    /// Whether something accepts TCP connections on its address (from its namespace).
    fn listening(&self) -> bool {
        let addr = self.addr();
        match &self.host {
            None => TcpStream::connect(addr).is_ok(),
            Some(host) => host
                .tcp_connect(addr, Duration::from_millis(200))
                .is_ok_and(|c| c.is_ok()),
        }
    }

    /// `program` in its namespace.
    fn command(&self, program: &str) -> Command {
        match &self.host {
            None => Command::new(program),
            Some(host) => host.command(program),
        }
    }

    fn spawn(&mut self) -> Result<(), RedisError> {
        // A restarted cluster node must not remember its old cluster: start clean.
        let _ = std::fs::remove_file(self.dir.join("nodes.conf"));
        let mut command = self.command("redis-server");
        match &self.tls {
            Some(tls) => {
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                command.args(["--port", &self.port.to_string()]);
            }
        }
        command
            .args(["--bind", &self.ip().to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]);
        }
        let child = command
            .spawn()
            .map_err(|e| RedisError::Start(format!("cannot run redis-server: {e}")))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.listening() {
            if Instant::now() > deadline {
                return Err(RedisError::Start(format!(
                    "redis-server on {} did not listen",
                    self.addr()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `redis://IP:PORT` (127.0.0.1, or the lab host's address; `rediss://` for a TLS
    /// server).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}", self.addr())
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }

    /// Kills it (SIGKILL: nothing is saved).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) -> Result<(), RedisError> {
        self.stop();
        self.spawn()
    }

    /// Runs `redis-cli` against it and returns its output.
    pub fn cli(&self, args: &[&str]) -> Result<String, RedisError> {
        which("redis-cli")?;
        let mut command = self.command("redis-cli");
        command
            .args(["-h", &self.ip().to_string()])
            .args(["-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        if let Some(tls) = &self.tls {
            command.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        if self.cluster {
            command.arg("-c");
        }
        let output = command
            .args(args)
            .output()
            .map_err(|e| RedisError::Start(format!("cannot run redis-cli: {e}")))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first port of a Redis Cluster inside a lab host ([`RedisCluster::start_in`]):
/// shard `i` listens on `LAB_CLUSTER_PORT + i`, its cluster bus on that plus 10000.
pub const LAB_CLUSTER_PORT: u16 = 7000;

/// A Redis Cluster of `shards` masters (no replicas) on loopback or inside a lab host,
/// slots assigned by `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    /// Its nodes.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `shards` cluster-enabled servers and joins them into one cluster.
    pub fn start(dir: &Path, shards: usize) -> Result<Self, RedisError> {
        which("redis-cli")?;
        let mut nodes = Vec::new();
        for _ in 0..shards {
            nodes.push(RedisServer::start_on(dir, free_port(), true)?);
        }
        let cluster = Self { nodes };
        cluster.create()?;
        Ok(cluster)
    }

    /// Starts `shards` cluster-enabled servers inside the lab host `host` (the lab's
    /// Redis host), on the host's first address, ports [`LAB_CLUSTER_PORT`]`..`, and
    /// joins them into one cluster with `redis-cli --cluster create` run in that
    /// namespace (the cluster bus, port + 10000, stays inside it). Reachable from every
    /// namespace routed to that address; dropping the lab kills them too.
    pub fn start_in(host: &Host, dir: &Path, shards: usize) -> Result<Self, RedisError> {
        which("redis-cli")?;
        let mut nodes = Vec::new();
        for i in 0..shards {
            let port = LAB_CLUSTER_PORT
                + u16::try_from(i).map_err(|_| RedisError::Start("too many shards".into()))?;
            nodes.push(RedisServer::start_in_on(host, dir, port, true)?);
        }
        let cluster = Self { nodes };
        cluster.create()?;
        Ok(cluster)
    }

    fn create(&self) -> Result<(), RedisError> {
        let first = self
            .nodes
            .first()
            .ok_or_else(|| RedisError::Start("a cluster of no shards".into()))?;
        // In the nodes' namespace (a lab host's, or this one).
        let mut command = first.command("redis-cli");
        command.args(["--cluster", "create"]);
        for node in &self.nodes {
            command.arg(node.addr().to_string());
        }
        let output = command
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|e| RedisError::Start(format!("cannot run redis-cli: {e}")))?;
        if !output.status.success() {
            return Err(RedisError::Start(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        // Every node must agree that all slots are served.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.nodes.iter().all(|n| {
                n.cli(&["cluster", "info"])
                    .map(|info| info.contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RedisError::Start(
                    "the Redis Cluster never reached state ok".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        self.nodes.iter_mut().for_each(RedisServer::stop);
    }

    /// Starts every node again, empty, and forms the cluster anew.
    pub fn restart(&mut self) -> Result<(), RedisError> {
        for node in &mut self.nodes {
            node.restart()?;
        }
        self.create()
    }

    /// Keys in the whole cluster (DBSIZE summed over the masters).
    pub fn dbsize(&self) -> usize {
        self.nodes
            .iter()
            .filter_map(|n| n.cli(&["dbsize"]).ok()?.parse::<usize>().ok())
            .sum()
    }
}
