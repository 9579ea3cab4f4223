//! The peer's side of the rendezvous: builders for its requests and parsers for
//! the gateway's answers and indications, and for the punch probes two peers
//! exchange. Stateless: the agent keeps the state.
use std::{net::SocketAddr, time::Duration};

use super::wire::{
    Candidate, CandidateKind, MAX_CANDIDATES, NatClass, SessionOutcome, TcpTechnique, attr,
    decode_candidate, encode_candidate, method, read_u32, read_u64,
};
use crate::{
    binding,
    stun::{
        self, Class, Message, MessageType, MessageWriter, attr as stun_attr, method as stun_method,
    },
};

/// Credentials a peer signs its requests with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// `expiry:peer-id`.
    pub username: String,
    /// The derived password.
    pub password: String,
}

/// A request of `method` signed with `credentials`: USERNAME, the NONCE when known,
/// what `fill` writes, then MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
pub(super) fn request(
    method: u16,
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    fill: impl FnOnce(&mut MessageWriter<'_>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    let mut writer = MessageWriter::new(
        &mut out,
        MessageType {
            method,
            class: Class::Request,
        },
        tid,
    );
    writer.attribute(stun_attr::USERNAME, credentials.username.as_bytes());
    if let Some(nonce) = nonce {
        writer.attribute(stun_attr::NONCE, nonce.as_bytes());
    }
    fill(&mut writer);
    writer.message_integrity_sha256(credentials.password.as_bytes());
    writer.finish_with_fingerprint();
    out
}

/// A Register (or keepalive) request announcing host candidates. `nonce` is the
/// last one the gateway gave (none at first contact: the answer brings one).
pub fn register(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    hosts: &[SocketAddr],
    nat: NatClass,
    rtt_ms: u32,
) -> Vec<u8> {
    let candidates: Vec<Candidate> = hosts
        .iter()
        .map(|&addr| Candidate {
            kind: CandidateKind::Host,
            addr,
        })
        .collect();
    register_with_candidates(tid, credentials, nonce, &candidates, nat, rtt_ms)
}

/// A Register request announcing host and predicted candidates.
pub fn register_with_candidates(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    candidates: &[Candidate],
    nat: NatClass,
    rtt_ms: u32,
) -> Vec<u8> {
    request(method::REGISTER, tid, credentials, nonce, |w| {
        for &candidate in candidates.iter().take(MAX_CANDIDATES - 1) {
            let (value, len) = encode_candidate(candidate, tid);
            w.attribute(attr::CANDIDATE, &value[..len]);
        }
        w.attribute(attr::NAT_CLASS, &[nat as u8]);
        w.attribute(attr::RTT, &rtt_ms.to_be_bytes());
    })
}

/// A Connect request: asks the gateway to introduce us to `target`.
pub fn connect(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    target: &str,
) -> Vec<u8> {
    request(method::CONNECT, tid, credentials, nonce, |w| {
        w.attribute(attr::PEER_ID, target.as_bytes());
    })
}

/// An Outcome report: tells the gateway how punching went (its metrics).
pub fn outcome(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    intro_id: u64,
    outcome: SessionOutcome,
    time_to_direct_ms: u32,
    probes: u32,
) -> Vec<u8> {
    request(method::OUTCOME, tid, credentials, nonce, |w| {
        w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
        let mut value = [0u8; 9];
        value[0] = outcome as u8;
        value[1..5].copy_from_slice(&time_to_direct_ms.to_be_bytes());
        value[5..9].copy_from_slice(&probes.to_be_bytes());
        w.attribute(attr::OUTCOME, &value);
    })
}

/// What a TCP punching outcome report says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpReport {
    /// The technique.
    pub technique: TcpTechnique,
    /// Whether it produced a connection.
    pub connected: bool,
    /// From the technique's start to the connection (or to giving up).
    pub elapsed_ms: u32,
    /// connect() calls made.
    pub attempts: u32,
}

/// A TCP punching outcome report for introduction `intro_id`.
pub fn tcp_outcome(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    intro_id: u64,
    report: TcpReport,
) -> Vec<u8> {
    let TcpReport {
        technique,
        connected,
        elapsed_ms,
        attempts,
    } = report;
    let outcome = if connected {
        SessionOutcome::Direct
    } else {
        SessionOutcome::Failed
    };
    request(method::OUTCOME, tid, credentials, nonce, |w| {
        w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
        let mut value = [0u8; 9];
        value[0] = outcome as u8;
        value[1..5].copy_from_slice(&elapsed_ms.to_be_bytes());
        value[5..9].copy_from_slice(&attempts.to_be_bytes());
        w.attribute(attr::OUTCOME, &value);
        w.attribute(attr::TECHNIQUE, &[technique as u8]);
    })
}

/// A relay offer: our TURN relayed address for introduction `intro_id`.
pub fn relay_offer(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    intro_id: u64,
    relayed: SocketAddr,
) -> Vec<u8> {
    request(method::RELAY_OFFER, tid, credentials, nonce, |w| {
        w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
        let (value, len) = encode_candidate(
            Candidate {
                kind: CandidateKind::Relayed,
                addr: relayed,
            },
            tid,
        );
        w.attribute(attr::CANDIDATE, &value[..len]);
    })
}

/// A TCP-Seq request: the initial sequence number of our low-TTL SYN for
/// introduction `intro_id`, and the other side's endpoint we sent it to. With
/// `forge`, the gateway keeps it and forges the SYN-ACKs itself (technique 4)
/// instead of forwarding it.
pub fn tcp_seq(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    intro_id: u64,
    isn: u32,
    expected: Option<SocketAddr>,
    forge: bool,
) -> Vec<u8> {
    request(method::TCP_SEQ, tid, credentials, nonce, |w| {
        w.attribute(attr::INTRO_ID, &intro_id.to_be_bytes());
        w.attribute(attr::TCP_SEQ, &isn.to_be_bytes());
        if forge {
            w.attribute(attr::TCP_FORGE, &[1]);
        }
        if let Some(addr) = expected {
            let (value, len) = encode_candidate(
                Candidate {
                    kind: CandidateKind::TcpServerReflexive,
                    addr,
                },
                tid,
            );
            w.attribute(attr::CANDIDATE, &value[..len]);
        }
    })
}

/// A TCP-Seq forwarded by the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSeq {
    /// The introduction it belongs to.
    pub intro_id: u64,
    /// Who sent it.
    pub peer_id: String,
    /// The initial sequence number of their SYN.
    pub isn: u32,
    /// The endpoint of ours they sent that SYN to, if they said.
    pub expected: Option<SocketAddr>,
}

/// Parses and verifies a forwarded TCP-Seq signed with `password`.
pub fn parse_tcp_seq(datagram: &[u8], password: &str) -> Option<TcpSeq> {
    let message = signed_indication(datagram, method::TCP_SEQ, password)?;
    let tid = message.transaction_id();
    let (mut intro_id, mut peer_id, mut isn, mut expected) = (None, None, None, None);
    for a in message.attributes().filter_map(Result::ok) {
        match a.ty {
            attr::INTRO_ID => intro_id = read_u64(a.value),
            attr::PEER_ID => peer_id = std::str::from_utf8(a.value).ok().map(str::to_owned),
            attr::TCP_SEQ if a.value.len() == 4 => isn = read_u32(a.value),
            attr::CANDIDATE => {
                expected = decode_candidate(a.value, tid)
                    .filter(|c| c.kind == CandidateKind::TcpServerReflexive)
                    .map(|c| c.addr)
            }
            _ => {}
        }
    }
    Some(TcpSeq {
        intro_id: intro_id?,
        peer_id: peer_id?,
        isn: isn?,
        expected,
    })
}

/// A Mapped-Check request: the answer to the gateway's probe of our mapped
/// candidate, echoing its token. It leaves from the agent's socket to the service
/// socket and is signed like every request, so only this peer can verify its
/// candidate, and only with the token the probe brought.
pub fn mapped_check(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    token: &[u8; 16],
) -> Vec<u8> {
    request(method::MAPPED_CHECK, tid, credentials, nonce, |w| {
        w.attribute(attr::MAPPED_TOKEN, token);
    })
}

/// A Mapped-Check indication from the gateway, signed for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappedCheck {
    /// The probe of our mapped candidate: answer with [`mapped_check`].
    Probe {
        /// The token to echo.
        token: [u8; 16],
    },
    /// The gateway gave up: our mapped candidate `external` did not answer, so it
    /// is not introduced.
    Unreachable {
        /// The candidate that was not reachable.
        external: SocketAddr,
    },
}

/// Parses and verifies a Mapped-Check indication signed with `password`.
pub fn parse_mapped_check(datagram: &[u8], password: &str) -> Option<MappedCheck> {
    let message = signed_indication(datagram, method::MAPPED_CHECK, password)?;
    let tid = message.transaction_id();
    let (mut token, mut external) = (None, None);
    for a in message.attributes().filter_map(Result::ok) {
        match a.ty {
            attr::MAPPED_TOKEN => token = <[u8; 16]>::try_from(a.value).ok(),
            attr::CANDIDATE => {
                external = decode_candidate(a.value, tid)
                    .filter(|c| c.kind == CandidateKind::Mapped)
                    .map(|c| c.addr)
            }
            _ => {}
        }
    }
    match (token, external) {
        (Some(token), _) => Some(MappedCheck::Probe { token }),
        (None, Some(external)) => Some(MappedCheck::Unreachable { external }),
        (None, None) => None,
    }
}

/// A Binding request with CHANGE-REQUEST (RFC 5780 filtering tests), signed like
/// the rendezvous requests so the gateway will answer it from another endpoint.
pub fn change_request(
    tid: [u8; 12],
    credentials: &PeerCredentials,
    nonce: Option<&str>,
    change: binding::ChangeRequest,
) -> Vec<u8> {
    request(stun_method::BINDING, tid, credentials, nonce, |w| {
        w.attribute(binding::attr5780::CHANGE_REQUEST, &change.to_value());
    })
}

/// An indication of `wanted` method from the gateway, integrity-checked with
/// `password` (introductions and relay offers are signed for their recipient).
fn signed_indication<'a>(datagram: &'a [u8], wanted: u16, password: &str) -> Option<Message<'a>> {
    let message = Message::parse(datagram).ok()?;
    let ty = message.message_type();
    if ty.method != wanted || ty.class != Class::Indication {
        return None;
    }
    message.verify_integrity_sha256(password.as_bytes()).ok()?;
    Some(message)
}

/// A relay offer forwarded by the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayOffer {
    /// The introduction it belongs to.
    pub intro_id: u64,
    /// Who offers.
    pub peer_id: String,
    /// Their relayed address: send there to reach them.
    pub relayed: SocketAddr,
}

/// Parses and verifies a forwarded relay offer signed with `password`.
pub fn parse_relay_offer(datagram: &[u8], password: &str) -> Option<RelayOffer> {
    let message = signed_indication(datagram, method::RELAY_OFFER, password)?;
    let tid = message.transaction_id();
    let (mut intro_id, mut peer_id, mut relayed) = (None, None, None);
    for a in message.attributes().filter_map(Result::ok) {
        match a.ty {
            attr::INTRO_ID => intro_id = read_u64(a.value),
            attr::PEER_ID => peer_id = std::str::from_utf8(a.value).ok().map(str::to_owned),
            attr::CANDIDATE => {
                relayed = decode_candidate(a.value, tid)
                    .filter(|c| c.kind == CandidateKind::Relayed)
                    .map(|c| c.addr)
            }
            _ => {}
        }
    }
    Some(RelayOffer {
        intro_id: intro_id?,
        peer_id: peer_id?,
        relayed: relayed?,
    })
}

/// A verified response from the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The method answered.
    pub method: u16,
    /// The transaction.
    pub transaction_id: [u8; 12],
    /// `Ok` for success, `Err(code)` for an error response.
    pub result: Result<(), u16>,
    /// XOR-MAPPED-ADDRESS, when present.
    pub mapped: Option<SocketAddr>,
    /// INTRO-ID, when present.
    pub intro_id: Option<u64>,
    /// LIFETIME, when present.
    pub lifetime: Option<Duration>,
    /// The nonce to use next, when the response is authenticated and has one.
    pub nonce: Option<String>,
    /// DISCOVERY-ENDPOINTs of an authenticated answer (a Register's): the gateway's
    /// other Binding endpoints, at most [`super::wire::MAX_DISCOVERY_ENDPOINTS`]; an
    /// unspecified address means the server address the request went to.
    pub discovery: Vec<SocketAddr>,
}

/// Parses a response to a rendezvous request. Success responses must carry valid
/// integrity under `password`; unauthenticated error responses are accepted
/// (they cannot do more than make the peer retry), but only an authenticated
/// response can hand the peer a nonce.
pub fn parse_response(datagram: &[u8], password: &str) -> Option<Response> {
    let message = Message::parse(datagram).ok()?;
    let ty = message.message_type();
    let authenticated = message.verify_integrity_sha256(password.as_bytes()).is_ok();
    let result = match ty.class {
        Class::Success if authenticated => Ok(()),
        Class::Success => return None,
        Class::Error => {
            let code = message
                .attributes()
                .filter_map(Result::ok)
                .find(|a| a.ty == stun_attr::ERROR_CODE)
                .and_then(|a| {
                    Some(u16::from(*a.value.get(2)? & 7) * 100 + u16::from(*a.value.get(3)?))
                })
                .unwrap_or(0);
            Err(code)
        }
        _ => return None,
    };
    let tid = message.transaction_id();
    let mut response = Response {
        method: ty.method,
        transaction_id: tid,
        result,
        mapped: None,
        intro_id: None,
        lifetime: None,
        nonce: None,
        discovery: Vec::new(),
    };
    for a in message.attributes().filter_map(Result::ok) {
        match a.ty {
            stun_attr::XOR_MAPPED_ADDRESS => {
                response.mapped = stun::decode_xor_address(a.value, tid)
            }
            attr::INTRO_ID => response.intro_id = read_u64(a.value),
            attr::LIFETIME => {
                response.lifetime = read_u32(a.value).map(|s| Duration::from_secs(u64::from(s)))
            }
            stun_attr::NONCE if authenticated => {
                response.nonce = std::str::from_utf8(a.value).ok().map(str::to_owned)
            }
            attr::DISCOVERY_ENDPOINT
                if authenticated
                    && response.discovery.len() < super::wire::MAX_DISCOVERY_ENDPOINTS =>
            {
                if let Some(endpoint) = crate::binding::decode_address(a.value)
                    && endpoint.port() != 0
                {
                    // Unspecified: on the server address the peer uses.
                    response.discovery.push(endpoint);
                }
            }
            _ => {}
        }
    }
    Some(response)
}

/// Whether the peer initiated or answers an introduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It sent the Connect.
    Initiator,
    /// The other side did.
    Responder,
}

/// A verified Introduction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Introduction {
    /// Its id.
    pub intro_id: u64,
    /// The other side's peer id.
    pub peer_id: String,
    /// The other side's candidates, server-reflexive first.
    pub candidates: Vec<Candidate>,
    /// The key both sides sign probes with.
    pub probe_key: [u8; 16],
    /// How long to wait after receipt before probing.
    pub start_delay: Duration,
    /// This side's role.
    pub role: Role,
    /// The other side's NAT class.
    pub peer_nat: NatClass,
}

/// Parses and verifies an Introduction indication signed with `password`.
pub fn parse_introduction(datagram: &[u8], password: &str) -> Option<Introduction> {
    let message = signed_indication(datagram, method::INTRODUCTION, password)?;
    let tid = message.transaction_id();
    let mut intro_id = None;
    let mut peer_id = None;
    let mut candidates = Vec::new();
    let mut probe_key = None;
    let mut start_delay = Duration::ZERO;
    let mut role = None;
    let mut peer_nat = NatClass::Unknown;
    for a in message.attributes().filter_map(Result::ok) {
        match a.ty {
            attr::INTRO_ID => intro_id = read_u64(a.value),
            attr::PEER_ID => peer_id = std::str::from_utf8(a.value).ok().map(str::to_owned),
            attr::CANDIDATE if candidates.len() < MAX_CANDIDATES => {
                candidates.extend(decode_candidate(a.value, tid));
            }
            attr::PROBE_KEY => probe_key = a.value.try_into().ok(),
            attr::START_DELAY => {
                start_delay = Duration::from_millis(u64::from(read_u32(a.value)?.min(5_000)))
            }
            attr::ROLE => {
                role = match a.value.first()? {
                    0 => Some(Role::Initiator),
                    _ => Some(Role::Responder),
                }
            }
            attr::NAT_CLASS => peer_nat = NatClass::from_u8(*a.value.first()?),
            _ => {}
        }
    }
    Some(Introduction {
        intro_id: intro_id?,
        peer_id: peer_id?,
        candidates,
        probe_key: probe_key?,
        start_delay,
        role: role?,
        peer_nat,
    })
}

/// A punch probe: a Binding request authenticated with the introduction's key.
pub fn probe_request(tid: [u8; 12], intro_id: u64, key: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    let mut writer = MessageWriter::new(
        &mut out,
        MessageType {
            method: stun_method::BINDING,
            class: Class::Request,
        },
        tid,
    );
    writer
        .attribute(stun_attr::USERNAME, format!("{intro_id:016x}").as_bytes())
        .message_integrity_sha256(key);
    writer.finish_with_fingerprint();
    out
}

/// The answer to a probe received from `from`.
pub fn probe_response(tid: [u8; 12], from: SocketAddr, key: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    let mut writer = MessageWriter::new(
        &mut out,
        MessageType {
            method: stun_method::BINDING,
            class: Class::Success,
        },
        tid,
    );
    writer
        .xor_mapped_address(from)
        .message_integrity_sha256(key);
    writer.finish_with_fingerprint();
    out
}

/// A verified probe or probe response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A request for introduction `intro_id`, to be answered.
    Request {
        /// Which introduction.
        intro_id: u64,
        /// Its transaction.
        transaction_id: [u8; 12],
    },
    /// A response to one of our probes.
    Response {
        /// Its transaction.
        transaction_id: [u8; 12],
        /// Where the other side saw our probe come from.
        mapped: Option<SocketAddr>,
    },
}

/// Parses a probe or probe response and checks it against `key`.
pub fn parse_probe(datagram: &[u8], key: &[u8; 16]) -> Option<Probe> {
    let message = Message::parse(datagram).ok()?;
    let ty = message.message_type();
    if ty.method != stun_method::BINDING {
        return None;
    }
    message.verify_integrity_sha256(key).ok()?;
    let tid = message.transaction_id();
    match ty.class {
        Class::Request => {
            let username = message
                .attributes()
                .filter_map(Result::ok)
                .find(|a| a.ty == stun_attr::USERNAME)?;
            let text = std::str::from_utf8(username.value).ok()?;
            let intro_id = u64::from_str_radix(text, 16).ok()?;
            Some(Probe::Request {
                intro_id,
                transaction_id: tid,
            })
        }
        Class::Success => {
            let mapped = message
                .attributes()
                .filter_map(Result::ok)
                .find(|a| a.ty == stun_attr::XOR_MAPPED_ADDRESS)
                .and_then(|a| stun::decode_xor_address(a.value, tid));
            Some(Probe::Response {
                transaction_id: tid,
                mapped,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::rendezvous::addr;

    #[test]
    fn probes_round_trip_and_need_the_key() {
        let key = [9u8; 16];
        let request = probe_request([4; 12], 0xABCD, &key);
        assert_eq!(
            parse_probe(&request, &key),
            Some(Probe::Request {
                intro_id: 0xABCD,
                transaction_id: [4; 12]
            })
        );
        assert_eq!(parse_probe(&request, &[8; 16]), None);
        let from = addr("198.51.100.2:4000");
        let response = probe_response([4; 12], from, &key);
        assert_eq!(
            parse_probe(&response, &key),
            Some(Probe::Response {
                transaction_id: [4; 12],
                mapped: Some(from)
            })
        );
    }
}
