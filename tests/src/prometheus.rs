//! A real Prometheus server run inside a lab namespace, so tests can check what the
//! Grafana dashboards would show: it scrapes the gateway (and agents) during a lab run
//! and answers PromQL through its HTTP API. Also a TCP bridge that lets it scrape a
//! process in another namespace (an agent behind a lab NAT).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::{Host, LabError};

/// Why running or querying Prometheus failed.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
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
    /// The `prometheus` binary is not installed.
    #[error(
        "the `prometheus` binary was not found (looked for {0}); run `cargo xtask setup`, \
         which installs Debian's prometheus package, or set PROMETHEUS_BIN"
    )]
    Missing(String),
    /// Prometheus exited or did not become ready in time.
    #[error("prometheus not ready: {0}")]
    NotReady(String),
    /// Prometheus refused a query (e.g. a PromQL syntax error) or answered nonsense.
    #[error("query {expr:?}: {message}")]
    Query {
        /// The PromQL expression.
        expr: String,
        /// What Prometheus (or the response parser) said.
        message: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PrometheusError {
    let what = what.into();
    move |source| PrometheusError::Io { what, source }
}

/// Path of the Prometheus server binary: `$PROMETHEUS_BIN`, else `prometheus` on PATH.
pub fn prometheus_binary() -> Result<PathBuf, PrometheusError> {
    find_binary("PROMETHEUS_BIN", "prometheus")
}

/// Path of `promtool` (Prometheus' config checker): `$PROMTOOL_BIN`, else on PATH.
pub fn promtool_binary() -> Result<PathBuf, PrometheusError> {
    find_binary("PROMTOOL_BIN", "promtool")
}

fn find_binary(variable: &str, name: &str) -> Result<PathBuf, PrometheusError> {
    if let Some(path) = std::env::var_os(variable) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| PrometheusError::Missing(format!("${variable} or {name} on PATH")))
}

/// One scrape job: a name (the `job` label) and its `host:port` targets.
#[derive(Clone, Debug)]
pub struct ScrapeJob {
    /// The job name.
    pub name: String,
    /// Addresses serving `/metrics`, as reached from Prometheus' namespace.
    pub targets: Vec<SocketAddr>,
    /// The targets' `instance` labels, in target order (as an operator names each
    /// gateway node after its `--node-id`); empty: Prometheus' default, the address.
    pub instances: Vec<String>,
}

/// The Prometheus configuration scraping `jobs` every `interval`.
pub fn scrape_config(interval: Duration, jobs: &[ScrapeJob]) -> String {
    let interval_ms = interval.as_millis().max(1);
    let mut yaml = format!(
        "global:\n  scrape_interval: {interval_ms}ms\n  scrape_timeout: {interval_ms}ms\n  \
         evaluation_interval: {interval_ms}ms\nscrape_configs:\n"
    );
    for job in jobs {
        let _ = write!(
            yaml,
            "  - job_name: \"{}\"\n    static_configs:\n",
            job.name
        );
        if job.instances.is_empty() {
            let targets: Vec<String> = job.targets.iter().map(|t| format!("\"{t}\"")).collect();
            let _ = writeln!(yaml, "      - targets: [{}]", targets.join(", "));
        } else {
            for (target, instance) in job.targets.iter().zip(&job.instances) {
                let _ = write!(
                    yaml,
                    "      - targets: [\"{target}\"]\n        labels: {{instance: \"{instance}\"}}\n"
                );
            }
        }
    }
    yaml
}

/// One sample of a query result: its labels and value (NaN and infinities included,
/// as Prometheus returns them).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// A `prometheus` server running in a lab host's namespace with its own temporary
/// storage; killed (and its storage removed) on drop.
#[derive(Debug)]
pub struct PrometheusProcess {
    child: Option<Child>,
    host: Host,
    listen: SocketAddr,
    dir: tempfile::TempDir,
}

impl PrometheusProcess {
    /// Starts Prometheus in `host`'s namespace, serving its API on `listen`, with the
    /// configuration `config` (see [`scrape_config`]), and waits (at most `timeout`)
    /// until it reports ready.
    pub fn start(
        host: &Host,
        listen: SocketAddr,
        config: &str,
        timeout: Duration,
    ) -> Result<Self, PrometheusError> {
        let binary = prometheus_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("gateway-prometheus-")
            .tempdir()
            .map_err(io("creating Prometheus' directory"))?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).map_err(io("writing prometheus.yml"))?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .map_err(io("creating Prometheus' log"))?;
        let mut command = host.command(&binary.to_string_lossy());
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().map_err(io("spawning prometheus"))?;
        let mut process = Self {
            child: Some(child),
            host: host.clone(),
            listen,
            dir,
        };
        process.wait_ready(timeout)?;
        Ok(process)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), PrometheusError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(PrometheusError::NotReady(format!(
                    "exited with {status}; log:\n{}",
                    self.log_text()
                )));
            }
            if matches!(self.get("/-/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PrometheusError::NotReady(format!(
                    "not ready after {timeout:?}; log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything Prometheus logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` on Prometheus' HTTP API: the status code and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String), PrometheusError> {
        http_get_any(&self.host, self.listen, path)
    }

    /// Evaluates `expr` now (`/api/v1/query`): its samples, or the error Prometheus
    /// gave (a syntax error, an unknown function...).
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, PrometheusError> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        parse_query_response(expr, status, &body)
    }

    /// The values of `label` among the series `selector` matches
    /// (`/api/v1/label/LABEL/values?match[]=SELECTOR`), sorted: what Grafana lists for
    /// a `label_values(SELECTOR, LABEL)` variable.
    pub fn label_values(
        &self,
        label: &str,
        selector: &str,
    ) -> Result<Vec<String>, PrometheusError> {
        let what = format!("label_values({selector}, {label})");
        let fail = |message: String| PrometheusError::Query {
            expr: what.clone(),
            message,
        };
        let (status, body) = self.get(&format!(
            "/api/v1/label/{}/values?match%5B%5D={}",
            url_encode(label),
            url_encode(selector)
        ))?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| fail(format!("HTTP {status}, not JSON ({e}): {body}")))?;
        if json.get("status").and_then(|s| s.as_str()) != Some("success") {
            return Err(fail(format!("HTTP {status}: {body}")));
        }
        let mut values: Vec<String> = json
            .get("data")
            .and_then(|d| d.as_array())
            .ok_or_else(|| fail(format!("no data list: {body}")))?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        values.sort();
        Ok(values)
    }

    /// The scrape targets' health as Prometheus sees them (`/api/v1/targets`), one line
    /// per target, for failure messages.
    pub fn targets_summary(&self) -> String {
        let Ok((_, body)) = self.get("/api/v1/targets") else {
            return "(targets unavailable)".into();
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else {
            return body;
        };
        let active = json
            .pointer("/data/activeTargets")
            .and_then(|t| t.as_array())
            .cloned()
            .unwrap_or_default();
        active
            .iter()
            .map(|t| {
                let field = |name: &str| t.get(name).and_then(|v| v.as_str()).unwrap_or("?");
                format!(
                    "{} {} health={} lastError={:?}",
                    field("scrapePool"),
                    field("scrapeUrl"),
                    field("health"),
                    field("lastError")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` execs prometheus: the child's pid is prometheus itself.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses an `/api/v1/query` response into samples (vector or scalar results).
pub fn parse_query_response(
    expr: &str,
    status: u16,
    body: &str,
) -> Result<Vec<Sample>, PrometheusError> {
    let fail = |message: String| PrometheusError::Query {
        expr: expr.to_owned(),
        message,
    };
    let json: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| fail(format!("HTTP {status}, not JSON ({e}): {body}")))?;
    if json.get("status").and_then(|s| s.as_str()) != Some("success") {
        let kind = json
            .get("errorType")
            .and_then(|e| e.as_str())
            .unwrap_or("?");
        let error = json.get("error").and_then(|e| e.as_str()).unwrap_or(body);
        return Err(fail(format!("HTTP {status}, {kind}: {error}")));
    }
    let data = json
        .get("data")
        .ok_or_else(|| fail("no data in the response".into()))?;
    let result = data
        .get("result")
        .ok_or_else(|| fail("no result in the response".into()))?;
    let value_of = |pair: &serde_json::Value| -> Result<f64, PrometheusError> {
        pair.get(1)
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| fail(format!("unreadable value {pair}")))
    };
    match data.get("resultType").and_then(|t| t.as_str()) {
        Some("vector") => result
            .as_array()
            .ok_or_else(|| fail("vector result is not a list".into()))?
            .iter()
            .map(|sample| {
                let labels = sample
                    .get("metric")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = sample
                    .get("value")
                    .ok_or_else(|| fail(format!("sample without value: {sample}")))?;
                Ok(Sample {
                    labels,
                    value: value_of(value)?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: value_of(result)?,
        }]),
        other => Err(fail(format!(
            "result type {other:?}: dashboards need instant vectors or scalars"
        ))),
    }
}

/// Percent-encodes `text` for a URL query value (everything but RFC 3986's
/// unreserved characters).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `GET path` over HTTP/1.0 from inside `host`'s namespace (1.0, so the body is never
/// chunked): the status code and the body, whatever the status.
pub fn http_get_any(
    host: &Host,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), PrometheusError> {
    let mut stream = host
        .tcp_connect(addr, Duration::from_secs(2))?
        .map_err(io(format!("connecting to {addr}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("setting a timeout"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(io("sending the request"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(io("reading the response"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| PrometheusError::NotReady(format!("malformed HTTP response: {response}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| PrometheusError::NotReady(format!("no HTTP status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// How long one bridged connection may sit idle before it is closed.
const BRIDGE_IDLE: Duration = Duration::from_secs(10);

/// Forwards every TCP connection accepted on an address in one namespace to an address
/// reached from another namespace, so a Prometheus in the lab's server namespace can
/// scrape an agent's loopback-only /metrics behind a lab NAT. Stops accepting on drop.
#[derive(Debug)]
pub struct TcpBridge {
    listen: SocketAddr,
    stop: Arc<AtomicBool>,
    accepter: Option<JoinHandle<()>>,
}

impl TcpBridge {
    /// Listens on `listen` in `listen_host`'s namespace; each connection is joined to a
    /// new connection to `target` made from `target_host`'s namespace.
    pub fn start(
        listen_host: &Host,
        listen: SocketAddr,
        target_host: &Host,
        target: SocketAddr,
    ) -> Result<Self, PrometheusError> {
        let listener: TcpListener = listen_host.tcp_listen_on(listen)?;
        let listen = listener.local_addr().map_err(io("bridge address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("non-blocking bridge listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let target_host = target_host.clone();
        let stopping = stop.clone();
        let accepter = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let target_host = target_host.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = bridge_one(client, &target_host, target) {
                                tracing::debug!(error = %e, "bridged connection failed");
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bridge accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        Ok(Self {
            listen,
            stop,
            accepter: Some(accepter),
        })
    }

    /// The address the bridge accepts on (in the listening namespace).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }
}

impl Drop for TcpBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accepter) = self.accepter.take() {
            let _ = accepter.join();
        }
    }
}

fn bridge_one(client: TcpStream, target_host: &Host, target: SocketAddr) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let upstream = target_host
        .tcp_connect(target, Duration::from_secs(2))
        .map_err(std::io::Error::other)??;
    for stream in [&client, &upstream] {
        stream.set_read_timeout(Some(BRIDGE_IDLE))?;
        stream.set_write_timeout(Some(BRIDGE_IDLE))?;
    }
    let (mut client_read, mut upstream_write) = (client.try_clone()?, upstream.try_clone()?);
    let forward = std::thread::spawn(move || {
        let copied = std::io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(std::net::Shutdown::Write);
        copied
    });
    let (mut upstream_read, mut client_write) = (upstream, client);
    let copied = std::io::copy(&mut upstream_read, &mut client_write);
    let _ = client_write.shutdown(std::net::Shutdown::Write);
    let _ = forward.join();
    copied.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            url_encode(r#"sum(rate(x{a="b"}[1m])) / 2"#),
            "sum%28rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%29%20%2F%202"
        );
        assert_eq!(url_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(url_encode("→"), "%E2%86%92");
    }

    #[test]
    fn query_responses_parse_into_samples_and_errors() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"outcome":"direct"},"value":[1700000000.5,"0.25"]},
            {"metric":{},"value":[1700000000.5,"NaN"]}]}}"#;
        let samples = parse_query_response("x", 200, vector).expect("vector");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].value, 0.25);
        assert_eq!(
            samples[0].labels.get("outcome").map(String::as_str),
            Some("direct")
        );
        assert!(samples[1].value.is_nan());

        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#;
        let samples = parse_query_response("1/0", 200, scalar).expect("scalar");
        assert_eq!(samples[0].value, f64::INFINITY);

        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(
            parse_query_response("y", 200, empty)
                .expect("empty")
                .is_empty()
        );

        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        let error = parse_query_response("sum(", 400, bad).expect_err("error");
        assert!(error.to_string().contains("parse error"), "{error}");

        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_query_response("z[1m]", 200, matrix).is_err());
    }

    #[test]
    fn scrape_config_lists_every_job_and_target() {
        let config = scrape_config(
            Duration::from_secs(1),
            &[
                ScrapeJob {
                    name: "gateway".into(),
                    targets: vec![
                        "127.0.0.1:9478".parse().expect("addr"),
                        "127.0.0.1:9479".parse().expect("addr"),
                    ],
                    instances: vec!["node-a".into(), "node-b".into()],
                },
                ScrapeJob {
                    name: "gateway-agents".into(),
                    targets: vec![
                        "127.0.0.1:19001".parse().expect("addr"),
                        "127.0.0.1:19002".parse().expect("addr"),
                    ],
                    instances: Vec::new(),
                },
            ],
        );
        assert!(config.contains("scrape_interval: 1000ms"), "{config}");
        assert!(
            config.contains("job_name: \"gateway-agents\"\n    static_configs:\n      - targets: [\"127.0.0.1:19001\", \"127.0.0.1:19002\"]\n"),
            "{config}"
        );
        assert!(
            config.contains("      - targets: [\"127.0.0.1:9478\"]\n        labels: {instance: \"node-a\"}\n      - targets: [\"127.0.0.1:9479\"]\n        labels: {instance: \"node-b\"}\n"),
            "{config}"
        );
    }
}
