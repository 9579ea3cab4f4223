//! The STUN Binding service (RFC 8489 §3, §6.3): answers a Binding request with the
//! source address it came from, so a peer learns its server-reflexive address.
//!
//! Sans-IO: [`BindingService::handle`] takes the datagram and its source and writes the
//! reply into a caller-owned buffer.
use std::net::SocketAddr;

use super::stun::{Class, DecodeError, Message, MessageType, MessageWriter, attr, method};

/// At most this many unknown attribute types are listed in a 420 response, so an
/// error reply never grows with the request.
const MAX_UNKNOWN_LISTED: usize = 4;

/// What became of one datagram; each variant is a bounded metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A Binding success response was written.
    BindingSuccess,
    /// A 420 (Unknown Attribute) error response was written.
    UnknownAttribute,
    /// Not STUN at all; dropped silently.
    NotStun,
    /// STUN-shaped but malformed; dropped silently.
    Malformed,
    /// Valid STUN this service does not answer (responses, indications, other methods).
    Unhandled,
}

impl Outcome {
    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::BindingSuccess => "binding_success",
            Outcome::UnknownAttribute => "unknown_attribute",
            Outcome::NotStun => "not_stun",
            Outcome::Malformed => "malformed",
            Outcome::Unhandled => "unhandled",
        }
    }

    /// Every outcome, for pre-registering metric label values.
    pub const ALL: [Outcome; 5] = [
        Outcome::BindingSuccess,
        Outcome::UnknownAttribute,
        Outcome::NotStun,
        Outcome::Malformed,
        Outcome::Unhandled,
    ];
}

/// Answers Binding requests. Stateless: it keeps nothing per source.
#[derive(Clone, Copy, Debug, Default)]
pub struct BindingService;

impl BindingService {
    /// Handles one datagram from `from`; on a reply, `out` holds exactly its bytes.
    pub fn handle(&self, from: SocketAddr, datagram: &[u8], out: &mut Vec<u8>) -> Outcome {
        out.clear();
        let message = match Message::parse(datagram) {
            Ok(message) => message,
            Err(DecodeError::NotStun | DecodeError::TooShort) => return Outcome::NotStun,
            Err(_) => return Outcome::Malformed,
        };
        let ty = message.message_type();
        if ty.class != Class::Request || ty.method != method::BINDING {
            return Outcome::Unhandled;
        }
        let mut unknown = [0u16; MAX_UNKNOWN_LISTED];
        let mut unknown_count = 0;
        for attribute in message.attributes() {
            let Ok(attribute) = attribute else {
                return Outcome::Malformed;
            };
            if attr::is_comprehension_required(attribute.ty) && !understood(attribute.ty) {
                if unknown_count < MAX_UNKNOWN_LISTED {
                    unknown[unknown_count] = attribute.ty;
                }
                unknown_count += 1;
            }
        }
        let tid = message.transaction_id();
        if unknown_count > 0 {
            let listed = unknown_count.min(MAX_UNKNOWN_LISTED);
            let mut value = [0u8; 2 * MAX_UNKNOWN_LISTED];
            for (i, ty) in unknown[..listed].iter().enumerate() {
                value[2 * i..2 * i + 2].copy_from_slice(&ty.to_be_bytes());
            }
            let mut writer = MessageWriter::new(
                out,
                MessageType {
                    method: method::BINDING,
                    class: Class::Error,
                },
                tid,
            );
            writer
                .error_code(420, "Unknown Attribute")
                .attribute(attr::UNKNOWN_ATTRIBUTES, &value[..2 * listed]);
            writer.finish_with_fingerprint();
            return Outcome::UnknownAttribute;
        }
        let mut writer = MessageWriter::new(
            out,
            MessageType {
                method: method::BINDING,
                class: Class::Success,
            },
            tid,
        );
        writer.xor_mapped_address(from);
        writer.finish_with_fingerprint();
        Outcome::BindingSuccess
    }
}

/// Comprehension-required attributes a Binding request may carry that this service
/// understands (authentication attributes are accepted and ignored: Binding is open).
fn understood(ty: u16) -> bool {
    matches!(
        ty,
        attr::MAPPED_ADDRESS
            | attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::REALM
            | attr::NONCE
            | attr::PASSWORD_ALGORITHM
            | attr::USERHASH
            | attr::XOR_MAPPED_ADDRESS
    )
}

/// Writes a Binding request with a FINGERPRINT (used by clients, tests and the demo).
pub fn binding_request(transaction_id: [u8; 12], out: &mut Vec<u8>) {
    out.clear();
    MessageWriter::new(
        out,
        MessageType {
            method: method::BINDING,
            class: Class::Request,
        },
        transaction_id,
    )
    .finish_with_fingerprint();
}

/// Reads the reflexive address from a Binding success response for `transaction_id`.
pub fn parse_binding_success(datagram: &[u8], transaction_id: [u8; 12]) -> Option<SocketAddr> {
    let message = Message::parse(datagram).ok()?;
    let ty = message.message_type();
    if ty.class != Class::Success || ty.method != method::BINDING {
        return None;
    }
    if message.transaction_id() != transaction_id {
        return None;
    }
    message
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == attr::XOR_MAPPED_ADDRESS)
        .and_then(|a| super::stun::decode_xor_address(a.value, transaction_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from() -> SocketAddr {
        "198.51.100.2:40000".parse().expect("addr")
    }

    #[test]
    fn binding_request_gets_reflexive_address() {
        let mut request = Vec::new();
        binding_request([9; 12], &mut request);
        let mut out = Vec::new();
        assert_eq!(
            BindingService.handle(from(), &request, &mut out),
            Outcome::BindingSuccess
        );
        assert_eq!(parse_binding_success(&out, [9; 12]), Some(from()));
        assert_eq!(
            parse_binding_success(&out, [8; 12]),
            None,
            "other transaction"
        );
    }

    #[test]
    fn ipv6_source_is_reported() {
        let source: SocketAddr = "[2001:db8::7]:5000".parse().expect("addr");
        let mut request = Vec::new();
        binding_request([3; 12], &mut request);
        let mut out = Vec::new();
        BindingService.handle(source, &request, &mut out);
        assert_eq!(parse_binding_success(&out, [3; 12]), Some(source));
    }

    #[test]
    fn unknown_required_attribute_gets_420_listing_it() {
        let mut request = Vec::new();
        let mut writer = MessageWriter::new(
            &mut request,
            MessageType {
                method: method::BINDING,
                class: Class::Request,
            },
            [1; 12],
        );
        writer
            .attribute(0x7777, b"x")
            .attribute(0x8888, b"optional is fine");
        writer.finish_with_fingerprint();
        let mut out = Vec::new();
        assert_eq!(
            BindingService.handle(from(), &request, &mut out),
            Outcome::UnknownAttribute
        );
        let reply = Message::parse(&out).expect("valid reply");
        assert_eq!(reply.message_type().class, Class::Error);
        let listed = reply
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::UNKNOWN_ATTRIBUTES)
            .expect("lists unknown");
        assert_eq!(listed.value, &[0x77, 0x77]);
    }

    #[test]
    fn non_requests_and_garbage_get_nothing() {
        let mut out = Vec::new();
        assert_eq!(
            BindingService.handle(from(), b"hello world, not stun", &mut out),
            Outcome::NotStun
        );
        assert!(out.is_empty());
        let mut response = Vec::new();
        MessageWriter::new(
            &mut response,
            MessageType {
                method: method::BINDING,
                class: Class::Success,
            },
            [1; 12],
        )
        .finish_with_fingerprint();
        assert_eq!(
            BindingService.handle(from(), &response, &mut out),
            Outcome::Unhandled
        );
        assert!(out.is_empty(), "never answer a response (reflection loops)");
    }

    proptest! {
        /// A reply is never much larger than what provoked it (no amplification).
        #[test]
        fn replies_are_small(bytes in proptest::collection::vec(any::<u8>(), 0..300), addr in any::<SocketAddr>()) {
            let mut out = Vec::new();
            BindingService.handle(addr, &bytes, &mut out);
            prop_assert!(out.is_empty(), "random bytes are not a valid request");
        }

        /// Well-framed requests with arbitrary attributes: the reply stays under 80
        /// bytes and under four times the request.
        #[test]
        fn replies_to_any_request_are_bounded(
            attrs in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 0..12)), 0..12),
            addr in any::<SocketAddr>(),
        ) {
            let mut request = Vec::new();
            let mut writer = MessageWriter::new(
                &mut request,
                MessageType { method: method::BINDING, class: Class::Request },
                [5; 12],
            );
            for (ty, value) in &attrs {
                if *ty != attr::FINGERPRINT {
                    writer.attribute(*ty, value);
                }
            }
            writer.finish_with_fingerprint();
            let mut out = Vec::new();
            let outcome = BindingService.handle(addr, &request, &mut out);
            prop_assert!(matches!(outcome, Outcome::BindingSuccess | Outcome::UnknownAttribute));
            prop_assert!(out.len() <= 80, "reply of {} bytes", out.len());
            prop_assert!(out.len() <= request.len() * 4);
            prop_assert!(Message::parse(&out).is_ok());
        }
    }
}
