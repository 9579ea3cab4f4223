//! STUN message framing (RFC 8489 §5, §14): the header, attribute walking, and a writer
//! that appends attributes and the FINGERPRINT.
//!
//! The decoder is zero-copy and total: every input yields a [`Message`] or a
//! [`DecodeError`], never a panic.
use std::net::{IpAddr, SocketAddr};

/// The fixed magic cookie in every RFC 5389/8489 STUN header.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// XOR constant of the FINGERPRINT attribute ("STUN" in ASCII).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Attribute types this crate knows by name (RFC 8489 §18.3).
pub mod attr {
    /// MAPPED-ADDRESS (classic STUN; comprehension-required).
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM.
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH.
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// ALTERNATE-SERVER (comprehension-optional; RFC 8489 §14.15): where a 300
    /// Try Alternate sends the client, in the MAPPED-ADDRESS format.
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// SOFTWARE (comprehension-optional).
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT (comprehension-optional).
    pub const FINGERPRINT: u16 = 0x8028;

    /// Whether an attribute type is in the comprehension-required range.
    pub const fn is_comprehension_required(ty: u16) -> bool {
        ty < 0x8000
    }
}

/// Method numbers (RFC 8489 §18.2).
pub mod method {
    /// Binding: reflexive address discovery.
    pub const BINDING: u16 = 0x001;
}

/// The class bits of a STUN message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request, which expects a response.
    Request,
    /// An indication, which expects nothing.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

/// A STUN message type: a 12-bit method and a class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageType {
    /// The method (e.g. [`method::BINDING`]).
    pub method: u16,
    /// The class.
    pub class: Class,
}

impl MessageType {
    /// Decodes the 14-bit type field (the top two bits must already be zero).
    pub fn from_bits(bits: u16) -> Self {
        let class = match ((bits >> 7) & 0b10) | ((bits >> 4) & 0b1) {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        };
        let method = (bits & 0x000F) | ((bits >> 1) & 0x0070) | ((bits >> 2) & 0x0F80);
        Self { method, class }
    }

    /// Encodes into the 14-bit type field. Methods above 0xFFF are truncated.
    pub fn to_bits(self) -> u16 {
        let m = self.method & 0x0FFF;
        let c: u16 = match self.class {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        };
        (m & 0x000F)
            | ((m & 0x0070) << 1)
            | ((m & 0x0F80) << 2)
            | ((c & 0b1) << 4)
            | ((c & 0b10) << 7)
    }
}

/// Why bytes are not a well-formed STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the 20-byte header.
    #[error("shorter than a STUN header")]
    TooShort,
    /// The first two bits are not zero or the magic cookie is missing: not STUN.
    #[error("not a STUN message (first bits or magic cookie)")]
    NotStun,
    /// The header's length field disagrees with the datagram or is not a multiple of 4.
    #[error("length field does not match the datagram")]
    BadLength,
    /// An attribute runs past the end of the message.
    #[error("attribute overruns the message")]
    TruncatedAttribute,
    /// A FINGERPRINT is present but wrong, or not the last attribute.
    #[error("bad FINGERPRINT")]
    BadFingerprint,
}

/// A decoded view of one STUN message, borrowing the datagram.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    bytes: &'a [u8],
    message_type: MessageType,
}

impl<'a> Message<'a> {
    /// Cheap test for demultiplexing: first two bits zero and the magic cookie.
    pub fn looks_like_stun(bytes: &[u8]) -> bool {
        bytes.len() >= HEADER_LEN
            && bytes[0] & 0xC0 == 0
            && bytes[4..8] == MAGIC_COOKIE.to_be_bytes()
    }

    /// Validates the header, the attribute layout and any FINGERPRINT.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        if !Self::looks_like_stun(bytes) {
            return Err(DecodeError::NotStun);
        }
        let length = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if !length.is_multiple_of(4) || HEADER_LEN + length != bytes.len() {
            return Err(DecodeError::BadLength);
        }
        let message = Self {
            bytes,
            message_type: MessageType::from_bits(u16::from_be_bytes([bytes[0], bytes[1]])),
        };
        for attribute in message.attributes() {
            let attribute = attribute?;
            if attribute.ty == attr::FINGERPRINT {
                let value_end = attribute.offset + 4 + attribute.value.len();
                if value_end != bytes.len() || attribute.value.len() != 4 {
                    return Err(DecodeError::BadFingerprint);
                }
                let expected = fingerprint(&bytes[..attribute.offset]);
                if attribute.value != expected.to_be_bytes() {
                    return Err(DecodeError::BadFingerprint);
                }
            }
        }
        Ok(message)
    }

    /// The message type.
    pub fn message_type(&self) -> MessageType {
        self.message_type
    }

    /// The 96-bit transaction id.
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut id = [0; 12];
        id.copy_from_slice(&self.bytes[8..20]);
        id
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) with `key`: for short-term
    /// credentials the key is the password; for long-term ones MD5(user:realm:pass).
    ///
    /// Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and
    /// FINGERPRINT make the message invalid, as the RFC requires.
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), IntegrityError> {
        self.verify(attr::MESSAGE_INTEGRITY, key)
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, RFC 8489 §14.6) with `key`.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> Result<(), IntegrityError> {
        self.verify(attr::MESSAGE_INTEGRITY_SHA256, key)
    }

    fn verify(&self, which: u16, key: &[u8]) -> Result<(), IntegrityError> {
        let mut found = None;
        for attribute in self.attributes() {
            let attribute = attribute.map_err(|_| IntegrityError::Malformed)?;
            match (found, attribute.ty) {
                (None, ty) if ty == which => found = Some(attribute),
                (Some(_), attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT) => {}
                (Some(_), _) => return Err(IntegrityError::Malformed),
                _ => {}
            }
        }
        let attribute = found.ok_or(IntegrityError::Missing)?;
        let expected = integrity_tag(
            which,
            key,
            &self.bytes[..attribute.offset],
            attribute.value.len(),
        );
        let expected = expected.as_ref().ok_or(IntegrityError::Malformed)?;
        // Constant-time comparison through the MAC crate's verify would need the
        // state; compare without early exit instead.
        let mut diff = 0u8;
        for (a, b) in expected.iter().zip(attribute.value) {
            diff |= a ^ b;
        }
        if diff == 0 && expected.len() == attribute.value.len() {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// Iterates over the attributes in order.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            bytes: self.bytes,
            offset: HEADER_LEN,
        }
    }
}

/// One attribute of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribute<'a> {
    /// The attribute type.
    pub ty: u16,
    /// The value, without padding.
    pub value: &'a [u8],
    /// Offset of the attribute's header within the message.
    pub offset: usize,
}

/// Iterator over a message's attributes; yields an error once and stops on overrun.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<Attribute<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.bytes.len() {
            return None;
        }
        let header = self.bytes.get(self.offset..self.offset + 4);
        let Some(header) = header else {
            self.offset = self.bytes.len();
            return Some(Err(DecodeError::TruncatedAttribute));
        };
        let ty = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let start = self.offset + 4;
        let Some(value) = self.bytes.get(start..start + len) else {
            self.offset = self.bytes.len();
            return Some(Err(DecodeError::TruncatedAttribute));
        };
        let attribute = Attribute {
            ty,
            value,
            offset: self.offset,
        };
        self.offset = start + len.next_multiple_of(4);
        Some(Ok(attribute))
    }
}

/// Why a message's integrity could not be confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The message carries no such attribute.
    #[error("no MESSAGE-INTEGRITY attribute")]
    Missing,
    /// The attribute has the wrong length or is followed by forbidden attributes.
    #[error("malformed MESSAGE-INTEGRITY")]
    Malformed,
    /// The HMAC does not match: wrong key or altered message.
    #[error("MESSAGE-INTEGRITY does not match")]
    Mismatch,
}

/// The HMAC over `prefix` (the message up to the integrity attribute) with the
/// header's length field rewritten to end right after a `tag_len`-byte attribute.
fn integrity_tag(which: u16, key: &[u8], prefix: &[u8], tag_len: usize) -> Option<Vec<u8>> {
    use hmac::{Hmac, Mac};
    let (wanted, sha256) = match which {
        attr::MESSAGE_INTEGRITY => (20, false),
        // RFC 8489 allows truncation to 16..=32 bytes in multiples of four.
        attr::MESSAGE_INTEGRITY_SHA256 => (tag_len, true),
        _ => return None,
    };
    if tag_len != wanted || (sha256 && !(16..=32).contains(&tag_len)) || !tag_len.is_multiple_of(4)
    {
        return None;
    }
    let length = u16::try_from(prefix.len() + 4 + tag_len - HEADER_LEN).ok()?;
    let mut header = [0u8; 4];
    header[..2].copy_from_slice(prefix.get(..2)?);
    header[2..].copy_from_slice(&length.to_be_bytes());
    let rest = prefix.get(4..)?;
    if sha256 {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).ok()?;
        mac.update(&header);
        mac.update(rest);
        Some(mac.finalize().into_bytes()[..tag_len].to_vec())
    } else {
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).ok()?;
        mac.update(&header);
        mac.update(rest);
        Some(mac.finalize().into_bytes().to_vec())
    }
}

/// The reason phrase of an ERROR-CODE value (after its 4-byte code), with the
/// trailing spaces RFC 3489-style padding leaves removed.
pub fn error_reason(value: &[u8]) -> &[u8] {
    let reason = value.get(4..).unwrap_or_default();
    let end = reason
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(0, |last| last + 1);
    &reason[..end]
}

/// CRC-32 of `bytes` XOR-ed with the FINGERPRINT constant.
pub fn fingerprint(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes) ^ FINGERPRINT_XOR
}

/// Builds one STUN message into a caller-owned buffer (no allocation when the buffer
/// has capacity), fixing the header's length as attributes are appended.
#[derive(Debug)]
pub struct MessageWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
}

impl<'b> MessageWriter<'b> {
    /// Starts a message with the given type and transaction id at the end of `buf`.
    pub fn new(buf: &'b mut Vec<u8>, message_type: MessageType, transaction_id: [u8; 12]) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type.to_bits().to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&transaction_id);
        Self { buf, start }
    }

    fn set_length(&mut self) {
        let body = self.buf.len() - self.start - HEADER_LEN;
        let body = u16::try_from(body).unwrap_or(u16::MAX);
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&body.to_be_bytes());
    }

    /// Appends an attribute, padding its value to a multiple of four bytes with zeros.
    pub fn attribute(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&ty.to_be_bytes());
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(&value[..usize::from(len)]);
        let pad = usize::from(len).next_multiple_of(4) - usize::from(len);
        self.buf.extend_from_slice(&[0; 3][..pad]);
        self.set_length();
        self
    }

    /// Appends XOR-MAPPED-ADDRESS (RFC 8489 §14.2) for `addr`.
    pub fn xor_mapped_address(&mut self, addr: SocketAddr) -> &mut Self {
        let transaction_id: [u8; 12] = self.buf[self.start + 8..self.start + 20]
            .try_into()
            .unwrap_or([0; 12]);
        let value = encode_xor_address(addr, transaction_id);
        self.attribute(attr::XOR_MAPPED_ADDRESS, &value[..xor_address_len(addr)])
    }

    /// Appends an address attribute in the plain MAPPED-ADDRESS format (RFC 8489
    /// §14.1), e.g. ALTERNATE-SERVER.
    pub fn address(&mut self, ty: u16, addr: SocketAddr) -> &mut Self {
        let mut value = [0u8; 20];
        value[2..4].copy_from_slice(&addr.port().to_be_bytes());
        let len = match addr.ip().to_canonical() {
            IpAddr::V4(v4) => {
                value[1] = 1;
                value[4..8].copy_from_slice(&v4.octets());
                8
            }
            IpAddr::V6(v6) => {
                value[1] = 2;
                value[4..20].copy_from_slice(&v6.octets());
                20
            }
        };
        self.attribute(ty, &value[..len])
    }

    /// Appends ERROR-CODE with a code (300..=699) and a reason phrase, the phrase
    /// padded with spaces to a multiple of four bytes: RFC 3489's layout, which RFC
    /// 8489 also allows, so clients of that era (e.g. miniupnpd's STUN self-check)
    /// parse our errors; readers trim the spaces ([`error_reason`]).
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let padded = reason.len().next_multiple_of(4);
        let mut value = Vec::with_capacity(4 + padded);
        value.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        value.extend_from_slice(reason.as_bytes());
        value.resize(4 + padded, b' ');
        self.attribute(attr::ERROR_CODE, &value)
    }

    /// Appends UNKNOWN-ATTRIBUTES listing `types`, with the first repeated when the
    /// count is odd so the value fills a multiple of four bytes (RFC 3489's layout,
    /// allowed by RFC 8489 §14.9), for RFC 3489-era parsers.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let mut value = Vec::with_capacity(2 * (types.len() + 1));
        for ty in types {
            value.extend_from_slice(&ty.to_be_bytes());
        }
        if types.len() % 2 == 1
            && let Some(first) = types.first()
        {
            value.extend_from_slice(&first.to_be_bytes());
        }
        self.attribute(attr::UNKNOWN_ATTRIBUTES, &value)
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 with `key`); only FINGERPRINT or
    /// MESSAGE-INTEGRITY-SHA256 may follow.
    pub fn message_integrity(&mut self, key: &[u8]) -> &mut Self {
        self.append_integrity(attr::MESSAGE_INTEGRITY, key, 20)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256 with `key`, full 32 bytes).
    pub fn message_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        self.append_integrity(attr::MESSAGE_INTEGRITY_SHA256, key, 32)
    }

    fn append_integrity(&mut self, which: u16, key: &[u8], len: usize) -> &mut Self {
        let tag =
            integrity_tag(which, key, &self.buf[self.start..], len).unwrap_or_else(|| vec![0; len]);
        self.attribute(which, &tag)
    }

    /// Returns the finished message without a FINGERPRINT (TURN Data indications and
    /// other hot-path messages, where the CRC buys nothing).
    pub fn finish(self) -> &'b [u8] {
        &self.buf[self.start..]
    }

    /// Appends FINGERPRINT, which must be last, and returns the finished message.
    pub fn finish_with_fingerprint(self) -> &'b [u8] {
        let start = self.start;
        let buf = self.buf;
        let fingerprint_offset = buf.len();
        buf.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        buf.extend_from_slice(&4u16.to_be_bytes());
        let body = u16::try_from(buf.len() + 4 - start - HEADER_LEN).unwrap_or(u16::MAX);
        buf[start + 2..start + 4].copy_from_slice(&body.to_be_bytes());
        // The CRC covers the message up to, not including, the FINGERPRINT attribute,
        // with the length field already counting it (RFC 8489 §14.7).
        let crc = fingerprint(&buf[start..fingerprint_offset]);
        buf.extend_from_slice(&crc.to_be_bytes());
        &buf[start..]
    }
}

fn xor_address_len(addr: SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

/// Encodes an XOR-MAPPED-ADDRESS value (8 bytes for IPv4, 20 for IPv6, in a 20-byte array).
pub fn encode_xor_address(addr: SocketAddr, transaction_id: [u8; 12]) -> [u8; 20] {
    let mut out = [0u8; 20];
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    out[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ cookie[i];
            }
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&cookie);
            key[4..].copy_from_slice(&transaction_id);
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ key[i];
            }
        }
    }
    out
}

/// Decodes an XOR-MAPPED-ADDRESS value; `None` when the family or length is wrong.
pub fn decode_xor_address(value: &[u8], transaction_id: [u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let family = *value.get(1)?;
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    match (family, value.len()) {
        (0x01, 8) => {
            let mut octets = [0u8; 4];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = value[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::from((octets, port)))
        }
        (0x02, 20) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&cookie);
            key[4..].copy_from_slice(&transaction_id);
            let mut octets = [0u8; 16];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = value[4 + i] ^ key[i];
            }
            Some(SocketAddr::from((octets, port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn errors_use_rfc3489_padding_that_rfc8489_readers_accept() {
        let mut buf = Vec::new();
        let mut writer = MessageWriter::new(
            &mut buf,
            MessageType {
                method: 0x001,
                class: Class::Error,
            },
            [7; 12],
        );
        writer
            .error_code(420, "Unknown Attribute")
            .unknown_attributes(&[0x0003]);
        let bytes = writer.finish_with_fingerprint().to_vec();
        let message = Message::parse(&bytes).expect("parses");
        let attrs: Vec<_> = message.attributes().filter_map(Result::ok).collect();
        let error = attrs
            .iter()
            .find(|a| a.ty == attr::ERROR_CODE)
            .expect("ERROR-CODE");
        // "Unknown Attribute" is 17 bytes: padded with 3 spaces inside the value, so
        // the attribute needs no zero padding (RFC 3489 §11.2.9).
        assert_eq!(error.value.len(), 4 + 20);
        assert_eq!(&error.value[4..], b"Unknown Attribute   ");
        assert_eq!(error_reason(error.value), b"Unknown Attribute");
        // One unknown attribute: listed twice, 4 bytes (RFC 3489 §11.2.10).
        let unknown = attrs
            .iter()
            .find(|a| a.ty == attr::UNKNOWN_ATTRIBUTES)
            .expect("UNKNOWN-ATTRIBUTES");
        assert_eq!(unknown.value, [0x00, 0x03, 0x00, 0x03]);
    }

    #[test]
    fn unknown_attributes_repeat_only_for_odd_counts_and_reasons_keep_inner_spaces() {
        let mut buf = Vec::new();
        let mut writer = MessageWriter::new(
            &mut buf,
            MessageType {
                method: 0x001,
                class: Class::Error,
            },
            [1; 12],
        );
        writer
            .unknown_attributes(&[0x0003, 0x8888])
            .error_code(400, "Bad  ok");
        let bytes = writer.finish().to_vec();
        let message = Message::parse(&bytes).expect("parses");
        let attrs: Vec<_> = message.attributes().filter_map(Result::ok).collect();
        assert_eq!(attrs[0].value, [0x00, 0x03, 0x88, 0x88]);
        assert_eq!(error_reason(attrs[1].value), b"Bad  ok");
        assert_eq!(error_reason(&[0, 0, 4, 0]), b"");
        assert_eq!(error_reason(&[0, 0, 4, 0, b' ', b' ']), b"");
    }

    /// RFC 5769 §2.2: the IPv4 Binding success response, byte for byte.
    const RFC5769_RESPONSE_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    #[test]
    fn rfc5769_ipv4_response_decodes() {
        let message = Message::parse(&RFC5769_RESPONSE_V4).expect("valid vector");
        assert_eq!(
            message.message_type(),
            MessageType {
                method: method::BINDING,
                class: Class::Success
            }
        );
        let tid = message.transaction_id();
        let xor = message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::XOR_MAPPED_ADDRESS)
            .expect("has XOR-MAPPED-ADDRESS");
        assert_eq!(
            decode_xor_address(xor.value, tid),
            Some("192.0.2.1:32853".parse().expect("addr"))
        );
    }

    /// RFC 5769 §2.3: the IPv6 Binding success response, byte for byte.
    const RFC5769_RESPONSE_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    #[test]
    fn rfc5769_ipv6_response_decodes_and_verifies() {
        let message = Message::parse(&RFC5769_RESPONSE_V6).expect("valid vector (FINGERPRINT)");
        let tid = message.transaction_id();
        let xor = message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::XOR_MAPPED_ADDRESS)
            .expect("has XOR-MAPPED-ADDRESS");
        assert_eq!(
            decode_xor_address(xor.value, tid),
            Some(
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .expect("addr")
            )
        );
        assert_eq!(message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), Ok(()));
        // Our encoder produces the same XOR-MAPPED-ADDRESS bytes.
        let encoded = encode_xor_address(
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .expect("addr"),
            tid,
        );
        assert_eq!(&encoded[..], xor.value);
    }

    #[test]
    fn rfc5769_ipv4_response_integrity_verifies() {
        let message = Message::parse(&RFC5769_RESPONSE_V4).expect("valid vector");
        assert_eq!(message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), Ok(()));
    }

    /// RFC 5769 §2.1: a request with short-term credentials (padding is spaces).
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74,
        0x65, 0x73, 0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e,
        0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36,
        0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20,
        0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e,
        0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5,
        0x7a, 0x3b, 0xcf,
    ];

    #[test]
    fn rfc5769_request_integrity_verifies() {
        let message = Message::parse(&RFC5769_REQUEST).expect("valid vector");
        let username = message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::USERNAME)
            .expect("USERNAME");
        assert_eq!(username.value, b"evtj:h6vY");
        assert_eq!(message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), Ok(()));
        assert_eq!(
            message.verify_integrity(b"wrong"),
            Err(IntegrityError::Mismatch)
        );
        assert_eq!(
            message.verify_integrity_sha256(b"x"),
            Err(IntegrityError::Missing)
        );
    }

    #[test]
    fn written_integrity_verifies_and_detects_tampering() {
        let mut buf = Vec::new();
        let mut writer = MessageWriter::new(
            &mut buf,
            MessageType {
                method: method::BINDING,
                class: Class::Request,
            },
            [4; 12],
        );
        writer
            .attribute(attr::USERNAME, b"1700000000:alice")
            .message_integrity(b"secret")
            .message_integrity_sha256(b"secret");
        let bytes = writer.finish_with_fingerprint().to_vec();
        let message = Message::parse(&bytes).expect("parses");
        assert_eq!(message.verify_integrity(b"secret"), Ok(()));
        assert_eq!(message.verify_integrity_sha256(b"secret"), Ok(()));
        assert_eq!(
            message.verify_integrity_sha256(b"other"),
            Err(IntegrityError::Mismatch)
        );
        let mut tampered = bytes.clone();
        tampered[HEADER_LEN + 5] ^= 1; // inside USERNAME
        // Re-fix the fingerprint so only the HMAC can notice.
        let fp_at = tampered.len() - 4;
        let crc = fingerprint(&tampered[..fp_at - 4]);
        tampered[fp_at..].copy_from_slice(&crc.to_be_bytes());
        let message = Message::parse(&tampered).expect("still well-formed");
        assert_eq!(
            message.verify_integrity(b"secret"),
            Err(IntegrityError::Mismatch)
        );
    }

    #[test]
    fn corrupted_fingerprint_is_rejected() {
        let mut bytes = RFC5769_RESPONSE_V4;
        bytes[79] ^= 1;
        assert_eq!(
            Message::parse(&bytes).err(),
            Some(DecodeError::BadFingerprint)
        );
    }

    #[test]
    fn message_type_matches_rfc_examples() {
        // Binding request 0x0001, success 0x0101, error 0x0111, indication 0x0011.
        let binding = |class| MessageType {
            method: method::BINDING,
            class,
        };
        assert_eq!(binding(Class::Request).to_bits(), 0x0001);
        assert_eq!(binding(Class::Success).to_bits(), 0x0101);
        assert_eq!(binding(Class::Error).to_bits(), 0x0111);
        assert_eq!(binding(Class::Indication).to_bits(), 0x0011);
        // TURN Allocate (0x003) request is 0x0003, ChannelBind (0x009) success 0x0109.
        assert_eq!(
            MessageType::from_bits(0x0109),
            MessageType {
                method: 0x009,
                class: Class::Success
            }
        );
    }

    #[test]
    fn bad_lengths_are_rejected() {
        let mut buf = Vec::new();
        MessageWriter::new(
            &mut buf,
            MessageType {
                method: 1,
                class: Class::Request,
            },
            [7; 12],
        )
        .finish_with_fingerprint();
        assert!(Message::parse(&buf).is_ok());
        assert_eq!(
            Message::parse(&buf[..buf.len() - 1]).err(),
            Some(DecodeError::BadLength)
        );
        assert_eq!(
            Message::parse(&buf[..10]).err(),
            Some(DecodeError::TooShort)
        );
        let mut not_stun = buf.clone();
        not_stun[4] = 0;
        assert_eq!(Message::parse(&not_stun).err(), Some(DecodeError::NotStun));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_stun_like_input(
            ty in 0u16..0x4000,
            tid in any::<[u8; 12]>(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&ty.to_be_bytes());
            bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            bytes.extend_from_slice(&tid);
            bytes.extend_from_slice(&body);
            if let Ok(message) = Message::parse(&bytes) {
                for attribute in message.attributes() {
                    let _ = attribute;
                }
            }
        }

        #[test]
        fn message_type_round_trips(method in 0u16..0x1000, class in 0u8..4) {
            let class = [Class::Request, Class::Indication, Class::Success, Class::Error][class as usize];
            let ty = MessageType { method, class };
            prop_assert_eq!(MessageType::from_bits(ty.to_bits()), ty);
        }

        #[test]
        fn xor_address_round_trips(addr in any::<SocketAddr>(), tid in any::<[u8; 12]>()) {
            // Scope id and flow label are not on the wire.
            let addr = SocketAddr::new(addr.ip(), addr.port());
            let mut buf = Vec::new();
            let ty = MessageType { method: method::BINDING, class: Class::Success };
            let mut writer = MessageWriter::new(&mut buf, ty, tid);
            writer.xor_mapped_address(addr).attribute(attr::SOFTWARE, b"odd");
            let bytes = writer.finish_with_fingerprint().to_vec();
            let message = Message::parse(&bytes).expect("writer output parses");
            let xor = message.attributes().next().expect("one").expect("ok");
            prop_assert_eq!(decode_xor_address(xor.value, tid), Some(addr));
        }
    }
}
