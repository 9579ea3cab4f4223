//! The Prometheus registry and the `/metrics` HTTP endpoint.
//!
//! Names follow the project's rules: prefix `gateway_`, base units, `_total` for
//! counters, bounded label values only (never an address or peer id).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::health::Health;
use crate::proto::rendezvous::{
    CrossNodeOutcome, RendezvousEvent, RendezvousHandled,
    wire::{NatClass, TcpTechnique},
};

/// Why the metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a programming error).
    #[error("metrics registry: {0}")]
    Registry(#[from] prometheus::Error),
    /// The HTTP listener could not bind.
    #[error("cannot listen for /metrics on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Every metric the daemon itself updates, in one registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Datagrams received on the service port.
    pub udp_received_datagrams: IntCounter,
    /// Bytes (UDP payload) received on the service port.
    pub udp_received_bytes: IntCounter,
    /// Datagrams sent from the service port.
    pub udp_sent_datagrams: IntCounter,
    /// Bytes (UDP payload) sent from the service port.
    pub udp_sent_bytes: IntCounter,
    /// Clients with a socket of their own on the service port now (flooders, see
    /// [`crate::fair`]).
    pub udp_isolated_clients: IntGauge,
    /// Clients given a socket of their own, ever.
    pub udp_isolations: IntCounter,
    /// What became of each received datagram, by [`RendezvousHandled`] label.
    pub stun_datagrams: IntCounterVec,
    /// Peers registered with the rendezvous.
    pub registered_peers: IntGauge,
    /// Registered peers by the transport they registered over (udp, tcp, tls).
    pub registered_peers_by_transport: IntGaugeVec,
    /// Introductions made, by the two sides' NAT classes.
    pub punch_attempts: IntCounterVec,
    /// Reported punch outcomes, by NAT classes and outcome.
    pub punch_outcomes: IntCounterVec,
    /// Reported punch outcomes of introductions that carried a verified mapped
    /// (port-mapping) candidate, by outcome: their share of all outcomes.
    pub punch_mapped_outcomes: IntCounterVec,
    /// Checks of peers' mapped candidates, by outcome (verified, unreachable).
    pub mapped_candidates: IntCounterVec,
    /// Reported time from introduction to a two-way direct path.
    pub punch_time_to_direct: HistogramVec,
    /// Reported TCP punching outcomes, by technique, outcome and NAT classes.
    pub tcp_punch_attempts: IntCounterVec,
    /// SYN-ACKs forged and sent for server-assisted TCP splicing.
    pub tcp_forged_synacks: IntCounter,
    /// 1 when the eBPF programs are loaded and attached, else 0.
    pub ebpf_loaded: IntGauge,
    /// Number of interfaces the eBPF programs are attached to.
    pub ebpf_attached_interfaces: IntGauge,
    /// Connects for a peer registered on another node, by outcome (counted once, on
    /// the initiator's node).
    pub cluster_introductions: IntCounterVec,
    /// 1 while draining (new registrations and allocations refused), else 0.
    pub draining: IntGauge,
    /// Configuration reloads (SIGHUP), by outcome: `success`, `partial` (applied
    /// but for settings that need a restart), `failed` (refused; the old one kept).
    pub config_reloads: IntCounterVec,
    /// 1 when the last reload was applied (or none was tried), 0 when it failed.
    pub config_last_reload_successful: IntGauge,
}

/// The outcomes of a punch (`gateway_punch_outcomes_total`).
pub const PUNCH_OUTCOMES: [&str; 3] = ["direct", "failed", "relayed"];

/// The outcomes of a mapped candidate's check
/// (`gateway_rendezvous_mapped_candidates_total`).
pub const MAPPED_CHECK_OUTCOMES: [&str; 2] = ["verified", "unreachable"];

/// The outcomes of a configuration reload (`gateway_config_reloads_total`).
pub const RELOAD_OUTCOMES: [&str; 3] = ["success", "partial", "failed"];

impl Metrics {
    /// Sets the registration gauges from the rendezvous core.
    pub fn set_registered_peers(&self, core: &gateway_proto::rendezvous::RendezvousServer) {
        self.registered_peers.set(core.peer_count() as i64);
        for (transport, count) in ["udp", "tcp", "tls"]
            .into_iter()
            .zip(core.peers_by_transport())
        {
            self.registered_peers_by_transport
                .with_label_values(&[transport])
                .set(count as i64);
        }
    }

    /// Creates and registers every metric, with all label values pre-set to zero so
    /// dashboards show series before the first event.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let stun_datagrams = IntCounterVec::new(
            Opts::new(
                "gateway_stun_datagrams_total",
                "Datagrams received on the service port, by what the protocol core made of them",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(stun_datagrams.clone()))?;
        for label in RendezvousHandled::ALL_LABELS.iter().chain(&[
            "channel_data",
            "turn_request",
            "turn_indication",
        ]) {
            stun_datagrams.with_label_values(&[label]);
        }
        let nat_labels = ["initiator_nat", "responder_nat"];
        let punch_attempts = IntCounterVec::new(
            Opts::new(
                "gateway_punch_attempts_total",
                "Introductions made (each starts one hole-punching attempt), by the sides' NAT mapping classes",
            ),
            &nat_labels,
        )?;
        registry.register(Box::new(punch_attempts.clone()))?;
        let punch_outcomes = IntCounterVec::new(
            Opts::new(
                "gateway_punch_outcomes_total",
                "Hole-punching outcomes reported by peers (first report per introduction), by NAT classes and outcome",
            ),
            &["initiator_nat", "responder_nat", "outcome"],
        )?;
        registry.register(Box::new(punch_outcomes.clone()))?;
        let punch_mapped_outcomes = IntCounterVec::new(
            Opts::new(
                "gateway_punch_mapped_outcomes_total",
                "Hole-punching outcomes reported for introductions that carried a verified mapped (port-mapping) candidate of either side, by outcome (a subset of gateway_punch_outcomes_total)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(punch_mapped_outcomes.clone()))?;
        for outcome in PUNCH_OUTCOMES {
            punch_mapped_outcomes.with_label_values(&[outcome]);
        }
        let mapped_candidates = IntCounterVec::new(
            Opts::new(
                "gateway_rendezvous_mapped_candidates_total",
                "Checks of peers' new mapped (port-mapping) candidates, by outcome: verified (the probe was answered; introduced from now on) or unreachable (dropped, the peer told)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(mapped_candidates.clone()))?;
        for outcome in MAPPED_CHECK_OUTCOMES {
            mapped_candidates.with_label_values(&[outcome]);
        }
        let punch_time_to_direct = HistogramVec::new(
            HistogramOpts::new(
                "gateway_punch_time_to_direct_seconds",
                "Reported time from introduction to the first two-way direct exchange",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &nat_labels,
        )?;
        registry.register(Box::new(punch_time_to_direct.clone()))?;
        let tcp_punch_attempts = IntCounterVec::new(
            Opts::new(
                "gateway_tcp_punch_attempts_total",
                "TCP hole-punching attempts reported by peers (first report per technique per introduction), by technique, outcome (success, failed) and NAT classes",
            ),
            &["technique", "outcome", "initiator_nat", "responder_nat"],
        )?;
        registry.register(Box::new(tcp_punch_attempts.clone()))?;
        for a in NatClass::ALL {
            for b in NatClass::ALL {
                punch_attempts.with_label_values(&[a.as_str(), b.as_str()]);
                // Also the histogram: a series born with its first observation has
                // no earlier sample, so rate() and increase() would miss that punch.
                punch_time_to_direct.with_label_values(&[a.as_str(), b.as_str()]);
                for outcome in PUNCH_OUTCOMES {
                    punch_outcomes.with_label_values(&[a.as_str(), b.as_str(), outcome]);
                }
                for technique in TcpTechnique::ALL {
                    for outcome in ["success", "failed"] {
                        tcp_punch_attempts.with_label_values(&[
                            technique.as_str(),
                            outcome,
                            a.as_str(),
                            b.as_str(),
                        ]);
                    }
                }
            }
        }
        let cluster_introductions = IntCounterVec::new(
            Opts::new(
                "gateway_cluster_introductions_total",
                "Connects for a peer registered on another node, by outcome (counted once, on the initiator's node)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(cluster_introductions.clone()))?;
        for outcome in CrossNodeOutcome::ALL {
            cluster_introductions.with_label_values(&[outcome.as_str()]);
        }
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "gateway_config_reloads_total",
                "Configuration reloads (SIGHUP), by outcome: success, partial (settings that need a restart were not applied), failed (refused as a whole, the old configuration kept)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(config_reloads.clone()))?;
        for outcome in RELOAD_OUTCOMES {
            config_reloads.with_label_values(&[outcome]);
        }
        let config_last_reload_successful = gauge(
            "gateway_config_last_reload_successful",
            "1 when the last configuration reload was applied (or none was tried), 0 when it was refused",
        )?;
        config_last_reload_successful.set(1);
        register_build_info(&registry)?;
        Ok(Self {
            draining: gauge(
                "gateway_draining",
                "1 while draining (SIGTERM: new registrations and allocations refused, existing ones served until they end or server.drain_timeout), else 0",
            )?,
            config_reloads,
            config_last_reload_successful,
            cluster_introductions,
            udp_received_datagrams: counter(
                "gateway_udp_received_datagrams_total",
                "Datagrams received on the service port",
            )?,
            udp_received_bytes: counter(
                "gateway_udp_received_bytes_total",
                "UDP payload bytes received on the service port",
            )?,
            udp_sent_datagrams: counter(
                "gateway_udp_sent_datagrams_total",
                "Datagrams sent from the service port",
            )?,
            udp_sent_bytes: counter(
                "gateway_udp_sent_bytes_total",
                "UDP payload bytes sent from the service port",
            )?,
            udp_isolated_clients: gauge(
                "gateway_udp_isolated_clients",
                "Clients that flooded the service port and have a socket (kernel queue) of their own on it now",
            )?,
            udp_isolations: counter(
                "gateway_udp_isolations_total",
                "Clients given a socket (kernel queue) of their own on the service port for flooding it",
            )?,
            ebpf_loaded: gauge(
                "gateway_ebpf_loaded",
                "1 when the eBPF programs are loaded and attached, 0 when running without them",
            )?,
            ebpf_attached_interfaces: gauge(
                "gateway_ebpf_attached_interfaces",
                "Interfaces the eBPF programs are attached to",
            )?,
            tcp_forged_synacks: counter(
                "gateway_tcp_forged_synacks_total",
                "TCP SYN-ACKs with spoofed source addresses the gateway sent for server-assisted splicing (server.tcp_forge_synack; lab only)",
            )?,
            registered_peers: gauge(
                "gateway_registered_peers",
                "Peers currently registered with the rendezvous",
            )?,
            registered_peers_by_transport: {
                let gauges = IntGaugeVec::new(
                    Opts::new(
                        "gateway_registered_peers_by_transport",
                        "Peers currently registered with the rendezvous, by the transport they registered over: udp, tcp or tls (agents whose networks drop UDP fall back to tcp, then tls)",
                    ),
                    &["transport"],
                )?;
                registry.register(Box::new(gauges.clone()))?;
                for transport in ["udp", "tcp", "tls"] {
                    gauges.with_label_values(&[transport]).set(0);
                }
                gauges
            },
            stun_datagrams,
            punch_attempts,
            punch_outcomes,
            punch_mapped_outcomes,
            mapped_candidates,
            punch_time_to_direct,
            tcp_punch_attempts,
            registry,
        })
    }

    /// Records one event of the rendezvous core. A SYN-ACK to forge counts only once
    /// the driver injected it (`gateway_tcp_forged_synacks_total`), not here.
    pub fn record(&self, event: &RendezvousEvent) {
        match *event {
            RendezvousEvent::Introduced {
                initiator_nat,
                responder_nat,
            } => self
                .punch_attempts
                .with_label_values(&[initiator_nat.as_str(), responder_nat.as_str()])
                .inc(),
            RendezvousEvent::Outcome {
                initiator_nat,
                responder_nat,
                direct,
                relayed,
                time_to_direct,
                mapped,
                ..
            } => {
                let pair = [initiator_nat.as_str(), responder_nat.as_str()];
                let outcome = match (direct, relayed) {
                    (true, _) => "direct",
                    (false, true) => "relayed",
                    (false, false) => "failed",
                };
                self.punch_outcomes
                    .with_label_values(&[pair[0], pair[1], outcome])
                    .inc();
                if mapped {
                    self.punch_mapped_outcomes
                        .with_label_values(&[outcome])
                        .inc();
                }
                if direct {
                    self.punch_time_to_direct
                        .with_label_values(&pair)
                        .observe(time_to_direct.as_secs_f64());
                }
            }
            RendezvousEvent::TcpOutcome {
                initiator_nat,
                responder_nat,
                technique,
                success,
            } => self
                .tcp_punch_attempts
                .with_label_values(&[
                    technique.as_str(),
                    if success { "success" } else { "failed" },
                    initiator_nat.as_str(),
                    responder_nat.as_str(),
                ])
                .inc(),
            RendezvousEvent::MappedCandidate { verified } => self
                .mapped_candidates
                .with_label_values(&[MAPPED_CHECK_OUTCOMES[usize::from(!verified)]])
                .inc(),
            RendezvousEvent::CrossNode(outcome) => self
                .cluster_introductions
                .with_label_values(&[outcome.as_str()])
                .inc(),
            // Carried out by the service loop and the cluster driver, not counted here.
            RendezvousEvent::ForgeSynAck(_) | RendezvousEvent::Cluster(_) => {}
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        render(&self.registry)
    }
}

/// Registers `gateway_build_info{version}` (always 1) in `registry`.
pub fn register_build_info(registry: &Registry) -> Result<(), MetricsError> {
    let build_info = IntGauge::with_opts(
        Opts::new(
            "gateway_build_info",
            "Always 1; labels carry the build's version",
        )
        .const_label("version", env!("CARGO_PKG_VERSION")),
    )?;
    build_info.set(1);
    registry.register(Box::new(build_info))?;
    Ok(())
}

/// Renders any registry in the Prometheus text format.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Largest HTTP request head accepted on the metrics endpoint.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client gets to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;

/// Binds the metrics listener (separately from serving, so bind errors stop start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` from `registry` (and a small index at `/`) until the task is
/// dropped. The daemon passes its [`Metrics::registry`]; the peer agent and `gateway
/// watch` pass their own.
///
/// A deliberately small HTTP/1.x responder: one request per connection, bounded head
/// size and time, a bounded number of connections.
pub async fn serve(listener: TcpListener, registry: Registry) {
    serve_with_health(listener, registry, None).await;
}

/// [`serve`], plus `GET /healthz` and `GET /readyz` answered from `health` (200 or
/// 503, with a line saying why): the daemon's metrics listener.
pub async fn serve_with_health(listener: TcpListener, registry: Registry, health: Option<Health>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Out of descriptors, accept fails until some close: say so once, not 20 times
    // a second (the relay's sockets are budgeted so this should not happen).
    let mut errors = crate::limits::AcceptErrors::new("metrics");
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => {
                errors.accepted();
                accepted
            }
            Err(e) => {
                errors.failed(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = respond(stream, &registry, health.as_ref()).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    registry: &Registry,
    health: Option<&Health>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&chunk[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let probe = |(ok, text): (bool, String)| {
        let status = if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        (status, "text/plain; charset=utf-8", text.into_bytes())
    };
    let (status, content_type, body): (&str, &str, Vec<u8>) = if !complete {
        ("400 Bad Request", "text/plain", b"bad request\n".to_vec())
    } else {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let mut parts = line.split(|&b| b == b' ');
        let method = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default();
        let path = target.split(|&b| b == b'?').next().unwrap_or_default();
        match (method, path) {
            (b"GET", b"/metrics") => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(registry),
            ),
            (b"GET", b"/healthz") if health.is_some() => {
                probe(health.map(Health::healthz).unwrap_or_default())
            }
            (b"GET", b"/readyz") if health.is_some() => {
                probe(health.map(Health::readyz).unwrap_or_default())
            }
            (b"GET", b"/") => (
                "200 OK",
                "text/plain; charset=utf-8",
                b"gateway: metrics at /metrics\n".to_vec(),
            ),
            (b"GET", _) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                b"only GET\n".to_vec(),
            ),
        }
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let metrics = Metrics::new().expect("metrics");
        let text = String::from_utf8(metrics.render()).expect("utf8");
        for family in metrics.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("gateway_"), "{name}");
        }
        assert!(
            text.contains("gateway_stun_datagrams_total{outcome=\"malformed\"} 0"),
            "{text}"
        );
        assert!(text.contains("gateway_ebpf_loaded 0"));
        // Every labelled series exists before its first event (dashboards' rate()).
        assert!(
            text.contains(
                "gateway_punch_time_to_direct_seconds_count{initiator_nat=\"none\",responder_nat=\"address_dependent\"} 0"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_and_refuses_the_rest() {
        let metrics = Metrics::new().expect("metrics");
        metrics.udp_received_datagrams.inc_by(7);
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = Health::new();
        let server = tokio::spawn(serve_with_health(
            listener,
            metrics.registry.clone(),
            Some(health.clone()),
        ));
        let get = |request: &'static str| async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            response
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("gateway_udp_received_datagrams_total 7"),
            "{ok}"
        );
        assert!(
            get("GET /nope HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        let ready = get("GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.ends_with("not ready: starting\n"), "{ready}");
        health.set_started();
        let ready = get("GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"),
            "{ready}"
        );
        let alive = get("GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(alive.starts_with("HTTP/1.1 200"), "{alive}");
        health.set_draining(true);
        let ready = get("GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(
            ready.starts_with("HTTP/1.1 503") && ready.contains("draining"),
            "{ready}"
        );
        assert!(
            get("POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
        server.abort();
    }
}
