//! Raw TCP packet toolkit: the building blocks of sequence-number-exchange
//! ("NATBlaster style") TCP splicing, technique 3 of `docs/tcp-splicing.md`.
//!
//! - Crafting and parsing ([`Segment`], [`Segment::to_packet`], [`parse_ip`]): pure
//!   functions that build a whole IPv4 or IPv6 packet carrying a TCP SYN, SYN-ACK or
//!   any other header-only segment, with the IP and TCP checksums filled in (pnet's
//!   `pnet_packet`).
//! - Capture ([`SynCapture`]): an `AF_PACKET` socket (pnet's `pnet_datalink`) on the
//!   interface that carries a local address, which sees this host's own outgoing SYN
//!   and so learns the initial sequence number the kernel chose.
//! - Injection ([`Injector`]): a raw `IPPROTO_RAW` socket (header included, through
//!   socket2) that sends a crafted packet as it is, in IPv4 or IPv6.
//! - Kernel helpers: [`tcp_state`] reads a kernel socket's TCP state (to see it reach
//!   ESTABLISHED after an injected SYN-ACK) and [`SuppressionRules`] installs
//!   nftables rules that keep the kernel from killing the attempt (RSTs to the peer,
//!   ICMP time-exceeded answers to a low-TTL SYN), removed again by the guard it
//!   returns ([`NftGuard`]) on drop, on error paths and while unwinding.
//!
//! Every raw socket is owned by a value here and closed when that value is dropped.
//! All of it needs `CAP_NET_RAW` (and `CAP_NET_ADMIN` for the rules); only Linux.
use std::{
    fs::File,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use pnet_datalink::{Channel, DataLinkReceiver, NetworkInterface};
use pnet_packet::{
    Packet as _,
    ethernet::{EtherTypes, EthernetPacket},
    ip::IpNextHeaderProtocols,
    ipv4::{self, Ipv4Flags, Ipv4Packet, MutableIpv4Packet},
    ipv6::{Ipv6Packet, MutableIpv6Packet},
    tcp::{self, MutableTcpPacket, TcpFlags, TcpPacket},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The TTL (IPv4) or hop limit (IPv6) crafted segments get unless told otherwise.
pub const DEFAULT_TTL: u8 = 64;
/// The receive window crafted segments advertise unless told otherwise.
pub const DEFAULT_WINDOW: u16 = 64240;
/// The MSS crafted SYNs and SYN-ACKs carry unless told otherwise (Ethernet, IPv4).
pub const DEFAULT_MSS: u16 = 1460;

const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const TCP_HEADER_LEN: usize = 20;

/// What went wrong with a raw packet operation.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// Source and destination of a segment are not of the same address family.
    #[error("source {src} and destination {dst} are not of the same address family")]
    MixedFamilies {
        /// The source address.
        src: IpAddr,
        /// The destination address.
        dst: IpAddr,
    },
    /// A capture or rule was asked for an unspecified address.
    #[error("a specific local address is needed, not {0}")]
    Unspecified(IpAddr),
    /// No interface of this host carries the address.
    #[error("no network interface has address {0}")]
    NoInterface(IpAddr),
    /// No interface has this name.
    #[error("no network interface is called {0:?}")]
    UnknownInterface(String),
    /// pnet opened something other than an Ethernet-framed channel.
    #[error("interface {0:?} did not give an Ethernet-framed packet channel")]
    UnsupportedChannel(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The awaited SYN did not show up in time.
    #[error("no outgoing SYN from {local} seen on {interface} within {timeout:?}")]
    CaptureTimeout {
        /// The local endpoint whose SYN was awaited.
        local: SocketAddr,
        /// The interface listened on.
        interface: String,
        /// How long was waited.
        timeout: Duration,
    },
    /// The kernel took fewer bytes than the packet had.
    #[error("raw send of {len} bytes to {dst} sent only {sent}")]
    ShortSend {
        /// The destination.
        dst: IpAddr,
        /// The packet's length.
        len: usize,
        /// What was sent.
        sent: usize,
    },
    /// `nft` failed.
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Nft {
        /// The arguments (and script, if any).
        args: String,
        /// The exit status.
        status: String,
        /// What nft wrote to stderr.
        stderr: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RawError {
    let what = what.into();
    move |source| RawError::Io { what, source }
}

/// TCP options a crafted segment carries. They are laid out as Linux lays out its
/// own: MSS first, then each other option NOP-padded to a 4-byte boundary, so the
/// options never exceed 24 of the 40 bytes TCP allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    /// Maximum segment size (kind 2).
    pub mss: Option<u16>,
    /// Window scale shift (kind 3).
    pub window_scale: Option<u8>,
    /// SACK permitted (kind 4).
    pub sack_permitted: bool,
    /// Timestamps value and echo reply (kind 8).
    pub timestamps: Option<(u32, u32)>,
}

impl TcpOptions {
    /// Only an MSS option.
    pub fn mss(mss: u16) -> Self {
        Self {
            mss: Some(mss),
            ..Self::default()
        }
    }

    /// The options' wire bytes (a multiple of 4 long).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        if let Some(mss) = self.mss {
            out.extend_from_slice(&[2, 4]);
            out.extend_from_slice(&mss.to_be_bytes());
        }
        if let Some((value, echo)) = self.timestamps {
            out.extend_from_slice(&[1, 1, 8, 10]);
            out.extend_from_slice(&value.to_be_bytes());
            out.extend_from_slice(&echo.to_be_bytes());
        }
        if self.sack_permitted {
            out.extend_from_slice(&[1, 1, 4, 2]);
        }
        if let Some(shift) = self.window_scale {
            out.extend_from_slice(&[1, 3, 3, shift]);
        }
        out
    }

    /// Reads the options this type knows from a TCP header's option bytes, ignoring
    /// others; stops at the end-of-list option or at a malformed length.
    pub fn parse(mut bytes: &[u8]) -> Self {
        let mut options = Self::default();
        while let Some(&kind) = bytes.first() {
            match kind {
                0 => break,
                1 => {
                    bytes = &bytes[1..];
                    continue;
                }
                _ => {}
            }
            let Some(&len) = bytes.get(1) else { break };
            let len = usize::from(len);
            if len < 2 || len > bytes.len() {
                break;
            }
            let body = &bytes[2..len];
            match (kind, body) {
                (2, &[a, b]) => options.mss = Some(u16::from_be_bytes([a, b])),
                (3, &[shift]) => options.window_scale = Some(shift),
                (4, []) => options.sack_permitted = true,
                (8, &[a, b, c, d, e, f, g, h]) => {
                    options.timestamps = Some((
                        u32::from_be_bytes([a, b, c, d]),
                        u32::from_be_bytes([e, f, g, h]),
                    ));
                }
                _ => {}
            }
            bytes = &bytes[len..];
        }
        options
    }
}

/// A header-only TCP segment and the IP header fields that matter for splicing.
/// [`Segment::to_packet`] turns it into a whole IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (meaningful when `flags` has ACK).
    pub ack: u32,
    /// TCP flags, as pnet's `TcpFlags` bits.
    pub flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Advertised receive window (never scaled in a SYN or SYN-ACK).
    pub window: u16,
    /// TCP options.
    pub options: TcpOptions,
}

impl Segment {
    /// A SYN from `src` to `dst` with initial sequence number `seq`, TTL 64,
    /// window 64240 and MSS 1460.
    pub fn syn(src: SocketAddr, dst: SocketAddr, seq: u32) -> Self {
        Self {
            src,
            dst,
            seq,
            ack: 0,
            flags: TcpFlags::SYN,
            ttl: DEFAULT_TTL,
            window: DEFAULT_WINDOW,
            options: TcpOptions::mss(DEFAULT_MSS),
        }
    }

    /// A SYN-ACK from `src` to `dst` with sequence number `seq` (the sender's ISN)
    /// acknowledging `ack` (the receiver's ISN + 1), TTL 64, window 64240 and MSS 1460.
    pub fn syn_ack(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32) -> Self {
        Self {
            ack,
            flags: TcpFlags::SYN | TcpFlags::ACK,
            ..Self::syn(src, dst, seq)
        }
    }

    /// The same segment with another TTL / hop limit.
    #[must_use]
    pub fn with_ttl(self, ttl: u8) -> Self {
        Self { ttl, ..self }
    }

    /// The same segment with another window.
    #[must_use]
    pub fn with_window(self, window: u16) -> Self {
        Self { window, ..self }
    }

    /// The same segment with other options.
    #[must_use]
    pub fn with_options(self, options: TcpOptions) -> Self {
        Self { options, ..self }
    }

    /// Whether SYN is set and ACK is not (a connection's first segment).
    pub fn is_syn(&self) -> bool {
        self.flags & (TcpFlags::SYN | TcpFlags::ACK) == TcpFlags::SYN
    }

    /// Whether both SYN and ACK are set.
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (TcpFlags::SYN | TcpFlags::ACK) == TcpFlags::SYN | TcpFlags::ACK
    }

    /// The whole IP packet (IPv4 header with DF set and identification 0, or IPv6
    /// header with flow label 0, then the TCP header and options) with correct IP and
    /// TCP checksums.
    pub fn to_packet(&self) -> Result<Vec<u8>, RawError> {
        let options = self.options.to_bytes();
        let tcp_len = TCP_HEADER_LEN + options.len();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut buf = vec![0u8; IPV4_HEADER_LEN + tcp_len];
                let (ip_bytes, tcp_bytes) = buf.split_at_mut(IPV4_HEADER_LEN);
                self.write_tcp(tcp_bytes, &options, |t| tcp::ipv4_checksum(t, &src, &dst));
                let mut ip = MutableIpv4Packet::new(ip_bytes).ok_or_else(too_short)?;
                ip.set_version(4);
                ip.set_header_length(5);
                ip.set_total_length(u16::try_from(IPV4_HEADER_LEN + tcp_len).unwrap_or(0));
                ip.set_identification(0);
                ip.set_flags(Ipv4Flags::DontFragment);
                ip.set_ttl(self.ttl);
                ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
                ip.set_source(src);
                ip.set_destination(dst);
                let sum = ipv4::checksum(&ip.to_immutable());
                ip.set_checksum(sum);
                Ok(buf)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut buf = vec![0u8; IPV6_HEADER_LEN + tcp_len];
                let (ip_bytes, tcp_bytes) = buf.split_at_mut(IPV6_HEADER_LEN);
                self.write_tcp(tcp_bytes, &options, |t| tcp::ipv6_checksum(t, &src, &dst));
                let mut ip = MutableIpv6Packet::new(ip_bytes).ok_or_else(too_short)?;
                ip.set_version(6);
                ip.set_traffic_class(0);
                ip.set_flow_label(0);
                ip.set_payload_length(u16::try_from(tcp_len).unwrap_or(0));
                ip.set_next_header(IpNextHeaderProtocols::Tcp);
                ip.set_hop_limit(self.ttl);
                ip.set_source(src);
                ip.set_destination(dst);
                Ok(buf)
            }
            (src, dst) => Err(RawError::MixedFamilies { src, dst }),
        }
    }

    fn write_tcp(&self, bytes: &mut [u8], options: &[u8], sum: impl Fn(&TcpPacket) -> u16) {
        bytes[TCP_HEADER_LEN..].copy_from_slice(options);
        // The buffer is exactly TCP_HEADER_LEN + options long, so `new` succeeds.
        let Some(mut tcp) = MutableTcpPacket::new(bytes) else {
            return;
        };
        tcp.set_source(self.src.port());
        tcp.set_destination(self.dst.port());
        tcp.set_sequence(self.seq);
        tcp.set_acknowledgement(self.ack);
        // At most 24 option bytes: the offset is 5..=11 words.
        tcp.set_data_offset(u8::try_from((TCP_HEADER_LEN + options.len()) / 4).unwrap_or(5));
        tcp.set_reserved(0);
        tcp.set_flags(self.flags);
        tcp.set_window(self.window);
        tcp.set_urgent_ptr(0);
        tcp.set_checksum(0);
        let checksum = sum(&tcp.to_immutable());
        tcp.set_checksum(checksum);
    }
}

fn too_short() -> RawError {
    RawError::Io {
        what: "crafting a packet".to_owned(),
        source: io::Error::other("buffer too short"),
    }
}

/// A segment read back from an IP packet, with whether its checksums verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedSegment {
    /// The segment's fields.
    pub segment: Segment,
    /// Whether the IPv4 header checksum is right (always true for IPv6).
    pub ip_checksum_ok: bool,
    /// Whether the TCP checksum over the pseudo-header is right. Packets captured on
    /// their way out of this host usually fail it: the kernel leaves the sum to the
    /// NIC (checksum offload).
    pub tcp_checksum_ok: bool,
    /// Payload bytes after the TCP header.
    pub payload_len: usize,
}

/// Parses an IPv4 or IPv6 packet carrying TCP (no IPv6 extension headers, no IPv4
/// fragments). Returns `None` for anything else or anything malformed; never panics.
pub fn parse_ip(packet: &[u8]) -> Option<ParsedSegment> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new(packet)?;
            let header_len = usize::from(ip.get_header_length()) * 4;
            let total = usize::from(ip.get_total_length());
            if header_len < IPV4_HEADER_LEN
                || total < header_len
                || total > packet.len()
                || ip.get_next_level_protocol() != IpNextHeaderProtocols::Tcp
                || ip.get_fragment_offset() != 0
                || ip.get_flags() & Ipv4Flags::MoreFragments != 0
            {
                return None;
            }
            let (src, dst) = (ip.get_source(), ip.get_destination());
            let tcp_bytes = &packet[header_len..total];
            let tcp = checked_tcp(tcp_bytes)?;
            let ip_checksum_ok =
                ipv4::checksum(&Ipv4Packet::new(&packet[..header_len])?) == ip.get_checksum();
            let tcp_checksum_ok = tcp::ipv4_checksum(&tcp, &src, &dst) == tcp.get_checksum();
            Some(parsed(
                &tcp,
                tcp_bytes,
                IpAddr::V4(src),
                IpAddr::V4(dst),
                ip.get_ttl(),
                ip_checksum_ok,
                tcp_checksum_ok,
            ))
        }
        6 => {
            let ip = Ipv6Packet::new(packet)?;
            let end = IPV6_HEADER_LEN + usize::from(ip.get_payload_length());
            if end > packet.len() || ip.get_next_header() != IpNextHeaderProtocols::Tcp {
                return None;
            }
            let (src, dst) = (ip.get_source(), ip.get_destination());
            let tcp_bytes = &packet[IPV6_HEADER_LEN..end];
            let tcp = checked_tcp(tcp_bytes)?;
            let tcp_checksum_ok = tcp::ipv6_checksum(&tcp, &src, &dst) == tcp.get_checksum();
            Some(parsed(
                &tcp,
                tcp_bytes,
                IpAddr::V6(src),
                IpAddr::V6(dst),
                ip.get_hop_limit(),
                true,
                tcp_checksum_ok,
            ))
        }
        _ => None,
    }
}

/// A TCP view of `bytes` whose data offset is sane for them.
fn checked_tcp(bytes: &[u8]) -> Option<TcpPacket<'_>> {
    let tcp = TcpPacket::new(bytes)?;
    let offset = usize::from(tcp.get_data_offset()) * 4;
    (offset >= TCP_HEADER_LEN && offset <= bytes.len()).then_some(tcp)
}

fn parsed(
    tcp: &TcpPacket<'_>,
    bytes: &[u8],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    ip_checksum_ok: bool,
    tcp_checksum_ok: bool,
) -> ParsedSegment {
    let offset = usize::from(tcp.get_data_offset()) * 4;
    ParsedSegment {
        segment: Segment {
            src: SocketAddr::new(src, tcp.get_source()),
            dst: SocketAddr::new(dst, tcp.get_destination()),
            seq: tcp.get_sequence(),
            ack: tcp.get_acknowledgement(),
            flags: tcp.get_flags(),
            ttl,
            window: tcp.get_window(),
            options: TcpOptions::parse(&bytes[TCP_HEADER_LEN..offset]),
        },
        ip_checksum_ok,
        tcp_checksum_ok,
        payload_len: bytes.len() - offset,
    }
}

/// Parses an Ethernet frame (optionally with one 802.1Q tag) carrying IPv4 or IPv6
/// TCP; see [`parse_ip`].
pub fn parse_ethernet(frame: &[u8]) -> Option<ParsedSegment> {
    let eth = EthernetPacket::new(frame)?;
    let (ethertype, payload) = if eth.get_ethertype() == EtherTypes::Vlan {
        let inner = eth.payload();
        let ethertype = u16::from_be_bytes([*inner.get(2)?, *inner.get(3)?]);
        (ethertype, inner.get(4..)?)
    } else {
        (eth.get_ethertype().0, eth.payload())
    };
    if ethertype == EtherTypes::Ipv4.0 || ethertype == EtherTypes::Ipv6.0 {
        parse_ip(payload)
    } else {
        None
    }
}

/// The interface of this host (in the calling thread's network namespace) that
/// carries `addr`.
pub fn interface_with_addr(addr: IpAddr) -> Result<NetworkInterface, RawError> {
    if addr.is_unspecified() {
        return Err(RawError::Unspecified(addr));
    }
    pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.ips.iter().any(|n| n.ip() == addr))
        .ok_or(RawError::NoInterface(addr))
}

/// Watches an interface for this host's own outgoing SYN from one local endpoint,
/// to learn the initial sequence number the kernel picked for a `connect()`.
///
/// Open it *before* the `connect()` (the socket buffers what it sees), then
/// [`SynCapture::wait`]. The `AF_PACKET` socket is closed when this is dropped.
pub struct SynCapture {
    rx: Box<dyn DataLinkReceiver>,
    interface: String,
    local: SocketAddr,
    remote: Option<SocketAddr>,
}

impl std::fmt::Debug for SynCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynCapture")
            .field("interface", &self.interface)
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// How often a capture's blocking read wakes up to check its deadline.
const CAPTURE_POLL: Duration = Duration::from_millis(20);

impl SynCapture {
    /// Listens on the interface that carries `local`'s address for a SYN from
    /// `local` (to `remote`, when given).
    pub fn for_local(local: SocketAddr, remote: Option<SocketAddr>) -> Result<Self, RawError> {
        let interface = interface_with_addr(local.ip())?;
        Self::open(&interface, local, remote)
    }

    /// Listens on the interface called `name`.
    pub fn on_interface(
        name: &str,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> Result<Self, RawError> {
        let interface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| RawError::UnknownInterface(name.to_owned()))?;
        Self::open(&interface, local, remote)
    }

    fn open(
        interface: &NetworkInterface,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> Result<Self, RawError> {
        if local.ip().is_unspecified() {
            return Err(RawError::Unspecified(local.ip()));
        }
        let config = pnet_datalink::Config {
            read_buffer_size: 65536,
            read_timeout: Some(CAPTURE_POLL),
            promiscuous: false,
            ..pnet_datalink::Config::default()
        };
        let rx = match pnet_datalink::channel(interface, config) {
            Ok(Channel::Ethernet(_tx, rx)) => rx,
            Ok(_) => return Err(RawError::UnsupportedChannel(interface.name.clone())),
            Err(e) => {
                return Err(RawError::Io {
                    what: format!("opening a packet socket on {}", interface.name),
                    source: e,
                });
            }
        };
        Ok(Self {
            rx,
            interface: interface.name.clone(),
            local,
            remote,
        })
    }

    /// The interface listened on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Whether `segment` is the SYN this capture waits for.
    pub fn matches(&self, segment: &Segment) -> bool {
        segment.is_syn()
            && segment.src == self.local
            && self.remote.is_none_or(|r| segment.dst == r)
    }

    /// Waits up to `timeout` for the SYN and returns it (its `seq` is the ISN).
    pub fn wait(&mut self, timeout: Duration) -> Result<Segment, RawError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.rx.next() {
                Ok(frame) => {
                    if let Some(p) = parse_ethernet(frame)
                        && self.matches(&p.segment)
                    {
                        tracing::debug!(
                            interface = %self.interface,
                            local = %self.local,
                            isn = p.segment.seq,
                            "captured own SYN"
                        );
                        return Ok(p.segment);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(RawError::Io {
                        what: format!("reading packets on {}", self.interface),
                        source: e,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(RawError::CaptureTimeout {
                    local: self.local,
                    interface: self.interface.clone(),
                    timeout,
                });
            }
        }
    }
}

/// Sends crafted packets as they are through raw sockets (`IPPROTO_RAW`, which
/// implies a caller-built IP header, for IPv4 and IPv6). The sockets are opened on
/// first use per family, in the calling thread's network namespace, and closed on
/// drop.
#[derive(Debug, Default)]
pub struct Injector {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl Injector {
    /// An injector with no socket open yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn socket(&mut self, v6: bool) -> Result<&Socket, RawError> {
        let (slot, domain) = if v6 {
            (&mut self.v6, Domain::IPV6)
        } else {
            (&mut self.v4, Domain::IPV4)
        };
        if slot.is_none() {
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
                .map_err(io_err("opening a raw IPPROTO_RAW socket"))?;
            *slot = Some(socket);
        }
        slot.as_ref().ok_or_else(too_short)
    }

    /// Crafts `segment` and sends it to its destination address.
    pub fn send(&mut self, segment: &Segment) -> Result<(), RawError> {
        let packet = segment.to_packet()?;
        let dst = segment.dst.ip();
        // Port 0: a raw socket's destination port field means "protocol" to Linux.
        let to = match segment.dst {
            SocketAddr::V4(a) => SockAddr::from(SocketAddr::new(IpAddr::V4(*a.ip()), 0)),
            SocketAddr::V6(a) => {
                SockAddr::from(std::net::SocketAddrV6::new(*a.ip(), 0, 0, a.scope_id()))
            }
        };
        let sent = self
            .socket(dst.is_ipv6())?
            .send_to(&packet, &to)
            .map_err(io_err(format!("raw send to {dst}")))?;
        if sent != packet.len() {
            return Err(RawError::ShortSend {
                dst,
                len: packet.len(),
                sent,
            });
        }
        tracing::debug!(segment = ?segment, "injected crafted segment");
        Ok(())
    }

    /// Sends `segment` at least once and up to `attempts` times, `interval` apart,
    /// until `done()` says it worked (checked every few milliseconds after each
    /// send). Returns the number of sends made, or `None` when all were made and
    /// `done()` never held.
    pub fn send_until(
        &mut self,
        segment: &Segment,
        attempts: u32,
        interval: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Result<Option<u32>, RawError> {
        for sent in 1..=attempts.max(1) {
            self.send(segment)?;
            let until = Instant::now() + interval;
            loop {
                if done() {
                    return Ok(Some(sent));
                }
                if Instant::now() >= until {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5).min(interval));
            }
        }
        Ok(None)
    }
}

/// A kernel TCP socket's state (Linux `TCP_INFO`'s `tcpi_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// ESTABLISHED.
    Established,
    /// SYN_SENT: connect() sent its SYN and waits for a SYN or SYN-ACK.
    SynSent,
    /// SYN_RECV: a SYN came in (simultaneous open), our SYN-ACK is out.
    SynRecv,
    /// FIN_WAIT1.
    FinWait1,
    /// FIN_WAIT2.
    FinWait2,
    /// TIME_WAIT.
    TimeWait,
    /// CLOSE: not connected (e.g. the attempt was reset or gave up).
    Close,
    /// CLOSE_WAIT: the peer sent its FIN.
    CloseWait,
    /// LAST_ACK.
    LastAck,
    /// LISTEN.
    Listen,
    /// CLOSING.
    Closing,
    /// A state this type does not know, by its kernel number.
    Other(u8),
}

impl TcpState {
    fn from_kernel(n: u8) -> Self {
        match n {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            n => Self::Other(n),
        }
    }

    /// Whether the handshake completed: ESTABLISHED or any state a connection can
    /// only reach from it (a fast peer may already have sent its FIN).
    pub fn is_synchronized(self) -> bool {
        matches!(
            self,
            Self::Established
                | Self::FinWait1
                | Self::FinWait2
                | Self::TimeWait
                | Self::CloseWait
                | Self::LastAck
                | Self::Closing
        )
    }
}

/// The TCP state of a kernel socket.
pub fn tcp_state(socket: BorrowedFd<'_>) -> io::Result<TcpState> {
    let mut info = [0u8; 8];
    let mut len = libc::socklen_t::try_from(info.len()).unwrap_or(8);
    // SAFETY: getsockopt(2) writes at most `len` bytes into `info`, which is that
    // long, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpState::from_kernel(info[0]))
}

/// Polls `socket`'s state every few milliseconds for up to `timeout` until `done`
/// holds for it; returns the last state seen either way.
pub fn wait_for_state(
    socket: &impl AsFd,
    timeout: Duration,
    mut done: impl FnMut(TcpState) -> bool,
) -> io::Result<TcpState> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = tcp_state(socket.as_fd())?;
        if done(now) || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// nftables rules that keep the kernel from spoiling a splice attempt, installed in
/// one table of their own by [`SuppressionRules::install`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuppressionRules {
    /// Drop RSTs this host sends to these endpoints (a kernel that sees a stray
    /// SYN-ACK or segment for no socket of its own answers with one).
    pub rst_to: Vec<SocketAddr>,
    /// Drop incoming ICMP and ICMPv6 time-exceeded messages while the rules stand:
    /// Linux aborts a connect() in SYN_SENT that gets one, which is what a low-TTL
    /// SYN provokes from the router where it expires.
    pub icmp_time_exceeded: bool,
}

static NEXT_TABLE: AtomicU32 = AtomicU32::new(0);

impl SuppressionRules {
    /// The nft script that creates `table` with these rules.
    pub fn script(&self, table: &str) -> String {
        let mut s = format!("table inet {table} {{\n");
        s.push_str("  chain input {\n    type filter hook input priority -150; policy accept;\n");
        if self.icmp_time_exceeded {
            s.push_str("    icmp type time-exceeded counter drop\n");
            s.push_str("    icmpv6 type time-exceeded counter drop\n");
        }
        s.push_str("  }\n");
        s.push_str("  chain output {\n    type filter hook output priority -150; policy accept;\n");
        for to in &self.rst_to {
            let family = if to.is_ipv4() { "ip" } else { "ip6" };
            s.push_str(&format!(
                "    {family} daddr {} tcp dport {} tcp flags & rst == rst counter drop\n",
                to.ip(),
                to.port()
            ));
        }
        s.push_str("  }\n}\n");
        s
    }

    /// Installs the rules in a new table (`inet gateway_splice_<pid>_<n>`) of the
    /// calling thread's network namespace. The returned guard deletes the table when
    /// dropped, wherever that happens.
    pub fn install(&self) -> Result<NftGuard, RawError> {
        for to in &self.rst_to {
            if to.ip().is_unspecified() {
                return Err(RawError::Unspecified(to.ip()));
            }
        }
        let table = format!(
            "gateway_splice_{}_{}",
            std::process::id(),
            NEXT_TABLE.fetch_add(1, Ordering::Relaxed)
        );
        let netns = File::open("/proc/thread-self/ns/net")
            .map_err(io_err("opening this thread's network namespace"))?;
        let netns_ino = netns
            .metadata()
            .map_err(io_err("reading this thread's network namespace"))?
            .ino();
        nft(&["-f", "-"], Some(&self.script(&table)))?;
        tracing::debug!(%table, "installed splice suppression rules");
        Ok(NftGuard {
            table,
            netns,
            netns_ino,
            removed: false,
        })
    }
}

/// Runs `nft args` (feeding `stdin`) in the calling thread's network namespace.
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, RawError> {
    let shown = || {
        let mut s = args.join(" ");
        if let Some(text) = stdin {
            s.push_str(" <<EOF\n");
            s.push_str(text);
            s.push_str("EOF");
        }
        s
    };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running nft {}", args.join(" "))))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(io_err("writing to nft"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for nft {}", args.join(" "))))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RawError::Nft {
            args: shown(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Owns an nftables table made by [`SuppressionRules::install`] and deletes it on
/// drop, in the network namespace it was made in, even when dropped from another
/// thread or while unwinding. [`NftGuard::remove`] does the same and reports errors.
#[derive(Debug)]
pub struct NftGuard {
    table: String,
    netns: File,
    netns_ino: u64,
    removed: bool,
}

impl NftGuard {
    /// The table's name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Deletes the table now.
    pub fn remove(mut self) -> Result<(), RawError> {
        self.removed = true;
        self.delete()
    }

    fn delete(&self) -> Result<(), RawError> {
        let args = ["delete", "table", "inet", self.table.as_str()];
        let here = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
        if here.ok() == Some(self.netns_ino) {
            return nft(&args, None).map(|_| ());
        }
        let fd = self.netns.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) on an open namespace file; it affects only this
                    // scoped thread, which ends right after.
                    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(RawError::Io {
                            what: "entering the rules' network namespace".to_owned(),
                            source: io::Error::last_os_error(),
                        });
                    }
                    nft(&args, None).map(|_| ())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(RawError::Io {
                        what: "removing nft rules".to_owned(),
                        source: io::Error::other("the removing thread panicked"),
                    })
                })
        })
    }
}

impl Drop for NftGuard {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = self.delete()
        {
            tracing::warn!(table = %self.table, "could not remove splice suppression rules: {e}");
        }
    }
}

/// Sets the TTL (IPv4) or unicast hop limit (IPv6) of a kernel socket, e.g. low for
/// the SYN of a splice attempt and back to normal once it is established.
pub fn set_socket_ttl(socket: &Socket, v6: bool, ttl: u8) -> io::Result<()> {
    if v6 {
        socket.set_unicast_hops_v6(u32::from(ttl))
    } else {
        socket.set_ttl_v4(u32::from(ttl))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    /// RFC 1071 one's-complement sum of `bytes` (odd length padded with zero),
    /// written here independently of pnet.
    fn ones_sum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            let word = u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
            sum += word;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// Whether the IP header (IPv4) and TCP checksums of `packet` verify, by the
    /// independent sum above: a correct checksum makes the covered words sum to 0xffff.
    fn independently_verified(packet: &[u8]) -> bool {
        if packet[0] >> 4 == 4 {
            let ihl = usize::from(packet[0] & 0xf) * 4;
            let tcp = &packet[ihl..];
            let len = u16::try_from(tcp.len()).unwrap().to_be_bytes();
            ones_sum(&[&packet[..ihl]]) == 0xffff
                && ones_sum(&[&packet[12..20], &[0, 6], &len, tcp]) == 0xffff
        } else {
            let tcp = &packet[40..];
            let len = u32::try_from(tcp.len()).unwrap().to_be_bytes();
            ones_sum(&[&packet[8..40], &len, &[0, 0, 0, 6], tcp]) == 0xffff
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Vectors computed byte by byte with a separate Python script (struct.pack and
    // an RFC 1071 sum), not with this code or pnet.
    const SYN_V4: &str = "4500002c0000400040064e95c0000201c63364029c4001bb01020304\
                          000000006002faf00efd0000020405b4";
    const SYN_ACK_V6: &str = "60000000001c060320010db800000000000000000000000120010db8\
                              00010000000000000000000215b31a0afffffff012345679701203e8\
                              8c4f0000020405b401030307";

    #[test]
    fn syn_v4_matches_independent_bytes() {
        let syn = Segment::syn(
            "192.0.2.1:40000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
            0x0102_0304,
        );
        let packet = syn.to_packet().unwrap();
        assert_eq!(packet, hex(&SYN_V4.replace(' ', "")));
        assert!(independently_verified(&packet));
    }

    #[test]
    fn syn_ack_v6_matches_independent_bytes() {
        let syn_ack = Segment::syn_ack(
            "[2001:db8::1]:5555".parse().unwrap(),
            "[2001:db8:1::2]:6666".parse().unwrap(),
            0xffff_fff0,
            0x1234_5679,
        )
        .with_ttl(3)
        .with_window(1000)
        .with_options(TcpOptions {
            window_scale: Some(7),
            ..TcpOptions::mss(1460)
        });
        let packet = syn_ack.to_packet().unwrap();
        assert_eq!(packet, hex(&SYN_ACK_V6.replace(' ', "")));
        assert!(independently_verified(&packet));
        let parsed = parse_ip(&packet).unwrap();
        assert_eq!(parsed.segment, syn_ack);
        assert!(parsed.segment.is_syn_ack() && !parsed.segment.is_syn());
    }

    #[test]
    fn a_flipped_bit_fails_the_checksums() {
        let syn = Segment::syn(
            "192.0.2.1:40000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
            7,
        );
        let mut packet = syn.to_packet().unwrap();
        packet[25] ^= 1; // a destination-port bit
        let parsed = parse_ip(&packet).unwrap();
        assert!(parsed.ip_checksum_ok && !parsed.tcp_checksum_ok);
        packet[25] ^= 1;
        packet[8] ^= 1; // the TTL
        let parsed = parse_ip(&packet).unwrap();
        assert!(!parsed.ip_checksum_ok && parsed.tcp_checksum_ok);
    }

    #[test]
    fn mixed_families_are_refused() {
        let err = Segment::syn(
            "192.0.2.1:1".parse().unwrap(),
            "[2001:db8::1]:2".parse().unwrap(),
            0,
        )
        .to_packet()
        .unwrap_err();
        assert!(matches!(err, RawError::MixedFamilies { .. }), "{err}");
    }

    #[test]
    fn options_parse_back_and_stop_at_garbage() {
        let all = TcpOptions {
            mss: Some(1220),
            window_scale: Some(14),
            sack_permitted: true,
            timestamps: Some((1, u32::MAX)),
        };
        let bytes = all.to_bytes();
        assert_eq!(bytes.len(), 24);
        assert_eq!(TcpOptions::parse(&bytes), all);
        // A zero length stops parsing instead of looping.
        assert_eq!(
            TcpOptions::parse(&[2, 4, 5, 0, 3, 0, 9]),
            TcpOptions::mss(1280)
        );
        assert_eq!(TcpOptions::parse(&[8, 200]), TcpOptions::default());
    }

    #[test]
    fn ethernet_frames_and_vlan_tags_are_unwrapped() {
        let syn = Segment::syn(
            "10.0.0.2:1000".parse().unwrap(),
            "10.0.1.2:2000".parse().unwrap(),
            42,
        );
        let ip = syn.to_packet().unwrap();
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        assert_eq!(parse_ethernet(&frame).unwrap().segment, syn);
        let mut tagged = vec![0u8; 12];
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x08, 0x00]);
        tagged.extend_from_slice(&ip);
        assert_eq!(parse_ethernet(&tagged).unwrap().segment, syn);
        frame[12] = 0x86; // not IP
        assert!(parse_ethernet(&frame).is_none());
    }

    #[test]
    fn rules_script_names_each_peer() {
        let rules = SuppressionRules {
            rst_to: vec![
                "192.0.2.1:80".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            ],
            icmp_time_exceeded: true,
        };
        let script = rules.script("t");
        assert!(
            script.contains("ip daddr 192.0.2.1 tcp dport 80 tcp flags & rst == rst counter drop")
        );
        assert!(script.contains("ip6 daddr 2001:db8::1 tcp dport 443"));
        assert!(script.contains("icmpv6 type time-exceeded counter drop"));
        let quiet = SuppressionRules::default().script("t");
        assert!(!quiet.contains("drop"));
    }

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        ]
    }

    fn options() -> impl Strategy<Value = TcpOptions> {
        (
            any::<Option<u16>>(),
            any::<Option<u8>>(),
            any::<bool>(),
            any::<Option<(u32, u32)>>(),
        )
            .prop_map(
                |(mss, window_scale, sack_permitted, timestamps)| TcpOptions {
                    mss,
                    window_scale,
                    sack_permitted,
                    timestamps,
                },
            )
    }

    proptest! {
        #[test]
        fn crafted_segments_parse_back_with_valid_checksums(
            src in addr(), dst_bytes in any::<[u8; 16]>(), sport in any::<u16>(),
            dport in any::<u16>(), seq in any::<u32>(), ack in any::<u32>(),
            syn_ack in any::<bool>(), ttl in any::<u8>(), window in any::<u16>(),
            options in options(),
        ) {
            let dst = match src {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(
                    dst_bytes[0], dst_bytes[1], dst_bytes[2], dst_bytes[3])),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(dst_bytes)),
            };
            let (src, dst) = (SocketAddr::new(src, sport), SocketAddr::new(dst, dport));
            let segment = if syn_ack {
                Segment::syn_ack(src, dst, seq, ack)
            } else {
                Segment::syn(src, dst, seq)
            }
            .with_ttl(ttl)
            .with_window(window)
            .with_options(options);
            let packet = segment.to_packet().unwrap();
            prop_assert!(independently_verified(&packet));
            let parsed = parse_ip(&packet).unwrap();
            prop_assert!(parsed.ip_checksum_ok && parsed.tcp_checksum_ok);
            prop_assert_eq!(parsed.payload_len, 0);
            prop_assert_eq!(parsed.segment, segment);
            // pnet's own parser agrees on the fields it knows.
            let tcp_at = if src.is_ipv4() { 20 } else { 40 };
            let tcp = TcpPacket::new(&packet[tcp_at..]).unwrap();
            prop_assert_eq!(tcp.get_sequence(), seq);
            prop_assert_eq!(tcp.get_flags() & TcpFlags::ACK != 0, syn_ack);
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse_ip(&bytes);
            let _ = parse_ethernet(&bytes);
            let _ = TcpOptions::parse(&bytes);
        }

        #[test]
        fn truncated_packets_are_refused(cut in 1usize..44) {
            let packet = Segment::syn(
                "192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap(), 1,
            ).to_packet().unwrap();
            prop_assert!(parse_ip(&packet[..packet.len().saturating_sub(cut)]).is_none());
        }
    }
}
