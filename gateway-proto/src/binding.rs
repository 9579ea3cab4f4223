//! The STUN Binding service (RFC 8489 §3, §6.3): answers a Binding request with the
//! source address it came from, so a peer learns its server-reflexive address.
//!
//! Sans-IO: [`BindingService::handle`] takes the datagram and its source and writes the
//! reply into a caller-owned buffer.
//!
//! Also the pieces of RFC 5780 (NAT behaviour discovery) the gateway uses: the
//! CHANGE-REQUEST attribute, the choice of the endpoint a changed answer leaves from
//! ([`Alternates`]), and the answer itself ([`change_response`]). The rendezvous core
//! decides who may ask (see `docs/protocol.md`); a plain [`BindingService`] answers
//! CHANGE-REQUEST with 420, as RFC 5780 has a server without alternate endpoints do.
use std::net::{IpAddr, SocketAddr};

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
    /// An answer was due but its source's (or everyone's) reply budget was spent
    /// (see [`crate::budget`]); dropped.
    Throttled,
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
            Outcome::Throttled => "throttled",
        }
    }

    /// Every outcome, for pre-registering metric label values.
    pub const ALL: [Outcome; 6] = [
        Outcome::BindingSuccess,
        Outcome::UnknownAttribute,
        Outcome::NotStun,
        Outcome::Malformed,
        Outcome::Unhandled,
        Outcome::Throttled,
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
                .unknown_attributes(&unknown[..listed]);
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

/// RFC 5780 attribute types.
pub mod attr5780 {
    /// CHANGE-REQUEST (comprehension-required): answer from another address and/or port.
    pub const CHANGE_REQUEST: u16 = 0x0003;
    /// RESPONSE-ORIGIN: the address and port the response was sent from.
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    /// OTHER-ADDRESS: where a "change IP and port" answer would come from.
    pub const OTHER_ADDRESS: u16 = 0x802C;
}

/// Largest answer to a CHANGE-REQUEST: header, XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN and
/// OTHER-ADDRESS (IPv6 sizes), MESSAGE-INTEGRITY-SHA256, FINGERPRINT.
pub const MAX_CHANGE_RESPONSE: usize = 20 + 3 * 24 + 36 + 8;

/// The flags of a CHANGE-REQUEST attribute (RFC 5780 §7.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChangeRequest {
    /// "Change IP" (flag 0x04): answer from another address.
    pub change_ip: bool,
    /// "Change port" (flag 0x02): answer from another port.
    pub change_port: bool,
}

impl ChangeRequest {
    /// Flag bit for "change IP".
    pub const CHANGE_IP: u32 = 0x04;
    /// Flag bit for "change port".
    pub const CHANGE_PORT: u32 = 0x02;

    /// Decodes the 4-byte attribute value; other bits are ignored, other lengths refused.
    pub fn from_value(value: &[u8]) -> Option<Self> {
        let bits = u32::from_be_bytes(value.try_into().ok()?);
        Some(Self {
            change_ip: bits & Self::CHANGE_IP != 0,
            change_port: bits & Self::CHANGE_PORT != 0,
        })
    }

    /// The attribute value.
    pub fn to_value(self) -> [u8; 4] {
        let mut bits = 0;
        if self.change_ip {
            bits |= Self::CHANGE_IP;
        }
        if self.change_port {
            bits |= Self::CHANGE_PORT;
        }
        bits.to_be_bytes()
    }

    /// Finds a CHANGE-REQUEST in `message`: `None` without one, `Some(None)` when its
    /// value is malformed.
    pub fn find(message: &Message<'_>) -> Option<Option<Self>> {
        message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr5780::CHANGE_REQUEST)
            .map(|a| Self::from_value(a.value))
    }
}

/// Where a changed answer leaves from, as chosen by [`Alternates::select`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    /// Index of the alternate endpoint in [`Alternates`]' list; `None` for the service
    /// socket itself (a CHANGE-REQUEST with no flag set).
    pub endpoint: Option<usize>,
    /// The address and port the answer leaves from (RESPONSE-ORIGIN), when known.
    pub origin: Option<SocketAddr>,
    /// Local address to send from (for a wildcard-bound socket).
    pub from_local: Option<IpAddr>,
}

/// The gateway's service endpoint and its other Binding endpoints (its discovery
/// sockets), for answering CHANGE-REQUEST.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Alternates {
    service: Option<SocketAddr>,
    endpoints: Vec<SocketAddr>,
}

impl Alternates {
    /// `service` is the address the service socket is bound to (it may be a wildcard);
    /// `endpoints` are the discovery sockets' addresses, in the order the driver
    /// numbers them.
    pub fn new(service: SocketAddr, endpoints: Vec<SocketAddr>) -> Self {
        Self {
            service: Some(service),
            endpoints,
        }
    }

    /// Picks the endpoint that answers a request for `change` which `requester` sent to
    /// the service port on local address `local` (when known). A wildcard-bound
    /// endpoint sends from the request's own address, so it only serves "change
    /// port"; "change IP" needs an endpoint bound to another address of the same
    /// family. `None` when no endpoint fits (the caller answers 420).
    pub fn select(
        &self,
        local: Option<IpAddr>,
        requester: SocketAddr,
        change: ChangeRequest,
    ) -> Option<Selected> {
        let service = self.service?;
        let local = local
            .map(|ip| ip.to_canonical())
            .or_else(|| (!service.ip().is_unspecified()).then(|| service.ip().to_canonical()));
        if !change.change_ip && !change.change_port {
            return Some(Selected {
                endpoint: None,
                origin: local.map(|ip| SocketAddr::new(ip, service.port())),
                from_local: local,
            });
        }
        let requester_v4 = requester.ip().to_canonical().is_ipv4();
        self.endpoints.iter().enumerate().find_map(|(i, e)| {
            let ip = e.ip().to_canonical();
            let wildcard = ip.is_unspecified();
            // A wildcard IPv6 socket is dual-stack (see server::bind); others serve
            // their own family only.
            let family_ok = if wildcard {
                e.is_ipv6() || requester_v4
            } else {
                ip.is_ipv4() == requester_v4
            };
            let ip_ok = if change.change_ip {
                !wildcard && local.is_some_and(|l| l != ip)
            } else {
                wildcard || local == Some(ip)
            };
            let port_ok = (e.port() != service.port()) == change.change_port;
            (family_ok && ip_ok && port_ok).then(|| {
                let origin_ip = if wildcard { local } else { Some(ip) };
                Selected {
                    endpoint: Some(i),
                    origin: origin_ip.map(|ip| SocketAddr::new(ip, e.port())),
                    from_local: if wildcard { local } else { None },
                }
            })
        })
    }

    /// The OTHER-ADDRESS to announce: where a "change IP and port" answer would come
    /// from, when one can be served.
    pub fn other_address(
        &self,
        local: Option<IpAddr>,
        requester: SocketAddr,
    ) -> Option<SocketAddr> {
        let change = ChangeRequest {
            change_ip: true,
            change_port: true,
        };
        self.select(local, requester, change)?.origin
    }
}

/// Encodes an address in the MAPPED-ADDRESS format (RESPONSE-ORIGIN, OTHER-ADDRESS).
pub(crate) fn address_value(addr: SocketAddr) -> ([u8; 20], usize) {
    let mut value = [0u8; 20];
    value[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            value[1] = 1;
            value[4..8].copy_from_slice(&v4.octets());
            (value, 8)
        }
        IpAddr::V6(v6) => {
            value[1] = 2;
            value[4..20].copy_from_slice(&v6.octets());
            (value, 20)
        }
    }
}

/// Decodes a MAPPED-ADDRESS-format value.
pub fn decode_address(value: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes(value.get(2..4)?.try_into().ok()?);
    let ip = match (value.get(1)?, value.len()) {
        (1, 8) => IpAddr::from(<[u8; 4]>::try_from(value.get(4..8)?).ok()?),
        (2, 20) => IpAddr::from(<[u8; 16]>::try_from(value.get(4..20)?).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Writes the answer to a CHANGE-REQUEST into `out`: XOR-MAPPED-ADDRESS (`requester`),
/// RESPONSE-ORIGIN and OTHER-ADDRESS when known, integrity under `password` when the
/// request was authenticated, FINGERPRINT. Never longer than [`MAX_CHANGE_RESPONSE`].
pub fn change_response(
    transaction_id: [u8; 12],
    requester: SocketAddr,
    origin: Option<SocketAddr>,
    other: Option<SocketAddr>,
    password: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.clear();
    let mut writer = MessageWriter::new(
        out,
        MessageType {
            method: method::BINDING,
            class: Class::Success,
        },
        transaction_id,
    );
    writer.xor_mapped_address(requester);
    for (ty, addr) in [
        (attr5780::RESPONSE_ORIGIN, origin),
        (attr5780::OTHER_ADDRESS, other),
    ] {
        if let Some(addr) = addr {
            let (value, len) = address_value(addr);
            writer.attribute(ty, &value[..len]);
        }
    }
    if let Some(password) = password {
        writer.message_integrity_sha256(password.as_bytes());
    }
    writer.finish_with_fingerprint();
}

/// Writes the 420 answer to a CHANGE-REQUEST the gateway cannot serve (RFC 5780: a
/// server without the alternate endpoint asked for), listing CHANGE-REQUEST as the
/// unknown attribute; with `authenticated` (password, nonce) it is signed and carries
/// the nonce.
pub fn change_unsupported(
    transaction_id: [u8; 12],
    authenticated: Option<(&str, &str)>,
    out: &mut Vec<u8>,
) {
    out.clear();
    let mut writer = MessageWriter::new(
        out,
        MessageType {
            method: method::BINDING,
            class: Class::Error,
        },
        transaction_id,
    );
    writer
        .error_code(420, "Unknown Attribute")
        .unknown_attributes(&[attr5780::CHANGE_REQUEST]);
    if let Some((password, nonce)) = authenticated {
        writer
            .attribute(attr::NONCE, nonce.as_bytes())
            .message_integrity_sha256(password.as_bytes());
    }
    writer.finish_with_fingerprint();
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
        // One type, repeated to fill four bytes (RFC 3489 layout).
        assert_eq!(listed.value, &[0x77, 0x77, 0x77, 0x77]);
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

    #[test]
    fn change_request_values_round_trip() {
        for (ip, port, bits) in [
            (false, false, 0),
            (false, true, 2),
            (true, false, 4),
            (true, true, 6),
        ] {
            let change = ChangeRequest {
                change_ip: ip,
                change_port: port,
            };
            assert_eq!(change.to_value(), [0, 0, 0, bits]);
            assert_eq!(ChangeRequest::from_value(&change.to_value()), Some(change));
        }
        assert_eq!(ChangeRequest::from_value(&[0, 0, 6]), None);
        assert_eq!(ChangeRequest::from_value(&[0, 0, 0, 6, 0]), None);
    }

    #[test]
    fn plain_binding_service_refuses_change_requests_with_420() {
        let mut request = Vec::new();
        let mut writer = MessageWriter::new(
            &mut request,
            MessageType {
                method: method::BINDING,
                class: Class::Request,
            },
            [1; 12],
        );
        writer.attribute(attr5780::CHANGE_REQUEST, &[0, 0, 0, 2]);
        writer.finish_with_fingerprint();
        let mut out = Vec::new();
        assert_eq!(
            BindingService.handle(from(), &request, &mut out),
            Outcome::UnknownAttribute
        );
    }

    fn sel(endpoint: Option<usize>, origin: &str, from_local: Option<&str>) -> Option<Selected> {
        Some(Selected {
            endpoint,
            origin: Some(origin.parse().expect("addr")),
            from_local: from_local.map(|ip| ip.parse().expect("ip")),
        })
    }

    #[test]
    fn alternates_pick_the_endpoint_that_changes_what_was_asked() {
        let alternates = Alternates::new(
            "0.0.0.0:3478".parse().expect("addr"),
            vec![
                "0.0.0.0:3479".parse().expect("addr"),
                "192.0.2.11:3480".parse().expect("addr"),
            ],
        );
        let primary = Some("192.0.2.10".parse().expect("ip"));
        let change = |change_ip, change_port| ChangeRequest {
            change_ip,
            change_port,
        };
        assert_eq!(
            alternates.select(primary, from(), change(false, false)),
            sel(None, "192.0.2.10:3478", Some("192.0.2.10"))
        );
        assert_eq!(
            alternates.select(primary, from(), change(false, true)),
            sel(Some(0), "192.0.2.10:3479", Some("192.0.2.10"))
        );
        assert_eq!(
            alternates.select(primary, from(), change(true, true)),
            sel(Some(1), "192.0.2.11:3480", None)
        );
        assert_eq!(
            alternates.other_address(primary, from()),
            Some("192.0.2.11:3480".parse().expect("addr"))
        );
        // Another address on the same port: nobody here.
        assert_eq!(
            alternates.select(primary, from(), change(true, false)),
            None
        );
        // A request that reached the second address cannot be answered from another
        // address by that same address's socket.
        let second = Some("192.0.2.11".parse().expect("ip"));
        assert_eq!(alternates.select(second, from(), change(true, true)), None);
        // Nor can an IPv4 endpoint answer an IPv6 requester.
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().expect("addr");
        let local_v6 = Some("2001:db8::10".parse().expect("ip"));
        assert_eq!(alternates.select(local_v6, v6, change(true, true)), None);
        // Unknown local address on a wildcard service: "change IP" cannot be judged.
        assert_eq!(alternates.select(None, from(), change(true, true)), None);
        // No discovery sockets at all.
        let none = Alternates::new("192.0.2.10:3478".parse().expect("addr"), Vec::new());
        assert_eq!(none.select(None, from(), change(false, true)), None);
        assert_eq!(none.other_address(None, from()), None);
    }

    #[test]
    fn change_responses_carry_origins_and_stay_bounded() {
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().expect("addr");
        let origin: SocketAddr = "[2001:db8::10]:3479".parse().expect("addr");
        let other: SocketAddr = "[2001:db8::11]:3480".parse().expect("addr");
        let mut out = Vec::new();
        change_response([2; 12], v6, Some(origin), Some(other), Some("pw"), &mut out);
        assert_eq!(out.len(), MAX_CHANGE_RESPONSE, "the largest case");
        let message = Message::parse(&out).expect("valid");
        message.verify_integrity_sha256(b"pw").expect("signed");
        let find = |ty| {
            message
                .attributes()
                .filter_map(Result::ok)
                .find(|a| a.ty == ty)
                .and_then(|a| decode_address(a.value))
        };
        assert_eq!(find(attr5780::RESPONSE_ORIGIN), Some(origin));
        assert_eq!(find(attr5780::OTHER_ADDRESS), Some(other));
        assert_eq!(parse_binding_success(&out, [2; 12]), Some(v6));
        change_response([2; 12], from(), None, None, None, &mut out);
        assert_eq!(out.len(), 20 + 12 + 8);
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
