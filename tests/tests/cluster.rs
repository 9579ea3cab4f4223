//! Several gateway nodes as one service, sharing the rendezvous through a real Redis
//! (Debian's redis-server, started here): peers registered on different nodes are
//! introduced and punch directly, outcomes are counted once, a dead node's peer
//! fails over and is reachable again, and a Redis that goes away and comes back
//! empty costs nothing but cross-node introductions while it is gone. Every case
//! runs against one Redis and against a three-shard Redis Cluster.
//!
//! Loopback only: the nodes, peers and Redis all run on 127.0.0.1, so these tests
//! need no root. The NAT side of punching is covered by the lab tests.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::credentials::SharedSecret;
use gateway_tests::{
    daemon::{PeerProcess, gateway_binary, metric_value, stun_binding},
    redis::{RedisCluster, RedisServer, TlsFiles},
};

const SECRET: &str = "cluster-test-secret";

/// Where the nodes find Redis.
enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
    /// One Redis that requires a password, given to the nodes in a file.
    Password(RedisServer, std::path::PathBuf),
    /// One Redis over TLS only (`rediss://`), its CA given to the nodes.
    Tls(RedisServer, std::path::PathBuf),
}

impl Backend {
    fn single(dir: &Path) -> Self {
        Backend::Single(RedisServer::start(dir).expect("redis-server"))
    }

    fn cluster(dir: &Path) -> Self {
        Backend::Cluster(RedisCluster::start(dir, 3).expect("redis cluster"))
    }

    fn with_password(dir: &Path) -> Self {
        let file = dir.join("redis.pass");
        std::fs::write(&file, "s3cret-redis-pass\n").expect("password file");
        let redis = RedisServer::start_with_password(dir, "s3cret-redis-pass").expect("redis");
        Backend::Password(redis, file)
    }

    fn tls(dir: &Path) -> Self {
        let files = TlsFiles::generate(dir).expect("certificates");
        let ca = files.ca.clone();
        Backend::Tls(
            RedisServer::start_tls(dir, files).expect("redis over TLS"),
            ca,
        )
    }

    fn args(&self) -> Vec<String> {
        match self {
            Backend::Single(redis) => vec!["--cluster-redis".into(), redis.url()],
            Backend::Password(redis, file) => {
                // The flag has no password option: the file comes through a config.
                let config = file.with_extension("toml");
                std::fs::write(
                    &config,
                    format!(
                        "[cluster]\nredis = \"{}\"\npassword_file = \"{}\"\n",
                        redis.url(),
                        file.display()
                    ),
                )
                .expect("config");
                vec!["--config".into(), config.display().to_string()]
            }
            Backend::Tls(redis, ca) => {
                let config = ca.with_extension("toml");
                std::fs::write(
                    &config,
                    format!(
                        "[cluster]\nredis = \"{}\"\ntls_ca_file = \"{}\"\n",
                        redis.url(),
                        ca.display()
                    ),
                )
                .expect("config");
                vec!["--config".into(), config.display().to_string()]
            }
            Backend::Cluster(cluster) => {
                let mut args = vec!["--cluster-mode".into(), "cluster".into()];
                for url in cluster.urls() {
                    args.push("--cluster-redis".into());
                    args.push(url);
                }
                args
            }
        }
    }

    fn stop(&mut self) {
        match self {
            Backend::Single(redis) | Backend::Password(redis, _) | Backend::Tls(redis, _) => {
                redis.stop()
            }
            Backend::Cluster(cluster) => cluster.stop(),
        }
    }

    fn restart(&mut self) {
        match self {
            Backend::Single(redis) | Backend::Password(redis, _) | Backend::Tls(redis, _) => {
                redis.restart().expect("restart redis")
            }
            Backend::Cluster(cluster) => cluster.restart().expect("restart cluster"),
        }
    }

    fn keys(&self) -> usize {
        match self {
            Backend::Single(redis) | Backend::Password(redis, _) | Backend::Tls(redis, _) => redis
                .cli(&["dbsize"])
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            Backend::Cluster(cluster) => cluster.dbsize(),
        }
    }
}

/// One `gateway serve` node on loopback, with its metrics endpoint.
struct Node {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

impl Node {
    fn start(dir: &Path, name: &str, backend: &Backend) -> Self {
        let addr = free_udp();
        let metrics = free_tcp();
        let secret = dir.join("secret");
        gateway_tests::daemon::write_secret(&secret, format!("{SECRET}\n")).expect("secret");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(gateway_binary())
            .args(["serve", "--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--no-ebpf", "--no-relay-tcp", "--node-id", name])
            .arg("--secret-file")
            .arg(&secret)
            .args(backend.args())
            .env("GATEWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn gateway serve");
        let node = Self {
            child,
            addr,
            metrics,
            log,
        };
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let deadline = Instant::now() + Duration::from_secs(10);
        while stun_binding(&socket, addr, Duration::from_millis(100)).is_none() {
            assert!(Instant::now() < deadline, "{name} never answered");
        }
        node
    }

    fn scrape(&self) -> String {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2))
        else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics
        );
        let _ = stream.write_all(request.as_bytes());
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_value(&self.scrape(), name, labels).unwrap_or(-1.0)
    }

    /// Waits until `name{labels}` reaches `value`.
    fn wait_metric(&self, name: &str, labels: &str, value: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.metric(name, labels) == value {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Node {
    fn cpu_time(&self) -> Duration {
        gateway_tests::daemon::cpu_time_of(self.child.id()).expect("the node's /proc stat")
    }
}

/// A node that cannot reach Redis retries with backoff: over the outage it used
/// under a quarter of a core (a client that retried without pause spun one whole).
fn assert_waits_without_spinning(node: &Node, cpu_before: Duration, since: Instant) {
    let share = (node.cpu_time() - cpu_before).as_secs_f64() / since.elapsed().as_secs_f64();
    eprintln!(
        "the node used {:.1}% of a core while Redis was down",
        share * 100.0
    );
    assert!(
        share < 0.25,
        "the node spun while Redis was down: {:.0}% of a core",
        share * 100.0
    );
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn credentials(peer: &str) -> (String, String) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let issued = SharedSecret::new(SECRET.as_bytes())
        .issue(peer, expiry)
        .expect("issue");
    (issued.username, issued.password)
}

/// Starts `gateway peer` as `name` on loopback with `servers` and extra `args`.
fn peer(name: &str, servers: &[&Node], args: &[&str]) -> PeerProcess {
    let (username, password) = credentials(name);
    let mut all: Vec<String> = Vec::new();
    for server in servers {
        all.push("--server".into());
        all.push(server.addr.to_string());
    }
    all.extend(["--bind".into(), "127.0.0.1:0".into()]);
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut process = PeerProcess::start_here(&username, &password, &refs).expect("peer");
    assert!(
        process
            .wait_for("registered", Duration::from_secs(10))
            .is_some(),
        "{name} never registered: {:?}",
        process.seen()
    );
    process
}

fn wait_up(nodes: &[&Node], count: usize) {
    for node in nodes {
        assert!(
            node.wait_metric("gateway_cluster_up", "", 1.0, Duration::from_secs(10)),
            "cluster not up; log:\n{}",
            node.log_text()
        );
        assert!(
            node.wait_metric(
                "gateway_cluster_nodes",
                "",
                count as f64,
                Duration::from_secs(10)
            ),
            "expected {count} nodes; log:\n{}",
            node.log_text()
        );
    }
}

/// Total of a counter over every label set on `nodes`.
fn total(nodes: &[&Node], name: &str) -> f64 {
    nodes
        .iter()
        .map(|n| {
            n.scrape()
                .lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

/// Peers on two nodes punch directly and carry a datagram through the forwarded
/// port; the attempt is counted once, on the initiator's node.
fn cross_node_punch(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let a = Node::start(dir.path(), "node-a", &backend);
    let b = Node::start(dir.path(), "node-b", &backend);
    wait_up(&[&a, &b], 2);

    let application = UdpSocket::bind("127.0.0.1:0").expect("app");
    application
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let app_addr = application.local_addr().expect("addr").to_string();
    let _bob = peer("bob", &[&b], &["--forward-to", &app_addr]);
    let listen = free_udp().to_string();
    let mut alice = peer(
        "alice",
        &[&a],
        &["--connect", "bob", "--forward-listen", &listen],
    );
    let up = alice.wait_for("path-up peer bob direct", Duration::from_secs(15));
    assert!(
        up.is_some(),
        "no direct path: {:?}\nnode a:\n{}\nnode b:\n{}",
        alice.seen(),
        a.log_text(),
        b.log_text()
    );
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    let mut got = [0u8; 64];
    let mut received = None;
    for _ in 0..20 {
        sender
            .send_to(b"across nodes", &listen)
            .expect("send to the forwarded port");
        application
            .set_read_timeout(Some(Duration::from_millis(250)))
            .expect("timeout");
        if let Ok(n) = application.recv(&mut got) {
            received = Some(got[..n].to_vec());
            break;
        }
    }
    assert_eq!(received.as_deref(), Some(&b"across nodes"[..]));
    assert_eq!(
        a.metric(
            "gateway_cluster_introductions_total",
            "outcome=\"introduced\""
        ),
        1.0
    );
    assert_eq!(
        b.metric(
            "gateway_cluster_introductions_total",
            "outcome=\"introduced\""
        ),
        0.0
    );
    // The outcome is counted once, on the initiator's node, whoever reported first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while total(&[&a, &b], "gateway_punch_outcomes_total") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(total(&[&a, &b], "gateway_punch_outcomes_total"), 1.0);
    assert_eq!(total(&[&b], "gateway_punch_outcomes_total"), 0.0);
    assert!(backend.keys() >= 2, "both registrations are in Redis");
}

#[test]
fn peers_on_two_nodes_punch_directly_through_one_redis() {
    let dir = tempfile::tempdir().expect("dir");
    cross_node_punch(Backend::single(dir.path()));
}

#[test]
fn nodes_authenticate_to_redis_with_the_password_file() {
    let dir = tempfile::tempdir().expect("dir");
    cross_node_punch(Backend::with_password(dir.path()));
}

#[test]
fn nodes_reach_redis_over_tls_with_the_configured_ca() {
    let dir = tempfile::tempdir().expect("dir");
    cross_node_punch(Backend::tls(dir.path()));
}

#[test]
fn peers_on_two_nodes_punch_directly_through_a_redis_cluster() {
    let dir = tempfile::tempdir().expect("dir");
    cross_node_punch(Backend::cluster(dir.path()));
}

/// Redis goes away: local introductions still work, a cross-node Connect gets a
/// clear refusal the agent prints, `gateway_cluster_up` is 0; Redis comes back
/// empty: the nodes write their registries again and cross-node introductions work
/// within one registration interval.
fn redis_outage(mut backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let a = Node::start(dir.path(), "node-a", &backend);
    let b = Node::start(dir.path(), "node-b", &backend);
    wait_up(&[&a, &b], 2);
    let _bob = peer("bob", &[&b], &[]);
    let _carol = peer("carol", &[&a], &[]);

    let (cpu_before, outage_start) = (a.cpu_time(), Instant::now());
    backend.stop();
    assert!(
        a.wait_metric("gateway_cluster_up", "", 0.0, Duration::from_secs(5)),
        "node a never saw Redis go"
    );
    let mut alice = peer("alice", &[&a], &["--connect", "carol"]);
    assert!(
        alice
            .wait_for("path-up peer carol direct", Duration::from_secs(10))
            .is_some(),
        "local introduction without Redis: {:?}",
        alice.seen()
    );
    let mut dave = peer("dave", &[&a], &["--connect", "bob"]);
    let refused = dave.wait_for("refused connect code 503", Duration::from_secs(10));
    assert!(
        refused
            .as_deref()
            .is_some_and(|l| l.contains("cluster unavailable")),
        "{:?}",
        dave.seen()
    );
    // Retries do not print a line each.
    std::thread::sleep(Duration::from_secs(3));
    let refusals = dave
        .seen()
        .iter()
        .filter(|l| l.starts_with("refused connect"))
        .count();
    assert_eq!(refusals, 1, "{:?}", dave.seen());
    assert!(
        a.metric(
            "gateway_cluster_introductions_total",
            "outcome=\"unavailable\""
        ) >= 1.0
    );

    assert_waits_without_spinning(&a, cpu_before, outage_start);
    backend.restart();
    let back = Instant::now();
    let up = dave.wait_for("path-up peer bob direct", Duration::from_secs(16));
    assert!(
        up.is_some(),
        "cross-node after Redis came back empty: {:?}\nnode a:\n{}\nnode b:\n{}",
        dave.seen(),
        a.log_text(),
        b.log_text()
    );
    assert!(
        back.elapsed() < Duration::from_secs(16),
        "within one registration interval (15 s): {:?}",
        back.elapsed()
    );
    assert_eq!(a.metric("gateway_cluster_up", ""), 1.0);
}

#[test]
fn a_redis_outage_costs_only_cross_node_introductions_one_redis() {
    let dir = tempfile::tempdir().expect("dir");
    redis_outage(Backend::single(dir.path()));
}

#[test]
fn a_redis_outage_costs_only_cross_node_introductions_redis_cluster() {
    let dir = tempfile::tempdir().expect("dir");
    redis_outage(Backend::cluster(dir.path()));
}

/// The node a peer is registered on dies: the peer moves to the next node of its
/// list, and a peer on a third node is introduced to it within 5 s of the death
/// (plus the punch itself).
fn node_death(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let a = Node::start(dir.path(), "node-a", &backend);
    let b = Node::start(dir.path(), "node-b", &backend);
    let c = Node::start(dir.path(), "node-c", &backend);
    wait_up(&[&a, &b, &c], 3);
    let mut alice = peer("alice", &[&a, &b], &[]);
    drop(a);
    let died = Instant::now();
    assert!(
        alice
            .wait_for("registered with ", Duration::from_secs(5))
            .is_some(),
        "no failover: {:?}",
        alice.seen()
    );
    let registered = died.elapsed();
    let mut carol = peer("carol", &[&c], &["--connect", "alice"]);
    assert!(
        carol
            .wait_for("path-up peer alice direct", Duration::from_secs(10))
            .is_some(),
        "introduction to the moved peer: {:?}\nnode b:\n{}\nnode c:\n{}",
        carol.seen(),
        b.log_text(),
        c.log_text()
    );
    assert!(
        registered < Duration::from_secs(5),
        "reachable on node b {registered:?} after node a died"
    );
    assert_eq!(
        c.metric(
            "gateway_cluster_introductions_total",
            "outcome=\"introduced\""
        ),
        1.0
    );
}

#[test]
fn a_dead_nodes_peer_moves_and_is_introduced_again_one_redis() {
    let dir = tempfile::tempdir().expect("dir");
    node_death(Backend::single(dir.path()));
}

#[test]
fn a_dead_nodes_peer_moves_and_is_introduced_again_redis_cluster() {
    let dir = tempfile::tempdir().expect("dir");
    node_death(Backend::cluster(dir.path()));
}
