//! The TCP segment codec: crafting a header-only segment (SYN, SYN-ACK, ...) into a
//! whole IPv4 or IPv6 packet with its checksums, and parsing one back out of an IP
//! packet or Ethernet frame.
//!
//! It exists apart from the sockets because it is pure: no system calls, no
//! privileges, so it is unit- and property-tested here against byte vectors and a
//! checksum computed independently of pnet, while the capture, injection and
//! kernel-state modules can only be exercised by the root tests in network
//! namespaces (`tests/tests/tcp_raw.rs`).
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use pnet_packet::{
    Packet as _,
    ethernet::{EtherTypes, EthernetPacket},
    ip::IpNextHeaderProtocols,
    ipv4::{self, Ipv4Flags, Ipv4Packet, MutableIpv4Packet},
    ipv6::{Ipv6Packet, MutableIpv6Packet},
    tcp::{self, MutableTcpPacket, TcpFlags, TcpPacket},
};

use super::RawError;

/// The TTL (IPv4) or hop limit (IPv6) crafted segments get unless told otherwise.
pub const DEFAULT_TTL: u8 = 64;
/// The receive window crafted segments advertise unless told otherwise.
pub const DEFAULT_WINDOW: u16 = 64240;
/// The MSS crafted SYNs and SYN-ACKs carry unless told otherwise (Ethernet, IPv4).
pub const DEFAULT_MSS: u16 = 1460;

const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const TCP_HEADER_LEN: usize = 20;

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

/// The error for a packet buffer that pnet found too short (which the lengths
/// computed here rule out); also used by [`super::Injector`] for a socket slot
/// that cannot be empty.
pub(super) fn too_short() -> RawError {
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
