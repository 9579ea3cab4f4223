//! TCP hole punching, the I/O half: learns this host's TCP server-reflexive
//! endpoint from the gateway ([`learn_reflexive`]) and performs the sans-IO
//! [`TcpPunch`]'s actions with real sockets ([`punch`]).
//!
//! Every socket of an attempt is bound to one local port, the one whose mapping the
//! gateway saw, with SO_REUSEADDR and SO_REUSEPORT, so the connection to the gateway
//! (which holds the NAT mapping), a listener and the connect() attempts can share it.
//! Dropping an attempt drops (closes) all of its sockets; a socket closed in SYN-SENT
//! sends nothing.
use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinSet,
};

use crate::proto::{
    rendezvous::wire::TcpTechnique,
    tcp_punch::{TcpPunch, TcpPunchEvent, TcpPunchState},
};

/// Why TCP punching could not start.
#[derive(Debug, thiserror::Error)]
pub enum TcpPunchError {
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The gateway did not answer the STUN Binding over TCP in time, or answered
    /// something unusable.
    #[error("no usable STUN Binding answer over TCP from {0}")]
    NoAnswer(SocketAddr),
}

/// Accepted connections greeted at once at most (the rest are closed).
const MAX_GREETING: usize = 4;
/// How long the STUN Binding over TCP to the gateway may take.
const LEARN_TIMEOUT: Duration = Duration::from_secs(3);

/// A TCP socket bound to `local` with SO_REUSEADDR and SO_REUSEPORT.
pub fn reusable_socket(local: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
}

/// A punching socket (or one accepted from the punching listener, which inherits
/// it) that is dropped before it wins closes with RST rather than FIN, so no
/// TIME_WAIT blocks the 4-tuple for a later technique of the same attempt (`auto`);
/// the winner gets the normal close back ([`graceful`]).
fn abortive(socket: &TcpSocket) -> io::Result<()> {
    socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO))
}

/// SYN-ACK retransmissions of the punching listener's half-open connections: one,
/// so one that the other side's NAT never lets through (a SYN that crossed the
/// listener while that NAT had no entry, answered by RST or ICMP) is dropped after
/// about 3 s instead of the default 5 retries (63 s). Until then it holds the very
/// 4-tuple later techniques connect() on (EADDRNOTAVAIL, measured in `auto`).
const LISTENER_SYNACK_RETRIES: libc::c_int = 1;

/// Bounds the SYN-ACK retransmissions of `listener`'s half-open connections
/// (Linux uses a listener's TCP_SYNCNT for them).
fn bound_synack_retries(listener: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = LISTENER_SYNACK_RETRIES;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: setsockopt(2) reads `len` bytes from `value`, a live c_int of that size,
    // on a descriptor `listener` owns for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            std::ptr::from_ref(&value).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Undoes [`abortive`] on the connection that won.
fn graceful(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(None) {
        tracing::debug!(error = %e, "cannot restore SO_LINGER on the punched connection");
    }
}

fn set_ttl(socket: &TcpSocket, ttl: u32, ipv4: bool) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    if ipv4 {
        s.set_ttl_v4(ttl)
    } else {
        s.set_unicast_hops_v6(ttl)
    }
}

/// This host's TCP endpoint as the gateway's TCP service port (`server`, where the
/// TURN-over-TCP listener also answers STUN Binding) sees it: connects from a fresh
/// reusable local port, sends a Binding request and reads XOR-MAPPED-ADDRESS.
/// Returns the connection (keep it open: it holds the NAT's mapping), the local
/// endpoint it is bound to, and the mapped endpoint.
pub async fn learn_reflexive(
    server: SocketAddr,
) -> Result<(TcpStream, SocketAddr, SocketAddr), TcpPunchError> {
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io = |what| move |source| TcpPunchError::Io { what, source };
    let socket = reusable_socket(any).map_err(io("binding the TCP punching port"))?;
    let local = socket
        .local_addr()
        .map_err(io("reading the TCP punching port"))?;
    let exchange = async {
        let mut stream = socket
            .connect(server)
            .await
            .map_err(io("connecting to the gateway over TCP"))?;
        let tid: [u8; 12] = rand::random();
        let mut request = Vec::with_capacity(28);
        crate::proto::binding::binding_request(tid, &mut request);
        stream
            .write_all(&request)
            .await
            .map_err(io("sending a Binding over TCP"))?;
        let mut head = [0u8; 20];
        stream
            .read_exact(&mut head)
            .await
            .map_err(io("reading the Binding answer"))?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if len > 1024 {
            return Err(TcpPunchError::NoAnswer(server));
        }
        let mut answer = head.to_vec();
        answer.resize(20 + len, 0);
        stream
            .read_exact(&mut answer[20..])
            .await
            .map_err(io("reading the Binding answer"))?;
        let mapped = crate::proto::binding::parse_binding_success(&answer, tid)
            .ok_or(TcpPunchError::NoAnswer(server))?;
        Ok((stream, mapped))
    };
    let (stream, mapped) = tokio::time::timeout(LEARN_TIMEOUT, exchange)
        .await
        .map_err(|_| TcpPunchError::NoAnswer(server))??;
    Ok((stream, local, mapped))
}

/// A punched TCP connection.
#[derive(Debug)]
pub struct Punched {
    /// The connection.
    pub stream: TcpStream,
    /// The technique whose window it came up in.
    pub technique: TcpTechnique,
    /// The other side's endpoint.
    pub remote: SocketAddr,
    /// From that technique's start to the connection.
    pub elapsed: Duration,
    /// NATBlaster: which step brought the connection up (see [`SpliceStep`]).
    pub step: Option<SpliceStep>,
}

/// A connection whose hello crossed, and the NATBlaster step that made it (if any).
type Connected = (TcpStream, Option<SpliceStep>);

/// Which NATBlaster step brought a spliced connection up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceStep {
    /// The crafted SYN-ACK alone (seq = our ISN, ack = the other's ISN + 1, sent
    /// through our NAT to the other side's endpoint).
    SynAck,
    /// The crafted SYN-ACK did not do it; our own SYN sent again past the core (the
    /// captured ISN, full TTL) made the NATs' entries and the kernels meet in a
    /// simultaneous open.
    Resyn,
    /// Server-assisted (technique 4): the SYN-ACK the gateway forged (nothing was
    /// crafted here).
    Forged,
}

impl SpliceStep {
    /// The status-line word.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SynAck => "synack",
            Self::Resyn => "resyn",
            Self::Forged => "forged",
        }
    }
}

/// How a NATBlaster splice swaps initial sequence numbers with the other side:
/// through the gateway (the agent's TCP-Seq request and indication); a
/// server-assisted one only gives the gateway ours.
pub struct SeqExchange {
    /// Sends our ISN and the endpoint our SYN went to; with `forge` (server-assisted)
    /// the gateway keeps it and forges the SYN-ACKs.
    pub send: Box<dyn Fn(u32, SocketAddr, bool) + Send + Sync>,
    /// What the gateway said: the other side's ISN, or a refusal.
    pub recv: std::sync::mpsc::Receiver<SeqNews>,
}

/// News for a splice waiting on the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqNews {
    /// The other side's initial sequence number (NATBlaster).
    Isn(u32),
    /// The gateway refused our TCP-Seq with this error code (e.g. 501: it does not
    /// forge SYN-ACKs).
    Refused(u16),
}

impl std::fmt::Debug for SeqExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqExchange").finish_non_exhaustive()
    }
}

/// The TTL crafted packets and the established connection use.
const NORMAL_TTL: u8 = 64;
/// How long our own low-TTL SYN may take to show up on the capture.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(1);
/// Crafted SYN-ACKs sent (and the wait after each) before the re-SYN step.
const SYN_ACK_SENDS: u32 = 3;
/// Wait after each crafted packet for the socket to synchronize.
const SPLICE_INTERVAL: Duration = Duration::from_millis(150);
/// Re-SYN step: crafted SYNs (each followed by the SYN-ACK) at most.
const RESYN_SENDS: u32 = 5;
/// Server-assisted: how long after our ISN went to the gateway the forged SYN-ACK
/// may take, beyond the wait for the other side's ISN.
const FORGE_GRACE: Duration = Duration::from_secs(1);

fn raw_io(e: crate::tcp_raw::RawError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The local address this host sends from toward `to` (the kernel's route choice).
fn source_toward(to: SocketAddr) -> io::Result<std::net::IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(to)?;
    Ok(probe.local_addr()?.ip())
}

/// NATBlaster (technique 3), one side, blocking: from port `port` toward `to`.
///
/// 1. Suppression rules for the attempt (our RSTs to `to`, incoming ICMP
///    time-exceeded): removed on every exit path by the guard.
/// 2. A kernel connect() with TTL `ttl` (passes our NAT, which creates its mapping
///    and connection-tracking entry; dies at the core); its SYN is captured on
///    the interface that routes to `to`, and the ISN sent to the other side.
/// 3. The other side's ISN arrives (within `seq_wait`): both SYNs are out, so both
///    NATs hold an entry for the pair of endpoints.
/// 4. Step "synack": the SYN-ACK the other side's kernel expects (seq = our ISN,
///    ack = its ISN + 1) goes out through our NAT, the socket's TTL still low.
/// 5. Step "resyn", if that did not synchronize our socket: our own SYN again with
///    the captured ISN and the full TTL (the retransmission the kernel cannot make
///    after the ICMP), the socket's TTL raised, the SYN-ACK after each.
///
/// Returns the established socket (normal TTL) and the step that made it.
pub fn splice(
    port: u16,
    to: SocketAddr,
    ttl: u8,
    seq_wait: Duration,
    exchange: &SeqExchange,
) -> io::Result<(std::net::TcpStream, SpliceStep)> {
    use crate::tcp_raw::{Injector, Segment, TcpState, set_socket_ttl, tcp_state};
    use std::os::fd::AsFd;
    let v6 = to.is_ipv6();
    let Opened {
        guard,
        socket,
        syn,
        local,
    } = open_captured(port, to, ttl)?;
    (exchange.send)(syn.seq, to, false);
    let their_isn = match exchange.recv.recv_timeout(seq_wait) {
        Ok(SeqNews::Isn(isn)) => isn,
        Ok(SeqNews::Refused(code)) => {
            return Err(io::Error::other(format!(
                "the gateway refused our sequence number (code {code})"
            )));
        }
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no initial sequence number from the other side",
            ));
        }
    };
    let synchronized = || tcp_state(socket.as_fd()).is_ok_and(TcpState::is_synchronized);
    let before = tcp_state(socket.as_fd())?;
    tracing::debug!(isn = syn.seq, their_isn, ?before, %local, %to, "natblaster: sequence numbers swapped");
    if before == TcpState::Close {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the low-TTL connect() was aborted before the splice",
        ));
    }
    let syn_ack =
        Segment::syn_ack(local, to, syn.seq, their_isn.wrapping_add(1)).with_ttl(NORMAL_TTL);
    let mut injector = Injector::new();
    let mut step = SpliceStep::SynAck;
    let mut done = injector
        .send_until(&syn_ack, SYN_ACK_SENDS, SPLICE_INTERVAL, synchronized)
        .map_err(raw_io)?
        .is_some();
    if !done {
        step = SpliceStep::Resyn;
        set_socket_ttl(&socket, v6, NORMAL_TTL)?;
        let resyn = syn.with_ttl(NORMAL_TTL);
        for _ in 0..RESYN_SENDS {
            injector.send(&resyn).map_err(raw_io)?;
            if injector
                .send_until(&syn_ack, 1, SPLICE_INTERVAL, synchronized)
                .map_err(raw_io)?
                .is_some()
            {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "not synchronized after the crafted SYN-ACK and re-SYN (state {:?})",
                tcp_state(socket.as_fd())?
            ),
        ));
    }
    set_socket_ttl(&socket, v6, NORMAL_TTL)?;
    guard.remove().map_err(raw_io)?;
    Ok((socket.into(), step))
}

/// A low-TTL connect() in SYN-SENT whose SYN was captured, under suppression rules.
struct Opened {
    /// Removes the rules (on drop too).
    guard: crate::tcp_raw::NftGuard,
    /// The kernel socket, still in SYN-SENT with the low TTL.
    socket: socket2::Socket,
    /// Its SYN as captured: `seq` is our ISN.
    syn: crate::tcp_raw::Segment,
    /// The local endpoint (the TCP punching port on the address toward `to`).
    local: SocketAddr,
}

/// Steps 1 and 2 of techniques 3 and 4: suppression rules (our RSTs to `to`, incoming
/// ICMP time-exceeded), then a kernel connect() from `port` toward `to` with TTL
/// `ttl` (passes our NAT, which creates its mapping and connection-tracking entry;
/// dies at the core), its SYN captured on the interface that routes to `to`.
fn open_captured(port: u16, to: SocketAddr, ttl: u8) -> io::Result<Opened> {
    use crate::tcp_raw::{SuppressionRules, SynCapture, set_socket_ttl};
    let v6 = to.is_ipv6();
    let local = SocketAddr::new(source_toward(to)?, port);
    let guard = SuppressionRules {
        rst_to: vec![to],
        icmp_time_exceeded: true,
    }
    .install()
    .map_err(raw_io)?;
    let mut capture = SynCapture::for_local(local, Some(to)).map_err(raw_io)?;
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Closed with RST if the splice fails after all (see `abortive`); the winner
    // gets the normal close back in `punch`.
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(&local.into())?;
    set_socket_ttl(&socket, v6, ttl)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&to.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Ok(()) => {}
        Err(e) => return Err(e),
    }
    let syn = capture.wait(CAPTURE_TIMEOUT).map_err(raw_io)?;
    Ok(Opened {
        guard,
        socket,
        syn,
        local,
    })
}

/// Server-assisted splicing (technique 4), one side, blocking: the low-TTL SYN as
/// in [`splice`] (rules, capture), our ISN to the gateway with TCP-FORGE, then
/// nothing but waiting: once both sides' ISNs are in, the gateway forges into our
/// NAT the SYN-ACK its entry expects (from the other side's public endpoint, seq =
/// its ISN, ack = ours + 1), which our socket in SYN-SENT takes as the answer. The
/// kernel's ACK leaves with the low TTL and dies at the core (harmless: the first
/// data segment carries the same acknowledgement); the TTL goes back to normal as
/// soon as the socket is synchronized. Gives up at once when the gateway refuses
/// (it does not forge), or `seq_wait` + 1 s after our ISN went out.
pub fn splice_assisted(
    port: u16,
    to: SocketAddr,
    ttl: u8,
    seq_wait: Duration,
    exchange: &SeqExchange,
) -> io::Result<(std::net::TcpStream, SpliceStep)> {
    use crate::tcp_raw::{TcpState, set_socket_ttl, tcp_state};
    use std::os::fd::AsFd;
    let Opened {
        guard,
        socket,
        syn,
        local,
    } = open_captured(port, to, ttl)?;
    (exchange.send)(syn.seq, to, true);
    let deadline = Instant::now() + seq_wait + FORGE_GRACE;
    loop {
        let state = tcp_state(socket.as_fd())?;
        if state.is_synchronized() {
            break;
        }
        if state == TcpState::Close {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the low-TTL connect() was aborted before a forged SYN-ACK arrived",
            ));
        }
        if let Ok(SeqNews::Refused(code)) = exchange.recv.try_recv() {
            return Err(io::Error::other(format!(
                "the gateway refused to forge the SYN-ACKs (code {code})"
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no forged SYN-ACK synchronized the socket (state {state:?})"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::debug!(isn = syn.seq, %local, %to, "server-assisted: synchronized by the forged SYN-ACK");
    set_socket_ttl(&socket, to.is_ipv6(), NORMAL_TTL)?;
    guard.remove().map_err(raw_io)?;
    Ok((socket.into(), SpliceStep::Forged))
}

/// A technique's result, for the gateway's outcome report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// The technique.
    pub technique: TcpTechnique,
    /// Whether it connected.
    pub connected: bool,
    /// From its start to the connection or to giving up.
    pub elapsed: Duration,
    /// connect() calls made.
    pub attempts: u32,
}

/// First bytes both sides send on a punched connection: "GWTP", the introduction id
/// and the side's random tie-breaker, then one acknowledgement byte once the other's
/// hello arrived; a connection counts only once both crossed. Two connections can
/// both pass (each side's SYN through a different mapping), so the side with the
/// larger tie-breaker picks one and says so with [`HELLO_CHOSEN`] on it; the other
/// side takes the connection that carries that byte (as ICE's controlling agent
/// nominates a pair).
const HELLO_MAGIC: [u8; 4] = *b"GWTP";
/// Length of the hello: magic, introduction id.
const HELLO_LEN: usize = 12;
/// The byte that acknowledges the other side's hello.
const HELLO_ACK: u8 = 0x06;
/// The byte the choosing side sends on the one connection it keeps.
const HELLO_CHOSEN: u8 = 0x07;
/// How long the other side's hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_millis(1500);

/// Proves a fresh connection carries bytes both ways and belongs to introduction
/// `intro_id`: sends our hello, reads the other's. A NAT that let the handshake
/// through but drops what follows (its sequence tracking disagrees with one side's
/// initial sequence number), or a connection from anyone else, fails here.
/// Returns whether this side chooses (it must then send [`HELLO_CHOSEN`] on the
/// connection it keeps); the other side returns only once that byte arrived.
async fn hello(stream: &mut TcpStream, intro_id: u64, tiebreak: u64) -> io::Result<bool> {
    let mut ours = [0u8; HELLO_LEN + 8];
    ours[..4].copy_from_slice(&HELLO_MAGIC);
    ours[4..HELLO_LEN].copy_from_slice(&intro_id.to_be_bytes());
    ours[HELLO_LEN..].copy_from_slice(&tiebreak.to_be_bytes());
    let exchange = async {
        stream.write_all(&ours).await?;
        let mut theirs = [0u8; HELLO_LEN + 8];
        stream.read_exact(&mut theirs).await?;
        if theirs[..HELLO_LEN] != ours[..HELLO_LEN] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not the other side of this introduction",
            ));
        }
        let mut their_tiebreak = [0u8; 8];
        their_tiebreak.copy_from_slice(&theirs[HELLO_LEN..]);
        let their_tiebreak = u64::from_be_bytes(their_tiebreak);
        if their_tiebreak == tiebreak {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "equal tie-breakers (or our own hello reflected)",
            ));
        }
        let we_choose = tiebreak > their_tiebreak;
        // Then an acknowledgement each way: a side whose hello never arrived sends
        // none, so a path that carries bytes one way only fails on both sides.
        stream.write_all(&[HELLO_ACK]).await?;
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack).await?;
        if ack[0] != HELLO_ACK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad hello acknowledgement",
            ));
        }
        if we_choose {
            return Ok(true);
        }
        // The other side chooses: this connection is the one only if it says so
        // (it closes the ones it does not keep).
        let mut chosen = [0u8; 1];
        stream.read_exact(&mut chosen).await?;
        if chosen[0] == HELLO_CHOSEN {
            Ok(false)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad choice byte",
            ))
        }
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no hello from the other side (data does not pass)",
            ))
        })
}

/// Runs one attempt for introduction `intro_id` from `local` (the port the gateway
/// saw): a listener there for the whole attempt plus the machine's openers and
/// connects; a connection counts once the hellos crossed (see `hello`). Calls `report`
/// once per technique tried. Returns the connection, or None when every technique
/// failed. Every other socket is closed when this returns.
pub async fn punch(
    local: SocketAddr,
    intro_id: u64,
    mut machine: TcpPunch,
    seq_wait: Duration,
    mut exchange: Option<SeqExchange>,
    mut report: impl FnMut(Report),
) -> Option<Punched> {
    // This attempt's tie-breaker for choosing between connections (see `hello`).
    let tiebreak: u64 = rand::random();
    // The listener takes a SYN that reaches this host while no connect() of ours
    // is in SYN-SENT for it (the other side started a little earlier, or our
    // attempt was just refused): without it the kernel would answer RST.
    let listener = match reusable_socket(local).and_then(|s| {
        abortive(&s)?;
        bound_synack_retries(&s)?;
        s.listen(16)
    }) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(error = %e, %local, "no TCP listener on the punching port");
            None
        }
    };
    let ipv4 = local.is_ipv4();
    // Each with whether we choose (see `hello`).
    let mut connects: JoinSet<(u32, io::Result<(Connected, bool)>)> = JoinSet::new();
    let mut openers: JoinSet<()> = JoinSet::new();
    // Accepted connections whose hello is under way.
    let mut greeting: JoinSet<(SocketAddr, io::Result<(TcpStream, bool)>)> = JoinSet::new();
    let mut winner: Option<(TcpStream, Option<SpliceStep>)> = None;
    loop {
        while let Some(action) = machine.poll_event() {
            match action {
                TcpPunchEvent::Open { to, ttl, hold } => {
                    openers.spawn(async move {
                        let opened = reusable_socket(local).and_then(|s| {
                            set_ttl(&s, u32::from(ttl), ipv4)?;
                            Ok(s)
                        });
                        match opened {
                            // The SYN leaves with the low TTL at once; the answer
                            // is an ICMP time-exceeded (the connect fails) or
                            // nothing: either way the socket is dropped, and a
                            // socket closed in SYN-SENT sends nothing.
                            Ok(s) => {
                                let sent = Instant::now();
                                let result = tokio::time::timeout(hold, s.connect(to)).await;
                                tracing::debug!(
                                    %to,
                                    ttl,
                                    after_ms = sent.elapsed().as_secs_f64() * 1000.0,
                                    result = ?result.as_ref().map(|r| r.as_ref().map(|_| ()).map_err(|e| e.to_string())),
                                    "low-TTL opener done"
                                );
                            }
                            Err(e) => tracing::debug!(error = %e, "cannot open a low-TTL socket"),
                        }
                    });
                }
                TcpPunchEvent::Connect {
                    to,
                    attempt,
                    timeout,
                } => {
                    connects.spawn(async move {
                        let result = match reusable_socket(local).and_then(|s| {
                            abortive(&s)?;
                            Ok(s)
                        }) {
                            Ok(s) => tokio::time::timeout(timeout, s.connect(to))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(io::Error::new(
                                        io::ErrorKind::TimedOut,
                                        "connect timed out",
                                    ))
                                }),
                            Err(e) => Err(e),
                        };
                        let result = match result {
                            Ok(mut stream) => hello(&mut stream, intro_id, tiebreak)
                                .await
                                .map(|choose| ((stream, None), choose)),
                            Err(e) => Err(e),
                        };
                        (attempt, result)
                    });
                }
                TcpPunchEvent::Splice {
                    to,
                    forge,
                    attempt,
                    ttl,
                    timeout,
                } => {
                    let Some(exchange) = exchange.take() else {
                        connects.spawn(async move {
                            (
                                attempt,
                                Err(io::Error::other("no sequence-number exchange")),
                            )
                        });
                        continue;
                    };
                    let port = local.port();
                    connects.spawn(async move {
                        let spliced = tokio::task::spawn_blocking(move || {
                            if forge {
                                splice_assisted(port, to, ttl, seq_wait, &exchange)
                            } else {
                                splice(port, to, ttl, seq_wait, &exchange)
                            }
                        });
                        let result = match tokio::time::timeout(timeout, spliced).await {
                            Ok(Ok(Ok((std, step)))) => {
                                match std
                                    .set_nonblocking(true)
                                    .and_then(|()| TcpStream::from_std(std))
                                {
                                    Ok(mut stream) => hello(&mut stream, intro_id, tiebreak)
                                        .await
                                        .map(|choose| ((stream, Some(step)), choose)),
                                    Err(e) => Err(e),
                                }
                            }
                            Ok(Ok(Err(e))) => Err(e),
                            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
                            Err(_) => {
                                Err(io::Error::new(io::ErrorKind::TimedOut, "splice timed out"))
                            }
                        };
                        (attempt, result)
                    });
                }
                TcpPunchEvent::CancelAll => {
                    connects.abort_all();
                    openers.abort_all();
                    greeting.abort_all();
                }
                TcpPunchEvent::Report {
                    technique,
                    connected,
                    elapsed,
                    attempts,
                } => report(Report {
                    technique,
                    connected,
                    elapsed,
                    attempts,
                }),
            }
        }
        match machine.state() {
            TcpPunchState::Running => {}
            TcpPunchState::Failed => return None,
            TcpPunchState::Connected {
                technique,
                remote,
                elapsed,
            } => {
                if let Some((stream, _)) = &winner {
                    graceful(stream);
                }
                return winner.map(|(stream, step)| Punched {
                    stream,
                    technique,
                    remote,
                    elapsed,
                    step,
                });
            }
        }
        let deadline = machine
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(deadline.into()) => machine.handle_timeout(Instant::now()),
            Some(done) = connects.join_next() => match done {
                Ok((attempt, Ok(((mut stream, step), choose)))) => {
                    if machine.handle_connected(Instant::now(), attempt) {
                        if choose && let Err(e) = stream.write_all(&[HELLO_CHOSEN]).await {
                            tracing::debug!(error = %e, "cannot name the chosen TCP connection");
                        }
                        winner = Some((stream, step));
                    }
                }
                Ok((attempt, Err(e))) => {
                    tracing::debug!(error = %e, attempt, "TCP punch connect failed");
                    machine.handle_connect_failed(Instant::now(), attempt);
                }
                Err(_) => {} // aborted
            },
            Some(_) = openers.join_next() => {}
            Some(done) = greeting.join_next() => match done {
                Ok((from, Ok((mut stream, choose)))) => {
                    if machine.handle_accepted(Instant::now(), from) {
                        if choose && let Err(e) = stream.write_all(&[HELLO_CHOSEN]).await {
                            tracing::debug!(error = %e, "cannot name the chosen TCP connection");
                        }
                        winner = Some((stream, None));
                    }
                }
                Ok((from, Err(e))) => {
                    tracing::debug!(error = %e, %from, "accepted TCP connection failed its hello");
                }
                Err(_) => {} // aborted
            },
            accepted = accept => match accepted {
                Ok((mut stream, from)) => {
                    // Only the other side's candidate addresses are worth a hello
                    // (checked again, with the result, by `accepted`).
                    if machine.admits(from) && greeting.len() < MAX_GREETING {
                        greeting.spawn(async move {
                            let result = hello(&mut stream, intro_id, tiebreak)
                                .await
                                .map(|choose| (stream, choose));
                            (from, result)
                        });
                    } else {
                        tracing::debug!(%from, "TCP connection from a stranger on the punching port; closed");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "TCP punch accept failed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two connected loopback streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn the_larger_tie_breaker_chooses_and_the_other_side_waits_for_its_word() {
        let (mut a, mut b) = pair().await;
        let other = tokio::spawn(async move {
            let result = hello(&mut b, 7, 1).await;
            (result.map_err(|e| e.kind()), b)
        });
        assert!(hello(&mut a, 7, 2).await.expect("hello"), "a chooses");
        a.write_all(&[HELLO_CHOSEN]).await.expect("choose");
        let (result, _b) = other.await.expect("task");
        assert_eq!(result, Ok(false), "b takes the connection a named");
    }

    #[tokio::test]
    async fn a_connection_the_chooser_drops_is_not_taken() {
        let (mut a, mut b) = pair().await;
        let other = tokio::spawn(async move { hello(&mut b, 7, 1).await.map_err(|e| e.kind()) });
        assert!(hello(&mut a, 7, 2).await.expect("hello"));
        // Another connection won on a's side: this one is closed without a word.
        drop(a);
        assert_eq!(
            other.await.expect("task"),
            Err(io::ErrorKind::UnexpectedEof)
        );
    }

    #[tokio::test]
    async fn another_introduction_or_a_reflected_hello_is_refused() {
        let (mut a, mut b) = pair().await;
        let other = tokio::spawn(async move { hello(&mut b, 8, 1).await.map_err(|e| e.kind()) });
        assert_eq!(
            hello(&mut a, 7, 2).await.map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidData)
        );
        assert!(other.await.expect("task").is_err());
        let (mut a, mut b) = pair().await;
        let other = tokio::spawn(async move { hello(&mut b, 7, 5).await.map_err(|e| e.kind()) });
        assert_eq!(
            hello(&mut a, 7, 5).await.map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidData)
        );
        assert!(other.await.expect("task").is_err());
    }
}
