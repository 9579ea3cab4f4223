//! The peer agent as a library ([`PeerClient`], [`PeerPath`]) and as the
//! `gateway peer` command ([`run`]).
//!
//! One task owns the UDP socket, the TCP/TLS connections to the gateway
//! ([`crate::server_link`], used when UDP to it does not work) and the sans-IO
//! [`Agent`]; the client talks to it through channels. A [`PeerPath`] is
//! socket-like: `send` and `recv` whole datagrams to and from one peer, over
//! whatever path currently works: direct (punched) or through the gateway's TURN
//! relay ([`PathKind`] says which), transparently to users of the path.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};

use crate::{
    portmap::{UpnpMapping, upnp_map},
    proto::{
        Transport,
        agent::{
            Agent, AgentConfig, AgentEvent, NextStep, PortMapTarget, ServerChangeReason,
            TransportChangeReason,
        },
        portmap::{MappedTransport, PortMapEvent, ProtocolOutcome, REQUESTED_LIFETIME},
        rendezvous::client::Role,
    },
    server_link::{LinkNews, ServerTls},
};

/// Why the agent could not do something.
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
    /// No path came up in time.
    #[error("no path to {peer} within {timeout:?}")]
    Timeout {
        /// The peer asked for.
        peer: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The agent task has stopped.
    #[error("the peer agent has stopped")]
    Stopped,
    /// The gateway refused something retrying cannot fix (wrong or expired
    /// credentials): the agent stopped.
    #[error("{0}")]
    Refused(String),
    /// A gateway address (`HOST:PORT`) could not be resolved.
    #[error("cannot resolve server {server}: {source}")]
    Resolve {
        /// The address as given.
        server: String,
        /// Why.
        source: std::io::Error,
    },
    /// The eBPF observers or the agent's metrics endpoint could not start.
    #[error(transparent)]
    Observe(#[from] crate::observe::ObserveError),
}

/// How a path carries datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Straight between the two peers through both NATs (hole punched).
    Direct {
        /// The other peer's address as seen from here.
        remote: SocketAddr,
    },
    /// Through the gateway's TURN relay (punching failed or cannot work); the agent
    /// keeps trying to upgrade it to a direct path.
    Relayed {
        /// The other peer's address at the relay, or its relayed address.
        remote: SocketAddr,
    },
}

impl PathKind {
    fn new(remote: SocketAddr, relayed: bool) -> Self {
        if relayed {
            Self::Relayed { remote }
        } else {
            Self::Direct { remote }
        }
    }
}

enum Command {
    Connect {
        peer: String,
        reply: oneshot::Sender<PathKind>,
    },
    Attach {
        peer: String,
        data: mpsc::Sender<Vec<u8>>,
    },
    Send {
        peer: String,
        payload: Vec<u8>,
    },
    TcpReport {
        intro_id: u64,
        report: crate::tcp_punch::Report,
    },
    TcpSeq {
        intro_id: u64,
        isn: u32,
        to: SocketAddr,
        forge: bool,
    },
    /// Exit: delete the port mapping and the TURN allocation, then answer.
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// A running peer agent: registered with the gateway, ready to connect to peers and
/// to be connected to.
#[derive(Debug)]
pub struct PeerClient {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<AgentEvent>,
    local: SocketAddr,
    /// Local ports of extra sockets the driver opened (`true`) or closed (`false`),
    /// for the eBPF observers to watch; bounded, excess changes are dropped.
    socket_ports: mpsc::Receiver<(u16, bool)>,
}

/// A socket-like path to one peer.
#[derive(Debug)]
pub struct PeerPath {
    peer: String,
    kind: PathKind,
    commands: mpsc::UnboundedSender<Command>,
    data: mpsc::Receiver<Vec<u8>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Connect { peer, .. } => write!(f, "Connect({peer})"),
            Command::Attach { peer, .. } => write!(f, "Attach({peer})"),
            Command::Send { peer, payload } => write!(f, "Send({peer}, {} bytes)", payload.len()),
            Command::TcpReport { intro_id, report } => {
                write!(f, "TcpReport({intro_id:x}, {report:?})")
            }
            Command::TcpSeq { intro_id, to, .. } => write!(f, "TcpSeq({intro_id:x}, {to})"),
            Command::Close { .. } => f.write_str("Close"),
        }
    }
}

/// Datagrams buffered per path before new ones are dropped (as UDP would).
const PATH_QUEUE: usize = 1024;

impl PeerClient {
    /// Binds the agent's socket and starts it (it registers at once).
    pub async fn start(bind: SocketAddr, config: AgentConfig) -> Result<Self, PeerError> {
        Self::start_with_tls(bind, config, None).await
    }

    /// [`Self::start`] with a TLS client for `config.server_tls` (the gateway's
    /// `turns:` endpoint, the last transport the agent falls back to).
    pub async fn start_with_tls(
        bind: SocketAddr,
        mut config: AgentConfig,
        tls: Option<crate::server_link::ServerTls>,
    ) -> Result<Self, PeerError> {
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|source| PeerError::Bind { addr: bind, source })?;
        let local = socket
            .local_addr()
            .map_err(|source| PeerError::Bind { addr: bind, source })?;
        if config.host_candidates.is_empty() {
            if !local.ip().is_unspecified() {
                config.host_candidates.push(local);
            } else if let Some(ip) = source_ip_towards(config.server).await {
                // The address the kernel picks toward the gateway: our host
                // candidate (and how discovery tells "no NAT" apart).
                config
                    .host_candidates
                    .push(SocketAddr::new(ip, local.port()));
            }
        }
        if let Some(target) = &mut config.port_mapping
            && target.port == 0
        {
            target.port = local.port();
        }
        // UPnP maps toward the LAN address the router sees us at.
        let upnp = config
            .port_mapping
            .filter(|_| config.upnp)
            .map(|t| SocketAddr::new(t.client, t.port));
        let upnp_tcp = config
            .tcp_port_mapping
            .filter(|_| config.upnp)
            .map(|t| SocketAddr::new(t.client, t.port));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (ports_tx, socket_ports) = mpsc::channel(SOCKET_PORT_CHANGES);
        let agent = Agent::new(config, Instant::now(), rand::random());
        let links = crate::server_link::ServerLinks::new(tls);
        tokio::spawn(drive(
            socket,
            agent,
            links,
            commands_rx,
            events_tx,
            ports_tx,
            [upnp, upnp_tcp],
        ));
        Ok(Self {
            commands,
            events,
            local,
            socket_ports,
        })
    }

    /// [`Self::start`] with several gateway nodes, in failover order (`servers`
    /// replaces `config`'s; see [`AgentConfig::with_servers`]): the agent registers
    /// with the first and moves on when its node falls silent.
    pub async fn start_with_servers(
        bind: SocketAddr,
        servers: &[SocketAddr],
        config: AgentConfig,
    ) -> Result<Self, PeerError> {
        Self::start(bind, config.with_servers(servers.iter().copied())).await
    }

    /// The agent socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Asks the gateway for an introduction to `peer` and waits for a path.
    pub async fn connect(&self, peer: &str, timeout: Duration) -> Result<PeerPath, PeerError> {
        let (reply, path_up) = oneshot::channel();
        self.commands
            .send(Command::Connect {
                peer: peer.to_owned(),
                reply,
            })
            .map_err(|_| PeerError::Stopped)?;
        let kind = tokio::time::timeout(timeout, path_up)
            .await
            .map_err(|_| PeerError::Timeout {
                peer: peer.to_owned(),
                timeout,
            })?
            .map_err(|_| PeerError::Stopped)?;
        self.path(peer, kind)
    }

    /// A path to `peer`, which must be up (e.g. after a `PathUp` event).
    pub fn path(&self, peer: &str, kind: PathKind) -> Result<PeerPath, PeerError> {
        let (data_tx, data) = mpsc::channel(PATH_QUEUE);
        self.commands
            .send(Command::Attach {
                peer: peer.to_owned(),
                data: data_tx,
            })
            .map_err(|_| PeerError::Stopped)?;
        Ok(PeerPath {
            peer: peer.to_owned(),
            kind,
            commands: self.commands.clone(),
            data,
        })
    }

    /// Before exiting: deletes the port mapping (waiting up to `wait` for the
    /// router's answer) and releases the TURN allocation, so neither outlives the
    /// agent until it expires.
    pub async fn close(&self, wait: Duration) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).is_ok() {
            let _ = tokio::time::timeout(wait, done).await;
        }
    }

    /// The next event (registration, discovery, introductions, paths, and data of
    /// peers that have no [`PeerPath`]); `None` once the agent stopped.
    pub async fn next_event(&mut self) -> Option<AgentEvent> {
        self.events.recv().await
    }
}

impl PeerPath {
    /// The peer at the other end.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// How the path carries datagrams.
    pub fn kind(&self) -> PathKind {
        self.kind
    }

    /// Sends one datagram to the peer (dropped, like UDP, while no path is up).
    pub fn send(&self, payload: &[u8]) -> Result<(), PeerError> {
        self.commands
            .send(Command::Send {
                peer: self.peer.clone(),
                payload: payload.to_vec(),
            })
            .map_err(|_| PeerError::Stopped)
    }

    /// Receives the next datagram from the peer; `None` once the agent stopped.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.data.recv().await
    }
}

/// The task owning the socket and the agent.
/// How many extra-socket port changes wait for the observer (two birthday attempts'
/// worth); more are dropped (a port then goes unwatched).
const SOCKET_PORT_CHANGES: usize = 2 * 1024;

async fn drive(
    socket: UdpSocket,
    mut agent: Agent,
    mut links: crate::server_link::ServerLinks,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<AgentEvent>,
    socket_ports: mpsc::Sender<(u16, bool)>,
    [upnp_local, upnp_tcp_local]: [Option<SocketAddr>; 2],
) {
    let mut buf = vec![0u8; 65_535];
    let mut waiting: HashMap<String, Vec<oneshot::Sender<PathKind>>> = HashMap::new();
    let mut attached: HashMap<String, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut extra = ExtraSockets::new(socket.local_addr().ok(), socket_ports);
    let mut upnp = Upnp::start(upnp_local, MappedTransport::Udp);
    let mut upnp_tcp = Upnp::start(upnp_tcp_local, MappedTransport::Tcp);
    // At exit: who to answer once the mappings are deleted, and by when at most.
    let mut closing: Option<(oneshot::Sender<()>, Instant)> = None;
    let mut closed = false;
    // Which mappings' deletion at exit was confirmed (no TCP client: nothing to wait for).
    let mut udp_closed = false;
    let mut tcp_closed = !agent.has_tcp_port_mapping();
    loop {
        let deadline = agent.poll_timeout();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let renew_at = upnp.renew_at();
        let renew = async {
            match renew_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let renew_tcp_at = upnp_tcp.renew_at();
        let renew_tcp = async {
            match renew_tcp_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let close_by = closing.as_ref().map(|(_, at)| *at);
        let give_up = async {
            match close_by {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => agent.handle_timeout(Instant::now()),
            () = renew => upnp.renew(),
            () = give_up => closed = true,
            () = renew_tcp => upnp_tcp.renew(),
            Some(news) = upnp.news.recv() => {
                upnp.handle(&mut agent, news, closing.is_none());
            }
            Some(news) = upnp_tcp.news.recv() => {
                upnp_tcp.handle(&mut agent, news, closing.is_none());
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => agent.handle_datagram(Instant::now(), from, &buf[..len]),
                Err(e) => tracing::debug!(error = %e, "receive failed"),
            },
            Some(news) = links.news.recv() => match news {
                LinkNews::Frame { transport, from, frame } => {
                    agent.handle_stream_frame(Instant::now(), transport, from, &frame);
                }
                LinkNews::Closed { transport, epoch, why } => {
                    if links.closed(transport, epoch) {
                        tracing::debug!(transport = transport.as_str(), %why, "gateway connection closed");
                        agent.handle_stream_closed(Instant::now(), transport);
                    }
                }
            },
            Some((slot, from, datagram)) = extra.received.recv() => {
                agent.handle_datagram_on(Instant::now(), slot, from, &datagram);
            }
            command = commands.recv() => match command {
                // Every client handle is gone: stop.
                None => return,
                Some(Command::Connect { peer, reply }) => {
                    match agent.path(&peer) {
                        Some(remote) => {
                            let relayed = agent.path_relayed(&peer).unwrap_or(false);
                            let _ = reply.send(PathKind::new(remote, relayed));
                        }
                        None => {
                            agent.connect(&peer, Instant::now());
                            waiting.entry(peer).or_default().push(reply);
                        }
                    }
                }
                Some(Command::Attach { peer, data }) => { attached.insert(peer, data); }
                Some(Command::Send { peer, payload }) => {
                    if !agent.send_data(&peer, &payload) {
                        tracing::debug!(%peer, "no path yet; datagram dropped");
                    }
                }
                Some(Command::TcpReport { intro_id, report }) => agent.report_tcp(
                    Instant::now(),
                    intro_id,
                    report.technique,
                    report.connected,
                    report.elapsed,
                    report.attempts,
                ),
                Some(Command::TcpSeq { intro_id, isn, to, forge }) => {
                    agent.send_tcp_seq(Instant::now(), intro_id, isn, Some(to), forge);
                }
                Some(Command::Close { reply }) => match &mut closing {
                    // Already closing (the agent stopped): answer this caller instead.
                    Some((waiting, _)) => *waiting = reply,
                    None => {
                        let now = Instant::now();
                        agent.shut_down(now);
                        for upnp in [&mut upnp, &mut upnp_tcp] {
                            if let Some(mapping) = upnp.held.take() {
                                upnp.delete(mapping);
                            }
                        }
                        closing = Some((reply, now + CLOSE_WAIT));
                    }
                },
            },
        }
        if agent.stopped() && closing.is_none() {
            // Wrong credentials: the agent ends, but first deletes what it holds (the
            // port mapping would stay for two hours).
            let now = Instant::now();
            agent.shut_down(now);
            for upnp in [&mut upnp, &mut upnp_tcp] {
                if let Some(mapping) = upnp.held.take() {
                    upnp.delete(mapping);
                }
            }
            closing = Some((oneshot::channel().0, now + CLOSE_WAIT));
        }
        // UDP from the socket's own address (`from_local` keeps its default), or a
        // message for the gateway on a TCP or TLS connection.
        while let Some(transmit) = agent.poll_transmit() {
            if transmit.transport.is_stream() {
                links.send(transmit.to, transmit.transport, transmit.payload);
                continue;
            }
            let socket = match transmit.socket {
                0 => &socket,
                slot => match extra.get_or_open(slot) {
                    Some(s) => s,
                    None => continue,
                },
            };
            let default_ttl = match transmit.ttl {
                Some(ttl) => match socket.ttl() {
                    Ok(default) => socket.set_ttl(u32::from(ttl)).ok().map(|()| default),
                    Err(_) => None,
                },
                None => None,
            };
            if let Err(e) = socket.send_to(&transmit.payload, transmit.to).await {
                tracing::debug!(error = %e, to = %transmit.to, "send failed");
            }
            if let Some(default) = default_ttl
                && let Err(e) = socket.set_ttl(default)
            {
                tracing::warn!(error = %e, "cannot restore the socket's TTL");
            }
        }
        while let Some(slot) = agent.poll_released_socket() {
            extra.close(slot);
        }
        let stopped = agent.stopped();
        while let Some(event) = agent.poll_event() {
            match &event {
                AgentEvent::TransportChanged { .. } => {
                    // A connection the agent left (and holds no allocation on) ends.
                    links.retain(|transport| agent.uses_stream(transport));
                }
                AgentEvent::PortMapping(PortMapEvent::Closed) => udp_closed = true,
                AgentEvent::TcpPortMapping(PortMapEvent::Closed) => tcp_closed = true,
                AgentEvent::PathUp {
                    peer_id,
                    remote,
                    relayed,
                    ..
                } => {
                    for reply in waiting.remove(peer_id).unwrap_or_default() {
                        let _ = reply.send(PathKind::new(*remote, *relayed));
                    }
                }
                AgentEvent::Data { peer_id, .. } if attached.contains_key(peer_id) => {
                    // Hand the payload over without copying it.
                    let AgentEvent::Data { peer_id, payload } = event else {
                        continue;
                    };
                    if let Some(path) = attached.get(&peer_id)
                        && path.try_send(payload).is_err()
                        && path.is_closed()
                    {
                        attached.remove(&peer_id);
                    }
                    continue;
                }
                _ => {}
            }
            if events.send(event).is_err() {
                // Nobody reads events any more; keep serving the paths.
            }
        }
        closed |= udp_closed && tcp_closed;
        if closed && let Some((reply, _)) = closing.take() {
            // Give the blocking UPnP deletes (if any) their moment, then answer.
            upnp.finish().await;
            upnp_tcp.finish().await;
            let _ = reply.send(());
            return;
        }
        if stopped && closing.is_none() {
            // (Not reached: a stopped agent is closing, above.) Callers waiting for a
            // path see the agent stop; the events (the refusal) were handed over.
            return;
        }
    }
}

/// How long the agent waits at exit for the router to confirm the mapping's
/// deletion (a silent router costs this, bounded; the client itself gives up after
/// its retries).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a blocking UPnP-IGD task reports.
enum UpnpNews {
    /// The first attempt's result.
    Mapped(Result<UpnpMapping, ProtocolOutcome>),
    /// A renewal's result (the mapping comes back to the driver).
    Renewed(Result<UpnpMapping, ProtocolOutcome>),
}

/// The driver's UPnP-IGD side for one transport's mapping: SSDP and SOAP are
/// blocking (igd-next), so each step runs on a blocking thread and reports through
/// `news`.
struct Upnp {
    /// The transport mapped (UDP: the agent's socket; TCP: the punching port).
    transport: MappedTransport,
    news: mpsc::UnboundedReceiver<UpnpNews>,
    sender: mpsc::UnboundedSender<UpnpNews>,
    /// The mapping the agent took (renewed at half its lease, deleted at exit).
    held: Option<UpnpMapping>,
    /// Deletions under way (awaited briefly at exit).
    deleting: Vec<tokio::task::JoinHandle<()>>,
}

impl Upnp {
    /// Starts the first attempt when `local` (the LAN address and port) is given.
    fn start(local: Option<SocketAddr>, transport: MappedTransport) -> Self {
        let (sender, news) = mpsc::unbounded_channel();
        if let Some(local) = local {
            let out = sender.clone();
            tokio::task::spawn_blocking(move || {
                let result = upnp_map(local, transport, REQUESTED_LIFETIME);
                let _ = out.send(UpnpNews::Mapped(result));
            });
        }
        Self {
            transport,
            news,
            sender,
            held: None,
            deleting: Vec::new(),
        }
    }

    fn renew_at(&self) -> Option<Instant> {
        self.held.as_ref().map(UpnpMapping::renew_at)
    }

    /// Hands a blocking task's result to the agent's client for this transport;
    /// keeps the mapping it took (unless exiting: `running` false) and deletes one
    /// it did not.
    fn handle(&mut self, agent: &mut Agent, news: UpnpNews, running: bool) {
        let now = Instant::now();
        let transport = self.transport;
        match news {
            UpnpNews::Mapped(Ok(mapping)) => {
                let held = agent.port_mapping_of(transport);
                if agent.handle_upnp_mapping_of(now, transport, Ok(mapping.mapping)) && running {
                    self.held = Some(mapping);
                } else if held.is_some_and(|h| h.external == mapping.mapping.external) {
                    // The router gave UPnP the very entry PCP or NAT-PMP holds
                    // (miniupnpd does): deleting it would delete that one.
                    tracing::debug!(external = %mapping.mapping.external, "UPnP renewed the held mapping");
                } else {
                    // PCP or NAT-PMP won (or we are exiting): the router keeps one.
                    self.delete(mapping);
                }
            }
            UpnpNews::Mapped(Err(outcome)) => {
                agent.handle_upnp_mapping_of(now, transport, Err(outcome));
            }
            UpnpNews::Renewed(Ok(mapping)) => {
                agent.handle_upnp_renewal_of(now, transport, Ok(mapping.mapping));
                self.held = Some(mapping);
            }
            UpnpNews::Renewed(Err(outcome)) => {
                // The lease may be gone: the agent stops announcing it
                // (`port-mapping lost ...`) and asks again.
                tracing::warn!(%outcome, ?transport, "cannot renew the UPnP mapping");
                self.held = None;
                agent.handle_upnp_renewal_of(now, transport, Err(outcome));
            }
        }
    }

    /// Renews the held mapping on a blocking thread.
    fn renew(&mut self) {
        let Some(mut mapping) = self.held.take() else {
            return;
        };
        let out = self.sender.clone();
        tokio::task::spawn_blocking(move || {
            let result = mapping.renew().map(|_| mapping);
            let _ = out.send(UpnpNews::Renewed(result));
        });
    }

    /// Deletes a mapping on a blocking thread (best effort; awaited at exit).
    fn delete(&mut self, mapping: UpnpMapping) {
        self.deleting.retain(|task| !task.is_finished());
        self.deleting.push(tokio::task::spawn_blocking(move || {
            if let Err(outcome) = mapping.delete() {
                tracing::warn!(%outcome, "cannot delete the UPnP mapping");
            }
        }));
    }

    /// At exit: the held mapping's deletion, waited for briefly.
    async fn finish(&mut self) {
        if let Some(mapping) = self.held.take() {
            self.delete(mapping);
        }
        for task in self.deleting.drain(..) {
            let _ = tokio::time::timeout(CLOSE_WAIT, task).await;
        }
    }
}

/// The agent's extra sockets (birthday punching), opened on first use: each has a
/// task that hands what it receives to the driver's loop.
struct ExtraSockets {
    /// Where the agent's own socket is bound (extra sockets take its address).
    local: Option<SocketAddr>,
    open: HashMap<u32, (std::sync::Arc<UdpSocket>, tokio::task::JoinHandle<()>)>,
    sender: mpsc::Sender<(u32, SocketAddr, Vec<u8>)>,
    received: mpsc::Receiver<(u32, SocketAddr, Vec<u8>)>,
    /// Where opened and closed local ports are announced (see `PeerClient`).
    ports: mpsc::Sender<(u16, bool)>,
}

impl ExtraSockets {
    fn new(local: Option<SocketAddr>, ports: mpsc::Sender<(u16, bool)>) -> Self {
        let (sender, received) = mpsc::channel(1024);
        Self {
            local,
            open: HashMap::new(),
            sender,
            received,
            ports,
        }
    }

    /// The socket for `slot`, opened now if needed (None if it cannot be: the
    /// datagram is dropped and the attempt goes on with the others).
    fn get_or_open(&mut self, slot: u32) -> Option<&UdpSocket> {
        if !self.open.contains_key(&slot) {
            let local = self.local?;
            let bind = SocketAddr::new(local.ip(), 0);
            let socket = match std::net::UdpSocket::bind(bind)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .and_then(UdpSocket::from_std)
            {
                Ok(s) => std::sync::Arc::new(s),
                Err(e) => {
                    tracing::debug!(error = %e, %bind, "cannot open an extra socket");
                    return None;
                }
            };
            if let Ok(addr) = socket.local_addr() {
                let _ = self.ports.try_send((addr.port(), true));
            }
            let reader = socket.clone();
            let sender = self.sender.clone();
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                while let Ok((len, from)) = reader.recv_from(&mut buf).await {
                    let datagram = buf.get(..len).unwrap_or_default().to_vec();
                    if sender.send((slot, from, datagram)).await.is_err() {
                        return;
                    }
                }
            });
            self.open.insert(slot, (socket, task));
        }
        self.open.get(&slot).map(|(s, _)| &**s)
    }

    fn close(&mut self, slot: u32) {
        if let Some((socket, task)) = self.open.remove(&slot) {
            task.abort();
            if let Ok(addr) = socket.local_addr() {
                let _ = self.ports.try_send((addr.port(), false));
            }
        }
    }
}

/// `--server-tls HOST[:PORT]`: the name its certificate must carry and the address
/// to connect to (port 443 when none is given; the first address HOST resolves to).
pub fn resolve_tls_endpoint(spec: &str) -> Result<(String, SocketAddr), PeerError> {
    use std::net::ToSocketAddrs;
    let bad = |why: &str| PeerError::Resolve {
        server: spec.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned()),
    };
    let (host, port) = if let Ok(addr) = spec.parse::<SocketAddr>() {
        (addr.ip().to_string(), addr.port())
    } else if let Ok(ip) = spec.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        (ip.to_string(), 443)
    } else {
        match spec.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (
                host.to_owned(),
                port.parse().map_err(|_| bad("the port is not a number"))?,
            ),
            _ => (spec.to_owned(), 443),
        }
    };
    if host.is_empty() {
        return Err(bad("no host name"));
    }
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))?;
    Ok((host, addr))
}

/// Resolves `gateway peer --server` values into gateway nodes, in order: an IP
/// literal (`192.0.2.10:3478`, `[2001:db8::1]:3478`) is one node, as before; a
/// `HOST:PORT` whose name resolves to several addresses gives one node per address,
/// in the resolver's order. An address given twice counts once (its first place).
pub fn resolve_servers(specs: &[String]) -> Result<Vec<SocketAddr>, PeerError> {
    use std::net::ToSocketAddrs;
    let mut servers = Vec::new();
    for spec in specs {
        let resolved: Vec<SocketAddr> = match spec.parse::<SocketAddr>() {
            Ok(addr) => vec![addr],
            Err(_) => spec
                .to_socket_addrs()
                .map_err(|source| PeerError::Resolve {
                    server: spec.clone(),
                    source,
                })?
                .collect(),
        };
        if resolved.is_empty() {
            return Err(PeerError::Resolve {
                server: spec.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            });
        }
        for addr in resolved {
            if !servers.contains(&addr) {
                servers.push(addr);
            }
        }
    }
    Ok(servers)
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

/// How `gateway peer` carries a local UDP port over the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Listen here; what local applications send goes to the peer, and the peer's
    /// data goes back to the last local sender.
    Listen(SocketAddr),
    /// Deliver the peer's data to this address (from an ephemeral local socket), and
    /// carry its replies back.
    To(SocketAddr),
}

/// How `gateway peer --tcp` carries a local TCP port over the punched connection
/// (one application connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpForward {
    /// Accept one local connection here and splice it to the punched connection.
    Listen(SocketAddr),
    /// Connect here once the punched connection is up and splice the two.
    To(SocketAddr),
}

/// TCP hole punching options of `gateway peer` (`--tcp`).
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// The technique(s) to try; the other side must use the same.
    pub mode: crate::proto::tcp_punch::TcpMode,
    /// The schedule's tunables.
    pub config: crate::proto::tcp_punch::TcpPunchConfig,
    /// The local TCP port to carry, if any.
    pub forward: Option<TcpForward>,
}

/// Options of `gateway peer`.
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
    /// eBPF punch observers on this host and the agent's own `/metrics`, if asked.
    pub observe: Option<crate::observe::ObserveOptions>,
    /// TCP hole punching on every introduction, if asked.
    pub tcp: Option<TcpOptions>,
    /// Ask the default router for a mapping of the agent's port (PCP, NAT-PMP,
    /// UPnP-IGD) and announce it as a candidate; `--no-port-mapping` turns it off.
    pub port_mapping: bool,
    /// The TLS client for `agent.server_tls` (`--server-tls`, `--tls-ca`).
    pub tls: Option<ServerTls>,
}

/// Where `gateway peer` asks for a port mapping: the default router of the
/// gateway's address family and this host's address toward it (a connected UDP
/// socket's local address: no packet is sent), or why there is none.
async fn port_mapping_target(
    server: SocketAddr,
    bind: SocketAddr,
) -> Result<PortMapTarget, &'static str> {
    if !server.is_ipv4() {
        return Err("IPv6 gateway (no NAT to map)");
    }
    if server.ip().is_loopback() || bind.ip().is_loopback() {
        // No NAT between: and nothing goes to the host's real router.
        return Err("loopback gateway (no NAT to map)");
    }
    // A procfs read: in memory, never blocks for long.
    let routes =
        std::fs::read_to_string("/proc/net/route").map_err(|_| "cannot read /proc/net/route")?;
    let router = default_ipv4_router(&routes).ok_or("no default IPv4 route")?;
    let client = if bind.ip().is_unspecified() {
        source_ip_towards(SocketAddr::new(router.into(), 5351))
            .await
            .ok_or("no local address toward the router")?
    } else {
        bind.ip()
    };
    Ok(PortMapTarget {
        router: router.into(),
        client,
        port: 0,
    })
}

/// The gateway of the default IPv4 route with the lowest metric in the text of
/// `/proc/net/route` (hexadecimal fields, addresses in host byte order as written
/// by a little-endian kernel; flags must say up and gateway).
fn default_ipv4_router(routes: &str) -> Option<std::net::Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(fields.get(i)?, 16).ok();
            let (destination, gateway, flags, metric, mask) =
                (hex(1)?, hex(2)?, hex(3)?, hex(6)?, hex(7)?);
            (destination == 0
                && mask == 0
                && gateway != 0
                && flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY)
                .then(|| (metric, std::net::Ipv4Addr::from(gateway.to_ne_bytes())))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, router)| router)
}

/// What a TCP punching task tells `run`.
enum TcpNews {
    Report {
        intro_id: u64,
        report: crate::tcp_punch::Report,
    },
    Up {
        peer: String,
        intro_id: u64,
        punched: crate::tcp_punch::Punched,
    },
    Failed {
        peer: String,
        intro_id: u64,
    },
    /// NATBlaster: our ISN, to send to the other side through the gateway
    /// (server-assisted, `forge`: for the gateway to forge the SYN-ACKs).
    SeqOut {
        intro_id: u64,
        isn: u32,
        to: SocketAddr,
        forge: bool,
    },
    Spliced {
        peer: String,
        result: std::io::Result<(u64, u64)>,
    },
}

fn status(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `gateway peer`: runs the agent with status lines on stdout until `shutdown`.
pub async fn run(
    mut options: PeerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PeerError> {
    // TCP punching: learn the TCP mapping first (it goes into every Register), and
    // keep the connection that made it open (it holds the mapping).
    let mut tcp_local = None;
    let mut _tcp_gateway = None;
    if options.tcp.is_some() {
        match crate::tcp_punch::learn_reflexive(options.agent.server).await {
            Ok((stream, local, mapped)) => {
                status(format_args!("tcp-mapped local {local} public {mapped}"));
                options.agent.tcp_candidates = vec![mapped];
                tcp_local = Some(local);
                _tcp_gateway = Some(stream);
            }
            Err(e) => status(format_args!("tcp-unavailable error {e}")),
        }
    }
    let mut tcp_forward_listener = match options.tcp.as_ref().and_then(|t| t.forward) {
        Some(TcpForward::Listen(addr)) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| PeerError::Bind { addr, source })?,
        ),
        _ => None,
    };
    let (tcp_news_tx, mut tcp_news) = mpsc::unbounded_channel::<TcpNews>();
    let forward_socket = match options.forward {
        Some(Forward::Listen(addr)) => Some(
            UdpSocket::bind(addr)
                .await
                .map_err(|source| PeerError::Bind { addr, source })?,
        ),
        Some(Forward::To(target)) => {
            let any: SocketAddr = if target.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            Some(
                UdpSocket::bind(any)
                    .await
                    .map_err(|source| PeerError::Bind { addr: any, source })?,
            )
        }
        None => None,
    };
    // With TCP punching on, the TCP mapping's lines say why there is none too.
    let tcp_none = |why: &str| {
        if options.tcp.is_some() {
            status(format_args!("port-mapping tcp none: {why}"));
        }
    };
    if options.port_mapping {
        match port_mapping_target(options.agent.server, options.bind).await {
            Ok(target) => {
                options.agent.port_mapping = Some(target);
                options.agent.upnp = true;
                // The TCP punching port (bound with SO_REUSEPORT, its listener up
                // during each attempt) gets a TCP mapping of its own.
                match tcp_local {
                    Some(local) => {
                        options.agent.tcp_port_mapping = Some(PortMapTarget {
                            port: local.port(),
                            ..target
                        });
                    }
                    None => tcp_none("no TCP punching port (tcp-unavailable)"),
                }
            }
            Err(why) => {
                status(format_args!("port-mapping none: {why}"));
                tcp_none(why);
            }
        }
    } else {
        status(format_args!(
            "port-mapping none: turned off (--no-port-mapping)"
        ));
        tcp_none("turned off (--no-port-mapping)");
    }
    let servers = options.agent.servers();
    let rendezvous = crate::observe::rendezvous_endpoints(&options.agent);
    let tls_endpoint = options.agent.server_tls;
    let mut client = PeerClient::start_with_tls(options.bind, options.agent, options.tls).await?;
    let fallback: Vec<String> = servers[1..].iter().map(ToString::to_string).collect();
    status(format_args!(
        "local {} server {}{}{}",
        client.local_addr(),
        servers[0],
        if fallback.is_empty() {
            String::new()
        } else {
            format!(" fallback {}", fallback.join(","))
        },
        tls_endpoint
            .map(|t| format!(" tls {t}"))
            .unwrap_or_default()
    ));
    let mut lines = StatusLines::default();
    // Detaches the programs when `run` returns.
    let mut observer = crate::observe::start_for_agent(
        options.observe,
        client.local_addr(),
        tcp_local,
        rendezvous,
    )
    .await?;
    let path_metrics = match &observer {
        Some(observer) => Some(PathMetrics::new(observer.registry()).map_err(|e| {
            PeerError::Observe(crate::observe::ObserveError::Metrics(
                crate::metrics::MetricsError::Registry(e),
            ))
        })?),
        None => None,
    };
    if let Some(peer) = &options.connect {
        // Start asking now; the path is picked up from the PathUp event below.
        let (reply, _) = oneshot::channel();
        client
            .commands
            .send(Command::Connect {
                peer: peer.clone(),
                reply,
            })
            .map_err(|_| PeerError::Stopped)?;
    }
    // The path that carries forwarded traffic: to the peer we connect to, or the
    // first peer that reaches us.
    let mut path: Option<PeerPath> = None;
    let mut app_addr = match options.forward {
        Some(Forward::To(target)) => Some(target),
        _ => None,
    };
    let mut app_buf = vec![0u8; 65_535];
    // Punch tasks and splices end with `run`.
    let mut tcp_tasks = tokio::task::JoinSet::new();
    let mut tcp_spliced = false;
    // Peers with a TCP attempt under way or a punched connection open: a later
    // introduction (a UDP re-punch, a relay upgrade) starts no second attempt.
    let mut tcp_busy: std::collections::HashSet<String> = std::collections::HashSet::new();
    // NATBlaster attempts waiting for the other side's ISN, by introduction.
    let mut tcp_seq_waiting: HashMap<u64, std::sync::mpsc::Sender<crate::tcp_punch::SeqNews>> =
        HashMap::new();
    // The extra sockets' ports, for the observers (taken out of the client, which the
    // loop below also borrows).
    let mut socket_ports = std::mem::replace(&mut client.socket_ports, mpsc::channel(1).1);
    tokio::pin!(shutdown);
    loop {
        let forward_recv = async {
            match &forward_socket {
                Some(s) => s.recv_from(&mut app_buf).await,
                None => std::future::pending().await,
            }
        };
        let path_recv = async {
            match path.as_mut() {
                Some(p) => p.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => {
                // Delete the port mapping and the TURN allocation before exiting.
                client.close(CLOSE_WAIT + Duration::from_millis(500)).await;
                // What the agent said while closing (the mapping deleted).
                while let Ok(event) = client.events.try_recv() {
                    if let Some(line) = lines.line(&event) {
                        status(format_args!("{line}"));
                    }
                }
                return Ok(());
            }
            Some(first) = socket_ports.recv() => {
                // Birthday punching's extra sockets are punch sockets too: watch their
                // ports while they are open (all changes waiting, in one update).
                let mut changes = vec![first];
                while let Ok(change) = socket_ports.try_recv() {
                    changes.push(change);
                }
                if let Some(probe) = observer.as_mut().and_then(crate::observe::Observer::probe_mut) {
                    let add: Vec<u16> = changes.iter().filter(|c| c.1).map(|c| c.0).collect();
                    let remove: Vec<u16> = changes.iter().filter(|c| !c.1).map(|c| c.0).collect();
                    if let Err(e) = probe.update_punch_udp_ports(&add, &remove) {
                        tracing::warn!(error = %e, "cannot watch the extra sockets' ports");
                    }
                }
            }
            // Reap finished punch and splice tasks (their results come as news).
            Some(_) = tcp_tasks.join_next() => {}
            Some(news) = tcp_news.recv() => match news {
                TcpNews::Report { intro_id, report } => {
                    client
                        .commands
                        .send(Command::TcpReport { intro_id, report })
                        .map_err(|_| PeerError::Stopped)?;
                }
                TcpNews::SeqOut { intro_id, isn, to, forge } => {
                    client
                        .commands
                        .send(Command::TcpSeq { intro_id, isn, to, forge })
                        .map_err(|_| PeerError::Stopped)?;
                }
                TcpNews::Up { peer, intro_id, punched } => {
                    tcp_seq_waiting.remove(&intro_id);
                    status(format_args!(
                        "tcp-path-up peer {peer} technique {} remote {} elapsed_ms {}{}",
                        punched.technique.cli_name(),
                        punched.remote,
                        punched.elapsed.as_millis(),
                        punched.step.map(|s| format!(" step {}", s.as_str())).unwrap_or_default()
                    ));
                    // One forwarded connection: the first punched connection gets it.
                    let forward = if tcp_spliced {
                        None
                    } else {
                        options.tcp.as_ref().and_then(|t| t.forward)
                    };
                    let listener = match forward {
                        Some(TcpForward::Listen(_)) => tcp_forward_listener.take(),
                        _ => None,
                    };
                    tcp_spliced |= forward.is_some();
                    let news = tcp_news_tx.clone();
                    tcp_tasks.spawn(async move {
                        let result = splice(punched.stream, forward, listener).await;
                        let _ = news.send(TcpNews::Spliced { peer, result });
                    });
                }
                TcpNews::Failed { peer, intro_id } => {
                    tcp_busy.remove(&peer);
                    tcp_seq_waiting.remove(&intro_id);
                    let mode = options.tcp.as_ref().map(|t| match t.mode {
                        crate::proto::tcp_punch::TcpMode::Auto => "auto",
                        crate::proto::tcp_punch::TcpMode::Only(t) => t.cli_name(),
                    });
                    status(format_args!(
                        "tcp-punch-failed peer {peer} technique {}",
                        mode.unwrap_or("none")
                    ));
                }
                TcpNews::Spliced { peer, result } => {
                    tcp_busy.remove(&peer);
                    match result {
                        Ok((sent, received)) => status(format_args!(
                            "tcp-forward-closed peer {peer} sent {sent} received {received}"
                        )),
                        Err(e) => status(format_args!("tcp-forward-closed peer {peer} error {e}")),
                    }
                }
            },
            event = client.next_event() => {
                let Some(event) = event else { return Err(PeerError::Stopped) };
                if let Some(line) = lines.line(&event) {
                    status(format_args!("{line}"));
                }
                if let Some(m) = &path_metrics {
                    match &event {
                        AgentEvent::PortMapping(e) => m.port_mapping(MappedTransport::Udp, e),
                        AgentEvent::TcpPortMapping(e) => m.port_mapping(MappedTransport::Tcp, e),
                        _ => {}
                    }
                }
                if let AgentEvent::Refused { method, code, reason, next: NextStep::Stop } = &event {
                    // The agent deletes its port mapping before it ends: wait for that.
                    client.close(CLOSE_WAIT + Duration::from_millis(500)).await;
                    while let Ok(event) = client.events.try_recv() {
                        if let Some(line) = lines.line(&event) {
                            status(format_args!("{line}"));
                        }
                    }
                    return Err(PeerError::Refused(format!(
                        "the gateway refused {} with {code}: {reason}",
                        crate::proto::agent::method_name(*method)
                    )));
                }
                if let (
                    AgentEvent::TcpIntroduced { peer_id, intro_id, candidates, start_at },
                    Some(tcp),
                    Some(local),
                ) = (&event, &options.tcp, tcp_local)
                    && tcp_busy.insert(peer_id.clone())
                {
                    let machine = crate::proto::tcp_punch::TcpPunch::new(
                        tcp.mode,
                        candidates,
                        *start_at,
                        tcp.config,
                    );
                    let (news, peer, intro_id) = (tcp_news_tx.clone(), peer_id.clone(), *intro_id);
                    let exchange = tcp.mode.techniques().iter().any(|t| matches!(t, crate::proto::tcp_punch::TcpTechnique::NatBlaster | crate::proto::tcp_punch::TcpTechnique::ServerAssisted)).then(|| {
                        let (tx, rx) = std::sync::mpsc::channel();
                        tcp_seq_waiting.insert(intro_id, tx);
                        let out = news.clone();
                        crate::tcp_punch::SeqExchange {
                            send: Box::new(move |isn, to, forge| {
                                let _ = out.send(TcpNews::SeqOut { intro_id, isn, to, forge });
                            }),
                            recv: rx,
                        }
                    });
                    let seq_wait = tcp.config.seq_wait;
                    tcp_tasks.spawn(async move {
                        let reports = news.clone();
                        let punched = crate::tcp_punch::punch(
                            local,
                            intro_id,
                            machine,
                            seq_wait,
                            exchange,
                            |report| {
                                let _ = reports.send(TcpNews::Report { intro_id, report });
                            },
                        )
                        .await;
                        let _ = news.send(match punched {
                            Some(punched) => TcpNews::Up { peer, intro_id, punched },
                            None => TcpNews::Failed { peer, intro_id },
                        });
                    });
                }
                if let AgentEvent::TcpSeq { intro_id, isn, .. } = &event
                    && let Some(waiting) = tcp_seq_waiting.remove(intro_id)
                {
                    let _ = waiting.send(crate::tcp_punch::SeqNews::Isn(*isn));
                }
                if let AgentEvent::TcpSeqRefused { intro_id, code } = &event
                    && let Some(waiting) = tcp_seq_waiting.remove(intro_id)
                {
                    let _ = waiting.send(crate::tcp_punch::SeqNews::Refused(*code));
                }
                if let AgentEvent::PathUp { peer_id, remote, relayed, .. } = &event {
                    if let Some(m) = &path_metrics {
                        m.sessions(*relayed).inc();
                    }
                    let ours = options.connect.as_deref().is_none_or(|p| p == peer_id);
                    let current = path.as_ref().map(|p| p.peer().to_owned());
                    if ours && current.as_deref().is_none_or(|p| p == peer_id) {
                        path = Some(client.path(peer_id, PathKind::new(*remote, *relayed))?);
                    }
                }
            }
            received = forward_recv => match received {
                Ok((len, from)) => {
                    if matches!(options.forward, Some(Forward::Listen(_))) {
                        app_addr = Some(from);
                    }
                    match &path {
                        Some(p) => {
                            p.send(&app_buf[..len])?;
                            if let Some(m) = &path_metrics {
                                m.bytes(p.kind(), "sent").inc_by(len as u64);
                            }
                        }
                        None => tracing::debug!("no path yet; dropped {len} bytes from {from}"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, "forward receive failed"),
            },
            data = path_recv => match data {
                Some(payload) => {
                    if let (Some(m), Some(p)) = (&path_metrics, &path) {
                        m.bytes(p.kind(), "received").inc_by(payload.len() as u64);
                    }
                    if let (Some(forward), Some(to)) = (&forward_socket, app_addr)
                        && let Err(e) = forward.send_to(&payload, to).await
                    {
                        tracing::debug!(error = %e, %to, "forward send failed");
                    }
                }
                None => return Err(PeerError::Stopped),
            },
        }
    }
}

/// Carries the punched connection: spliced to one local application connection
/// (accepted on `listener`, or made to the `To` address), or, without forwarding,
/// held open and drained until the other side closes it. Bytes (to the peer, from
/// the peer).
async fn splice(
    mut punched: tokio::net::TcpStream,
    forward: Option<TcpForward>,
    listener: Option<tokio::net::TcpListener>,
) -> std::io::Result<(u64, u64)> {
    let mut app = match (forward, listener) {
        (Some(TcpForward::Listen(_)), Some(listener)) => listener.accept().await?.0,
        (Some(TcpForward::To(addr)), _) => {
            // Connect to the application when the peer's first bytes (or its close)
            // arrive, not before: its server need not be up when the path is.
            punched.peek(&mut [0u8; 1]).await?;
            tokio::net::TcpStream::connect(addr).await?
        }
        _ => {
            let received = tokio::io::copy(&mut punched, &mut tokio::io::sink()).await?;
            return Ok((0, received));
        }
    };
    let _ = app.set_nodelay(true);
    let _ = punched.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut app, &mut punched).await
}

/// The agent's own view of its paths, for `/metrics` (`--metrics-listen`): sessions
/// and forwarded bytes by path kind, so direct and relayed traffic can be compared.
struct PathMetrics {
    sessions: prometheus::IntCounterVec,
    bytes: prometheus::IntCounterVec,
    port_mappings: prometheus::IntCounterVec,
}

/// Every protocol label of `gateway_peer_port_mappings_total`.
const PORT_MAPPING_PROTOCOLS: [&str; 3] = ["pcp", "nat-pmp", "upnp"];
/// Every outcome label of `gateway_peer_port_mappings_total`.
const PORT_MAPPING_OUTCOMES: [&str; 8] = [
    "mapped",
    "refreshed",
    "lost",
    "no_answer",
    "unsupported",
    "refused",
    "unusable",
    "error",
];

/// The outcome label of why a protocol gave no mapping.
fn outcome_label(outcome: &ProtocolOutcome) -> &'static str {
    match outcome {
        ProtocolOutcome::NoAnswer => "no_answer",
        ProtocolOutcome::UnsupportedVersion => "unsupported",
        ProtocolOutcome::Refused { .. } => "refused",
        ProtocolOutcome::Unusable => "unusable",
        ProtocolOutcome::Error(_) => "error",
    }
}

impl PathMetrics {
    fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let sessions = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "gateway_peer_sessions_total",
                "Paths this agent brought up, by path (direct = punched, relayed = through the TURN relay); an upgrade counts as a new direct session",
            ),
            &["path"],
        )?;
        let bytes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "gateway_peer_path_bytes_total",
                "Forwarded application bytes by path and direction (sent, received)",
            ),
            &["path", "direction"],
        )?;
        let port_mappings = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "gateway_peer_port_mappings_total",
                "Port-mapping results of this agent by transport (udp: the agent's socket; tcp: the TCP punching port), protocol (pcp, nat-pmp, upnp) and outcome (mapped, refreshed, lost, or why a protocol gave none)",
            ),
            &["transport", "protocol", "outcome"],
        )?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(port_mappings.clone()))?;
        for transport in ["udp", "tcp"] {
            for protocol in PORT_MAPPING_PROTOCOLS {
                for outcome in PORT_MAPPING_OUTCOMES {
                    port_mappings.with_label_values(&[transport, protocol, outcome]);
                }
            }
        }
        for path in ["direct", "relayed"] {
            sessions.with_label_values(&[path]);
            for direction in ["sent", "received"] {
                bytes.with_label_values(&[path, direction]);
            }
        }
        Ok(Self {
            sessions,
            bytes,
            port_mappings,
        })
    }

    /// Counts a port-mapping event (a deletion at exit is not counted).
    fn port_mapping(&self, transport: MappedTransport, event: &PortMapEvent) {
        let transport = match transport {
            MappedTransport::Udp => "udp",
            MappedTransport::Tcp => "tcp",
        };
        let count = |protocol: &str, outcome: &str| {
            self.port_mappings
                .with_label_values(&[transport, protocol, outcome])
                .inc();
        };
        match event {
            PortMapEvent::Mapped(m) => count(m.protocol.as_str(), "mapped"),
            PortMapEvent::Refreshed(m) => count(m.protocol.as_str(), "refreshed"),
            PortMapEvent::Lost { mapping, .. } => count(mapping.protocol.as_str(), "lost"),
            PortMapEvent::Unavailable(outcomes) => {
                for (protocol, outcome) in outcomes {
                    count(protocol.as_str(), outcome_label(outcome));
                }
            }
            PortMapEvent::Closed => {}
        }
    }

    fn sessions(&self, relayed: bool) -> prometheus::IntCounter {
        self.sessions
            .with_label_values(&[if relayed { "relayed" } else { "direct" }])
    }

    fn bytes(&self, kind: PathKind, direction: &str) -> prometheus::IntCounter {
        let path = match kind {
            PathKind::Direct { .. } => "direct",
            PathKind::Relayed { .. } => "relayed",
        };
        self.bytes.with_label_values(&[path, direction])
    }
}

/// The status lines of `gateway peer`: one per event (none for data), with the
/// little state a line needs (the node a registration is with after a failover).
#[derive(Debug, Default)]
struct StatusLines {
    /// The node failed over to, until its registration is announced.
    new_server: Option<SocketAddr>,
    /// The transport toward the gateway (said in the registration line when not UDP).
    transport: Transport,
    /// The last refusal printed (method, code) and when: the same refusal again
    /// within [`REPEAT_QUIET`] prints nothing (retries back off, and the first line
    /// said so).
    last_refusal: Option<((u16, u16), std::time::Instant)>,
    /// The port mapping announced last: a refresh that keeps it says nothing.
    port_mapping: Option<crate::proto::portmap::Mapping>,
    /// The same for the TCP mapping of the TCP punching port.
    tcp_port_mapping: Option<crate::proto::portmap::Mapping>,
}

/// How long the same refusal stays quiet after it was printed.
const REPEAT_QUIET: Duration = Duration::from_secs(30);

/// A refusal in words: the method's name, the code, what it means for the agent and
/// what it does next (the words come from the agent core).
fn refusal_line(method: u16, code: u16, reason: &str, next: NextStep) -> String {
    format!(
        "refused {} code {code}: {reason}; {next}",
        crate::proto::agent::method_name(method)
    )
}

impl StatusLines {
    /// The line for a port-mapping event: `port-mapping protocol P external ADDR
    /// lifetime S` for a new (or moved) mapping, `port-mapping none: ...` with each
    /// protocol's outcome, `port-mapping lost ...`, `port-mapping deleted`; the TCP
    /// mapping's (`transport` TCP) say `port-mapping tcp ...`.
    fn port_mapping_line(
        &mut self,
        transport: MappedTransport,
        event: &PortMapEvent,
    ) -> Option<String> {
        let (tag, held) = match transport {
            MappedTransport::Udp => ("port-mapping", &mut self.port_mapping),
            MappedTransport::Tcp => ("port-mapping tcp", &mut self.tcp_port_mapping),
        };
        match event {
            PortMapEvent::Mapped(m) | PortMapEvent::Refreshed(m) => {
                let same =
                    held.is_some_and(|p| p.protocol == m.protocol && p.external == m.external);
                *held = Some(*m);
                if same && matches!(event, PortMapEvent::Refreshed(_)) {
                    return None;
                }
                Some(format!(
                    "{tag} protocol {} external {} lifetime {}",
                    m.protocol.as_str(),
                    m.external,
                    m.lifetime.as_secs()
                ))
            }
            PortMapEvent::Unavailable(outcomes) => {
                let why: Vec<String> = outcomes
                    .iter()
                    .map(|(p, o)| format!("{} {o}", p.as_str()))
                    .collect();
                Some(format!("{tag} none: {}", why.join("; ")))
            }
            PortMapEvent::Lost { mapping, outcome } => {
                *held = None;
                Some(format!(
                    "{tag} lost protocol {} external {}: {outcome}",
                    mapping.protocol.as_str(),
                    mapping.external
                ))
            }
            PortMapEvent::Closed => Some(format!("{tag} deleted")),
        }
    }

    /// The line for `event`, if it has one.
    fn line(&mut self, event: &AgentEvent) -> Option<String> {
        let line = match event {
            AgentEvent::Registered { mapped } => {
                let over = match self.transport {
                    Transport::Udp => String::new(),
                    t => format!(" over {}", t.as_str()),
                };
                match self.new_server.take() {
                    Some(server) => format!("registered with {server} public {mapped}{over}"),
                    None => format!("registered public {mapped}{over}"),
                }
            }
            AgentEvent::TransportChanged {
                server,
                from,
                to,
                to_addr,
                reason,
            } => {
                self.transport = *to;
                let (from, to) = (from.as_str(), to.as_str());
                match reason {
                    TransportChangeReason::NoAnswer { silent } => format!(
                        "no answer from {server} over {from} for {:.0} s; trying {to} to {to_addr}",
                        silent.as_secs_f64()
                    ),
                    TransportChangeReason::StreamFailed => {
                        format!("{from} connection to the gateway failed; trying {to} to {to_addr}")
                    }
                    TransportChangeReason::UdpAnswered => {
                        format!("udp to {server} answers again; using udp")
                    }
                    _ => format!("transport {to} to {to_addr}"),
                }
            }
            AgentEvent::ServerChanged { from, to, reason } => {
                self.new_server = Some(*to);
                match reason {
                    ServerChangeReason::NoAnswer { silent } => format!(
                        "server {from} no answer for {:.1} s; now using {to}",
                        silent.as_secs_f64()
                    ),
                    _ => format!("server {from} given up; now using {to}"),
                }
            }
            AgentEvent::NatClassified {
                class,
                filtering,
                port_preserved,
            } => format!(
                "nat mapping {} filtering {} port_preserved {port_preserved}",
                class.as_str(),
                filtering.as_str()
            ),
            AgentEvent::NoAnswer {
                server,
                silent,
                retry_in,
            } => format!(
                "no answer from {server} over udp for {:.0} s; still trying (next register in {:.0} s)",
                silent.as_secs_f64(),
                retry_in.as_secs_f64().max(1.0)
            ),
            AgentEvent::Refused {
                method,
                code,
                reason,
                next,
            } => {
                let line = refusal_line(*method, *code, reason, *next);
                let now = std::time::Instant::now();
                let key = (*method, *code);
                let quiet = self.last_refusal.as_ref().is_some_and(|(last, at)| {
                    *last == key && now.saturating_duration_since(*at) < REPEAT_QUIET
                });
                // A refusal that stops the agent is always said.
                if quiet && *next != NextStep::Stop {
                    return None;
                }
                self.last_refusal = Some((key, now));
                line
            }
            AgentEvent::Introduced { peer_id, role } => {
                let role = match role {
                    Role::Initiator => "initiator",
                    Role::Responder => "responder",
                };
                format!("introduced peer {peer_id} role {role}")
            }
            AgentEvent::PathUp {
                peer_id,
                remote,
                relayed,
                elapsed,
                probes,
                rtt,
            } => format!(
                "path-up peer {peer_id} {} {remote} elapsed_ms {} probes {probes} rtt_ms {:.1}",
                if *relayed { "relayed" } else { "direct" },
                elapsed.as_millis(),
                rtt.as_secs_f64() * 1000.0
            ),
            AgentEvent::PunchFailed { peer_id, probes } => {
                format!("punch-failed peer {peer_id} probes {probes}")
            }
            AgentEvent::Birthday {
                peer_id,
                role,
                budget,
                after,
            } => format!(
                "birthday peer {peer_id} role {} budget {budget} after_ms {}",
                role.as_str(),
                after.as_millis()
            ),
            AgentEvent::RelayFallback { peer_id } => format!("relay-fallback peer {peer_id}"),
            AgentEvent::RelayAllocated { relayed } => {
                format!("relay-allocated relayed {relayed}")
            }
            AgentEvent::PathDown { peer_id } => format!("path-down peer {peer_id}"),
            AgentEvent::TcpIntroduced {
                peer_id,
                candidates,
                ..
            } => format!(
                "tcp-introduced peer {peer_id} candidates {}",
                candidates.len()
            ),
            AgentEvent::TcpSeq {
                peer_id, intro_id, ..
            } => format!("tcp-seq-received peer {peer_id} intro {intro_id:016x}"),
            AgentEvent::TcpSeqRefused { intro_id, code } => {
                format!("tcp-seq-refused intro {intro_id:016x} code {code}")
            }
            AgentEvent::PortMapping(event) => {
                return self.port_mapping_line(MappedTransport::Udp, event);
            }
            AgentEvent::TcpPortMapping(event) => {
                return self.port_mapping_line(MappedTransport::Tcp, event);
            }
            AgentEvent::MappedCandidate {
                external,
                verified: true,
            } => format!("port-mapping external {external} verified by the gateway"),
            AgentEvent::MappedCandidate {
                external,
                verified: false,
            } => format!(
                "port-mapping external {external} not reachable from the gateway; not announced"
            ),
            AgentEvent::Data { .. } => return None,
        };
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_server_change_is_one_line_and_the_next_registration_names_the_node() {
        let (old, new): (SocketAddr, SocketAddr) = (
            "192.0.2.10:3478".parse().expect("addr"),
            "192.0.2.20:3478".parse().expect("addr"),
        );
        let mapped: SocketAddr = "198.51.100.2:4000".parse().expect("addr");
        let mut lines = StatusLines::default();
        assert_eq!(
            lines.line(&AgentEvent::Registered { mapped }).as_deref(),
            Some("registered public 198.51.100.2:4000")
        );
        assert_eq!(
            lines
                .line(&AgentEvent::ServerChanged {
                    from: old,
                    to: new,
                    reason: ServerChangeReason::NoAnswer {
                        silent: Duration::from_millis(2_503),
                    },
                })
                .as_deref(),
            Some("server 192.0.2.10:3478 no answer for 2.5 s; now using 192.0.2.20:3478")
        );
        assert_eq!(
            lines.line(&AgentEvent::Registered { mapped }).as_deref(),
            Some("registered with 192.0.2.20:3478 public 198.51.100.2:4000")
        );
        // Later registrations (the public endpoint moved) are plain again.
        assert_eq!(
            lines
                .line(&AgentEvent::Registered { mapped: old })
                .as_deref(),
            Some("registered public 192.0.2.10:3478")
        );
    }

    #[test]
    fn a_refusal_is_one_line_with_its_meaning_and_what_comes_next() {
        use crate::proto::rendezvous::wire::method;
        let mut lines = StatusLines::default();
        let refused = |code, next| AgentEvent::Refused {
            method: method::CONNECT,
            code,
            reason: crate::proto::agent::refusal_reason(method::CONNECT, code),
            next,
        };
        assert_eq!(
            lines
                .line(&refused(404, NextStep::RetryIn(Duration::from_secs(4))))
                .as_deref(),
            Some(
                "refused connect code 404: peer not registered with the gateway (or not in this peer's group); retrying in 4 s, then less often"
            )
        );
        // The same refusal again soon is quiet (its retries back off); another one
        // is not.
        assert_eq!(
            lines.line(&refused(404, NextStep::RetryIn(Duration::from_secs(8)))),
            None
        );
        assert!(
            lines
                .line(&refused(503, NextStep::RetryIn(Duration::from_secs(1))))
                .is_some_and(|l| l.contains("cluster unavailable"))
        );
        let silent = AgentEvent::NoAnswer {
            server: "192.0.2.10:3478".parse().expect("addr"),
            silent: Duration::from_millis(5_020),
            retry_in: Duration::from_millis(2_500),
        };
        assert_eq!(
            lines.line(&silent).as_deref(),
            Some(
                "no answer from 192.0.2.10:3478 over udp for 5 s; still trying (next register in 2 s)"
            )
        );
    }

    #[test]
    fn the_default_router_is_the_lowest_metric_default_gateway() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t00000000\t0202000A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0101000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth2\t00000000\t0303000A\t0001\t0\t0\t0\t00000000\t0\t0\t0\n";
        let expected = if cfg!(target_endian = "little") {
            std::net::Ipv4Addr::new(10, 0, 1, 1)
        } else {
            std::net::Ipv4Addr::new(1, 1, 0, 10)
        };
        // eth2's default route is not a gateway route (flags without RTF_GATEWAY).
        assert_eq!(default_ipv4_router(routes), Some(expected));
        // Only the link route: no default router.
        let lan_only: String = routes.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(default_ipv4_router(&lan_only), None);
        assert_eq!(default_ipv4_router("garbage\nmore garbage"), None);
    }

    #[test]
    fn port_mapping_lines_say_the_mapping_or_why_none() {
        use crate::proto::portmap::{Mapping, MappingProtocol};
        let mut lines = StatusLines::default();
        let mapping = Mapping {
            protocol: MappingProtocol::Pcp,
            external: "198.51.100.2:30000".parse().expect("addr"),
            lifetime: Duration::from_secs(7200),
        };
        let line = |lines: &mut StatusLines, e| lines.line(&AgentEvent::PortMapping(e));
        assert_eq!(
            line(&mut lines, PortMapEvent::Mapped(mapping)).as_deref(),
            Some("port-mapping protocol pcp external 198.51.100.2:30000 lifetime 7200")
        );
        // A refresh that keeps the endpoint is quiet; one that moves it is said.
        assert_eq!(line(&mut lines, PortMapEvent::Refreshed(mapping)), None);
        let moved = Mapping {
            external: "198.51.100.2:30001".parse().expect("addr"),
            ..mapping
        };
        assert!(line(&mut lines, PortMapEvent::Refreshed(moved)).is_some());
        assert_eq!(
            line(
                &mut lines,
                PortMapEvent::Unavailable(vec![
                    (MappingProtocol::Pcp, ProtocolOutcome::NoAnswer),
                    (MappingProtocol::NatPmp, ProtocolOutcome::UnsupportedVersion),
                    (
                        MappingProtocol::Upnp,
                        ProtocolOutcome::Error("UPnP discovery: x".into())
                    ),
                ])
            )
            .as_deref(),
            Some(
                "port-mapping none: pcp no answer; nat-pmp not spoken by the router; upnp UPnP discovery: x"
            )
        );
        // The TCP mapping's lines are its own, and so is its refresh memory.
        let tcp = |lines: &mut StatusLines, e| lines.line(&AgentEvent::TcpPortMapping(e));
        let tcp_mapping = Mapping {
            external: "198.51.100.2:40000".parse().expect("addr"),
            ..mapping
        };
        assert_eq!(
            tcp(&mut lines, PortMapEvent::Mapped(tcp_mapping)).as_deref(),
            Some("port-mapping tcp protocol pcp external 198.51.100.2:40000 lifetime 7200")
        );
        assert_eq!(tcp(&mut lines, PortMapEvent::Refreshed(tcp_mapping)), None);
        assert_eq!(line(&mut lines, PortMapEvent::Refreshed(moved)), None);
        assert_eq!(
            tcp(
                &mut lines,
                PortMapEvent::Lost {
                    mapping: tcp_mapping,
                    outcome: ProtocolOutcome::NoAnswer
                }
            )
            .as_deref(),
            Some("port-mapping tcp lost protocol pcp external 198.51.100.2:40000: no answer")
        );
        assert_eq!(
            tcp(&mut lines, PortMapEvent::Closed).as_deref(),
            Some("port-mapping tcp deleted")
        );
        assert_eq!(
            line(&mut lines, PortMapEvent::Closed).as_deref(),
            Some("port-mapping deleted")
        );
    }

    #[test]
    fn servers_resolve_in_order_one_node_per_address() {
        let specs = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // IP literals as before, in the order given; a repeat counts once.
        let servers = resolve_servers(&specs(&[
            "192.0.2.10:3478",
            "[2001:db8::1]:3478",
            "192.0.2.10:3478",
        ]))
        .expect("literals");
        assert_eq!(
            servers,
            vec![
                "192.0.2.10:3478".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::1]:3478".parse().expect("addr"),
            ]
        );
        // A name: every address it resolves to is a node (localhost: at least the
        // loopback address, from /etc/hosts).
        let local = resolve_servers(&specs(&["localhost:3478"])).expect("localhost");
        assert!(!local.is_empty());
        assert!(
            local
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 3478)
        );
        // No port, or not a port: a clear error naming the value (no DNS asked).
        for bad in ["192.0.2.10", "localhost:port"] {
            let error = resolve_servers(&specs(&[bad])).expect_err(bad).to_string();
            assert!(error.contains(bad), "{error}");
        }
    }
}
