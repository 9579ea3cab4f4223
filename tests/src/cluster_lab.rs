//! Several gateway nodes as one service in the NAT lab: `n` server hosts on the
//! public segment, each running `gateway serve --cluster-redis ... --node-id node-K`,
//! and a Redis on the lab's Redis host (192.0.2.100) that they share. Peers behind
//! the lab's NATs register with whichever node they are given. Used by the
//! `cluster_lab` tests and `cargo xtask demo --nodes N`. See `docs/lab.md`.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    daemon::{DaemonError, GatewayProcess, PeerProcess, metric_value},
    lab::{Host, Lab, LabBuilder, LabError, server_addrs},
    punch,
    redis::{RedisCluster, RedisError, RedisServer},
};

/// The UDP port every node serves on (its first address).
pub const SERVICE_PORT: u16 = 3478;
/// The port of every node's discovery socket (its first address).
pub const DISCOVERY_PORT: u16 = 3479;

/// Node `k`'s `--node-id`.
pub fn node_id(k: usize) -> String {
    format!("node-{k}")
}

/// Node `k`'s service address (server `k`'s first address, port 3478).
pub fn service(k: usize) -> SocketAddr {
    SocketAddr::from((server_addrs(k)[0], SERVICE_PORT))
}

/// `gateway peer` flags naming node `k`'s other Binding endpoints (its discovery port
/// and its second address), like [`punch::DISCOVER`] for a one-server lab. Discovery
/// is node-local: an agent asks the node it registers with.
pub fn discover(k: usize) -> Vec<String> {
    let [first, second] = server_addrs(k);
    vec![
        "--discover".into(),
        SocketAddr::from((first, DISCOVERY_PORT)).to_string(),
        "--discover".into(),
        SocketAddr::from((second, SERVICE_PORT)).to_string(),
    ]
}

/// The `gateway serve` flags that make node `k` a member of the cluster sharing
/// `redis`.
pub fn cluster_args(redis: &RedisServer, k: usize) -> Vec<String> {
    vec![
        "--cluster-redis".into(),
        redis.url(),
        "--node-id".into(),
        node_id(k),
    ]
}

/// Which Redis the nodes of a [`ClusterLab`] share, on the lab's Redis host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One `redis-server` on 192.0.2.100:6379.
    Single,
    /// A Redis Cluster of three masters on 192.0.2.100:7000-7002 (bus ports
    /// 17000-17002), the nodes given every shard as a seed and `--cluster-mode
    /// cluster`.
    Cluster,
}

/// The running Redis of a [`ClusterLab`].
#[derive(Debug)]
pub enum LabRedis {
    /// One server.
    Single(RedisServer),
    /// A three-shard Redis Cluster.
    Cluster(RedisCluster),
}

impl LabRedis {
    /// Starts `backend` on the lab's Redis host `host`, its files under `dir`.
    pub fn start(backend: Backend, host: &Host, dir: &std::path::Path) -> Result<Self, RedisError> {
        Ok(match backend {
            Backend::Single => Self::Single(RedisServer::start_in(host, dir)?),
            Backend::Cluster => Self::Cluster(RedisCluster::start_in(host, dir, 3)?),
        })
    }

    /// The `gateway serve` flags that make node `k` a member of the cluster sharing
    /// this Redis.
    pub fn args(&self, k: usize) -> Vec<String> {
        match self {
            Self::Single(redis) => cluster_args(redis, k),
            Self::Cluster(cluster) => {
                let mut args = vec!["--cluster-mode".into(), "cluster".into()];
                for url in cluster.urls() {
                    args.push("--cluster-redis".into());
                    args.push(url);
                }
                args.push("--node-id".into());
                args.push(node_id(k));
                args
            }
        }
    }

    /// Kills it (every shard; nothing is saved).
    pub fn stop(&mut self) {
        match self {
            Self::Single(redis) => redis.stop(),
            Self::Cluster(cluster) => cluster.stop(),
        }
    }

    /// Starts it again on the same addresses, empty (a cluster is formed anew).
    pub fn restart(&mut self) -> Result<(), RedisError> {
        match self {
            Self::Single(redis) => redis.restart(),
            Self::Cluster(cluster) => cluster.restart(),
        }
    }

    /// Keys stored (summed over the shards of a cluster).
    pub fn keys(&self) -> usize {
        match self {
            Self::Single(redis) => redis
                .cli(&["dbsize"])
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            Self::Cluster(cluster) => cluster.dbsize(),
        }
    }
}

/// Waits until every node of `nodes` reaches Redis (`gateway_cluster_up` 1) and sees
/// all of them (`gateway_cluster_nodes` = their number; heartbeats are 1 s apart).
pub fn wait_cluster(nodes: &[GatewayProcess], timeout: Duration) -> Result<(), DaemonError> {
    let deadline = Instant::now() + timeout;
    let want = nodes.len() as f64;
    for (k, node) in nodes.iter().enumerate() {
        loop {
            let text = node.scrape().unwrap_or_default();
            let up = metric_value(&text, "gateway_cluster_up", "");
            let seen = metric_value(&text, "gateway_cluster_nodes", "");
            if up == Some(1.0) && seen == Some(want) {
                break;
            }
            if Instant::now() > deadline {
                return Err(DaemonError::NotReady(format!(
                    "{}: gateway_cluster_up {up:?}, gateway_cluster_nodes {seen:?} (want {want}) \
                     after {timeout:?}; log:\n{}",
                    node_id(k),
                    node.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Sum of every sample of the metric `name` (all label sets) in Prometheus text.
pub fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A running cluster in the lab; the nodes, Redis and the lab are torn down on drop
/// (in that order).
#[derive(Debug)]
pub struct ClusterLab {
    /// The gateway nodes: node `k` on server `k` (metrics on its first address, port
    /// 9478).
    pub nodes: Vec<GatewayProcess>,
    /// The Redis they share, on the lab's Redis host.
    pub redis: LabRedis,
    /// The lab (dropped after every process in it).
    pub lab: Lab,
    secret_paths: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for path in &self.secret_paths {
            std::fs::remove_file(path).ok();
        }
    }
}

impl ClusterLab {
    /// Builds `builder`'s lab with `nodes` servers and the Redis host, starts Redis
    /// there and on each server a node as [`punch::start_gateway_on`] does (secret
    /// [`punch::SECRET`], discovery socket, relay, eBPF off) plus
    /// [`cluster_args`] and `gateway_args`, and waits until every node sees all.
    pub fn start(
        builder: LabBuilder,
        nodes: usize,
        gateway_args: &[&str],
    ) -> Result<Self, DaemonError> {
        Self::start_with(builder, nodes, Backend::Single, gateway_args)
    }

    /// [`Self::start`] with the nodes sharing `backend` (one Redis or a three-shard
    /// Redis Cluster on the Redis host).
    pub fn start_with(
        builder: LabBuilder,
        nodes: usize,
        backend: Backend,
        gateway_args: &[&str],
    ) -> Result<Self, DaemonError> {
        let lab = builder.servers(nodes).redis_host().build()?;
        let dir = tempfile::tempdir().map_err(|source| DaemonError::Io {
            what: "making a directory for Redis".into(),
            source,
        })?;
        let redis_host = lab
            .redis_host()
            .ok_or_else(|| LabError::Invalid("no Redis host".into()))?;
        let redis = LabRedis::start(backend, redis_host, dir.path())?;
        let mut processes = Vec::new();
        let mut secret_paths = Vec::new();
        for (k, server) in lab.servers().iter().enumerate() {
            let cluster = redis.args(k);
            let mut args: Vec<&str> = cluster.iter().map(String::as_str).collect();
            args.extend_from_slice(gateway_args);
            let (process, secret) = punch::start_gateway_on(server, &args)?;
            processes.push(process);
            secret_paths.push(secret);
        }
        wait_cluster(&processes, Duration::from_secs(10))?;
        Ok(Self {
            nodes: processes,
            redis,
            lab,
            secret_paths,
            _dir: dir,
        })
    }

    /// Starts `gateway peer` as `peer` (credentials under [`punch::SECRET`]) on `host`,
    /// registering with node `node` only, with that node's [`discover`] flags and
    /// `args`.
    pub fn start_peer(
        &self,
        host: &Host,
        node: usize,
        peer: &str,
        args: &[&str],
    ) -> Result<PeerProcess, DaemonError> {
        let credentials = punch::credentials(peer);
        let discover = discover(node);
        let mut all: Vec<&str> = discover.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        PeerProcess::start(
            host,
            service(node),
            &credentials.username,
            &credentials.password,
            &all,
        )
    }

    /// Kills node `k` (SIGKILL, as a crash: it says goodbye to nobody). Its metrics
    /// read empty from then on.
    pub fn kill_node(&mut self, k: usize) {
        if let Some(node) = self.nodes.get_mut(k) {
            node.kill();
        }
    }

    /// Node `k`'s /metrics (empty if it does not answer).
    pub fn scrape(&self, k: usize) -> String {
        self.nodes
            .get(k)
            .and_then(|n| n.scrape().ok())
            .unwrap_or_default()
    }

    /// The sample `name{labels}` on node `k`.
    pub fn metric(&self, k: usize, name: &str, labels: &str) -> Option<f64> {
        metric_value(&self.scrape(k), name, labels)
    }

    /// Every sample of `name` on each node, summed per node (node 0 first).
    pub fn per_node(&self, name: &str) -> Vec<f64> {
        (0..self.nodes.len())
            .map(|k| sum_of(&self.scrape(k), name))
            .collect()
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(k, n)| format!("--- {} log:\n{}", node_id(k), n.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
