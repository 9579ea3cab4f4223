//! Punch observability away from the server: the eBPF programs with a `/metrics`
//! endpoint and registry of their own, for the peer agent (`gateway peer
//! --ebpf-interface`) and for hosts that run no agent, such as a Linux NAT router
//! (`gateway watch`).
//!
//! The kernel decides per flow whether it punched or bounced (see
//! `gateway-ebpf/src/main.rs`); this module loads the programs, keeps the flow table
//! trimmed, and exports what they count.
use std::{net::SocketAddr, time::Duration};

use prometheus::{IntGauge, Registry};
use tokio::task::JoinHandle;

use crate::{
    ebpf::{AttachMode, EbpfError, EbpfProbe, WatchSpec},
    metrics::{self, MetricsError},
    proto::agent::AgentConfig,
};

/// Default for [`ObserveOptions::flow_idle_timeout`]: RFC 4787's shortest allowed UDP
/// mapping lifetime, after which a NAT may have forgotten the flow.
pub const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often idle flows are removed from the kernel's table.
const EXPIRY_PERIOD: Duration = Duration::from_secs(5);

/// What to observe and where to export it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObserveOptions {
    /// Interfaces to attach the programs to; none: no eBPF, metrics only.
    pub interfaces: Vec<String>,
    /// How to attach them.
    pub attach: AttachMode,
    /// What the programs watch (an agent adds its own socket's port).
    pub watch: WatchSpec,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Fail instead of running on without eBPF.
    pub require_ebpf: bool,
    /// Flows silent this long leave the flow table.
    pub flow_idle_timeout: Duration,
}

impl Default for ObserveOptions {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            attach: AttachMode::Auto,
            watch: WatchSpec::default(),
            metrics_listen: None,
            require_ebpf: false,
            flow_idle_timeout: DEFAULT_FLOW_IDLE_TIMEOUT,
        }
    }
}

/// Why observation could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// eBPF was required and could not be loaded or attached.
    #[error("eBPF is required but unavailable: {0}")]
    Ebpf(EbpfError),
    /// The metrics endpoint could not be set up.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

impl From<prometheus::Error> for ObserveError {
    fn from(e: prometheus::Error) -> Self {
        Self::Metrics(MetricsError::Registry(e))
    }
}

/// Running observation: the programs (when they loaded), the flow expiry task and the
/// metrics server. Dropping it stops the tasks and detaches the programs.
pub struct Observer {
    registry: Registry,
    probe: Option<EbpfProbe>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Binds the metrics listener, loads and attaches the programs, and starts
    /// serving. Without eBPF (not root, no kernel support, a binary built without
    /// the object) it logs why and runs on with `gateway_ebpf_loaded 0`, unless
    /// `require_ebpf` is set.
    pub async fn start(options: ObserveOptions) -> Result<Self, ObserveError> {
        let registry = Registry::new();
        metrics::register_build_info(&registry)?;
        let loaded = IntGauge::new(
            "gateway_ebpf_loaded",
            "1 when the eBPF programs are loaded and attached, 0 when running without them",
        )?;
        let attached = IntGauge::new(
            "gateway_ebpf_attached_interfaces",
            "Interfaces the eBPF programs are attached to",
        )?;
        registry.register(Box::new(loaded.clone()))?;
        registry.register(Box::new(attached.clone()))?;
        let listener = match options.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let mut tasks = Vec::new();
        let probe = if options.interfaces.is_empty() {
            if options.require_ebpf {
                return Err(ObserveError::Ebpf(EbpfError::Aya {
                    what: "no interface given".into(),
                    cause: "pass --ebpf-interface IFACE".into(),
                }));
            }
            None
        } else {
            match EbpfProbe::load(&options.watch, &options.interfaces, options.attach) {
                Ok(probe) => {
                    registry.register(Box::new(probe.collector()?))?;
                    loaded.set(1);
                    attached.set(i64::try_from(probe.interfaces().len()).unwrap_or(i64::MAX));
                    for (interface, program, via) in probe.attachments() {
                        tracing::info!(%interface, program, via = via.as_str(), "eBPF program attached");
                    }
                    tracing::info!(
                        interfaces = ?probe.interfaces(),
                        watch = ?probe.watching(),
                        "eBPF punch observers attached"
                    );
                    let table = probe.flow_table();
                    let idle = options.flow_idle_timeout;
                    tasks.push(tokio::spawn(async move {
                        let mut tick = tokio::time::interval(EXPIRY_PERIOD);
                        loop {
                            tick.tick().await;
                            let expired = table.expire(idle);
                            if expired > 0 {
                                tracing::debug!(expired, "idle punch flows expired");
                            }
                        }
                    }));
                    Some(probe)
                }
                Err(e) if options.require_ebpf => return Err(ObserveError::Ebpf(e)),
                Err(e) => {
                    tracing::warn!(
                        "eBPF punch observers unavailable, running without them (gateway_ebpf_loaded 0): {e}"
                    );
                    None
                }
            }
        };
        if let Some(listener) = listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(url = %format!("http://{addr}/metrics"), "metrics listening");
            }
            tasks.push(tokio::spawn(metrics::serve(listener, registry.clone())));
        }
        Ok(Self {
            registry,
            probe,
            tasks,
        })
    }

    /// The registry `/metrics` renders (add the caller's own metrics here).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The loaded programs, when they loaded.
    pub fn probe(&self) -> Option<&EbpfProbe> {
        self.probe.as_ref()
    }

    /// The loaded programs, to change what they watch (an agent's extra sockets).
    pub fn probe_mut(&mut self) -> Option<&mut EbpfProbe> {
        self.probe.as_mut()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(probe) = self.probe.take() {
            probe.detach();
        }
    }
}

/// The gateway endpoints an agent talks to besides its peers: its rendezvous
/// server, its discovery endpoints, and every port of the gateway's address (port 0:
/// the TURN relay's relayed addresses, whose ports are only known at run time). Their
/// flows are not punch flows; a relayed path is not counted as punched. The kernel
/// matches ignored endpoints whatever the protocol, so the server's entry also covers
/// the TCP connection `--tcp` keeps open to the gateway's TCP service (same address
/// and port) from the TCP punch port. Fallback gateway nodes (failover) are ignored
/// by address alone (port 0 covers their service and relay ports in one of the
/// kernel's few entries).
pub fn rendezvous_endpoints(agent: &AgentConfig) -> Vec<SocketAddr> {
    let mut endpoints = vec![agent.server, SocketAddr::new(agent.server.ip(), 0)];
    endpoints.extend(agent.discovery.iter().copied());
    for node in agent.servers().into_iter().skip(1) {
        let host = SocketAddr::new(node.ip(), 0);
        if !endpoints.contains(&host) {
            endpoints.push(host);
        }
    }
    endpoints
}

/// Starts observation for an agent whose punch socket is `local`: its port becomes a
/// UDP punch port, `tcp_local`'s port (the `--tcp` punch port, when TCP punching
/// runs) a TCP punch port, and `rendezvous` endpoints are ignored. `None` in, `None`
/// out.
pub async fn start_for_agent(
    options: Option<ObserveOptions>,
    local: SocketAddr,
    tcp_local: Option<SocketAddr>,
    rendezvous: Vec<SocketAddr>,
) -> Result<Option<Observer>, ObserveError> {
    let Some(options) = options else {
        return Ok(None);
    };
    Observer::start(agent_options(options, local, tcp_local, rendezvous))
        .await
        .map(Some)
}

/// `options` with an agent's ports watched and its gateway endpoints ignored.
fn agent_options(
    mut options: ObserveOptions,
    local: SocketAddr,
    tcp_local: Option<SocketAddr>,
    rendezvous: Vec<SocketAddr>,
) -> ObserveOptions {
    options.watch.punch_udp_ports.push(local.port());
    options
        .watch
        .punch_tcp_ports
        .extend(tcp_local.map(|a| a.port()));
    options.watch.ignored_remotes.extend(rendezvous);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_watches_its_udp_and_tcp_punch_ports_and_ignores_the_gateway() {
        let agent = AgentConfig::new(
            "192.0.2.1:3478".parse().expect("address"),
            crate::proto::rendezvous::client::PeerCredentials {
                username: "0:alice".into(),
                password: "secret".into(),
            },
        );
        let udp: SocketAddr = "0.0.0.0:40000".parse().expect("address");
        let tcp: SocketAddr = "0.0.0.0:40001".parse().expect("address");
        let options = agent_options(
            ObserveOptions::default(),
            udp,
            Some(tcp),
            rendezvous_endpoints(&agent),
        );
        assert_eq!(options.watch.punch_udp_ports, vec![40000]);
        assert_eq!(options.watch.punch_tcp_ports, vec![40001]);
        // The TCP mapping connection goes to the server's address and port.
        assert!(options.watch.ignored_remotes.contains(&agent.server));

        // Fallback nodes: every port of their address, once.
        let nodes = agent.clone().with_servers([
            "192.0.2.1:3478".parse().expect("address"),
            "192.0.2.2:3478".parse().expect("address"),
            "192.0.2.2:3479".parse().expect("address"),
        ]);
        let ignored = rendezvous_endpoints(&nodes);
        assert_eq!(
            ignored
                .iter()
                .filter(|e| e.ip() == "192.0.2.2".parse::<std::net::IpAddr>().expect("ip"))
                .collect::<Vec<_>>(),
            vec![&"192.0.2.2:0".parse::<SocketAddr>().expect("address")]
        );

        let without_tcp = agent_options(
            ObserveOptions::default(),
            udp,
            None,
            rendezvous_endpoints(&agent),
        );
        assert!(without_tcp.watch.punch_tcp_ports.is_empty());
    }
}
