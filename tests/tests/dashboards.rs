//! The Grafana dashboards against a real Prometheus. A lab run (the gateway and
//! punching agents in network namespaces, or two gateway nodes sharing a real Redis)
//! is scraped every second by Prometheus running in the lab's server namespace; then
//! every PromQL expression of every panel, read from the dashboards' JSON, is
//! evaluated through Prometheus' HTTP API and must return data: a panel that would
//! show nothing fails the test. The `node` variable is checked the same way: it lists
//! exactly the run's gateway nodes, and every panel that filters by it shows nothing
//! for a node that does not exist. Panels whose metrics are not built yet are listed
//! in [`PENDING_PANELS`]; their expressions must still be valid PromQL.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use gateway_tests::{
    daemon::{GatewayProcess, PeerProcess},
    dashboards::{self, Dashboard},
    lab::{Host, Lab, NatPreset, lab_available},
    prometheus::{
        PrometheusProcess, Sample, ScrapeJob, TcpBridge, http_get_any, promtool_binary,
        scrape_config,
    },
    punch::{DISCOVER, SECRET, SERVICE, credentials},
    redis::{RedisServer, TlsFiles},
};

/// Every dashboard file and the lab scenario that makes its panels show data.
const DASHBOARDS: &[(&str, Scenario)] = &[
    ("cluster.json", Scenario::TwoNodeCluster),
    ("punching.json", Scenario::DirectAndFailedPunch),
    ("relay.json", Scenario::DirectAndFailedPunch),
];

/// Panels (file, title) whose metrics do not exist on this branch yet. Their
/// expressions must be valid PromQL and must show nothing; once one shows data the
/// test fails until it is removed from here, so every panel whose metric exists is
/// verified.
///
/// - The kernel punch metrics (`gateway_punched_flows_total`,
///   `gateway_bounced_packets_total{reason}`, `gateway_ebpf_punch_time_seconds`,
///   `gateway_ebpf_flow_table_entries`) come with the eBPF punch observer, and from
///   agents also with `gateway peer --metrics-listen` ([`AGENTS_SERVE_METRICS`]).
/// - The relay metrics (`gateway_turn_*`, `gateway_relay_*`) come with the relay; the
///   agents' `gateway_peer_sessions_total{path}` and `gateway_peer_path_bytes_total`
///   also need [`AGENTS_SERVE_METRICS`], and the failing pair of the scenario must
///   then be relayed.
const PENDING_PANELS: &[(&str, &str)] = &[];

/// Whether `gateway peer` serves its own /metrics (`--metrics-listen`, with the eBPF
/// observer on `--ebpf-interface`). When set, every agent runs with
/// [`AGENT_METRICS_ARGS`] and Prometheus scrapes it (job `gateway-agents`) through a
/// [`TcpBridge`] from the server's namespace.
const AGENTS_SERVE_METRICS: bool = true;
/// The agents' flags when [`AGENTS_SERVE_METRICS`] is set.
const AGENT_METRICS_ARGS: &[&str] = &[
    "--metrics-listen",
    "127.0.0.1:9479",
    "--ebpf-interface",
    "eth0",
];
/// The flags of the pair that also punches TCP (alice and bob).
const TCP_PUNCH_ARGS: &[&str] = &["--tcp", "simultaneous-open"];
/// Where an agent serves /metrics in its own namespace (as in [`AGENT_METRICS_ARGS`]).
const AGENT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9479);

/// Where an initiator's forwarder listens for its local application, and where a
/// responder's forwarder delivers (nothing needs to listen: the bytes are counted).
const APP_LISTEN: &str = "127.0.0.1:5000";
const APP_TARGET: &str = "127.0.0.1:6000";

/// The gateway's /metrics in the server's namespace (loopback, its default).
const GATEWAY_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9478);
/// Prometheus' API in the server's namespace.
const PROMETHEUS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// What `$__rate_interval` and `$__range` stand for: the whole run fits in it.
const WINDOW: &str = "1m";
/// How long the panels may take to show data once the scenario's events happened
/// (a few scrapes).
const DATA_TIMEOUT: Duration = Duration::from_secs(20);
/// The shipped alerting rules, in `dashboards/`.
const ALERTS_FILE: &str = "gateway-alerts.yml";
/// `$node` when "All" is picked.
const ALL_NODES: &str = dashboards::NODE_ALL_VALUE;
/// The cluster's nodes: `--node-id` (also their `instance` label, as
/// docs/operations.md advises), service address (the server's two addresses) and
/// /metrics address in the server's namespace.
const CLUSTER_NODES: [(&str, usize, u16); 2] = [("node-a", 0, 9478), ("node-b", 1, 9479)];

/// A lab run that makes dashboards show data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// One gateway with its eBPF programs and two pairs of agents: alice (site a,
    /// port-restricted cone) punches bob (site b, port-restricted cone answering with
    /// ICMP rejects) directly; carol (site a's second host) cannot punch dave (site c,
    /// symmetric NAT with random ports; see docs/nat-matrix.md) and reports a failure.
    /// Alice and bob also punch TCP (`--tcp simultaneous-open`; whether it connects
    /// through bob's ICMP-rejecting NAT is a race, docs/tcp-splicing.md, but either
    /// way an outcome is reported and counted). A client also sends datagrams that are
    /// not STUN.
    DirectAndFailedPunch,
    /// Two gateway nodes (node-a, node-b, on the server's two addresses, no eBPF)
    /// sharing the rendezvous through a real redis-server in the server's namespace,
    /// scraped as instances `node-a` and `node-b`. Bob (site b, port-restricted cone)
    /// registers with node-b; alice (site a, port-restricted cone) registers with
    /// node-a and connects to bob: one cross-node introduction, counted `introduced`
    /// on node-a, with messages between the nodes through Redis.
    TwoNodeCluster,
}

/// Everything a scenario runs; torn down in field order (Prometheus first, the lab
/// last).
struct Run {
    prometheus: PrometheusProcess,
    /// The `instance` label of every gateway node Prometheus scrapes, sorted.
    nodes: Vec<String>,
    _bridges: Vec<TcpBridge>,
    _agents: Vec<PeerProcess>,
    _gateways: Vec<GatewayProcess>,
    redis: Option<RedisServer>,
    _redis_dir: Option<tempfile::TempDir>,
    /// The TLS listener's certificate and key (the TLS panels).
    _tls_dir: Option<tempfile::TempDir>,
    _secret: tempfile::NamedTempFile,
    _lab: Lab,
}

/// The lab gateway's shared secret in a file, for `--secret-file`.
fn secret_file() -> tempfile::NamedTempFile {
    let mut secret = tempfile::NamedTempFile::new().expect("secret file");
    secret.write_all(SECRET).expect("write secret");
    secret
}

/// The lab's "public" ranges (RFC 5737) are reserved: allow them, or a pair that
/// cannot punch could not be relayed.
const ALLOW_LAB_PEERS: &[&str] = &[
    "--allow-peer",
    "198.51.100.0/24",
    "--allow-peer",
    "203.0.113.0/24",
    "--allow-peer",
    "192.0.2.0/24",
];

fn site_host(lab: &Lab, site: &str, i: usize) -> Host {
    lab.site(site)
        .and_then(|s| s.host(i))
        .unwrap_or_else(|| panic!("lab has no host {i} in site {site}"))
        .clone()
}

/// Waits (bounded) until `expr` returns at least one sample.
fn wait_for_samples(prometheus: &PrometheusProcess, expr: &str, timeout: Duration) -> Vec<Sample> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(samples) = prometheus.query(expr)
            && !samples.is_empty()
        {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{expr} returned nothing within {timeout:?}; targets:\n{}\nlog:\n{}",
            prometheus.targets_summary(),
            prometheus.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Scenario {
    fn run(self) -> Run {
        match self {
            Scenario::DirectAndFailedPunch => direct_and_failed_punch(),
            Scenario::TwoNodeCluster => two_node_cluster(),
        }
    }
}

fn direct_and_failed_punch() -> Run {
    let lab = Lab::builder()
        .site_with_hosts("a", NatPreset::port_restricted_cone(), 2)
        .site("b", NatPreset::reject_icmp())
        .site("c", NatPreset::symmetric())
        .build()
        .expect("lab");
    let server = lab.server().clone();
    let secret = secret_file();
    let secret_path = secret.path().to_string_lossy().into_owned();
    // A TLS listener for the TLS panels (a certificate valid for one day).
    let tls_dir = tempfile::tempdir().expect("TLS directory");
    let tls = TlsFiles::generate(tls_dir.path()).expect("certificate");
    let (tls_cert, tls_key) = (
        tls.cert.to_string_lossy().into_owned(),
        tls.key.to_string_lossy().into_owned(),
    );
    let tls_listen = SocketAddr::new(SERVICE.ip(), 443).to_string();
    let mut args = vec![
        "--listen",
        "0.0.0.0:3478",
        "--discovery-listen",
        "0.0.0.0:3479",
        "--require-ebpf",
        "--secret-file",
        &secret_path,
        "--tls-listen",
        &tls_listen,
        "--tls-cert",
        &tls_cert,
        "--tls-key",
        &tls_key,
    ];
    args.extend_from_slice(ALLOW_LAB_PEERS);
    let gateway = GatewayProcess::start(&server, GATEWAY_METRICS_ADDR, &args)
        .expect("gateway starts with eBPF (is the object embedded? run `cargo xtask build-ebpf`)");

    // (peer id, host, peer to connect to); responders first.
    let agents = [
        ("bob", site_host(&lab, "b", 0), None),
        ("dave", site_host(&lab, "c", 0), None),
        ("alice", site_host(&lab, "a", 0), Some("bob")),
        ("carol", site_host(&lab, "a", 1), Some("dave")),
    ];
    let mut bridges = Vec::new();
    let mut agent_targets = Vec::new();
    if AGENTS_SERVE_METRICS {
        for (_, host, _) in &agents {
            let bridge = TcpBridge::start(
                &server,
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                host,
                AGENT_METRICS_ADDR,
            )
            .expect("bridge to an agent");
            agent_targets.push(bridge.listen_addr());
            bridges.push(bridge);
        }
    }
    let config = scrape_config(
        SCRAPE_INTERVAL,
        &[
            ScrapeJob {
                name: "gateway".into(),
                targets: vec![GATEWAY_METRICS_ADDR],
                instances: Vec::new(),
            },
            ScrapeJob {
                name: "gateway-agents".into(),
                targets: agent_targets,
                instances: Vec::new(),
            },
        ],
    );
    let prometheus =
        PrometheusProcess::start(&server, PROMETHEUS_ADDR, &config, Duration::from_secs(30))
            .expect("prometheus starts");
    // A scrape before any punch: counters need a sample before they grow for rate()
    // and increase() to see the growth.
    wait_for_samples(&prometheus, "up{job=\"gateway\"} == 1", DATA_TIMEOUT);

    let mut started: Vec<(&str, PeerProcess)> = Vec::new();
    for (peer, host, connect) in &agents {
        let creds = credentials(peer);
        let mut args: Vec<&str> = DISCOVER.to_vec();
        // Initiators carry a local UDP port to the responders' (so the path byte
        // panels have traffic, direct and relayed).
        match connect {
            Some(other) => args.extend(["--connect", other, "--forward-listen", APP_LISTEN]),
            None => args.extend(["--forward-to", APP_TARGET]),
        }
        if AGENTS_SERVE_METRICS {
            args.extend_from_slice(AGENT_METRICS_ARGS);
        }
        if *peer == "alice" || *peer == "bob" {
            // For the TCP punching panels: both sides run the same technique.
            args.extend(TCP_PUNCH_ARGS);
        }
        if matches!(*peer, "carol" | "dave") {
            // Without birthday punching (both halves: a sweep alone still hits dave's
            // one mapping toward carol now and then) the carol-dave pair cannot punch,
            // which the failed-punch and relay panels need.
            args.extend(["--birthday-sockets", "0", "--birthday-probes", "0"]);
        }
        let mut agent = PeerProcess::start(host, SERVICE, &creds.username, &creds.password, &args)
            .expect("agent starts");
        if connect.is_none() {
            // Responders are registered and classified before anyone connects to them.
            agent
                .wait_for("nat mapping", Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{peer} not classified: {:?}", agent.seen()));
        }
        started.push((peer, agent));
    }

    // Errors for the error panels: datagrams that are not STUN.
    let client = site_host(&lab, "a", 0).udp_bind(0).expect("client socket");
    for _ in 0..5 {
        client
            .send_to(b"not a STUN message", SERVICE)
            .expect("send");
    }
    // For the TLS handshake panel: plain HTTP to the TLS port (a scanner would).
    site_host(&lab, "a", 0)
        .run(|| -> std::io::Result<()> {
            let mut stream = std::net::TcpStream::connect_timeout(
                &SocketAddr::new(SERVICE.ip(), 443),
                Duration::from_secs(2),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")?;
            // The gateway closes it once it sees the bytes are not TLS.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            Ok(())
        })
        .expect("namespace")
        .expect("plain connection to the TLS port");

    for (peer, line) in [
        ("alice", "path-up"),
        ("bob", "path-up"),
        ("carol", "punch-failed"),
        // ...after which carol and dave are relayed.
        ("carol", "path-up peer dave relayed"),
        ("dave", "path-up peer carol relayed"),
        // The TCP verdict (tcp-path-up or tcp-punch-failed), after which the outcome
        // is reported.
        ("alice", "tcp-p"),
        ("bob", "tcp-p"),
    ] {
        let agent = started
            .iter_mut()
            .find(|(name, _)| *name == peer)
            .map(|(_, agent)| agent)
            .unwrap_or_else(|| panic!("no agent {peer}"));
        assert!(
            agent.wait_for(line, Duration::from_secs(10)).is_some(),
            "{peer} never printed {line}: {:?}",
            agent.seen()
        );
    }
    // Application traffic over both paths: alice to bob (direct), carol to dave
    // (relayed).
    for initiator in [site_host(&lab, "a", 0), site_host(&lab, "a", 1)] {
        let app = initiator
            .run(|| std::net::UdpSocket::bind("127.0.0.1:0"))
            .expect("namespace")
            .expect("app socket");
        for i in 0..20 {
            app.send_to(format!("app datagram {i}").as_bytes(), APP_LISTEN)
                .expect("send");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Run {
        prometheus,
        // Prometheus' default instance label: the scrape address.
        nodes: vec![GATEWAY_METRICS_ADDR.to_string()],
        _bridges: bridges,
        _agents: started.into_iter().map(|(_, agent)| agent).collect(),
        _gateways: vec![gateway],
        redis: None,
        _redis_dir: None,
        _tls_dir: Some(tls_dir),
        _secret: secret,
        _lab: lab,
    }
}

fn two_node_cluster() -> Run {
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .site("b", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let server = lab.server().clone();
    let secret = secret_file();
    let secret_path = secret.path().to_string_lossy().into_owned();
    // A process inherits the network namespace of the thread that spawns it: Redis
    // listens on the server namespace's loopback, next to the nodes.
    let redis_dir = tempfile::tempdir().expect("redis directory");
    let dir = redis_dir.path().to_owned();
    let redis = server
        .run(move || RedisServer::start(&dir))
        .expect("lab")
        .unwrap_or_else(|e| panic!("{e}"));
    let redis_url = redis.url();

    let service = |i: usize| SocketAddr::from((server.addrs()[i], 3478));
    let metrics = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut gateways = Vec::new();
    for (node, address, port) in CLUSTER_NODES {
        let listen = service(address).to_string();
        let mut args = vec![
            "--listen",
            &listen,
            "--no-ebpf",
            "--secret-file",
            &secret_path,
            "--cluster-redis",
            &redis_url,
            "--node-id",
            node,
        ];
        args.extend_from_slice(ALLOW_LAB_PEERS);
        let gateway = GatewayProcess::start(&server, metrics(port), &args)
            .unwrap_or_else(|e| panic!("{node} starts: {e}"));
        gateways.push(gateway);
    }
    let mut config = scrape_config(
        SCRAPE_INTERVAL,
        &[ScrapeJob {
            name: "gateway".into(),
            targets: CLUSTER_NODES.iter().map(|(_, _, p)| metrics(*p)).collect(),
            instances: CLUSTER_NODES
                .iter()
                .map(|(n, _, _)| (*n).to_owned())
                .collect(),
        }],
    );
    // The shipped alerting rules, evaluated every second like the scrapes.
    config.push_str(&format!(
        "rule_files: [\"{}\"]\n",
        dashboards::dashboards_dir().join(ALERTS_FILE).display()
    ));
    let prometheus =
        PrometheusProcess::start(&server, PROMETHEUS_ADDR, &config, Duration::from_secs(30))
            .expect("prometheus starts");
    // Both nodes scraped, each seeing both through Redis, before any Connect: the
    // counters need a sample before they grow, and a Connect before the nodes reach
    // Redis would be refused (503).
    wait_for_samples(
        &prometheus,
        "count(up{job=\"gateway\"} == 1) == 2",
        DATA_TIMEOUT,
    );
    wait_for_samples(
        &prometheus,
        "count(gateway_cluster_up == 1 and gateway_cluster_nodes == 2) == 2",
        DATA_TIMEOUT,
    );

    // (peer id, host, node, peer to connect to); the responder first.
    let agents = [
        ("bob", site_host(&lab, "b", 0), 1, None),
        ("alice", site_host(&lab, "a", 0), 0, Some("bob")),
    ];
    let mut started = Vec::new();
    for (peer, host, node, connect) in &agents {
        let creds = credentials(peer);
        let args: Vec<&str> = connect.iter().flat_map(|c| ["--connect", c]).collect();
        let mut agent = PeerProcess::start(
            host,
            service(*node),
            &creds.username,
            &creds.password,
            &args,
        )
        .expect("agent starts");
        let line = match connect {
            Some(other) => format!("path-up peer {other}"),
            None => "registered".to_owned(),
        };
        assert!(
            agent.wait_for(&line, Duration::from_secs(15)).is_some(),
            "{peer} never printed {line}: {:?}\nnode-a:\n{}\nnode-b:\n{}",
            agent.seen(),
            gateways[0].log_text(),
            gateways[1].log_text()
        );
        started.push(agent);
    }
    // Until Prometheus has scraped the introduction and the messages it took.
    for expr in [
        "gateway_cluster_introductions_total{outcome=\"introduced\", instance=\"node-a\"} == 1",
        "sum(gateway_cluster_messages_total{direction=\"received\"}) > 0",
        "sum(gateway_registered_peers) == 2",
    ] {
        wait_for_samples(&prometheus, expr, DATA_TIMEOUT);
    }
    Run {
        prometheus,
        nodes: CLUSTER_NODES
            .iter()
            .map(|(n, _, _)| (*n).to_owned())
            .collect(),
        _bridges: Vec::new(),
        _agents: started,
        _gateways: gateways,
        redis: Some(redis),
        _redis_dir: Some(redis_dir),
        _tls_dir: None,
        _secret: secret,
        _lab: lab,
    }
}

/// One query to check: where it comes from and what is sent to Prometheus.
struct Query {
    file: String,
    panel: String,
    expr: String,
    pending: bool,
    /// Whether it filters by `$node` (every query but the agents' own).
    by_node: bool,
}

impl Query {
    fn name(&self) -> String {
        format!("{} / {:?}: {}", self.file, self.panel, self.expr)
    }
}

fn is_pending(file: &str, panel: &str) -> bool {
    PENDING_PANELS.contains(&(file, panel))
}

fn load_dashboards() -> Vec<Dashboard> {
    let dir = dashboards::dashboards_dir();
    DASHBOARDS
        .iter()
        .map(|(file, _)| dashboards::load(&dir, file).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Every query of `dashboard` with `$node` set to `node` (a regex as Grafana writes
/// it: [`ALL_NODES`] or [`dashboards::node_regex`]).
fn queries(dashboard: &Dashboard, node: &str) -> Vec<Query> {
    dashboard
        .panels
        .iter()
        .flat_map(|panel| {
            panel.exprs.iter().map(|expr| Query {
                file: dashboard.file.clone(),
                panel: panel.title.clone(),
                expr: dashboards::substitute_variables(expr, WINDOW, node)
                    .unwrap_or_else(|e| panic!("{}: {e}", dashboard.file)),
                pending: is_pending(&dashboard.file, &panel.title),
                by_node: expr.contains(dashboards::NODE_MATCHER),
            })
        })
        .collect()
}

/// Data a panel can show: at least one sample, at least one of them a number.
fn shows_data(samples: &[Sample]) -> bool {
    samples.iter().any(|s| s.value.is_finite())
}

/// A panel's samples (its first query's) with every node, for checks of what it
/// shows.
fn panel_samples(
    prometheus: &PrometheusProcess,
    dashboards: &[Dashboard],
    title: &str,
) -> Vec<Sample> {
    query_samples(prometheus, dashboards, title, 0, ALL_NODES)
}

/// The samples of query `index` of a panel, with `$node` set to `node`.
fn query_samples(
    prometheus: &PrometheusProcess,
    dashboards: &[Dashboard],
    title: &str,
    index: usize,
    node: &str,
) -> Vec<Sample> {
    let panel = dashboards
        .iter()
        .flat_map(|d| d.panels.iter())
        .find(|p| p.title == title)
        .unwrap_or_else(|| panic!("no panel {title:?}"));
    let expr = panel
        .exprs
        .get(index)
        .unwrap_or_else(|| panic!("{title:?} has no query {index}"));
    let expr = dashboards::substitute_variables(expr, WINDOW, node).expect("known variables");
    prometheus.query(&expr).unwrap_or_else(|e| panic!("{e}"))
}

/// Each sample's value by the value of its label `name`.
fn by_label(samples: &[Sample], name: &str) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|s| (label(s, name).to_owned(), s.value))
        .collect()
}

fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
    sample
        .labels
        .get(name)
        .map(String::as_str)
        .unwrap_or_default()
}

#[test]
fn every_dashboard_panel_shows_data_from_a_lab_run() {
    if !lab_available() {
        return;
    }
    let started = Instant::now();
    let dashboards = load_dashboards();
    let mut scenarios: Vec<Scenario> = DASHBOARDS.iter().map(|(_, s)| *s).collect();
    scenarios.sort();
    scenarios.dedup();
    for scenario in scenarios {
        let files: Vec<&str> = DASHBOARDS
            .iter()
            .filter(|(_, s)| *s == scenario)
            .map(|(file, _)| *file)
            .collect();
        let mut run = scenario.run();
        let prometheus = &run.prometheus;
        let scenario_dashboards: Vec<&Dashboard> = dashboards
            .iter()
            .filter(|d| files.contains(&d.file.as_str()))
            .collect();
        let checks: Vec<Query> = scenario_dashboards
            .iter()
            .flat_map(|d| queries(d, ALL_NODES))
            .collect();

        // Every built panel shows data (bounded wait: a few scrapes).
        let deadline = Instant::now() + DATA_TIMEOUT;
        loop {
            let empty: Vec<String> = checks
                .iter()
                .filter(|q| !q.pending)
                .filter_map(|q| match prometheus.query(&q.expr) {
                    Ok(samples) if shows_data(&samples) => None,
                    Ok(samples) => Some(format!("{} -> no data {samples:?}", q.name())),
                    Err(e) => Some(format!("{} -> {e}", q.name())),
                })
                .collect();
            if empty.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{scenario:?}: {} queries show nothing after {DATA_TIMEOUT:?}:\n{}\ntargets:\n{}",
                empty.len(),
                empty.join("\n"),
                prometheus.targets_summary()
            );
            std::thread::sleep(SCRAPE_INTERVAL);
        }

        // Pending panels: valid PromQL, and still nothing to show.
        for query in checks.iter().filter(|q| q.pending) {
            match prometheus.query(&query.expr) {
                Ok(samples) => assert!(
                    samples.is_empty(),
                    "{} now shows data ({samples:?}): remove it from PENDING_PANELS",
                    query.name()
                ),
                Err(e) => panic!("{} is not valid PromQL: {e}", query.name()),
            }
        }

        check_node_variable(&run, &scenario_dashboards);
        match scenario {
            Scenario::DirectAndFailedPunch => check_punch_values(prometheus, &dashboards),
            Scenario::TwoNodeCluster => {
                check_cluster_values(&run, &dashboards);
                // Last: it takes Redis away.
                check_cluster_alerts(&mut run, &dashboards);
            }
        }
        let verified = checks.iter().filter(|q| !q.pending).count();
        eprintln!(
            "{scenario:?}: {verified} queries show data, {} pending, {:.1} s so far",
            checks.len() - verified,
            started.elapsed().as_secs_f64()
        );
    }
}

/// The `node` variable of every dashboard of the run: its query lists exactly the
/// run's gateway nodes (as Grafana would ask Prometheus for them: the agents, which
/// serve no `gateway_registered_peers`, are not offered), and every query that
/// filters by it shows nothing for a node that does not exist (the filter reaches
/// Prometheus).
fn check_node_variable(run: &Run, dashboards: &[&Dashboard]) {
    let prometheus = &run.prometheus;
    for dashboard in dashboards {
        let query = &dashboard.node_values;
        let values = prometheus
            .label_values(&query.label, &query.selector)
            .unwrap_or_else(|e| panic!("{}: {e}", dashboard.file));
        assert_eq!(
            values, run.nodes,
            "{}: the node variable lists the gateway nodes",
            dashboard.file
        );
        for query in queries(dashboard, &dashboards::node_regex(&["no-such-node"])) {
            if query.pending || !query.by_node {
                continue;
            }
            match prometheus.query(&query.expr) {
                Ok(samples) => assert!(
                    !shows_data(&samples),
                    "{} shows data for a node that does not exist: {samples:?}",
                    query.name()
                ),
                Err(e) => panic!("{}: {e}", query.name()),
            }
        }
    }
}

/// What the cluster panels show after one cross-node introduction from node-a to
/// node-b, for all nodes and for each node picked alone.
fn check_cluster_values(run: &Run, dashboards: &[Dashboard]) {
    let prometheus = &run.prometheus;
    let nodes: Vec<&str> = run.nodes.iter().map(String::as_str).collect();
    let every_node = |value: f64| -> BTreeMap<String, f64> {
        nodes.iter().map(|n| ((*n).to_owned(), value)).collect()
    };
    let up = panel_samples(prometheus, dashboards, "Cluster up per node");
    assert_eq!(by_label(&up, "instance"), every_node(1.0), "{up:?}");
    let live = panel_samples(prometheus, dashboards, "Live nodes as each node sees them");
    assert_eq!(by_label(&live, "instance"), every_node(2.0), "{live:?}");
    let peers = panel_samples(prometheus, dashboards, "Registered peers per node");
    assert_eq!(by_label(&peers, "instance"), every_node(1.0), "{peers:?}");

    let outcomes = panel_samples(
        prometheus,
        dashboards,
        "Cross-node introductions by outcome",
    );
    let outcomes = by_label(&outcomes, "outcome");
    assert!(
        outcomes.get("introduced").is_some_and(|rate| *rate > 0.0),
        "a cross-node introduction per second: {outcomes:?}"
    );
    // Every outcome of CrossNodeOutcome is a series from start-up.
    for outcome in [
        "introduced",
        "not_found",
        "unavailable",
        "timed_out",
        "failed",
        "responder_gone",
    ] {
        assert!(outcomes.contains_key(outcome), "{outcome}: {outcomes:?}");
    }
    let success = panel_samples(prometheus, dashboards, "Cross-node introduction success");
    assert!(
        success.len() == 1 && (success[0].value - 1.0).abs() < 1e-9,
        "the one cross-node Connect was introduced: {success:?}"
    );
    let messages = panel_samples(prometheus, dashboards, "Node-to-node messages");
    let messages = by_label(&messages, "direction");
    for direction in ["sent", "received"] {
        assert!(
            messages.get(direction).is_some_and(|rate| *rate > 0.0),
            "{direction}: {messages:?}"
        );
    }
    let p50 = query_samples(prometheus, dashboards, "Redis round trip", 0, ALL_NODES);
    let p99 = query_samples(prometheus, dashboards, "Redis round trip", 1, ALL_NODES);
    let (p50, p99) = (by_label(&p50, "instance"), by_label(&p99, "instance"));
    assert_eq!(
        p50.keys().collect::<Vec<_>>(),
        nodes.iter().collect::<Vec<_>>()
    );
    for (node, median) in &p50 {
        let tail = p99.get(node).copied().unwrap_or(f64::NAN);
        assert!(
            *median > 0.0 && *median < 1.0 && tail >= *median && tail <= 1.0,
            "{node}: p50 {median} s, p99 {tail} s"
        );
    }

    // One node picked: only its series, and the introduction only where it is counted
    // (node-a, the initiator's node).
    for node in &nodes {
        let only = dashboards::node_regex(&[node]);
        let up = query_samples(prometheus, dashboards, "Cluster up per node", 0, &only);
        assert_eq!(
            by_label(&up, "instance"),
            BTreeMap::from([((*node).to_owned(), 1.0)]),
            "{node}: {up:?}"
        );
        let outcomes = query_samples(
            prometheus,
            dashboards,
            "Cross-node introductions by outcome",
            0,
            &only,
        );
        let introduced = by_label(&outcomes, "outcome")
            .get("introduced")
            .copied()
            .unwrap_or(f64::NAN);
        if *node == "node-a" {
            assert!(introduced > 0.0, "{node}: {outcomes:?}");
        } else {
            assert_eq!(introduced, 0.0, "{node}: {outcomes:?}");
        }
    }
    // Several picked: Grafana's (a|b).
    let both = dashboards::node_regex(&nodes);
    let up = query_samples(prometheus, dashboards, "Cluster up per node", 0, &both);
    assert_eq!(by_label(&up, "instance"), every_node(1.0), "{up:?}");
}

/// Each alerting rule Prometheus loaded: its name, health (`ok` once evaluated
/// without error) and state (`inactive`, `pending`, `firing`).
fn alert_rules(prometheus: &PrometheusProcess) -> Vec<(String, String, String)> {
    let (status, body) = prometheus
        .get("/api/v1/rules?type=alert")
        .unwrap_or_else(|e| panic!("{e}"));
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("HTTP {status} {e}: {body}"));
    let field = |rule: &serde_json::Value, name: &str| {
        rule.get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    json.pointer("/data/groups")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|group| group.get("rules").and_then(serde_json::Value::as_array))
        .flatten()
        .map(|rule| {
            (
                field(rule, "name"),
                field(rule, "health"),
                field(rule, "state"),
            )
        })
        .collect()
}

/// The alert names in the shipped rules file, in file order.
fn shipped_alert_names() -> Vec<String> {
    let path = dashboards::dashboards_dir().join(ALERTS_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// The shipped alerting rules in the real Prometheus: all evaluated without error
/// and quiet while the cluster is healthy; once Redis is gone, GatewayClusterDown
/// and GatewayClusterRedisErrors go pending for every node (their `for` has not
/// passed yet) while the others stay quiet, and the up panel shows both nodes down.
fn check_cluster_alerts(run: &mut Run, dashboards: &[Dashboard]) {
    let names = shipped_alert_names();
    let deadline = Instant::now() + DATA_TIMEOUT;
    let rules = loop {
        let rules = alert_rules(&run.prometheus);
        if rules.len() == names.len() && rules.iter().all(|(_, health, _)| health != "unknown") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "the rules were not all evaluated: {rules:?}\nlog:\n{}",
            run.prometheus.log_text()
        );
        std::thread::sleep(SCRAPE_INTERVAL);
    };
    for (name, health, state) in &rules {
        assert!(names.contains(name), "{name} is not in {ALERTS_FILE}");
        assert_eq!(health, "ok", "{name} evaluates without error");
        assert_eq!(state, "inactive", "{name} is quiet in a healthy cluster");
    }

    run.redis.as_mut().expect("the cluster's Redis").stop();
    let prometheus = &run.prometheus;
    let expected: BTreeSet<(String, String)> = ["GatewayClusterDown", "GatewayClusterRedisErrors"]
        .iter()
        .flat_map(|alert| run.nodes.iter().map(|n| ((*alert).to_owned(), n.clone())))
        .collect();
    let deadline = Instant::now() + DATA_TIMEOUT;
    loop {
        let active: BTreeSet<(String, String)> = prometheus
            .query("ALERTS")
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|s| {
                (
                    label(s, "alertname").to_owned(),
                    label(s, "instance").to_owned(),
                )
            })
            .collect();
        if active == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with Redis gone, the active alerts are {active:?}, not {expected:?}"
        );
        std::thread::sleep(SCRAPE_INTERVAL);
    }
    let up = panel_samples(prometheus, dashboards, "Cluster up per node");
    assert!(
        up.len() == run.nodes.len() && up.iter().all(|s| s.value == 0.0),
        "both nodes down: {up:?}"
    );
}

/// What some punching panels show after one direct and one failed punch between
/// known NAT classes.
fn check_punch_values(prometheus: &PrometheusProcess, dashboards: &[Dashboard]) {
    const EIM: &str = "endpoint_independent";
    const APDM: &str = "address_and_port_dependent";
    let ratios = panel_samples(prometheus, dashboards, "Success ratio by NAT class pair");
    let ratio = |responder: &str| {
        ratios
            .iter()
            .find(|s| label(s, "initiator_nat") == EIM && label(s, "responder_nat") == responder)
            .map(|s| s.value)
    };
    assert_eq!(ratio(EIM), Some(1.0), "{ratios:?}");
    assert_eq!(ratio(APDM), Some(0.0), "{ratios:?}");
    let failed = panel_samples(prometheus, dashboards, "Failed punches by NAT class pair");
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|s| label(s, "initiator_nat") == EIM && label(s, "responder_nat") == APDM),
        "only the EIM → APDM pair failed: {failed:?}"
    );
    let overall = panel_samples(prometheus, dashboards, "Punch success ratio");
    assert!(
        overall.len() == 1 && overall[0].value > 0.0 && overall[0].value < 1.0,
        "one success and at least one failure: {overall:?}"
    );
    // No lab router grants port mappings in this scenario: no punch used one.
    let mapped = panel_samples(prometheus, dashboards, "Punches with a mapped candidate");
    assert_eq!(
        mapped.iter().map(|s| s.value).collect::<Vec<_>>(),
        [0.0],
        "{mapped:?}"
    );
    let gateways = panel_samples(prometheus, dashboards, "Gateways reporting");
    assert_eq!(
        gateways.iter().map(|s| s.value).sum::<f64>(),
        1.0,
        "one gateway (agents are not counted): {gateways:?}"
    );
    let ebpf = panel_samples(prometheus, dashboards, "eBPF programs");
    assert_eq!(ebpf.first().map(|s| s.value), Some(1.0), "{ebpf:?}");
    // One plain-HTTP connection to the TLS port, no TLS client.
    let handshakes = by_label(
        &panel_samples(prometheus, dashboards, "TLS handshakes by outcome"),
        "outcome",
    );
    assert!(
        handshakes.get("plaintext").is_some_and(|&rate| rate > 0.0)
            && handshakes.get("ok") == Some(&0.0),
        "{handshakes:?}"
    );
    let open = panel_samples(prometheus, dashboards, "TLS connections open");
    assert_eq!(
        open.iter().map(|s| s.value).collect::<Vec<_>>(),
        [0.0],
        "{open:?}"
    );
    // The lab's certificate is valid for one day.
    let expiry = panel_samples(prometheus, dashboards, "TLS certificate expires in");
    assert!(
        expiry.len() == 1 && expiry[0].value > 82_800.0 && expiry[0].value <= 86_400.0,
        "{expiry:?}"
    );
    // Nobody flooded.
    let isolated = panel_samples(
        prometheus,
        dashboards,
        "Flooding clients on their own queue",
    );
    assert_eq!(
        isolated.iter().map(|s| s.value).collect::<Vec<_>>(),
        [0.0],
        "{isolated:?}"
    );
}

#[test]
fn dashboards_are_portable_and_every_file_and_pending_panel_is_known() {
    let dir = dashboards::dashboards_dir();
    let files = dashboards::dashboard_files(&dir).expect("dashboards/");
    let listed: BTreeSet<&str> = DASHBOARDS.iter().map(|(f, _)| *f).collect();
    assert_eq!(
        files.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        listed,
        "every dashboard file is in DASHBOARDS with its scenario, and only those"
    );
    let dashboards = load_dashboards();
    for (file, title) in PENDING_PANELS {
        assert!(
            dashboards
                .iter()
                .any(|d| d.file == *file && d.panels.iter().any(|p| p.title == *title)),
            "PENDING_PANELS names {file} / {title:?}, which does not exist"
        );
    }
    for dashboard in &dashboards {
        let mut titles = BTreeSet::new();
        for panel in &dashboard.panels {
            assert!(
                titles.insert(panel.title.as_str()),
                "{}: two panels titled {:?}",
                dashboard.file,
                panel.title
            );
        }
        // Every query's variables are Grafana's intervals and `$node` (nothing a test
        // cannot fill).
        queries(dashboard, ALL_NODES);
    }
}

/// The `key: value` settings of a YAML file, for the few scalar settings compared here.
fn yaml_values(path: &Path, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(&format!("{key}:")))
        .map(|value| value.trim().to_owned())
        .collect()
}

#[test]
fn shipped_prometheus_config_is_valid_and_matches_the_datasource() {
    let dir = dashboards::dashboards_dir();
    let config = dir.join("prometheus.yml");
    let promtool = promtool_binary().unwrap_or_else(|e| panic!("{e}"));
    let output = std::process::Command::new(&promtool)
        .args(["check", "config"])
        .arg(&config)
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The alerting rules it loads, on their own too.
    let output = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(dir.join(ALERTS_FILE))
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check rules: {said}");
    assert!(
        said.contains(&format!("{} rules found", shipped_alert_names().len())),
        "{said}"
    );
    assert_eq!(
        yaml_values(&config, "rule_files"),
        vec![format!("[\"{ALERTS_FILE}\"]")]
    );
    // Grafana's $__rate_interval is right only when the datasource knows the interval.
    let scrape = yaml_values(&config, "scrape_interval");
    let datasource = yaml_values(
        &dir.join("provisioning/datasources/gateway.yml"),
        "timeInterval",
    );
    assert_eq!(scrape.len(), 1, "{scrape:?}");
    assert_eq!(scrape, datasource);
    let path = yaml_values(&dir.join("provisioning/dashboards/gateway.yml"), "path");
    assert_eq!(path.len(), 1, "one dashboard provider path: {path:?}");
}

#[test]
fn bridge_carries_a_scrape_from_behind_a_nat() {
    if !lab_available() {
        return;
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .build()
        .expect("lab");
    let agent_host = site_host(&lab, "a", 0);
    // A one-shot /metrics on the agent's loopback.
    let listener = agent_host
        .tcp_listen_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("listen");
    let target = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut head = [0u8; 1024];
        let n = stream.read(&mut head).expect("read");
        let body = "gateway_peer_sessions_total{path=\"direct\"} 1\n";
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).expect("write");
        String::from_utf8_lossy(&head[..n]).into_owned()
    });
    // From the server's namespace the agent's loopback is not reachable...
    let direct = lab
        .server()
        .tcp_connect(target, Duration::from_secs(1))
        .expect("lab");
    assert!(
        direct.is_err(),
        "the server reached the agent's loopback directly"
    );
    // ...but through the bridge it is.
    let bridge = TcpBridge::start(
        lab.server(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        &agent_host,
        target,
    )
    .expect("bridge");
    let (status, body) = http_get_any(lab.server(), bridge.listen_addr(), "/metrics")
        .expect("scrape through bridge");
    assert_eq!(status, 200);
    assert_eq!(body, "gateway_peer_sessions_total{path=\"direct\"} 1\n");
    let request = server.join().expect("server thread");
    assert!(request.starts_with("GET /metrics HTTP/1.0"), "{request}");
}
