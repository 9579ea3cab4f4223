//! NAT-PMP (RFC 6886) and PCP (RFC 6887) messages: what the agent asks its router and
//! how the router answers. Only what a port-mapping client needs: NAT-PMP's external
//! address and MAP requests, PCP's MAP opcode; every answer parsed without panicking.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The port NAT-PMP and PCP servers listen on (RFC 6886 §3, RFC 6887 §19.1).
pub const SERVER_PORT: u16 = 5351;
/// NAT-PMP's version number.
pub const NAT_PMP_VERSION: u8 = 0;
/// PCP's version number.
pub const PCP_VERSION: u8 = 2;
/// The result code NAT-PMP (1) and PCP (1) both use for "unsupported version".
pub const UNSUPPORTED_VERSION: u16 = 1;
/// PCP's ANNOUNCE opcode.
const PCP_ANNOUNCE: u8 = 0;
/// PCP's MAP opcode.
const PCP_MAP: u8 = 1;
/// Length of a PCP ANNOUNCE request: the common 24-byte header alone.
pub const PCP_ANNOUNCE_LEN: usize = 24;
/// Length of a PCP MAP request or answer: 24-byte header and 36 bytes of MAP data.
pub const PCP_MAP_LEN: usize = 60;

/// What a mapping carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappedTransport {
    /// UDP (NAT-PMP opcode 1, IANA protocol 17).
    Udp,
    /// TCP (NAT-PMP opcode 2, IANA protocol 6).
    Tcp,
}

impl MappedTransport {
    fn nat_pmp_opcode(self) -> u8 {
        match self {
            Self::Udp => 1,
            Self::Tcp => 2,
        }
    }

    fn iana_protocol(self) -> u8 {
        match self {
            Self::Udp => 17,
            Self::Tcp => 6,
        }
    }

    /// Lower-case name, for status lines and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// NAT-PMP's request for the router's external address (RFC 6886 §3.2).
pub fn nat_pmp_external_address_request() -> [u8; 2] {
    [NAT_PMP_VERSION, 0]
}

/// NAT-PMP's MAP request (RFC 6886 §3.3); `lifetime_secs` 0 deletes the mapping.
pub fn nat_pmp_map_request(
    transport: MappedTransport,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime_secs: u32,
) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0] = NAT_PMP_VERSION;
    out[1] = transport.nat_pmp_opcode();
    out[4..6].copy_from_slice(&internal_port.to_be_bytes());
    out[6..8].copy_from_slice(&suggested_external_port.to_be_bytes());
    out[8..12].copy_from_slice(&lifetime_secs.to_be_bytes());
    out
}

/// PCP's ANNOUNCE request (RFC 6887 §14.1) from `client`: asks nothing of the
/// router but an answer, so a client learns whether PCP is spoken without creating
/// a mapping.
pub fn pcp_announce_request(client: IpAddr) -> [u8; PCP_ANNOUNCE_LEN] {
    let mut out = [0u8; PCP_ANNOUNCE_LEN];
    out[0] = PCP_VERSION;
    out[1] = PCP_ANNOUNCE;
    out[8..24].copy_from_slice(&mapped_v6(client).octets());
    out
}

/// PCP's MAP request (RFC 6887 §11.1) from `client` (the address the router sees
/// the request come from), with `nonce` naming the mapping; `lifetime_secs` 0
/// deletes it.
pub fn pcp_map_request(
    nonce: [u8; 12],
    client: IpAddr,
    transport: MappedTransport,
    internal_port: u16,
    suggested_external: Option<SocketAddr>,
    lifetime_secs: u32,
) -> [u8; PCP_MAP_LEN] {
    let mut out = [0u8; PCP_MAP_LEN];
    out[0] = PCP_VERSION;
    out[1] = PCP_MAP;
    out[4..8].copy_from_slice(&lifetime_secs.to_be_bytes());
    out[8..24].copy_from_slice(&mapped_v6(client).octets());
    out[24..36].copy_from_slice(&nonce);
    out[36] = transport.iana_protocol();
    out[40..42].copy_from_slice(&internal_port.to_be_bytes());
    let (port, ip) = suggested_external.map_or((0, IpAddr::V4(Ipv4Addr::UNSPECIFIED)), |a| {
        (a.port(), a.ip())
    });
    out[42..44].copy_from_slice(&port.to_be_bytes());
    // The all-zeros IPv4-mapped address asks for "any external address" (§11.1).
    out[44..60].copy_from_slice(&mapped_v6(ip).octets());
    out
}

fn mapped_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// An answer from a NAT-PMP or PCP server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterAnswer {
    /// NAT-PMP's external address answer.
    NatPmpExternalAddress {
        /// Result code (0 = success).
        result: u16,
        /// Seconds since the router's mapping table started (a reboot resets it).
        epoch: u32,
        /// The router's external address.
        address: Ipv4Addr,
    },
    /// NAT-PMP's MAP answer.
    NatPmpMap {
        /// UDP or TCP.
        transport: MappedTransport,
        /// Result code (0 = success).
        result: u16,
        /// Seconds since the router's mapping table started.
        epoch: u32,
        /// The internal port the mapping is for.
        internal_port: u16,
        /// The external port granted.
        external_port: u16,
        /// Seconds the mapping lasts.
        lifetime_secs: u32,
    },
    /// A version-0 answer saying NAT-PMP does not know the version we asked in:
    /// a NAT-PMP-only router's answer to a PCP request.
    NatPmpUnsupportedVersion,
    /// PCP's MAP answer.
    PcpMap {
        /// Result code (0 = success).
        result: u8,
        /// Seconds the mapping lasts (on error: how long the error holds).
        lifetime_secs: u32,
        /// Seconds since the router's mapping table started.
        epoch: u32,
        /// The request's nonce, echoed.
        nonce: [u8; 12],
        /// UDP or TCP (`None` for another protocol number).
        transport: Option<MappedTransport>,
        /// The internal port the mapping is for.
        internal_port: u16,
        /// The external endpoint granted.
        external: SocketAddr,
    },
    /// PCP's ANNOUNCE answer.
    PcpAnnounce {
        /// Result code (0 = success).
        result: u8,
        /// Seconds since the router's mapping table started.
        epoch: u32,
    },
    /// A PCP answer with a result but nothing else we use (e.g. UNSUPP_VERSION to a
    /// NAT-PMP request from a PCP-only router, which answers with its own version).
    PcpError {
        /// The version the router speaks.
        version: u8,
        /// Result code.
        result: u8,
    },
}

/// Parses a datagram from the router's port 5351; `None` for anything that is not
/// an answer we can use (requests, unknown opcodes, short or garbled datagrams).
pub fn parse_answer(bytes: &[u8]) -> Option<RouterAnswer> {
    let version = *bytes.first()?;
    let opcode = *bytes.get(1)?;
    match version {
        NAT_PMP_VERSION => {
            if opcode & 0x80 == 0 {
                return None;
            }
            let result = be16(bytes, 2)?;
            if result == UNSUPPORTED_VERSION {
                return Some(RouterAnswer::NatPmpUnsupportedVersion);
            }
            let epoch = be32(bytes, 4)?;
            match opcode & 0x7F {
                0 => Some(RouterAnswer::NatPmpExternalAddress {
                    result,
                    epoch,
                    address: Ipv4Addr::from(be32(bytes, 8).unwrap_or(0)),
                }),
                op @ (1 | 2) => Some(RouterAnswer::NatPmpMap {
                    transport: if op == 1 {
                        MappedTransport::Udp
                    } else {
                        MappedTransport::Tcp
                    },
                    result,
                    epoch,
                    internal_port: be16(bytes, 8).unwrap_or(0),
                    external_port: be16(bytes, 10).unwrap_or(0),
                    lifetime_secs: be32(bytes, 12).unwrap_or(0),
                }),
                _ => None,
            }
        }
        PCP_VERSION..=u8::MAX | 1 => {
            // PCP answers have the R bit set (RFC 6887 §7.2).
            if opcode & 0x80 == 0 {
                return None;
            }
            let result = *bytes.get(3)?;
            if opcode & 0x7F == PCP_ANNOUNCE && version == PCP_VERSION && bytes.len() >= 12 {
                return Some(RouterAnswer::PcpAnnounce {
                    result,
                    epoch: be32(bytes, 8)?,
                });
            }
            if opcode & 0x7F != PCP_MAP || version != PCP_VERSION || bytes.len() < PCP_MAP_LEN {
                return Some(RouterAnswer::PcpError { version, result });
            }
            let lifetime_secs = be32(bytes, 4)?;
            let epoch = be32(bytes, 8)?;
            let nonce: [u8; 12] = bytes.get(24..36)?.try_into().ok()?;
            let transport = match bytes.get(36)? {
                17 => Some(MappedTransport::Udp),
                6 => Some(MappedTransport::Tcp),
                _ => None,
            };
            let octets: [u8; 16] = bytes.get(44..60)?.try_into().ok()?;
            let ip = Ipv6Addr::from(octets);
            let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
            Some(RouterAnswer::PcpMap {
                result,
                lifetime_secs,
                epoch,
                nonce,
                transport,
                internal_port: be16(bytes, 40)?,
                external: SocketAddr::new(ip, be16(bytes, 42)?),
            })
        }
    }
}

/// NAT-PMP's result codes in words (RFC 6886 §3.5).
pub fn nat_pmp_result_text(code: u16) -> &'static str {
    match code {
        0 => "success",
        1 => "unsupported version",
        2 => "not authorized or refused",
        3 => "network failure",
        4 => "out of resources",
        5 => "unsupported opcode",
        _ => "unknown result",
    }
}

/// PCP's result codes in words (RFC 6887 §7.4).
pub fn pcp_result_text(code: u8) -> &'static str {
    match code {
        0 => "success",
        1 => "unsupported version",
        2 => "not authorized",
        3 => "malformed request",
        4 => "unsupported opcode",
        5 => "unsupported option",
        6 => "malformed option",
        7 => "network failure",
        8 => "no resources",
        9 => "unsupported protocol",
        10 => "user exceeded quota",
        11 => "cannot provide external",
        12 => "address mismatch",
        13 => "excessive remote peers",
        _ => "unknown result",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nat_pmp_requests_have_rfc_6886_layout() {
        assert_eq!(nat_pmp_external_address_request(), [0, 0]);
        assert_eq!(
            nat_pmp_map_request(MappedTransport::Udp, 4500, 4501, 7200),
            [0, 1, 0, 0, 0x11, 0x94, 0x11, 0x95, 0, 0, 0x1C, 0x20]
        );
        assert_eq!(nat_pmp_map_request(MappedTransport::Tcp, 1, 0, 0)[1], 2);
    }

    #[test]
    fn pcp_map_request_has_rfc_6887_layout() {
        let nonce = [9u8; 12];
        let request = pcp_map_request(
            nonce,
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2)),
            MappedTransport::Udp,
            4500,
            None,
            7200,
        );
        assert_eq!(&request[..4], &[2, 1, 0, 0]);
        assert_eq!(&request[4..8], &7200u32.to_be_bytes());
        assert_eq!(
            &request[8..24],
            &Ipv4Addr::new(10, 0, 1, 2).to_ipv6_mapped().octets()
        );
        assert_eq!(&request[24..36], &nonce);
        assert_eq!(request[36], 17);
        assert_eq!(&request[40..42], &4500u16.to_be_bytes());
        assert_eq!(&request[42..44], &[0, 0]);
        assert_eq!(
            &request[44..60],
            &Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets()
        );
    }

    #[test]
    fn answers_parse_and_a_request_echo_does_not() {
        let mut map = vec![0, 129, 0, 0, 0, 0, 1, 0, 0x11, 0x94, 0x75, 0x30];
        map.extend_from_slice(&3600u32.to_be_bytes());
        assert_eq!(
            parse_answer(&map),
            Some(RouterAnswer::NatPmpMap {
                transport: MappedTransport::Udp,
                result: 0,
                epoch: 256,
                internal_port: 4500,
                external_port: 30000,
                lifetime_secs: 3600,
            })
        );
        let external = [0, 128, 0, 0, 0, 0, 0, 5, 198, 51, 100, 2];
        assert_eq!(
            parse_answer(&external),
            Some(RouterAnswer::NatPmpExternalAddress {
                result: 0,
                epoch: 5,
                address: Ipv4Addr::new(198, 51, 100, 2)
            })
        );
        assert_eq!(
            parse_answer(&[0, 129, 0, 1]),
            Some(RouterAnswer::NatPmpUnsupportedVersion)
        );
        // Our own requests (no R bit) are not answers.
        assert_eq!(
            parse_answer(&nat_pmp_map_request(MappedTransport::Udp, 1, 1, 1)),
            None
        );
        let request = pcp_map_request(
            [1; 12],
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            MappedTransport::Udp,
            1,
            None,
            1,
        );
        assert_eq!(parse_answer(&request), None);
        let mut answer = request;
        answer[1] |= 0x80;
        answer[3] = 0;
        answer[42..44].copy_from_slice(&40000u16.to_be_bytes());
        answer[44..60].copy_from_slice(&Ipv4Addr::new(198, 51, 100, 2).to_ipv6_mapped().octets());
        assert_eq!(
            parse_answer(&answer),
            Some(RouterAnswer::PcpMap {
                result: 0,
                lifetime_secs: 1,
                epoch: 0,
                nonce: [1; 12],
                transport: Some(MappedTransport::Udp),
                internal_port: 1,
                external: "198.51.100.2:40000".parse().expect("addr"),
            })
        );
        assert_eq!(
            parse_answer(&[2, 0x80, 0, 1]),
            Some(RouterAnswer::PcpError {
                version: 2,
                result: 1
            })
        );
        let mut announce = pcp_announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST)).to_vec();
        assert_eq!(parse_answer(&announce), None, "a request");
        announce[1] = 0x80;
        announce[8..12].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_answer(&announce),
            Some(RouterAnswer::PcpAnnounce {
                result: 0,
                epoch: 9
            })
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_answer(&bytes);
        }
    }
}
