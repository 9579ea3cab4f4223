//! The peer agent's driver (`gateway peer`): one UDP socket for rendezvous, probes
//! and data, the sans-IO [`Agent`] in between, optional forwarding of a local UDP
//! port over the punched path, and one status line per event on standard output.
use std::{future::Future, net::SocketAddr, time::Instant};

use tokio::net::UdpSocket;

use crate::proto::{
    agent::{Agent, AgentConfig, AgentEvent},
    rendezvous::client::Role,
};

/// How a local UDP port is carried over the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Listen here; what local applications send goes to the peer, and the peer's
    /// data goes back to the last local sender.
    Listen(SocketAddr),
    /// Deliver the peer's data to this address (from an ephemeral local socket), and
    /// carry its replies back.
    To(SocketAddr),
}

/// Options of one agent run.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// Local address of the agent's socket.
    pub bind: SocketAddr,
    /// Agent tunables (server, credentials, ...).
    pub agent: AgentConfig,
    /// Peer to connect to, if this side initiates.
    pub connect: Option<String>,
    /// Forwarding, if any.
    pub forward: Option<Forward>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A socket could not be opened.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The local address the kernel routes from toward `to` (a connected UDP socket sends
/// nothing).
async fn source_ip_towards(to: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .ok()?;
    let probe = UdpSocket::bind(any).await.ok()?;
    probe.connect(to).await.ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

fn status(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    options: PeerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PeerError> {
    let socket = UdpSocket::bind(options.bind)
        .await
        .map_err(|source| PeerError::Bind {
            addr: options.bind,
            source,
        })?;
    let local = socket.local_addr().map_err(|source| PeerError::Bind {
        addr: options.bind,
        source,
    })?;
    let forward_socket = match options.forward {
        Some(Forward::Listen(addr)) => Some(
            UdpSocket::bind(addr)
                .await
                .map_err(|source| PeerError::Bind { addr, source })?,
        ),
        Some(Forward::To(target)) => {
            let any = SocketAddr::new(
                if target.is_ipv4() {
                    [0, 0, 0, 0].into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                0,
            );
            Some(
                UdpSocket::bind(any)
                    .await
                    .map_err(|source| PeerError::Bind { addr: any, source })?,
            )
        }
        None => None,
    };
    let mut config = options.agent.clone();
    if config.host_candidates.is_empty() {
        if !local.ip().is_unspecified() {
            config.host_candidates.push(local);
        } else if let Some(ip) = source_ip_towards(config.server).await {
            // The address the kernel picks toward the gateway: our host candidate
            // (and how discovery tells "no NAT" apart).
            config
                .host_candidates
                .push(SocketAddr::new(ip, local.port()));
        }
    }
    status(format_args!("local {local} server {}", config.server));
    let start = Instant::now();
    let mut agent = Agent::new(config, start, rand::random());
    if let Some(peer) = &options.connect {
        agent.connect(peer, start);
    }
    // The peer whose path carries forwarded traffic.
    let mut remote_peer = options.connect.clone();
    let mut app_addr = match options.forward {
        Some(Forward::To(target)) => Some(target),
        _ => None,
    };
    let mut buf = vec![0u8; 65_535];
    let mut app_buf = vec![0u8; 65_535];
    tokio::pin!(shutdown);
    loop {
        let deadline = agent.poll_timeout();
        let forward_recv = async {
            match &forward_socket {
                Some(s) => s.recv_from(&mut app_buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep_until(deadline.into()) => agent.handle_timeout(Instant::now()),
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => agent.handle_datagram(Instant::now(), from, &buf[..len]),
                Err(e) => tracing::debug!(error = %e, "receive failed"),
            },
            received = forward_recv => match received {
                Ok((len, from)) => {
                    if matches!(options.forward, Some(Forward::Listen(_))) {
                        app_addr = Some(from);
                    }
                    let sent = remote_peer
                        .as_deref()
                        .is_some_and(|peer| agent.send_data(peer, &app_buf[..len]));
                    if !sent {
                        tracing::debug!("no direct path yet; dropped {len} bytes from {from}");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "forward receive failed"),
            },
        }
        while let Some(transmit) = agent.poll_transmit() {
            if let Err(e) = socket.send_to(&transmit.payload, transmit.to).await {
                tracing::debug!(error = %e, to = %transmit.to, "send failed");
            }
        }
        while let Some(event) = agent.poll_event() {
            match event {
                AgentEvent::Registered { mapped } => {
                    status(format_args!("registered public {mapped}"))
                }
                AgentEvent::NatClassified {
                    class,
                    port_preserved,
                } => status(format_args!(
                    "nat mapping {} port_preserved {port_preserved}",
                    class.as_str()
                )),
                AgentEvent::Refused { method, code } => {
                    status(format_args!("refused method 0x{method:03x} code {code}"))
                }
                AgentEvent::Introduced { peer_id, role } => {
                    let role = match role {
                        Role::Initiator => "initiator",
                        Role::Responder => "responder",
                    };
                    if remote_peer.is_none() {
                        remote_peer = Some(peer_id.clone());
                    }
                    status(format_args!("introduced peer {peer_id} role {role}"));
                }
                AgentEvent::PathUp {
                    peer_id,
                    remote,
                    elapsed,
                    probes,
                } => status(format_args!(
                    "path-up peer {peer_id} direct {remote} elapsed_ms {} probes {probes}",
                    elapsed.as_millis()
                )),
                AgentEvent::PunchFailed { peer_id, probes } => status(format_args!(
                    "punch-failed peer {peer_id} probes {probes} (no relay yet)"
                )),
                AgentEvent::PathDown { peer_id } => {
                    status(format_args!("path-down peer {peer_id}"))
                }
                AgentEvent::Data { peer_id, payload } => {
                    if remote_peer.as_deref() != Some(peer_id.as_str()) {
                        continue;
                    }
                    if let (Some(forward), Some(to)) = (&forward_socket, app_addr)
                        && let Err(e) = forward.send_to(&payload, to).await
                    {
                        tracing::debug!(error = %e, %to, "forward send failed");
                    }
                }
            }
        }
    }
}
