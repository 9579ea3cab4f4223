//! Batched UDP I/O for the service sockets: the shared [`ServiceSocket`], binding with
//! the options the gateway needs, and sending many datagrams with one `sendmmsg`
//! (per-message source address through IP_PKTINFO / IPV6_PKTINFO, UDP GSO for
//! repeated datagrams). The only module with the control-message `unsafe` code; the
//! protocol drivers call it and know nothing of cmsg layouts.
use std::{
    io::IoSliceMut,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
};

use quinn_udp::{RecvMeta, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UdpSocket,
};

use crate::{metrics::Metrics, proto::Transmit};

/// Largest datagram read; anything longer is truncated by the kernel and then fails
/// to parse (STUN over UDP stays well under this).
pub(crate) const MAX_DATAGRAM: usize = 65_535;
/// Receive buffer asked of the kernel, so bursts are not dropped while we work.
const RECV_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Why the UDP service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created or bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the service socket with the options the gateway needs (a large receive
/// buffer; dual-stack when bound to `[::]`; SO_REUSEPORT, so a flooding client can
/// be given a connected socket of its own on the same port, see [`crate::fair`]).
///
/// A port already bound by anyone (another gateway of the same user included, which
/// SO_REUSEPORT alone would let share it) is refused: the address is first bound
/// without the option.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let new_socket = || -> Result<Socket, ServerError> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false).map_err(err)?;
        }
        Ok(socket)
    };
    if addr.port() != 0 {
        // Released before the real bind: a process binding the port in between
        // shares it (rare, and only as this user with SO_REUSEPORT).
        new_socket()?.bind(&addr.into()).map_err(err)?;
    }
    let socket = new_socket()?;
    set_reuse_port(&socket).map_err(err)?;
    // Best effort: without CAP_NET_ADMIN the kernel caps this at net.core.rmem_max.
    size_recv_buffer(&socket, RECV_BUFFER_BYTES);
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

/// Asks for a receive buffer of `bytes` for `socket`: beyond `net.core.rmem_max`
/// where the process may (SO_RCVBUFFORCE, CAP_NET_ADMIN), else up to it (SO_RCVBUF).
/// Best effort: a socket keeps the size it got.
pub(crate) fn size_recv_buffer(socket: &Socket, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a live descriptor with a pointer to a c_int and its size.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = socket.set_recv_buffer_size(bytes);
    }
}

/// Sets SO_REUSEPORT on `socket` (before binding it).
fn set_reuse_port(socket: &Socket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a live descriptor with a pointer to a c_int and its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Receive buffer of an isolated client's socket: what one client may have waiting.
const ISOLATED_RECV_BUFFER_BYTES: usize = 1024 * 1024;

/// Opens a socket of `client`'s own on `service`'s port (see [`crate::fair`]): bound
/// with SO_REUSEPORT to the service address (or, for a wildcard one, the address
/// the client sent to, `local`) and connected to the client, so the kernel queues
/// the client's datagrams there and no longer in the service socket's queue.
/// Replies still leave from `service`. Must be called inside a tokio runtime.
pub fn isolated_socket(
    service: &ServiceSocket,
    client: SocketAddr,
    local: Option<IpAddr>,
) -> std::io::Result<ServiceSocket> {
    let bound = service.socket.get_ref().local_addr()?;
    let ip = match (bound.ip().is_unspecified(), local) {
        (true, Some(local)) => local,
        _ => bound.ip(),
    };
    let (ip, peer) = if bound.is_ipv6() {
        let ip = match ip {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        };
        (ip, to_v6_mapped(client))
    } else {
        (ip.to_canonical(), canonical(client))
    };
    if peer.is_ipv6() != bound.is_ipv6() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an IPv6 client of an IPv4 socket",
        ));
    }
    let addr = SocketAddr::new(ip, bound.port());
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    set_reuse_port(&socket)?;
    size_recv_buffer(&socket, ISOLATED_RECV_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.connect(&peer.into())?;
    let socket: std::net::UdpSocket = socket.into();
    // Its own quinn-udp state: building one turns on IP_PKTINFO and UDP_GRO.
    let state = UdpSocketState::new((&socket).into())?;
    // SAFETY: the std socket owns its descriptor and keeps it open, unchanged, for
    // as long as the AsyncFd holding it lives.
    let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
    Ok(ServiceSocket::new(
        Arc::new(socket),
        Arc::new(state),
        bound.is_ipv6(),
    ))
}

/// Turns on UDP_GRO: datagrams of one flow arriving back to back (a GSO batch) are
/// read as one buffer with their segment size. Best effort.
pub(crate) fn enable_gro(socket: &Socket) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a live descriptor with a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Datagram buffers read per system call (recvmmsg).
pub(crate) const RECV_BATCH: usize = 32;

/// Prepares a bound service socket for the service loop (`service::run`): its quinn-udp state (batched
/// receives, IP_PKTINFO), shared so relay tasks can send to clients from it too.
/// The socket is re-registered with the runtime for readability only (see
/// [`ServiceSocket`] for why). Must be called inside a tokio runtime.
pub fn service_socket(socket: UdpSocket) -> std::io::Result<ServiceSocket> {
    let socket = socket.into_std()?;
    let state = UdpSocketState::new((&socket).into())?;
    // An IPv6 socket is dual-stack (see `bind`) and needs v4-mapped peers.
    let dual_stack = socket.local_addr()?.is_ipv6();
    // SAFETY: the std socket owns its descriptor and keeps it open, unchanged, for
    // as long as the AsyncFd holding it lives.
    let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
    Ok(ServiceSocket::new(
        Arc::new(socket),
        Arc::new(state),
        dual_stack,
    ))
}

/// The main socket, shared so relay tasks can send to clients from it.
///
/// It is registered with the runtime for readability only: every datagram sent on a
/// socket registered for writability too makes the kernel signal EPOLLOUT, which
/// wakes a parked runtime thread for nothing (measured: a fifth of the server's CPU
/// at high request rates, see docs/benchmarks.md). Sends are plain non-blocking
/// system calls; the rare full send buffer is waited out by the service loop
/// ([`ServiceSocket::writable`]) and drops relayed datagrams ([`ServiceSocket::try_send`]).
#[derive(Clone)]
pub struct ServiceSocket {
    pub(crate) socket: Arc<AsyncFd<std::net::UdpSocket>>,
    pub(crate) state: Arc<UdpSocketState>,
    pub(crate) dual_stack: bool,
    /// The clients given a socket of their own on this socket's port, shared by
    /// the loops serving it.
    pub(crate) isolation: crate::fair::Isolation,
}

impl ServiceSocket {
    /// Wraps the service socket (registered for readability) and its quinn-udp state.
    pub fn new(
        socket: Arc<AsyncFd<std::net::UdpSocket>>,
        state: Arc<UdpSocketState>,
        dual_stack: bool,
    ) -> Self {
        Self {
            socket,
            state,
            dual_stack,
            isolation: crate::fair::Isolation::default(),
        }
    }

    /// Datagrams the kernel dropped on this socket since it was opened (a full
    /// receive queue, mostly: SK_MEMINFO_DROPS), or `None` when it will not say.
    pub fn kernel_drops(&self) -> Option<u64> {
        let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: getsockopt on a live descriptor into a buffer of `len` bytes.
        let read = unsafe {
            libc::getsockopt(
                self.socket.get_ref().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let drops = info.get(libc::SK_MEMINFO_DROPS as usize)?;
        (read == 0 && len as usize > libc::SK_MEMINFO_DROPS as usize * 4)
            .then_some(u64::from(*drops))
    }

    /// Sends `payload` to `to` from the gateway address `local` (when known), without
    /// waiting: a full socket buffer drops the datagram, as the network would.
    pub fn try_send(&self, to: SocketAddr, local: Option<IpAddr>, payload: &[u8]) -> bool {
        let destination = if self.dual_stack {
            to_v6_mapped(to)
        } else {
            to
        };
        let src_ip = local.map(|ip| match (self.dual_stack, ip) {
            (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => ip,
        });
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents: payload,
            segment_size: None,
            src_ip,
        };
        self.state
            .send(self.socket.get_ref().into(), &transmit)
            .is_ok()
    }

    /// Most segments one GSO send may carry on this socket (1: no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents`, datagrams of `segment` bytes each (the last may be shorter),
    /// to `to` from `local` as one segmented (GSO) send without waiting; should the
    /// kernel refuse it, one by one. Returns how many datagrams left.
    pub fn try_send_segments(
        &self,
        to: SocketAddr,
        local: Option<IpAddr>,
        contents: &[u8],
        segment: usize,
    ) -> usize {
        let datagrams = contents.len().div_ceil(segment.max(1));
        let destination = if self.dual_stack {
            to_v6_mapped(to)
        } else {
            to
        };
        let src_ip = local.map(|ip| match (self.dual_stack, ip) {
            (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => ip,
        });
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: (datagrams > 1).then_some(segment),
            src_ip,
        };
        match self.state.try_send(self.socket.get_ref().into(), &transmit) {
            Ok(()) => datagrams,
            // A full buffer drops them all, as one datagram would be.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => contents
                .chunks(segment.max(1))
                .filter(|one| self.try_send(to, local, one))
                .count(),
        }
    }

    /// Waits until the socket can take a datagram again (after a send hit a full
    /// buffer). A second descriptor of the socket is registered for writability for
    /// the wait only, so sends in the common case wake nobody.
    pub async fn writable(&self) -> std::io::Result<()> {
        let descriptor = self.socket.get_ref().try_clone()?;
        // SAFETY: the std socket owns its descriptor and keeps it open, unchanged,
        // for as long as the AsyncFd holding it lives.
        let registered =
            unsafe { AsyncFd::register_with_interest(descriptor, tokio::io::Interest::WRITABLE)? };
        let _ready = registered.writable().await?;
        Ok(())
    }
}

/// IPv4 addresses as IPv4-mapped IPv6 (for sending from a dual-stack socket).
pub fn to_v6_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

/// Largest UDP payload one GSO send may carry in all.
const MAX_GSO_BYTES: usize = 65_000;
/// Most messages one sendmmsg takes (the kernel's UIO_MAXIOV).
const MAX_SEND_BATCH: usize = 1024;
/// Control-message space per outgoing message, in u64s (for alignment): room for an
/// IPV6_PKTINFO and a UDP_SEGMENT header with their padding.
const SEND_CONTROL_WORDS: usize = 12;

/// One message of a batched send: `count` consecutive transmits from `first`, sent
/// as one datagram, or with `count` > 1 as one segmented (GSO) send of equal-length
/// datagrams.
#[derive(Clone, Copy, Debug)]
struct Group {
    first: usize,
    count: usize,
}

/// Reused buffers of [`send_transmits`], so a batch allocates nothing once warm.
#[derive(Default)]
pub(crate) struct SendScratch {
    groups: Vec<Group>,
    destinations: Vec<socket2::SockAddr>,
}

/// Sends a batch's datagrams in order, all of them with one `sendmmsg` where
/// possible. Consecutive datagrams to the same destination with the same length (an
/// introduction's two copies) go out as one message with UDP segmentation offload
/// where the kernel has it: the recipient still gets them as separate datagrams, and
/// the kernel's send path runs once for all of them. Each message carries its own
/// source address (IP_PKTINFO / IPV6_PKTINFO) and segment size. Should a segmented
/// message fail (a device without segmentation support), its copies go out one by
/// one instead; a full send buffer is waited out.
///
/// A transmit for a stream client (TCP or TLS: a rendezvous answer or introduction
/// to a peer registered over a connection) goes to that connection's writer
/// instead ([`crate::stream::send_stream`]).
pub(crate) async fn send_transmits(
    client: &ServiceSocket,
    transmits: &[Transmit],
    metrics: &Metrics,
    scratch: &mut SendScratch,
) {
    if transmits.iter().any(|t| t.transport.is_stream()) {
        let datagrams: Vec<Transmit> = transmits
            .iter()
            .filter(|t| {
                if t.transport.is_stream() {
                    // A gone connection or a full queue drops it, as UDP would.
                    crate::stream::send_stream(t);
                    false
                } else {
                    true
                }
            })
            .cloned()
            .collect();
        send_datagrams(client, &datagrams, metrics, scratch).await;
    } else {
        send_datagrams(client, transmits, metrics, scratch).await;
    }
}

/// [`send_transmits`] for datagrams only.
async fn send_datagrams(
    client: &ServiceSocket,
    transmits: &[Transmit],
    metrics: &Metrics,
    scratch: &mut SendScratch,
) {
    let max_segments = client.state.max_gso_segments();
    scratch.groups.clear();
    scratch.destinations.clear();
    let mut first = 0;
    while let Some(head) = transmits.get(first) {
        let len = head.payload.len();
        let limit = if len == 0 || len > usize::from(u16::MAX) {
            1
        } else {
            max_segments.min(MAX_GSO_BYTES / len).max(1)
        };
        let count = transmits
            .get(first..)
            .unwrap_or_default()
            .iter()
            .take(limit)
            .take_while(|t| {
                t.to == head.to && t.from_local == head.from_local && t.payload.len() == len
            })
            .count()
            .max(1);
        scratch.groups.push(Group { first, count });
        let to = if client.dual_stack {
            to_v6_mapped(head.to)
        } else {
            head.to
        };
        scratch.destinations.push(to.into());
        first += count;
    }
    let mut done = 0;
    while done < scratch.groups.len() {
        match send_groups(client, transmits, scratch, done) {
            Ok(sent) => {
                for group in scratch.groups.get(done..done + sent).unwrap_or_default() {
                    let bytes: usize = transmits
                        .get(group.first..group.first + group.count)
                        .unwrap_or_default()
                        .iter()
                        .map(|t| t.payload.len())
                        .sum();
                    metrics.udp_sent_datagrams.inc_by(group.count as u64);
                    metrics.udp_sent_bytes.inc_by(bytes as u64);
                }
                done += sent.max(1).min(scratch.groups.len() - done);
                if sent == 0 {
                    tracing::debug!("sendmmsg sent nothing; dropping one message");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The send buffer is full: wait until it drains, then retry.
                if let Err(e) = client.writable().await {
                    tracing::debug!(error = %e, "cannot wait for the socket to drain");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            Err(e) => {
                // The first unsent message failed: a segmented one goes out one by one
                // instead; a plain one is dropped, as quinn-udp's send would.
                let Some(&group) = scratch.groups.get(done) else {
                    break;
                };
                done += 1;
                let group_transmits = transmits
                    .get(group.first..group.first + group.count)
                    .unwrap_or_default();
                if group.count == 1 {
                    if let Some(t) = group_transmits.first() {
                        tracing::debug!(error = %e, to = %t.to, "send failed");
                    }
                    continue;
                }
                if let Some(t) = group_transmits.first() {
                    tracing::debug!(error = %e, to = %t.to, "segmented send failed; sending one by one");
                }
                for transmit in group_transmits {
                    match send_one(client, transmit, &transmit.payload, None).await {
                        Ok(()) => {
                            metrics.udp_sent_datagrams.inc();
                            metrics.udp_sent_bytes.inc_by(transmit.payload.len() as u64);
                        }
                        Err(e) => tracing::debug!(error = %e, to = %transmit.to, "send failed"),
                    }
                }
            }
        }
    }
}

/// One non-blocking `sendmmsg` of the groups from index `from` on (at most
/// [`MAX_SEND_BATCH`]): how many messages the kernel took, or the error of the first.
fn send_groups(
    client: &ServiceSocket,
    transmits: &[Transmit],
    scratch: &SendScratch,
    from: usize,
) -> std::io::Result<usize> {
    let groups = scratch.groups.get(from..).unwrap_or_default();
    let groups = groups.get(..MAX_SEND_BATCH).unwrap_or(groups);
    let destinations = scratch.destinations.get(from..).unwrap_or_default();
    if groups.is_empty() {
        return Ok(0);
    }
    // The payloads themselves are not copied: one iovec per datagram, a segmented
    // message gathering its copies.
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(groups.iter().map(|g| g.count).sum());
    for group in groups {
        for transmit in transmits
            .get(group.first..group.first + group.count)
            .unwrap_or_default()
        {
            iovecs.push(libc::iovec {
                iov_base: transmit.payload.as_ptr().cast_mut().cast(),
                iov_len: transmit.payload.len(),
            });
        }
    }
    let mut control = vec![[0u64; SEND_CONTROL_WORDS]; groups.len()];
    // SAFETY: an all-zero mmsghdr is a valid empty header.
    let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; groups.len()];
    let mut iov_at = 0;
    for (((group, destination), header), control) in groups
        .iter()
        .zip(destinations)
        .zip(headers.iter_mut())
        .zip(control.iter_mut())
    {
        let msg = &mut header.msg_hdr;
        msg.msg_name = destination.as_ptr().cast_mut().cast();
        msg.msg_namelen = destination.len();
        msg.msg_iov = iovecs.get_mut(iov_at..).unwrap_or_default().as_mut_ptr();
        msg.msg_iovlen = group.count;
        iov_at += group.count;
        let head = transmits.get(group.first);
        let src_ip = head
            .and_then(|t| t.from_local)
            .map(|ip| match (client.dual_stack, ip) {
                (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
                _ => ip,
            });
        let segment = (group.count > 1)
            .then(|| head.map(|t| t.payload.len()))
            .flatten()
            .and_then(|len| u16::try_from(len).ok());
        if src_ip.is_none() && segment.is_none() {
            continue;
        }
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(control);
        let mut used = 0;
        // SAFETY: the control buffer is 8-byte aligned and large enough for both
        // headers (SEND_CONTROL_WORDS); the CMSG macros stay within msg_controllen,
        // and every header written is followed by its payload of the stated size.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(msg);
            match src_ip {
                Some(IpAddr::V4(ip)) if !cmsg.is_null() => {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    used += write_cmsg(cmsg, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
                    cmsg = libc::CMSG_NXTHDR(msg, cmsg);
                }
                Some(IpAddr::V6(ip)) if !cmsg.is_null() => {
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: ip.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    used += write_cmsg(cmsg, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
                    cmsg = libc::CMSG_NXTHDR(msg, cmsg);
                }
                _ => {}
            }
            if let Some(segment) = segment
                && !cmsg.is_null()
            {
                used += write_cmsg(cmsg, libc::SOL_UDP, libc::UDP_SEGMENT, segment);
            }
        }
        msg.msg_controllen = used;
    }
    let fd = client.socket.get_ref().as_raw_fd();
    // SAFETY: every header points at live buffers (destinations, iovecs over the
    // transmits' payloads, control) that outlive the call.
    let sent = unsafe {
        libc::sendmmsg(
            fd,
            headers.as_mut_ptr(),
            headers.len() as u32,
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())
}

/// Writes one control message (`level`, `ty`, `value`) at `cmsg`; returns the space
/// it takes.
///
/// # Safety
/// `cmsg` must point at a control-message header inside a buffer with room for
/// `CMSG_SPACE(size_of::<T>())` bytes from it.
unsafe fn write_cmsg<T>(cmsg: *mut libc::cmsghdr, level: i32, ty: i32, value: T) -> usize {
    let size = std::mem::size_of::<T>() as u32;
    // SAFETY: guaranteed by the caller; the payload may be unaligned.
    unsafe {
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = ty;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<T>(), value);
        libc::CMSG_SPACE(size) as usize
    }
}

/// Sends `contents` (one datagram, or several of `segment_size` bytes each) to
/// `transmit`'s destination from its local address, waiting while the socket's send
/// buffer is full.
async fn send_one(
    client: &ServiceSocket,
    transmit: &Transmit,
    contents: &[u8],
    segment_size: Option<usize>,
) -> std::io::Result<()> {
    let dual_stack = client.dual_stack;
    let destination = if dual_stack {
        to_v6_mapped(transmit.to)
    } else {
        transmit.to
    };
    let src_ip = transmit.from_local.map(|ip| match (dual_stack, ip) {
        (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => ip,
    });
    let outgoing = quinn_udp::Transmit {
        destination,
        ecn: None,
        contents,
        segment_size,
        src_ip,
    };
    let socket = client.socket.get_ref();
    loop {
        // A segmented send reports its failure so the caller can fall back; a plain
        // one is quinn-udp's `send`, which logs failures other than a full buffer.
        let sent = if segment_size.is_some() {
            client.state.try_send(socket.into(), &outgoing)
        } else {
            client.state.send(socket.into(), &outgoing)
        };
        match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The send buffer is full: wait until it drains, then retry.
                if let Err(e) = client.writable().await {
                    tracing::debug!(error = %e, "cannot wait for the socket to drain");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            result => return result,
        }
    }
}

/// IPv4-mapped IPv6 sources (from a dual-stack socket) as plain IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// One received datagram of a batch, with the addresses the driver needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Datagram<'a> {
    /// The sender (IPv4-mapped IPv6 from a dual-stack socket shown as IPv4).
    pub from: SocketAddr,
    /// The local address it was sent to (IP_PKTINFO), when known.
    pub local: Option<IpAddr>,
    /// The bytes.
    pub bytes: &'a [u8],
}

/// The preallocated buffers of batched receives (recvmmsg through quinn-udp, with
/// GRO where the kernel coalesces): nothing is allocated per batch.
pub(crate) struct RecvBatch {
    storage: Vec<u8>,
    metas: [RecvMeta; RECV_BATCH],
    count: usize,
}

impl RecvBatch {
    /// Buffers for [`RECV_BATCH`] datagrams of up to [`MAX_DATAGRAM`] bytes.
    pub fn new() -> Self {
        Self {
            storage: vec![0u8; MAX_DATAGRAM * RECV_BATCH],
            metas: [RecvMeta::default(); RECV_BATCH],
            count: 0,
        }
    }

    /// Waits until `socket` is readable and reads one batch; returns how many
    /// buffers were filled (0 when readiness was stale or the read failed: ICMP
    /// errors from earlier sends surface here as ECONNREFUSED). Cancel-safe.
    pub async fn recv(&mut self, socket: &ServiceSocket) -> usize {
        self.count = 0;
        let received = match socket.socket.readable().await {
            Ok(mut ready) => ready.try_io(|fd| {
                // Views into the one preallocated buffer: no allocation per batch.
                let mut chunks = self.storage.chunks_mut(MAX_DATAGRAM);
                let mut bufs: [IoSliceMut<'_>; RECV_BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                socket
                    .state
                    .recv(fd.get_ref().into(), &mut bufs, &mut self.metas)
            }),
            Err(e) => Ok(Err(e)),
        };
        match received {
            Ok(Ok(count)) => self.count = count,
            // Readiness was stale: wait again.
            Err(_would_block) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "receive failed"),
        }
        self.count
    }

    /// The datagrams of the last batch, in order (a GRO buffer split into its
    /// datagrams of `stride` bytes).
    pub fn datagrams(&self) -> impl Iterator<Item = Datagram<'_>> {
        let metas = self.metas.get(..self.count).unwrap_or_default();
        metas
            .iter()
            .zip(self.storage.chunks(MAX_DATAGRAM))
            .flat_map(|(meta, buffer)| {
                let from = canonical(meta.addr);
                let local = meta.dst_ip.map(|ip| ip.to_canonical());
                buffer
                    .get(..meta.len)
                    .unwrap_or_default()
                    .chunks(meta.stride.max(1))
                    .map(move |bytes| Datagram { from, local, bytes })
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn grouped_datagrams_arrive_one_by_one_in_order() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let client = service_socket(socket).expect("client socket");
        let metrics = Metrics::new().expect("metrics");
        let first = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
        let second = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
        for receiver in [&first, &second] {
            receiver
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
        }
        let to = |receiver: &std::net::UdpSocket, payload: &[u8]| {
            Transmit::udp(receiver.local_addr().expect("address"), payload.to_vec())
                .from_local(None)
        };
        // Same destination and length: one segmented send of four; then a shorter
        // one; then another destination.
        let transmits = [
            to(&first, b"intro-a"),
            to(&first, b"intro-a"),
            to(&first, b"intro-b"),
            to(&first, b"intro-b"),
            to(&first, b"reply"),
            to(&second, b"other"),
            to(&second, b"other"),
        ];
        let mut scratch = SendScratch::default();
        send_transmits(&client, &transmits, &metrics, &mut scratch).await;
        let mut received = Vec::new();
        let mut datagram = [0u8; 64];
        for (receiver, count) in [(&first, 5), (&second, 2)] {
            for _ in 0..count {
                let len = receiver.recv(&mut datagram).expect("a datagram");
                received.push(datagram.get(..len).unwrap_or_default().to_vec());
            }
        }
        let expected: Vec<Vec<u8>> = transmits.iter().map(|t| t.payload.clone()).collect();
        assert_eq!(received, expected);
        assert_eq!(metrics.udp_sent_datagrams.get(), 7);
        assert_eq!(
            metrics.udp_sent_bytes.get(),
            expected.iter().map(|p| p.len() as u64).sum::<u64>()
        );
    }

    #[tokio::test]
    async fn an_isolated_client_s_datagrams_queue_on_its_own_socket_only() {
        let any = IpAddr::from([0, 0, 0, 0]);
        let loopback = IpAddr::from([127, 0, 0, 1]);
        isolate_one_of_two(any, loopback).await;
        isolate_one_of_two(loopback, loopback).await;
    }

    #[tokio::test]
    async fn the_kernel_s_drops_are_read_and_grow_when_the_queue_is_full() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        // A small queue, quickly full.
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(4096)
            .expect("buffer");
        let to = socket.local_addr().expect("address");
        let service = service_socket(socket).expect("service socket");
        assert_eq!(service.kernel_drops(), Some(0));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
        for _ in 0..200 {
            sender.send_to(&[0u8; 100], to).expect("send");
        }
        assert!(service.kernel_drops().is_some_and(|d| d > 0));
    }

    #[tokio::test]
    async fn a_dual_stack_service_socket_isolates_ipv4_and_ipv6_clients() {
        let any6 = IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED);
        isolate_one_of_two(any6, IpAddr::from([127, 0, 0, 1])).await;
        isolate_one_of_two(any6, IpAddr::from(std::net::Ipv6Addr::LOCALHOST)).await;
    }

    /// Reads until 3 datagrams came (each failing after 2 s).
    async fn read_three(socket: &ServiceSocket) -> Vec<(SocketAddr, Vec<u8>, Option<IpAddr>)> {
        let mut batch = RecvBatch::new();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let wait = tokio::time::timeout(Duration::from_secs(2), batch.recv(socket));
            wait.await.expect("datagrams");
            seen.extend(
                batch
                    .datagrams()
                    .map(|d| (d.from, d.bytes.to_vec(), d.local)),
            );
        }
        seen
    }

    /// A service socket bound to `service_ip`; two clients on `client_ip` send to it,
    /// one of them isolated: each one's datagrams land on its own socket only, and
    /// the port stays taken for anyone else.
    async fn isolate_one_of_two(service_ip: IpAddr, client_ip: IpAddr) {
        let socket = bind(SocketAddr::new(service_ip, 0)).expect("bind");
        let service = service_socket(socket).expect("service socket");
        let port = service
            .socket
            .get_ref()
            .local_addr()
            .expect("address")
            .port();
        let to = SocketAddr::new(client_ip, port);
        let flooder = std::net::UdpSocket::bind((client_ip, 0)).expect("flooder");
        let other = std::net::UdpSocket::bind((client_ip, 0)).expect("other");
        let flooder_addr = flooder.local_addr().expect("address");
        let local = Some(client_ip);
        let isolated = isolated_socket(&service, flooder_addr, local).expect("isolated");
        for _ in 0..3 {
            flooder.send_to(b"flood", to).expect("send");
            other.send_to(b"other", to).expect("send");
        }
        let on_isolated = read_three(&isolated).await;
        let on_service = read_three(&service).await;
        assert!(
            on_isolated
                .iter()
                .all(|d| *d == (flooder_addr, b"flood".to_vec(), local)),
            "{service_ip} {client_ip}: {on_isolated:?}"
        );
        let other_addr = other.local_addr().expect("address");
        assert!(
            on_service
                .iter()
                .all(|d| d.0 == other_addr && d.1 == b"other"),
            "{service_ip} {client_ip}: {on_service:?}"
        );
        assert!(bind(SocketAddr::new(service_ip, port)).is_err());
    }

    #[tokio::test]
    async fn each_message_leaves_from_its_own_local_address() {
        // A wildcard-bound socket: the source address comes from each message's
        // IP_PKTINFO (127.0.0.2 and 127.0.0.3 are local on loopback).
        let socket = bind(SocketAddr::from(([0, 0, 0, 0], 0))).expect("bind");
        let client = service_socket(socket).expect("client socket");
        let metrics = Metrics::new().expect("metrics");
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let to = receiver.local_addr().expect("address");
        let from = |last: u8, payload: &[u8]| {
            Transmit::udp(to, payload.to_vec()).from_local(Some(IpAddr::from([127, 0, 0, last])))
        };
        // Two copies (one segmented message) from .2, then one from .3, then .2.
        let transmits = [
            from(2, b"copy"),
            from(2, b"copy"),
            from(3, b"copy"),
            from(2, b"last"),
        ];
        let mut scratch = SendScratch::default();
        send_transmits(&client, &transmits, &metrics, &mut scratch).await;
        let mut datagram = [0u8; 64];
        for transmit in &transmits {
            let (len, source) = receiver.recv_from(&mut datagram).expect("a datagram");
            assert_eq!(datagram.get(..len), Some(&transmit.payload[..]));
            assert_eq!(Some(source.ip()), transmit.from_local);
        }
        assert_eq!(metrics.udp_sent_datagrams.get(), 4);
    }
}
