//! TURN (RFC 8656) over UDP: the wire vocabulary shared by the relay server and the
//! clients (the agent's fallback and the load generator), the ChannelData framing,
//! and the long-term credential key.
//!
//! The server state machine is in [`server`]; the sans-IO client in [`client`].
use std::net::{IpAddr, SocketAddr};

use super::stun::{self, MessageWriter};

pub mod client;
pub mod server;

/// TURN method numbers (RFC 8656 §17).
pub mod method {
    /// Allocate (request/response only).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh (request/response only).
    pub const REFRESH: u16 = 0x004;
    /// Send (indication only).
    pub const SEND: u16 = 0x006;
    /// Data (indication only).
    pub const DATA: u16 = 0x007;
    /// CreatePermission (request/response only).
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind (request/response only).
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// TURN attribute types (RFC 8656 §18).
pub mod attr {
    /// CHANNEL-NUMBER: u16 channel + 2 reserved bytes.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME: u32 seconds.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA: the application payload of Send/Data indications.
    pub const DATA: u16 = 0x0013;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY: 0x01 IPv4, 0x02 IPv6.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT: protocol number (17 = UDP).
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// ADDITIONAL-ADDRESS-FAMILY (dual allocation, RFC 8656 §18.12).
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDRESS-ERROR-CODE.
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// ICMP (RFC 8656 §18.13).
    pub const ICMP: u16 = 0x8004;
}

/// Address family codes used by REQUESTED-ADDRESS-FAMILY and friends.
pub mod family {
    /// IPv4.
    pub const IPV4: u8 = 0x01;
    /// IPv6.
    pub const IPV6: u8 = 0x02;
}

/// The address family of a relayed address: what a client asks for
/// (REQUESTED-ADDRESS-FAMILY) and what the server opens a relay socket in; one type
/// for both ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    /// IPv4 (what a server gives when none is asked for).
    #[default]
    V4,
    /// IPv6 (REQUESTED-ADDRESS-FAMILY 0x02).
    V6,
}

impl AddressFamily {
    /// The family of `ip` (an IPv4-mapped IPv6 address counts as IPv6).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// True when `ip` is of this family.
    pub fn matches(self, ip: IpAddr) -> bool {
        Self::of(ip) == self
    }
}

/// The IANA protocol number of UDP, the only REQUESTED-TRANSPORT served.
pub const TRANSPORT_UDP: u8 = 17;
/// First channel number (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// Last channel number accepted. RFC 8656 allows only 0x4000..=0x4FFF, but RFC 5766
/// allowed up to 0x7FFF and deployed clients (coturn's own tools among them) still use
/// that range, so the relay accepts it; clients of this crate pick from RFC 8656's.
pub const CHANNEL_MAX: u16 = 0x7FFF;
/// Last channel number of RFC 8656's range, which our own clients use.
pub const CHANNEL_MAX_RFC8656: u16 = 0x4FFF;
/// ChannelData header length.
pub const CHANNEL_DATA_HEADER: usize = 4;

/// True when the first byte marks ChannelData (first two bits `01`), which is how a
/// TURN server tells it from STUN (`00`) on the same socket.
pub fn is_channel_data(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0xC0 == 0x40)
}

/// A parsed ChannelData message: the channel and the application data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// Channel number, 0x4000..=0x7FFF.
    pub channel: u16,
    /// The application data (padding excluded).
    pub data: &'a [u8],
}

/// Why bytes are not a ChannelData message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelDataError {
    /// Shorter than the 4-byte header.
    #[error("shorter than a ChannelData header")]
    TooShort,
    /// The channel number is outside 0x4000..=0x7FFF.
    #[error("channel number outside 0x4000..=0x7FFF")]
    BadChannel,
    /// The length field claims more bytes than arrived.
    #[error("ChannelData length exceeds the datagram")]
    Truncated,
}

impl<'a> ChannelData<'a> {
    /// Parses ChannelData; bytes after the announced length (UDP padding) are ignored.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, ChannelDataError> {
        let header = datagram
            .get(..CHANNEL_DATA_HEADER)
            .ok_or(ChannelDataError::TooShort)?;
        let channel = u16::from_be_bytes([header[0], header[1]]);
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
            return Err(ChannelDataError::BadChannel);
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let data = datagram
            .get(CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len)
            .ok_or(ChannelDataError::Truncated)?;
        Ok(Self { channel, data })
    }
}

/// The 4-byte ChannelData header for `len` bytes of data on `channel`; callers put it
/// in front of data already in a buffer, so relaying needs no copy of the payload.
/// `len` above 65535 is clamped (UDP cannot carry more anyway).
pub fn channel_data_header(channel: u16, len: usize) -> [u8; CHANNEL_DATA_HEADER] {
    let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
    let channel = channel.to_be_bytes();
    [channel[0], channel[1], len[0], len[1]]
}

/// Appends a complete ChannelData message to `out` (no padding: UDP needs none).
pub fn encode_channel_data(channel: u16, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&channel_data_header(channel, data.len()));
    out.extend_from_slice(data);
}

/// Writes a Data indication (RFC 8656 §11.4) carrying `data` from `peer` into `out`
/// (cleared first); no FINGERPRINT, as on the hot path it buys nothing.
pub fn data_indication(tid: [u8; 12], peer: SocketAddr, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut writer = MessageWriter::new(
        out,
        stun::MessageType {
            method: method::DATA,
            class: stun::Class::Indication,
        },
        tid,
    );
    xor_address_attribute(&mut writer, attr::XOR_PEER_ADDRESS, peer, tid);
    writer.attribute(attr::DATA, data);
    writer.finish();
}

/// The long-term credential key (RFC 8489 §9.2.2): MD5(username ":" realm ":" password).
/// The strings are used as given (they are ASCII in the REST convention, so
/// OpaqueString processing leaves them unchanged).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    hasher.update(username.as_bytes());
    hasher.update(b":");
    hasher.update(realm.as_bytes());
    hasher.update(b":");
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

/// Appends an XOR-PEER-ADDRESS (or any XOR address attribute `ty`) for `addr`.
pub fn xor_address_attribute(
    writer: &mut MessageWriter<'_>,
    ty: u16,
    addr: SocketAddr,
    tid: [u8; 12],
) {
    let value = stun::encode_xor_address(addr, tid);
    let len = if addr.is_ipv4() { 8 } else { 20 };
    writer.attribute(ty, &value[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 5769 §2.4: a request with long-term authentication. Username
    /// "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}", realm "example.org",
    /// password "TheMatrIX" (after SASLprep).
    const RFC5769_LONG_TERM_REQUEST: [u8; 116] = [
        0x00, 0x01, 0x00, 0x60, 0x21, 0x12, 0xa4, 0x42, 0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72,
        0xc0, 0x29, 0xda, 0x41, 0x2e, 0x00, 0x06, 0x00, 0x12, 0xe3, 0x83, 0x9e, 0xe3, 0x83, 0x88,
        0xe3, 0x83, 0xaa, 0xe3, 0x83, 0x83, 0xe3, 0x82, 0xaf, 0xe3, 0x82, 0xb9, 0x00, 0x00, 0x00,
        0x15, 0x00, 0x1c, 0x66, 0x2f, 0x2f, 0x34, 0x39, 0x39, 0x6b, 0x39, 0x35, 0x34, 0x64, 0x36,
        0x4f, 0x4c, 0x33, 0x34, 0x6f, 0x4c, 0x39, 0x46, 0x53, 0x54, 0x76, 0x79, 0x36, 0x34, 0x73,
        0x41, 0x00, 0x14, 0x00, 0x0b, 0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c, 0x65, 0x2e, 0x6f, 0x72,
        0x67, 0x00, 0x00, 0x08, 0x00, 0x14, 0xf6, 0x70, 0x24, 0x65, 0x6d, 0xd6, 0x4a, 0x3e, 0x02,
        0xb8, 0xe0, 0x71, 0x2e, 0x85, 0xc9, 0xa2, 0x8c, 0xa8, 0x96, 0x66,
    ];

    #[test]
    fn long_term_key_verifies_rfc5769_vector() {
        let message = stun::Message::parse(&RFC5769_LONG_TERM_REQUEST).expect("valid vector");
        let key = long_term_key(
            "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
            "example.org",
            "TheMatrIX",
        );
        assert_eq!(message.verify_integrity(&key), Ok(()));
        let wrong = long_term_key("\u{30DE}", "example.org", "TheMatrIX");
        assert!(message.verify_integrity(&wrong).is_err());
    }

    #[test]
    fn channel_data_round_trip_and_errors() {
        let mut out = Vec::new();
        encode_channel_data(0x4001, b"hello", &mut out);
        assert!(is_channel_data(&out));
        assert_eq!(
            ChannelData::parse(&out),
            Ok(ChannelData {
                channel: 0x4001,
                data: b"hello"
            })
        );
        // Padding after the data is ignored.
        out.extend_from_slice(&[0, 0, 0]);
        assert_eq!(ChannelData::parse(&out).map(|c| c.data), Ok(&b"hello"[..]));
        assert_eq!(ChannelData::parse(&[0x40]), Err(ChannelDataError::TooShort));
        assert_eq!(
            ChannelData::parse(&[0x80, 0, 0, 0]),
            Err(ChannelDataError::BadChannel)
        );
        assert_eq!(
            ChannelData::parse(&[0x40, 0, 0, 9, 1]),
            Err(ChannelDataError::Truncated)
        );
        assert!(!is_channel_data(&[0x00, 0x01]));
        assert!(!is_channel_data(&[]));
    }

    proptest! {
        #[test]
        fn channel_data_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ChannelData::parse(&bytes);
        }

        #[test]
        fn channel_data_round_trips(channel in CHANNEL_MIN..=CHANNEL_MAX, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            encode_channel_data(channel, &data, &mut out);
            let parsed = ChannelData::parse(&out).expect("own encoding parses");
            prop_assert_eq!(parsed.channel, channel);
            prop_assert_eq!(parsed.data, &data[..]);
        }
    }
}
