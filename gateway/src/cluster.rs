//! The cluster driver: several gateway nodes as one service, sharing the rendezvous
//! through Redis (see `docs/cluster.md`).
//!
//! The rendezvous core decides everything (`proto::rendezvous::cluster`); this
//! module carries out its [`ClusterRequest`]s against Redis and feeds back what
//! Redis answers:
//!
//! - `Store(entry)`: `SET gw:peer:<id> <entry> EX <lifetime> GET`. When the previous
//!   value names another node, that node is told `Moved` (latest registration wins).
//! - `Locate { token, peer }`: `GET gw:peer:<id>`, answered with
//!   `RendezvousServer::handle_located`.
//! - `Send { node, message }`: `XADD gw:inbox:<node> MAXLEN ~ 100000 * m <message>`.
//!   Every node reads its own inbox stream with `XREAD BLOCK` on a connection of its
//!   own and hands each message to `RendezvousServer::handle_cluster_message`.
//!
//! A heartbeat (`ZADD gw:nodes <now ms> <node>` once a second) decides whether the
//! cluster is up (`gateway_cluster_up`), counts the live nodes
//! (`gateway_cluster_nodes`), measures the round trip (`set_cluster_transit`), and
//! notices a Redis that lost its data (our node was missing from `gw:nodes`): the
//! node then writes its whole registry again. Every key is a plain key, so the same
//! commands work on one Redis and on a Redis Cluster (each key hashes to its slot;
//! no command spans two keys).
//!
//! Nothing here holds the core's lock across an await or a system call: a lock is
//! taken to feed one input and drain the outputs, then released before the replies
//! are sent. The request queue is bounded; a full queue drops (counted).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, RedisResult, TlsCertificates, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use tokio::sync::mpsc;

use crate::{
    config::ClusterConfig,
    metrics::Metrics,
    proto::{
        MAIN_SOCKET, Transmit,
        rendezvous::{
            RendezvousEvent, RendezvousServer,
            cluster::{ClusterMessage, ClusterRequest, PeerEntry, moved_notice},
        },
    },
    rendezvous::{SharedRendezvous, lock},
    udp::{SendScratch, ServiceSocket, send_transmits},
};

/// Requests queued between the service loops and the cluster task at most; more are
/// dropped (a dropped Locate times out in the core with 503, a dropped Store is
/// written again at the peer's next registration).
pub const REQUEST_QUEUE: usize = 65_536;
/// Requests the writer sends to Redis concurrently (pipelined on its connection).
const WRITE_BATCH: usize = 512;
/// Prefix of the registry's keys (one per peer).
const PEER_KEY_PREFIX: &str = "gw:peer:";
/// Prefix of the nodes' inbox streams.
const INBOX_PREFIX: &str = "gw:inbox:";
/// The sorted set of nodes by last heartbeat (milliseconds since the epoch).
const NODES_KEY: &str = "gw:nodes";
/// Entries an inbox keeps at most (approximately: `MAXLEN ~`).
const INBOX_MAXLEN: usize = 100_000;
/// How often a node beats.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose last beat is older than this is not counted as live.
const NODE_ALIVE: Duration = Duration::from_secs(5);
/// How long one `XREAD` waits for messages.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Messages one `XREAD` takes at most.
const READ_COUNT: usize = 1024;
/// Connect and answer deadlines of every Redis command.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longer than [`READ_BLOCK`], so a blocking read is not cut short.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why the cluster driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The password file could not be read.
    #[error("cannot read cluster.password_file {path}: {source}")]
    PasswordFile {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A URL is not one Redis understands.
    #[error("invalid cluster.redis URL {url}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        source: redis::RedisError,
    },
    /// The CA file for `rediss://` could not be read.
    #[error("cannot read cluster.tls_ca_file {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No node id was given and the host name is unusable.
    #[error("cluster.node_id is not set and the host name cannot be used: {0}")]
    NodeId(String),
    /// A metric could not be registered (a programming error).
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The cluster's own metrics (node-local: every node exports its view).
#[derive(Clone)]
pub struct ClusterMetrics {
    /// 1 while Redis answers the heartbeat, else 0.
    pub up: IntGauge,
    /// Nodes whose heartbeat is recent.
    pub nodes: IntGauge,
    /// Round trip of Redis commands.
    pub redis_round_trip: Histogram,
    /// Redis commands that failed, by command.
    pub redis_errors: IntCounterVec,
    /// Requests dropped because the queue to Redis was full.
    pub dropped: IntCounter,
    /// Node-to-node messages, by direction (sent, received) .
    pub messages: IntCounterVec,
    /// Registrations moved to another node (this node forgot them).
    pub moved: IntCounter,
}

impl ClusterMetrics {
    /// Creates and registers the cluster metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            "gateway_cluster_up",
            "1 while this node reaches the cluster's Redis (the heartbeat succeeds), else 0",
        )?;
        let nodes = IntGauge::new(
            "gateway_cluster_nodes",
            "Gateway nodes with a heartbeat in the last 5 s, as this node sees them",
        )?;
        let redis_round_trip = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_cluster_redis_round_trip_seconds",
                "Round trip of this node's Redis commands (one observation per batch)",
            )
            .buckets(vec![
                0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "gateway_cluster_redis_errors_total",
                "Redis commands that failed, by command",
            ),
            &["command"],
        )?;
        let dropped = IntCounter::new(
            "gateway_cluster_requests_dropped_total",
            "Cluster requests dropped because the queue to Redis was full",
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "gateway_cluster_messages_total",
                "Node-to-node messages through Redis, by direction",
            ),
            &["direction"],
        )?;
        let moved = IntCounter::new(
            "gateway_cluster_moved_peers_total",
            "Peers that registered with another node later and were forgotten here",
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(redis_round_trip.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(moved.clone()))?;
        for command in ["set", "get", "xadd", "xread", "heartbeat"] {
            redis_errors.with_label_values(&[command]);
        }
        for direction in ["sent", "received"] {
            messages.with_label_values(&[direction]);
        }
        Ok(Self {
            up,
            nodes,
            redis_round_trip,
            redis_errors,
            dropped,
            messages,
            moved,
        })
    }
}

/// Where the service loops hand the core's cluster requests (cheap to clone).
#[derive(Clone)]
pub struct ClusterLink {
    requests: mpsc::Sender<ClusterRequest>,
    metrics: ClusterMetrics,
}

impl ClusterLink {
    /// Queues one request for Redis without waiting; a full queue drops it (counted).
    pub fn submit(&self, request: ClusterRequest) {
        if self.requests.try_send(request).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Whether Redis is reachable now (`gateway_cluster_up`; `/readyz`).
    pub fn is_up(&self) -> bool {
        self.metrics.up.get() == 1
    }
}

/// What the cluster tasks share.
struct ClusterShared {
    core: SharedRendezvous,
    service: ServiceSocket,
    metrics: Metrics,
    cluster_metrics: ClusterMetrics,
    node_id: String,
    connector: Connector,
    /// Registration lifetime: the TTL of every registry key.
    lifetime: Duration,
    link: ClusterLink,
    up: AtomicBool,
}

/// One node's connection settings.
struct Connector {
    urls: Vec<String>,
    redis_cluster: bool,
    password: Option<String>,
    /// The CA to trust for `rediss://` instead of the system's roots (PEM).
    root_cert: Option<Vec<u8>>,
}

/// A connection to one Redis or to a Redis Cluster (both multiplexed: concurrent
/// commands are pipelined on the wire).
#[derive(Clone)]
enum Redis {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Redis {
    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Redis::Single(c) => cmd.query_async(c).await,
            Redis::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

impl Connector {
    /// Connects (one attempt, bounded by [`CONNECT_TIMEOUT`]).
    async fn connect(&self) -> RedisResult<Redis> {
        if self.redis_cluster {
            let mut builder = ClusterClient::builder(self.urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(1);
            if let Some(password) = &self.password {
                builder = builder.password(password.clone());
            }
            if let Some(root) = &self.root_cert {
                builder = builder.certs(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root.clone()),
                });
            }
            let client = builder.build()?;
            return Ok(Redis::Cluster(client.get_async_connection().await?));
        }
        let url = self.urls.first().map(String::as_str).unwrap_or_default();
        let mut info = url.into_connection_info()?;
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &self.root_cert {
            Some(root) => redis::Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root.clone()),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let manager = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })??;
        Ok(Redis::Single(manager))
    }

    /// Connects, retrying with exponential backoff until it works.
    async fn connect_with_backoff(&self, what: &str) -> Redis {
        let mut delay = BACKOFF_MIN;
        loop {
            match self.connect().await {
                Ok(redis) => return redis,
                Err(e) => {
                    tracing::debug!(error = %e, task = what, "cannot connect to Redis; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// This node's id: the configured one, else the host name.
pub fn node_id(config: &ClusterConfig) -> Result<String, ClusterError> {
    if let Some(id) = &config.node_id {
        return Ok(id.clone());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| ClusterError::NodeId(e.to_string()))?;
    let host = host.trim();
    let usable = !host.is_empty()
        && host.len() <= 64
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if usable {
        Ok(host.to_owned())
    } else {
        Err(ClusterError::NodeId(format!("{host:?}")))
    }
}

/// Starts the cluster tasks (writer, inbox reader, heartbeat) for `core`, which must
/// have had `enable_cluster` called with `node_id`. Replies the cluster causes
/// (an introduction to a local peer, an answer to a Connect) leave from `service`.
/// Redis need not be up: the tasks connect in the background and the node serves
/// its own peers meanwhile. Must be called inside a tokio runtime.
pub fn start(
    config: &ClusterConfig,
    node_id: String,
    lifetime: Duration,
    core: SharedRendezvous,
    service: ServiceSocket,
    metrics: Metrics,
    health: Option<&crate::health::Health>,
) -> Result<ClusterLink, ClusterError> {
    let password = match &config.password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| ClusterError::PasswordFile {
                    path: path.display().to_string(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let root_cert = match &config.tls_ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|source| ClusterError::CaFile {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    for url in &config.redis {
        url.as_str()
            .into_connection_info()
            .map_err(|source| ClusterError::Url {
                url: url.clone(),
                source,
            })?;
    }
    let cluster_metrics = ClusterMetrics::new(&metrics.registry)?;
    let (requests, queue) = mpsc::channel(REQUEST_QUEUE);
    let link = ClusterLink {
        requests,
        metrics: cluster_metrics.clone(),
    };
    let shared = Arc::new(ClusterShared {
        core,
        service,
        metrics,
        cluster_metrics,
        node_id,
        connector: Connector {
            urls: config.redis.clone(),
            redis_cluster: config.is_redis_cluster(),
            password,
            root_cert,
        },
        lifetime,
        link: link.clone(),
        up: AtomicBool::new(false),
    });
    lock(&shared.core).set_cluster_up(false);
    crate::health::spawn(health, "cluster-writer", writer(shared.clone(), queue));
    crate::health::spawn(health, "cluster-reader", reader(shared.clone()));
    crate::health::spawn(health, "cluster-heartbeat", heartbeat(shared));
    Ok(link)
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl ClusterShared {
    /// Feeds one input to the core under its lock, drains what it produced, then
    /// (unlocked) queues its cluster requests and sends its datagrams.
    async fn feed(
        &self,
        scratch: &mut SendScratch,
        input: impl FnOnce(&mut RendezvousServer, Instant, u64),
    ) {
        let mut transmits: Vec<Transmit> = Vec::new();
        let mut requests = Vec::new();
        {
            let mut core = lock(&self.core);
            input(&mut core, Instant::now(), unix_now().as_secs());
            while let Some(transmit) = core.poll_transmit() {
                // Cluster inputs answer peers from the service socket only.
                if transmit.socket == MAIN_SOCKET {
                    transmits.push(transmit);
                }
            }
            while let Some(event) = core.poll_event() {
                match event {
                    RendezvousEvent::Cluster(request) => requests.push(request),
                    event => self.metrics.record(&event),
                }
            }
            self.metrics.set_registered_peers(&core);
        }
        crate::rendezvous::deadline_may_have_moved();
        for request in requests {
            self.link.submit(request);
        }
        if !transmits.is_empty() {
            send_transmits(&self.service, &transmits, &self.metrics, scratch).await;
        }
    }

    fn error(&self, command: &str, error: &redis::RedisError) {
        self.cluster_metrics
            .redis_errors
            .with_label_values(&[command])
            .inc();
        tracing::debug!(%error, command, "Redis command failed");
    }

    /// Records the cluster's state; logs and tells the core only changes (the core
    /// then answers the Connects waiting for Redis at once).
    async fn set_up(&self, up: bool, scratch: &mut SendScratch) {
        self.cluster_metrics.up.set(i64::from(up));
        if self.up.swap(up, Ordering::Relaxed) == up {
            return;
        }
        if up {
            tracing::info!(node = %self.node_id, "cluster: Redis reachable; cross-node introductions on");
        } else {
            tracing::warn!(node = %self.node_id, "cluster: Redis unreachable; serving this node's peers only (cross-node Connects get 503 Cluster Unavailable)");
        }
        self.feed(scratch, |core, _, _| core.set_cluster_up(up))
            .await;
    }
}

/// The registry key of `peer_id` (`gw:peer:<id>`).
pub fn peer_key(peer_id: &str) -> String {
    format!("{PEER_KEY_PREFIX}{peer_id}")
}

fn inbox_key(node: &str) -> String {
    format!("{INBOX_PREFIX}{node}")
}

/// The Redis command that carries one request.
fn command_for(request: &ClusterRequest, lifetime: Duration) -> Cmd {
    match request {
        ClusterRequest::Store(entry) => {
            let mut cmd = redis::cmd("SET");
            cmd.arg(peer_key(&entry.peer_id))
                .arg(entry.encode())
                .arg("EX")
                .arg(lifetime.as_secs().max(1))
                .arg("GET");
            cmd
        }
        ClusterRequest::Locate { peer_id, .. } => {
            let mut cmd = redis::cmd("GET");
            cmd.arg(peer_key(peer_id));
            cmd
        }
        ClusterRequest::Send { node, message } => xadd(node, message),
    }
}

fn xadd(node: &str, message: &ClusterMessage) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(inbox_key(node))
        .arg("MAXLEN")
        .arg("~")
        .arg(INBOX_MAXLEN)
        .arg("*")
        .arg("m")
        .arg(message.encode());
    cmd
}

fn command_name(request: &ClusterRequest) -> &'static str {
    match request {
        ClusterRequest::Store(_) => "set",
        ClusterRequest::Locate { .. } => "get",
        ClusterRequest::Send { .. } => "xadd",
    }
}

/// The writer's connection: connected lazily, at most one attempt per backoff step.
///
/// A Redis Cluster connection whose commands fail is dropped rather than kept:
/// while no shard answers, redis-rs's cluster client retries its slot refresh
/// without pause as long as the connection lives (a core spun per node for the
/// whole outage). Dropping every handle stops that task; the next attempt comes
/// after the backoff. One Redis (the connection manager) reconnects by itself with
/// its own backoff and is kept.
struct WriterConnection {
    redis: Option<Redis>,
    next_attempt: Instant,
    delay: Duration,
}

impl WriterConnection {
    fn new() -> Self {
        Self {
            redis: None,
            next_attempt: Instant::now(),
            delay: BACKOFF_MIN,
        }
    }

    /// The connection, connecting first when none is open and the backoff allows,
    /// or at once when the heartbeat just reached Redis (`redis_up`): the registry
    /// rewrite it asks for then must not wait out a backoff of up to 5 s.
    async fn get(&mut self, connector: &Connector, redis_up: bool) -> Option<Redis> {
        if self.redis.is_none() && (redis_up || Instant::now() >= self.next_attempt) {
            match connector.connect().await {
                Ok(redis) => {
                    self.redis = Some(redis);
                    self.delay = BACKOFF_MIN;
                }
                Err(e) => {
                    tracing::debug!(error = %e, task = "writer", "cannot connect to Redis; retrying");
                    self.back_off();
                }
            }
        }
        self.redis.clone()
    }

    /// Commands failed: a cluster connection is dropped (see the type's doc).
    fn failed(&mut self) {
        if matches!(self.redis, Some(Redis::Cluster(_))) {
            self.redis = None;
            self.back_off();
        }
    }

    fn back_off(&mut self) {
        self.next_attempt = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }
}

/// Carries out the core's requests, up to [`WRITE_BATCH`] at a time concurrently.
async fn writer(shared: Arc<ClusterShared>, mut queue: mpsc::Receiver<ClusterRequest>) {
    let mut connection = WriterConnection::new();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut scratch = SendScratch::default();
    loop {
        if queue.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            return;
        }
        let redis_up = shared.up.load(Ordering::Relaxed);
        let Some(mut redis) = connection.get(&shared.connector, redis_up).await else {
            // No connection (Redis is down, the backoff runs): the batch fails at
            // once. Locates are answered 503 by the core's timer; Stores are written
            // again by the heartbeat when Redis answers.
            for request in batch.drain(..) {
                shared.error(
                    command_name(&request),
                    &redis::RedisError::from((redis::ErrorKind::Io, "not connected to Redis")),
                );
            }
            continue;
        };
        let started = Instant::now();
        let commands: Vec<Cmd> = batch
            .iter()
            .map(|r| command_for(r, shared.lifetime))
            .collect();
        let answers = futures_util::future::join_all(commands.iter().map(|cmd| {
            let mut redis = redis.clone();
            async move { redis.query::<Value>(cmd).await }
        }))
        .await;
        shared
            .cluster_metrics
            .redis_round_trip
            .observe(started.elapsed().as_secs_f64());
        // Every Locate answer of the batch goes to the core under one lock, and
        // what it sends leaves in one batched send.
        let mut located = Vec::new();
        let mut failed_stores = Vec::new();
        let mut any_failed = false;
        for (request, answer) in batch.drain(..).zip(answers) {
            let answer = match answer {
                Ok(answer) => Some(answer),
                Err(e) => {
                    any_failed = true;
                    shared.error(command_name(&request), &e);
                    if let ClusterRequest::Store(_) = &request {
                        failed_stores.push(command_for(&request, shared.lifetime));
                    }
                    None
                }
            };
            match request {
                ClusterRequest::Store(entry) => {
                    if let Some(previous) = answer.as_ref().and_then(entry_of) {
                        tell_moved(&shared, &mut redis, &entry, &previous).await;
                    }
                }
                ClusterRequest::Locate { token, .. } => {
                    // A failed GET is answered as "not found" only when Redis
                    // answered; otherwise the core's timer answers 503.
                    if let Some(answer) = answer {
                        located.push((token, entry_of(&answer)));
                    }
                }
                ClusterRequest::Send { .. } => {
                    if answer.is_some() {
                        shared
                            .cluster_metrics
                            .messages
                            .with_label_values(&["sent"])
                            .inc();
                    }
                }
            }
        }
        if !located.is_empty() {
            shared
                .feed(&mut scratch, |core, now, unix| {
                    for (token, entry) in located {
                        core.handle_located(now, unix, token, entry);
                    }
                })
                .await;
        }
        // Both connection kinds reconnect by themselves (the manager for one Redis,
        // the cluster client per node); the heartbeat reports the state. A connection
        // that broke while idle (Redis restarted) fails its first command and only
        // then reconnects: that is typically the registry rewrite the heartbeat asks
        // for when Redis comes back, and a lost Store leaves its peer unreachable
        // across nodes until the peer's next Register (up to 15 s). Send each failed
        // Store once more (idempotent: the entry is this node's latest).
        let mut retry_failed = false;
        for cmd in failed_stores {
            if let Err(e) = redis.query::<Value>(&cmd).await {
                retry_failed = true;
                shared.error("set", &e);
            }
        }
        // A cluster connection that failed its retries too is dropped (its client
        // would spin until a shard answers); one whose retries worked recovered.
        drop(redis);
        if any_failed && (retry_failed || !shared.up.load(Ordering::Relaxed)) {
            connection.failed();
        }
    }
}

/// The entry a GET or SET..GET answered, if any and if it decodes.
fn entry_of(value: &Value) -> Option<PeerEntry> {
    match value {
        Value::BulkString(bytes) => PeerEntry::decode(bytes).ok(),
        _ => None,
    }
}

/// After `entry` replaced `previous` in the registry: when `previous` was another
/// node's, that node is told to forget the peer (latest registration wins).
async fn tell_moved(
    shared: &ClusterShared,
    redis: &mut Redis,
    entry: &PeerEntry,
    previous: &PeerEntry,
) {
    let Some(ClusterRequest::Send { node, message }) = moved_notice(entry, Some(previous)) else {
        return;
    };
    if let Err(e) = redis.query::<Value>(&xadd(&node, &message)).await {
        shared.error("xadd", &e);
    }
}

/// Reads this node's inbox and hands each message to the core.
async fn reader(shared: Arc<ClusterShared>) {
    let key = inbox_key(&shared.node_id);
    let mut scratch = SendScratch::default();
    // Only messages sent from this node's start on: older ones were for a previous
    // life of this node and name introductions it no longer knows. The start is
    // taken from Redis's own clock at the first connection and kept across
    // reconnections: reading from "$" after a reconnection would miss what other
    // nodes sent while this one was reconnecting (a cross-node introduction right
    // after a Redis outage was lost that way).
    let mut last_id = String::from("$");
    loop {
        let mut redis = shared.connector.connect_with_backoff("reader").await;
        if last_id == "$"
            && let Ok(time) = redis.query::<(u64, u64)>(&redis::cmd("TIME")).await
        {
            last_id = start_id(time);
        }
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&key)
                .arg(&last_id);
            let answer: Value = match redis.query(&cmd).await {
                Ok(answer) => answer,
                Err(e) => {
                    shared.error("xread", &e);
                    tokio::time::sleep(BACKOFF_MIN).await;
                    break;
                }
            };
            // One read's messages go to the core under one lock, and what they
            // make it send leaves in one batched send.
            let mut messages = Vec::new();
            for (id, payload) in stream_entries(&answer) {
                last_id = id;
                shared
                    .cluster_metrics
                    .messages
                    .with_label_values(&["received"])
                    .inc();
                let Ok(message) = ClusterMessage::decode(&payload) else {
                    tracing::debug!("cluster: undecodable inbox message dropped");
                    continue;
                };
                if let ClusterMessage::Moved { .. } = message {
                    shared.cluster_metrics.moved.inc();
                }
                messages.push(message);
            }
            if !messages.is_empty() {
                shared
                    .feed(&mut scratch, |core, now, unix| {
                        for message in messages {
                            core.handle_cluster_message(now, unix, message);
                        }
                    })
                    .await;
            }
        }
    }
}

/// The stream id of the instant Redis's `TIME` answered (seconds, microseconds): an
/// `XREAD` from it yields every entry added from then on.
fn start_id((secs, micros): (u64, u64)) -> String {
    format!(
        "{}-0",
        secs.saturating_mul(1000).saturating_add(micros / 1000)
    )
}

/// The (id, payload of field `m`) pairs of an `XREAD` answer for one stream; anything
/// else in it is skipped.
fn stream_entries(answer: &Value) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // RESP2: [[key, [[id, [field, value, ...]], ...]]]; RESP3 may give a map.
    let streams: Vec<&Value> = match answer {
        Value::Array(streams) => streams.iter().collect(),
        Value::Map(pairs) => pairs.iter().map(|(_, entries)| entries).collect(),
        _ => return out,
    };
    for stream in streams {
        let entries = match stream {
            Value::Array(pair) if pair.len() == 2 => &pair[1],
            other => other,
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) =
                (parts.first(), parts.get(1))
            else {
                continue;
            };
            let Ok(id) = String::from_utf8(id.clone()) else {
                continue;
            };
            let payload = fields.chunks(2).find_map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] if k == b"m" => Some(v.clone()),
                _ => None,
            });
            if let Some(payload) = payload {
                out.push((id, payload));
            }
        }
    }
    out
}

/// Beats once a second: decides up/down, counts nodes, measures the transit, and
/// writes the registry again when Redis came back or lost its data.
async fn heartbeat(shared: Arc<ClusterShared>) {
    let mut redis: Option<Redis> = None;
    let mut scratch = SendScratch::default();
    let mut ticker = tokio::time::interval(HEARTBEAT);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let connection = match redis.as_mut() {
            Some(redis) => redis,
            None => match shared.connector.connect().await {
                Ok(connected) => redis.insert(connected),
                Err(e) => {
                    shared.error("heartbeat", &e);
                    shared.set_up(false, &mut scratch).await;
                    continue;
                }
            },
        };
        let now_ms = unix_now().as_millis() as u64;
        let started = Instant::now();
        let mut beat = redis::cmd("ZADD");
        beat.arg(NODES_KEY).arg(now_ms).arg(&shared.node_id);
        let added: RedisResult<i64> = connection.query(&beat).await;
        let round_trip = started.elapsed();
        let added = match added {
            Ok(added) => added,
            Err(e) => {
                shared.error("heartbeat", &e);
                shared.set_up(false, &mut scratch).await;
                redis = None;
                continue;
            }
        };
        shared
            .cluster_metrics
            .redis_round_trip
            .observe(round_trip.as_secs_f64());
        let was_up = shared.up.load(Ordering::Relaxed);
        // Node to Redis to node: a message's one-way trip is about one round trip.
        lock(&shared.core).set_cluster_transit(round_trip.max(Duration::from_micros(100)));
        shared.set_up(true, &mut scratch).await;
        let alive_since = now_ms.saturating_sub(NODE_ALIVE.as_millis() as u64);
        let mut count = redis::cmd("ZCOUNT");
        count.arg(NODES_KEY).arg(alive_since).arg("+inf");
        match connection.query::<i64>(&count).await {
            Ok(nodes) => shared.cluster_metrics.nodes.set(nodes),
            Err(e) => shared.error("heartbeat", &e),
        }
        let mut prune = redis::cmd("ZREMRANGEBYSCORE");
        prune
            .arg(NODES_KEY)
            .arg("-inf")
            .arg(now_ms.saturating_sub(60_000));
        if let Err(e) = connection.query::<i64>(&prune).await {
            shared.error("heartbeat", &e);
        }
        // Our node was missing (a Redis that restarted empty) or Redis was down:
        // write every local registration again, so the registry is whole now rather
        // than after each peer's next registration.
        if added == 1 || !was_up {
            let entries = lock(&shared.core).local_entries(unix_now().as_secs());
            if !entries.is_empty() {
                tracing::info!(
                    peers = entries.len(),
                    "cluster: writing this node's registry to Redis"
                );
            }
            for entry in entries {
                shared.link.submit(ClusterRequest::Store(entry));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_is_read_from_redis_time_at_start() {
        assert_eq!(start_id((1_765_000_000, 123_456)), "1765000000123-0");
        assert_eq!(start_id((u64::MAX, 0)), format!("{}-0", u64::MAX));
    }

    #[test]
    fn xread_answers_yield_ids_and_payloads_in_order() {
        let entry = |id: &str, payload: &[u8]| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"m".to_vec()),
                    Value::BulkString(payload.to_vec()),
                ]),
            ])
        };
        let answer = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"gw:inbox:a".to_vec()),
            Value::Array(vec![entry("1-0", b"one"), entry("2-0", b"two")]),
        ])]);
        assert_eq!(
            stream_entries(&answer),
            vec![
                ("1-0".to_owned(), b"one".to_vec()),
                ("2-0".to_owned(), b"two".to_vec())
            ]
        );
        // A timeout (nil) and garbage give nothing.
        assert!(stream_entries(&Value::Nil).is_empty());
        assert!(stream_entries(&Value::Array(vec![Value::Int(3)])).is_empty());
    }

    #[test]
    fn keys_name_the_peer_and_the_node() {
        assert_eq!(peer_key("bob"), "gw:peer:bob");
        assert_eq!(inbox_key("node-1"), "gw:inbox:node-1");
    }
}
