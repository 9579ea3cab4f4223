//! Tests of the relay core, in virtual time, with a fake socket layer that carries
//! out the core's socket events as the driver would.
use super::*;
use crate::drain::Draining;
use crate::{
    stun::{self, MessageWriter},
    turn::{
        TRANSPORT_UDP, attr as turn_attr, family, long_term_key, method, xor_address_attribute,
    },
};
use proptest::prelude::*;

const SECRET: &[u8] = b"relay-test-secret";
const REALM: &str = "gateway";
const NOW_UNIX: u64 = 1_000_000;

#[derive(Default)]
struct FakeSockets {
    next_port: u16,
    open: Vec<SocketAddr>,
    closed: Vec<SocketAddr>,
    no_ports: bool,
    /// Leave [`TurnServerEvent::OpenRelay`]s unanswered (in [`Harness::held`]).
    hold: bool,
}

impl FakeSockets {
    fn open(&mut self, family: AddressFamily, even_port: bool) -> Result<SocketAddr, OpenError> {
        if self.no_ports {
            return Err(OpenError::NoPort);
        }
        let ip: IpAddr = match family {
            AddressFamily::V4 => "192.0.2.10".parse().expect("ip"),
            AddressFamily::V6 => return Err(OpenError::FamilyUnavailable),
        };
        self.next_port += if even_port { 2 } else { 1 };
        let addr = SocketAddr::new(ip, 50_000 + self.next_port * 2);
        self.open.push(addr);
        Ok(addr)
    }

    fn close(&mut self, relay: SocketAddr) {
        self.open.retain(|a| *a != relay);
        self.closed.push(relay);
    }

    fn open_pair(&mut self, family: AddressFamily) -> Result<(SocketAddr, SocketAddr), OpenError> {
        let even = self.open(family, true)?;
        let even = SocketAddr::new(even.ip(), even.port() & !1);
        let odd = SocketAddr::new(even.ip(), even.port() + 1);
        self.open.retain(|a| a.port() != even.port());
        self.open.extend([even, odd]);
        Ok((even, odd))
    }

    /// What a driver reports for an [`TurnServerEvent::OpenRelay`].
    fn open_for(
        &mut self,
        family: AddressFamily,
        even_port: EvenPort,
    ) -> Result<(SocketAddr, Option<SocketAddr>), OpenError> {
        match even_port {
            EvenPort::Any => self.open(family, false).map(|relay| (relay, None)),
            EvenPort::Even => self.open(family, true).map(|relay| (relay, None)),
            EvenPort::EvenReserveNext => self
                .open_pair(family)
                .map(|(relay, reserved)| (relay, Some(reserved))),
        }
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

fn server_with(config: TurnConfig) -> TurnServer {
    let policy = PeerPolicy::new(vec![], vec![], vec!["192.0.2.10".parse().expect("ip")]);
    TurnServer::new(config, SharedSecret::new(SECRET), [9; 32], 600, policy)
}

fn server() -> TurnServer {
    server_with(TurnConfig::default())
}

struct User {
    username: String,
    password: String,
}

fn user(id: &str) -> User {
    let issued = SharedSecret::new(SECRET)
        .issue(id, NOW_UNIX + 3600)
        .expect("issue");
    User {
        username: issued.username,
        password: issued.password,
    }
}

/// Builds a request; with `auth`, adds USERNAME, REALM, NONCE and MESSAGE-INTEGRITY.
fn request(
    method_number: u16,
    class: Class,
    tid: [u8; 12],
    body: impl FnOnce(&mut MessageWriter<'_>),
    auth: Option<(&User, &str)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = MessageWriter::new(
        &mut out,
        MessageType {
            method: method_number,
            class,
        },
        tid,
    );
    body(&mut writer);
    if let Some((user, nonce)) = auth {
        writer
            .attribute(stun_attr::USERNAME, user.username.as_bytes())
            .attribute(stun_attr::REALM, REALM.as_bytes())
            .attribute(stun_attr::NONCE, nonce.as_bytes());
        writer.message_integrity(&long_term_key(&user.username, REALM, &user.password));
    }
    writer.finish_with_fingerprint();
    out
}

struct Harness {
    server: TurnServer,
    sockets: FakeSockets,
    now: Instant,
    tid: u8,
    /// The gateway address clients reach (what the driver learns from IP_PKTINFO).
    local: Option<IpAddr>,
    /// Fast-path instructions polled, not yet looked at ([`drained`]).
    fast: Vec<FastPath>,
    /// [`TurnServerEvent::AllocationCreated`]s polled, not yet taken.
    created: u64,
    /// Open requests left unanswered while [`FakeSockets::hold`] is set.
    held: Vec<(RelayRequestId, AddressFamily, EvenPort, Option<IpAddr>)>,
    /// The outcome of the last report the harness made.
    reported: Option<RequestOutcome>,
}

struct Reply {
    class: Class,
    code: Option<u16>,
    bytes: Vec<u8>,
    transport: Transport,
}

impl Reply {
    fn attr(&self, ty: u16) -> Option<Vec<u8>> {
        let message = Message::parse(&self.bytes).expect("reply parses");
        message
            .attributes()
            .flatten()
            .find(|a| a.ty == ty)
            .map(|a| a.value.to_vec())
    }

    fn nonce(&self) -> String {
        String::from_utf8(self.attr(stun_attr::NONCE).expect("nonce")).expect("utf8")
    }
}

impl Harness {
    fn new(server: TurnServer) -> Self {
        Self {
            server,
            sockets: FakeSockets::default(),
            now: Instant::now(),
            tid: 0,
            local: None,
            fast: Vec::new(),
            created: 0,
            held: Vec::new(),
            reported: None,
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid = self.tid.wrapping_add(1);
        [self.tid; 12]
    }

    /// Carries out the core's events as the driver does: opens (unless holding) and
    /// closes sockets, and keeps fast-path instructions and creations to look at.
    fn service(&mut self) {
        while let Some(event) = self.server.poll_event() {
            match event {
                TurnServerEvent::OpenRelay {
                    request,
                    family,
                    even_port,
                    local,
                } => {
                    if self.sockets.hold {
                        self.held.push((request, family, even_port, local));
                        continue;
                    }
                    let result = self.sockets.open_for(family, even_port);
                    self.reported = self.server.handle_relay_opened(self.now, request, result);
                }
                TurnServerEvent::CloseRelay(relay) => self.sockets.close(relay),
                TurnServerEvent::FastPath(instruction) => self.fast.push(instruction),
                TurnServerEvent::AllocationCreated { .. } => self.created += 1,
            }
        }
    }

    /// Runs the core's timers and carries out what they ask.
    fn timeout(&mut self) {
        self.server.handle_timeout(self.now);
        self.service();
    }

    /// Allocations created since the last call (what feeds the `_total` counter).
    fn take_created(&mut self) -> u64 {
        std::mem::take(&mut self.created)
    }

    /// The one reply queued, if any.
    fn reply(&mut self) -> Option<Reply> {
        let transmit = self.server.poll_transmit()?;
        assert_eq!(self.server.poll_transmit(), None, "one reply per request");
        let parsed = Message::parse(&transmit.payload).expect("reply parses");
        let code = parsed
            .attributes()
            .flatten()
            .find(|a| a.ty == stun_attr::ERROR_CODE)
            .map(|a| u16::from(a.value[2]) * 100 + u16::from(a.value[3]));
        Some(Reply {
            class: parsed.message_type().class,
            code,
            bytes: transmit.payload.clone(),
            transport: transmit.transport,
        })
    }

    /// Hands `message` from `client` to the core, carries out its events and takes
    /// its reply. An Allocate answered after its socket opened reads as answered
    /// at once, with the outcome the report returned.
    fn handle(
        &mut self,
        client: impl Into<ClientAddr>,
        now_unix: u64,
        message: &Message<'_>,
    ) -> (TurnHandled<'static>, Option<Reply>) {
        let handled = self
            .server
            .handle_stun(self.now, now_unix, client, self.local, message);
        let handled = match handled {
            TurnHandled::NotTurn => TurnHandled::NotTurn,
            TurnHandled::Request { method, outcome } => TurnHandled::Request { method, outcome },
            TurnHandled::AwaitingRelay => TurnHandled::AwaitingRelay,
            TurnHandled::Relay { relay, peer, data } => TurnHandled::Relay {
                relay,
                peer,
                data: Box::leak(data.to_vec().into_boxed_slice()),
            },
            TurnHandled::Dropped(reason) => TurnHandled::Dropped(reason),
        };
        self.reported = None;
        self.service();
        let handled = match (handled, self.reported.take()) {
            (TurnHandled::AwaitingRelay, Some(outcome)) => TurnHandled::Request {
                method: RequestMethod::Allocate,
                outcome,
            },
            (handled, _) => handled,
        };
        (handled, self.reply())
    }

    /// [`Harness::handle`] for bytes that parse, at [`NOW_UNIX`].
    fn send(
        &mut self,
        client: impl Into<ClientAddr>,
        datagram: &[u8],
    ) -> (TurnHandled<'static>, Option<Reply>) {
        self.stun(client, NOW_UNIX, datagram)
    }

    /// [`Harness::handle`] for bytes that parse.
    fn stun(
        &mut self,
        client: impl Into<ClientAddr>,
        now_unix: u64,
        datagram: &[u8],
    ) -> (TurnHandled<'static>, Option<Reply>) {
        let message = Message::parse(datagram).expect("test request parses");
        self.handle(client, now_unix, &message)
    }

    /// Challenge then authenticated Allocate; returns the relayed address and nonce.
    fn allocate(&mut self, client: SocketAddr, who: &User) -> (SocketAddr, String) {
        let tid = self.next_tid();
        let first = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
        let (_, challenge) = self.send(client, &first);
        let nonce = challenge.expect("challenge").nonce();
        let tid = self.next_tid();
        let second = request(
            method::ALLOCATE,
            Class::Request,
            tid,
            transport_udp,
            Some((who, &nonce)),
        );
        let (handled, reply) = self.send(client, &second);
        assert_eq!(
            handled,
            TurnHandled::Request {
                method: RequestMethod::Allocate,
                outcome: RequestOutcome::Ok
            }
        );
        let reply = reply.expect("success");
        assert_eq!(reply.class, Class::Success);
        let relayed = stun::decode_xor_address(
            &reply.attr(turn_attr::XOR_RELAYED_ADDRESS).expect("relayed"),
            tid,
        )
        .expect("relayed address decodes");
        (relayed, nonce)
    }

    fn authed(
        &mut self,
        client: SocketAddr,
        who: &User,
        nonce: &str,
        method_number: u16,
        body: impl FnOnce(&mut MessageWriter<'_>, [u8; 12]),
    ) -> (RequestOutcome, Reply) {
        let tid = self.next_tid();
        let datagram = request(
            method_number,
            Class::Request,
            tid,
            |w| body(w, tid),
            Some((who, nonce)),
        );
        let (handled, reply) = self.send(client, &datagram);
        let TurnHandled::Request { outcome, .. } = handled else {
            panic!("expected a request outcome, got {handled:?}");
        };
        (outcome, reply.expect("authenticated requests are answered"))
    }

    fn permit(
        &mut self,
        client: SocketAddr,
        who: &User,
        nonce: &str,
        peer: SocketAddr,
    ) -> RequestOutcome {
        self.authed(client, who, nonce, method::CREATE_PERMISSION, |w, tid| {
            xor_address_attribute(w, turn_attr::XOR_PEER_ADDRESS, peer, tid);
        })
        .0
    }

    fn bind(
        &mut self,
        client: SocketAddr,
        who: &User,
        nonce: &str,
        channel: u16,
        peer: SocketAddr,
    ) -> RequestOutcome {
        self.authed(client, who, nonce, method::CHANNEL_BIND, |w, tid| {
            w.attribute(
                turn_attr::CHANNEL_NUMBER,
                &[(channel >> 8) as u8, channel as u8, 0, 0],
            );
            xor_address_attribute(w, turn_attr::XOR_PEER_ADDRESS, peer, tid);
        })
        .0
    }
}

fn transport_udp(w: &mut MessageWriter<'_>) {
    w.attribute(turn_attr::REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0]);
}

const CLIENT: &str = "198.51.100.20:40000";
const PEER: &str = "8.8.4.4:7000";

#[test]
fn unauthenticated_allocate_is_challenged_and_creates_nothing() {
    let mut h = Harness::new(server());
    let tid = h.next_tid();
    let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let (handled, reply) = h.send(addr(CLIENT), &datagram);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Allocate,
            outcome: RequestOutcome::Unauthorized
        }
    );
    let reply = reply.expect("401");
    assert_eq!(reply.class, Class::Error);
    assert_eq!(reply.code, Some(401));
    assert_eq!(
        reply.attr(stun_attr::REALM).as_deref(),
        Some(REALM.as_bytes())
    );
    assert_eq!(reply.nonce().len(), 16);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.sockets.open.is_empty());
    // The reply is barely larger than the request (no amplification worth having).
    assert!(
        reply.bytes.len() <= datagram.len() + 64,
        "reply {} bytes for a {}-byte request",
        reply.bytes.len(),
        datagram.len()
    );
}

#[test]
fn authenticated_allocate_returns_relayed_and_mapped_addresses_with_integrity() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let tid = h.next_tid();
    let first = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let nonce = h.send(addr(CLIENT), &first).1.expect("401").nonce();
    let tid = h.next_tid();
    let second = request(
        method::ALLOCATE,
        Class::Request,
        tid,
        transport_udp,
        Some((&alice, &nonce)),
    );
    let (_, reply) = h.send(addr(CLIENT), &second);
    let reply = reply.expect("success");
    assert_eq!(reply.class, Class::Success);
    let message = Message::parse(&reply.bytes).expect("parses");
    let key = long_term_key(&alice.username, REALM, &alice.password);
    assert_eq!(message.verify_integrity(&key), Ok(()));
    let relayed = stun::decode_xor_address(
        &reply.attr(turn_attr::XOR_RELAYED_ADDRESS).expect("relayed"),
        tid,
    );
    assert_eq!(relayed, h.sockets.open.first().copied());
    let mapped = stun::decode_xor_address(
        &reply.attr(stun_attr::XOR_MAPPED_ADDRESS).expect("mapped"),
        tid,
    );
    assert_eq!(mapped, Some(addr(CLIENT)));
    assert_eq!(
        reply.attr(turn_attr::LIFETIME),
        Some(600u32.to_be_bytes().to_vec())
    );
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.take_created(), 1);
    // A retransmission of the same Allocate gets the same success; a new one 437.
    let (_, again) = h.send(addr(CLIENT), &second);
    assert_eq!(again.expect("reply").class, Class::Success);
    assert_eq!(h.server.allocation_count(), 1);
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Mismatch, Some(437)));
}

#[test]
fn a_request_signed_with_sha256_only_is_answered_with_sha256() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let tid = h.next_tid();
    let nonce = h
        .send(
            addr(CLIENT),
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    let key = long_term_key(&alice.username, REALM, &alice.password);
    let tid = h.next_tid();
    let mut datagram = Vec::new();
    let mut writer = MessageWriter::new(
        &mut datagram,
        MessageType {
            method: method::ALLOCATE,
            class: Class::Request,
        },
        tid,
    );
    transport_udp(&mut writer);
    writer
        .attribute(stun_attr::USERNAME, alice.username.as_bytes())
        .attribute(stun_attr::REALM, REALM.as_bytes())
        .attribute(stun_attr::NONCE, nonce.as_bytes());
    writer.message_integrity_sha256(&key);
    writer.finish_with_fingerprint();
    let (handled, reply) = h.send(addr(CLIENT), &datagram);
    assert!(matches!(
        handled,
        TurnHandled::Request {
            outcome: RequestOutcome::Ok,
            ..
        }
    ));
    let reply = reply.expect("success");
    let message = Message::parse(&reply.bytes).expect("parses");
    assert_eq!(message.verify_integrity_sha256(&key), Ok(()));
    assert!(reply.attr(stun_attr::MESSAGE_INTEGRITY).is_none());
    // A wrong key fails either way.
    let wrong = long_term_key(&alice.username, REALM, "guess");
    assert!(message.verify_integrity_sha256(&wrong).is_err());
}

#[test]
fn bad_credentials_and_foreign_or_stale_nonces_are_refused() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let tid = h.next_tid();
    let nonce = h
        .send(
            addr(CLIENT),
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    // Wrong password.
    let mallory = User {
        username: alice.username.clone(),
        password: "guess".into(),
    };
    let (outcome, reply) = h.authed(addr(CLIENT), &mallory, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::Unauthorized, Some(401))
    );
    // Expired credentials (expiry in the past).
    let expired = SharedSecret::new(SECRET)
        .issue("alice", NOW_UNIX - 1)
        .expect("issue");
    let expired = User {
        username: expired.username,
        password: expired.password,
    };
    let (outcome, _) = h.authed(addr(CLIENT), &expired, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!(outcome, RequestOutcome::Unauthorized);
    // A captured request replayed from another address: its nonce is not valid there.
    let (outcome, reply) = h.authed(
        addr("198.51.100.99:40000"),
        &alice,
        &nonce,
        method::ALLOCATE,
        |w, _| transport_udp(w),
    );
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::StaleNonce, Some(438))
    );
    assert_ne!(reply.nonce(), nonce, "438 carries a fresh nonce");
    // The nonce goes stale after its lifetime.
    let tid = h.next_tid();
    let datagram = request(
        method::ALLOCATE,
        Class::Request,
        tid,
        transport_udp,
        Some((&alice, &nonce)),
    );
    let (handled, _) = h.stun(addr(CLIENT), NOW_UNIX + 601, &datagram);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Allocate,
            outcome: RequestOutcome::StaleNonce
        }
    );
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.sockets.open.is_empty());
}

#[test]
fn another_users_request_on_an_allocated_five_tuple_gets_441() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let bob = user("bob");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    let (outcome, reply) = h.authed(addr(CLIENT), &bob, &nonce, method::REFRESH, |_, _| {});
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::WrongCredentials, Some(441))
    );
}

#[test]
fn denied_peers_get_403_on_every_path_including_ipv4_in_ipv6_forms() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    for peer in [
        "127.0.0.1:9",
        "10.0.0.5:9",
        "169.254.169.254:80",
        "192.0.2.10:3478", // the gateway's own relay address
    ] {
        assert_eq!(
            h.permit(addr(CLIENT), &alice, &nonce, addr(peer)),
            RequestOutcome::Forbidden,
            "{peer}"
        );
        assert_eq!(
            h.bind(addr(CLIENT), &alice, &nonce, 0x4000, addr(peer)),
            RequestOutcome::Forbidden,
            "{peer}"
        );
    }
    // IPv6 forms of denied IPv4 addresses: refused for what they reach (an IPv6 peer on
    // an IPv4 relay is a family mismatch, so these never pass either way); the policy
    // verdict itself is what matters.
    for peer in [
        "[::ffff:127.0.0.1]:9",
        "[64:ff9b::a00:5]:9",
        "[2002:7f00:1::]:9",
    ] {
        let outcome = h.permit(addr(CLIENT), &alice, &nonce, addr(peer));
        assert!(
            matches!(outcome, RequestOutcome::Forbidden | RequestOutcome::Family),
            "{peer}: {outcome:?}"
        );
        assert!(h.server.policy().check(addr(peer).ip()).is_err(), "{peer}");
    }
    // A Send indication to a denied peer is dropped even without asking for a permission.
    let tid = h.next_tid();
    let send = request(
        method::SEND,
        Class::Indication,
        tid,
        |w| {
            xor_address_attribute(w, turn_attr::XOR_PEER_ADDRESS, addr("127.0.0.1:9"), tid);
            w.attribute(turn_attr::DATA, b"x");
        },
        None,
    );
    assert_eq!(
        h.send(addr(CLIENT), &send).0,
        TurnHandled::Dropped(DropReason::DeniedPeer)
    );
}

#[test]
fn operator_allowed_range_opens_a_denied_address() {
    let policy = PeerPolicy::new(
        vec![
            "127.0.0.0/8"
                .parse::<crate::peer_policy::PeerRange>()
                .expect("range"),
        ],
        vec![],
        vec![],
    );
    let mut h = Harness::new(TurnServer::new(
        TurnConfig::default(),
        SharedSecret::new(SECRET),
        [1; 32],
        600,
        policy,
    ));
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr("127.0.0.1:9")),
        RequestOutcome::Ok
    );
}

#[test]
fn send_indications_and_peer_data_need_a_live_permission() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (relay, nonce) = h.allocate(addr(CLIENT), &alice);
    let peer = addr(PEER);
    let tid = h.next_tid();
    let send = request(
        method::SEND,
        Class::Indication,
        tid,
        |w| {
            xor_address_attribute(w, turn_attr::XOR_PEER_ADDRESS, peer, tid);
            w.attribute(turn_attr::DATA, b"hello");
        },
        None,
    );
    assert_eq!(
        h.send(addr(CLIENT), &send).0,
        TurnHandled::Dropped(DropReason::NoPermission)
    );
    assert_eq!(
        h.server.data_from_peer(h.now, relay, peer, 5),
        Err(DropReason::NoPermission)
    );
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, peer),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.send(addr(CLIENT), &send).0,
        TurnHandled::Relay {
            relay,
            peer,
            data: b"hello"
        }
    );
    // Permissions are per IP address: another port of the same peer passes.
    let other_port = addr("8.8.4.4:7001");
    assert_eq!(
        h.server.data_from_peer(h.now, relay, other_port, 5),
        Ok(ToClient {
            client: addr(CLIENT).into(),
            local: None,
            channel: None
        })
    );
    assert_eq!(
        h.server
            .data_from_peer(h.now, relay, addr("8.8.8.8:7000"), 5),
        Err(DropReason::NoPermission)
    );
    // A Data indication carries the peer and the data.
    let mut out = Vec::new();
    h.server.data_indication(peer, b"back", &mut out);
    let message = Message::parse(&out).expect("indication parses");
    assert_eq!(
        message.message_type(),
        MessageType {
            method: method::DATA,
            class: Class::Indication
        }
    );
    let tid = message.transaction_id();
    let attrs: Vec<_> = message.attributes().flatten().collect();
    assert_eq!(stun::decode_xor_address(attrs[0].value, tid), Some(peer));
    assert_eq!(attrs[1].value, b"back");
    // Permissions expire after 300 s.
    h.now += Duration::from_secs(301);
    assert_eq!(
        h.server.data_from_peer(h.now, relay, peer, 5),
        Err(DropReason::NoPermission)
    );
}

#[test]
fn channels_carry_data_both_ways_and_conflicts_are_refused() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (relay, nonce) = h.allocate(addr(CLIENT), &alice);
    let peer = addr(PEER);
    assert_eq!(
        h.server
            .channel_data_from_client(h.now, addr(CLIENT), 0x4000, 3),
        Err(DropReason::NoChannel)
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4000, peer),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.server
            .channel_data_from_client(h.now, addr(CLIENT), 0x4000, 3),
        Ok((relay, peer))
    );
    assert_eq!(
        h.server
            .data_from_peer(h.now, relay, peer, 3)
            .map(|t| t.channel),
        Ok(Some(0x4000))
    );
    // The binding installed a permission, so another port of the peer gets a Data
    // indication (no channel).
    assert_eq!(
        h.server
            .data_from_peer(h.now, relay, addr("8.8.4.4:7001"), 3)
            .map(|t| t.channel),
        Ok(None)
    );
    // Rebinding the same pair refreshes; the same number to another peer, or the same
    // peer to another number, is refused; numbers out of range are refused.
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4000, peer),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4000, addr("8.8.8.8:1")),
        RequestOutcome::BadRequest
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4001, peer),
        RequestOutcome::BadRequest
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x3FFF, addr("8.8.8.8:1")),
        RequestOutcome::BadRequest
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x8000, addr("8.8.8.8:1")),
        RequestOutcome::BadRequest
    );
    // Channels expire after 600 s (the permission too, after 300 s).
    h.now += Duration::from_secs(601);
    assert_eq!(
        h.server
            .channel_data_from_client(h.now, addr(CLIENT), 0x4000, 3),
        Err(DropReason::NoChannel)
    );
    // Another client has no allocation at all.
    assert_eq!(
        h.server
            .channel_data_from_client(h.now, addr("198.51.100.21:1"), 0x4000, 3),
        Err(DropReason::NoAllocation)
    );
}

#[test]
fn quotas_per_user_and_in_total_answer_486() {
    let config = TurnConfig {
        max_allocations: 3,
        max_allocations_per_user: 2,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    let alice = user("alice");
    let bob = user("bob");
    h.allocate(addr("198.51.100.20:1"), &alice);
    let (_, nonce) = h.allocate(addr("198.51.100.20:2"), &alice);
    let third = addr("198.51.100.20:3");
    let tid = h.next_tid();
    let nonce3 = h
        .send(
            third,
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    let (outcome, reply) = h.authed(third, &alice, &nonce3, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Quota, Some(486)));
    h.allocate(addr("198.51.100.20:4"), &bob);
    let carol = user("carol");
    let (outcome, _) = h.authed(third, &carol, &nonce3, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!(outcome, RequestOutcome::Quota, "total quota");
    // Freeing one of alice's allocations lets alice allocate again... once the total
    // has room: delete alice's second allocation with Refresh lifetime 0.
    let (outcome, reply) = h.authed(
        addr("198.51.100.20:2"),
        &alice,
        &nonce,
        method::REFRESH,
        |w, _| {
            w.attribute(turn_attr::LIFETIME, &0u32.to_be_bytes());
        },
    );
    assert_eq!(outcome, RequestOutcome::Ok);
    assert_eq!(reply.attr(turn_attr::LIFETIME), Some(vec![0, 0, 0, 0]));
    assert_eq!(h.sockets.closed.len(), 1);
    let (outcome, _) = h.authed(third, &alice, &nonce3, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!(outcome, RequestOutcome::Ok);
}

#[test]
fn permissions_and_channels_per_allocation_are_capped() {
    let config = TurnConfig {
        max_permissions: 2,
        max_channels: 1,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr("8.8.8.1:1")),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr("8.8.8.2:1")),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr("8.8.8.1:2")),
        RequestOutcome::Ok,
        "refresh"
    );
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr("8.8.8.3:1")),
        RequestOutcome::Capacity
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4000, addr("8.8.8.1:1")),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr("8.8.8.2:1")),
        RequestOutcome::Capacity
    );
}

#[test]
fn allocations_expire_and_their_sockets_close() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (relay, nonce) = h.allocate(addr(CLIENT), &alice);
    // Refresh asks for 2 hours; the maximum (3600 s) is granted.
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::REFRESH, |w, _| {
        w.attribute(turn_attr::LIFETIME, &7200u32.to_be_bytes());
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    assert_eq!(
        reply.attr(turn_attr::LIFETIME),
        Some(3600u32.to_be_bytes().to_vec())
    );
    h.now += Duration::from_secs(3599);
    h.timeout();
    assert_eq!(h.server.allocation_count(), 1);
    h.now += Duration::from_secs(2);
    h.timeout();
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.sockets.closed, vec![relay]);
    assert_eq!(h.server.poll_timeout(), None);
    assert_eq!(
        h.server.data_from_peer(h.now, relay, addr(PEER), 1),
        Err(DropReason::NoAllocation)
    );
}

#[test]
fn tcp_and_udp_clients_are_different_five_tuples_and_tcp_allocations_end_with_the_connection() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (udp_relay, _) = h.allocate(addr(CLIENT), &alice);
    // The same address over TCP is another 5-tuple: its own allocation.
    let tcp = ClientAddr {
        addr: addr(CLIENT),
        transport: Transport::Tcp,
    };
    let tid = h.next_tid();
    let hello = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let (handled, challenge) = h.send(tcp, &hello);
    assert!(matches!(
        handled,
        TurnHandled::Request {
            outcome: RequestOutcome::Unauthorized,
            ..
        }
    ));
    let challenge = challenge.expect("401");
    assert_eq!(
        challenge.transport,
        Transport::Tcp,
        "answered on the connection"
    );
    let nonce = challenge.nonce();
    let tid = h.next_tid();
    let signed = request(
        method::ALLOCATE,
        Class::Request,
        tid,
        transport_udp,
        Some((&alice, &nonce)),
    );
    let (handled, reply) = h.send(tcp, &signed);
    assert_eq!(reply.expect("success").transport, Transport::Tcp);
    assert!(matches!(
        handled,
        TurnHandled::Request {
            outcome: RequestOutcome::Ok,
            ..
        }
    ));
    assert_eq!(h.server.allocation_count(), 2);
    // The connection closes: only the TCP allocation goes, its socket closed.
    h.server.remove_client(tcp);
    h.service();
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.sockets.open, vec![udp_relay]);
}

#[test]
fn even_port_with_r_bit_reserves_the_next_port_for_a_token() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let tid = h.next_tid();
    let nonce = h
        .send(
            addr(CLIENT),
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::EVEN_PORT, &[0x80]);
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    let token = reply.attr(turn_attr::RESERVATION_TOKEN).expect("a token");
    assert_eq!(token.len(), 8);
    let tid = Message::parse(&reply.bytes)
        .expect("parses")
        .transaction_id();
    let relayed = stun::decode_xor_address(
        &reply.attr(turn_attr::XOR_RELAYED_ADDRESS).expect("relayed"),
        tid,
    )
    .expect("address");
    assert_eq!(relayed.port() % 2, 0, "an even port");
    // Another client allocates with the token and gets the next port.
    let other = addr("198.51.100.21:40001");
    let tid = h.next_tid();
    let nonce2 = h
        .send(
            other,
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    let (outcome, reply) = h.authed(other, &alice, &nonce2, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    let tid = Message::parse(&reply.bytes)
        .expect("parses")
        .transaction_id();
    let second = stun::decode_xor_address(
        &reply.attr(turn_attr::XOR_RELAYED_ADDRESS).expect("relayed"),
        tid,
    )
    .expect("address");
    assert_eq!(second, SocketAddr::new(relayed.ip(), relayed.port() + 1));
    // A token works once; unknown tokens and tokens with a family get refused.
    let third = addr("198.51.100.22:40002");
    let tid = h.next_tid();
    let nonce3 = h
        .send(
            third,
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    let (outcome, reply) = h.authed(third, &alice, &nonce3, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Capacity, Some(508)));
    let (outcome, _) = h.authed(third, &alice, &nonce3, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::RESERVATION_TOKEN, &token);
        w.attribute(
            turn_attr::REQUESTED_ADDRESS_FAMILY,
            &[family::IPV4, 0, 0, 0],
        );
    });
    assert_eq!(outcome, RequestOutcome::BadRequest);
    // An unused reservation lapses after 30 s and its socket closes.
    let (outcome, reply) = h.authed(third, &alice, &nonce3, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::EVEN_PORT, &[0x80]);
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    let tid = Message::parse(&reply.bytes)
        .expect("parses")
        .transaction_id();
    let even = stun::decode_xor_address(
        &reply.attr(turn_attr::XOR_RELAYED_ADDRESS).expect("relayed"),
        tid,
    )
    .expect("address");
    let reserved = SocketAddr::new(even.ip(), even.port() + 1);
    assert!(h.sockets.open.contains(&reserved));
    h.now += Duration::from_secs(31);
    h.timeout();
    assert!(h.sockets.closed.contains(&reserved));
    assert!(!h.sockets.open.contains(&reserved));
}

/// A nonce for `client` (from the 401 to an unauthenticated Allocate).
fn fresh_nonce(h: &mut Harness, client: SocketAddr) -> String {
    let tid = h.next_tid();
    h.send(
        client,
        &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
    )
    .1
    .expect("401")
    .nonce()
}

/// An Allocate with EVEN-PORT's R bit; the outcome, and the token when granted.
fn reserve_pair(
    h: &mut Harness,
    client: SocketAddr,
    who: &User,
    nonce: &str,
) -> (RequestOutcome, Option<Vec<u8>>) {
    let (outcome, reply) = h.authed(client, who, nonce, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::EVEN_PORT, &[0x80]);
    });
    (outcome, reply.attr(turn_attr::RESERVATION_TOKEN))
}

fn redeem(
    h: &mut Harness,
    client: SocketAddr,
    who: &User,
    nonce: &str,
    token: &[u8],
) -> (RequestOutcome, Option<u16>) {
    let (outcome, reply) = h.authed(client, who, nonce, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(turn_attr::RESERVATION_TOKEN, token);
    });
    (outcome, reply.code)
}

#[test]
fn even_port_reservations_count_in_the_quota_and_end_with_their_allocation() {
    let config = TurnConfig {
        max_allocations_per_user: 4,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    let alice = user("alice");
    let bob = user("bob");
    let client_ip: IpAddr = "198.51.100.20".parse().expect("ip");
    // Reserve-and-delete, many more times than the quota: each reservation ends
    // with the allocation that made it, so nothing piles up.
    let mut tokens = Vec::new();
    for i in 0..36u16 {
        let client = SocketAddr::new(client_ip, 40_000 + i);
        let nonce = fresh_nonce(&mut h, client);
        let (outcome, token) = reserve_pair(&mut h, client, &alice, &nonce);
        assert_eq!(outcome, RequestOutcome::Ok, "cycle {i}");
        tokens.push(token.expect("a token"));
        let (outcome, _) = h.authed(client, &alice, &nonce, method::REFRESH, |w, _| {
            w.attribute(turn_attr::LIFETIME, &0u32.to_be_bytes());
        });
        assert_eq!(outcome, RequestOutcome::Ok);
    }
    assert!(
        h.server.reservations.is_empty(),
        "no reservation outlives its allocation"
    );
    assert!(h.server.per_user.is_empty());
    assert!(h.sockets.open.is_empty(), "every reserved socket closed");
    let late = SocketAddr::new(client_ip, 41_000);
    let nonce = fresh_nonce(&mut h, late);
    assert_eq!(
        redeem(&mut h, late, &alice, &nonce, &tokens[0]),
        (RequestOutcome::Capacity, Some(508)),
        "the token of a deleted allocation is dead"
    );

    // A reservation takes a quota slot: two pairs fill a quota of four.
    let (one, two, three) = (
        SocketAddr::new(client_ip, 42_001),
        SocketAddr::new(client_ip, 42_002),
        SocketAddr::new(client_ip, 42_003),
    );
    let nonce_one = fresh_nonce(&mut h, one);
    let (outcome, token) = reserve_pair(&mut h, one, &alice, &nonce_one);
    assert_eq!(outcome, RequestOutcome::Ok);
    let token = token.expect("a token");
    let nonce_two = fresh_nonce(&mut h, two);
    assert_eq!(
        reserve_pair(&mut h, two, &alice, &nonce_two).0,
        RequestOutcome::Ok
    );
    let nonce_three = fresh_nonce(&mut h, three);
    assert_eq!(
        reserve_pair(&mut h, three, &alice, &nonce_three).0,
        RequestOutcome::Quota
    );
    let (outcome, reply) = h.authed(three, &alice, &nonce_three, method::ALLOCATE, |w, _| {
        transport_udp(w);
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Quota, Some(486)));

    // Only the user who reserved may redeem; redeeming moves the slot, it takes
    // no new one.
    let nonce_bob = fresh_nonce(&mut h, three);
    assert_eq!(
        redeem(&mut h, three, &bob, &nonce_bob, &token),
        (RequestOutcome::Capacity, Some(508))
    );
    assert_eq!(
        redeem(&mut h, three, &alice, &nonce_three, &token),
        (RequestOutcome::Ok, None)
    );
    assert_eq!(h.server.per_user.get("alice"), Some(&4));
    // The redeemed socket is an allocation now: deleting its maker leaves it open.
    let redeemed = h.server.slots[h.server.by_client[&ClientAddr::from(three)]]
        .as_ref()
        .expect("allocation")
        .relay;
    let (outcome, _) = h.authed(one, &alice, &nonce_one, method::REFRESH, |w, _| {
        w.attribute(turn_attr::LIFETIME, &0u32.to_be_bytes());
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    assert!(h.sockets.open.contains(&redeemed));
    assert_eq!(h.server.per_user.get("alice"), Some(&3));
}

#[test]
fn bandwidth_cap_drops_the_excess() {
    let config = TurnConfig {
        bandwidth_bytes_per_second: 1000,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    let alice = user("alice");
    let (relay, nonce) = h.allocate(addr(CLIENT), &alice);
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4000, addr(PEER)),
        RequestOutcome::Ok
    );
    let mut passed = 0;
    for _ in 0..20 {
        if h.server
            .channel_data_from_client(h.now, addr(CLIENT), 0x4000, 100)
            .is_ok()
        {
            passed += 1;
        }
    }
    assert_eq!(passed, 10, "one second's worth passes at once");
    assert_eq!(
        h.server.data_from_peer(h.now, relay, addr(PEER), 100),
        Err(DropReason::Bandwidth)
    );
    h.now += Duration::from_millis(500);
    let mut passed = 0;
    for _ in 0..20 {
        if h.server
            .data_from_peer(h.now, relay, addr(PEER), 100)
            .is_ok()
        {
            passed += 1;
        }
    }
    assert_eq!(passed, 5, "half a second refills half");
}

#[test]
fn other_requests_without_an_allocation_get_437_and_unknown_attributes_420() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let tid = h.next_tid();
    let nonce = h
        .send(
            addr(CLIENT),
            &request(method::REFRESH, Class::Request, tid, |_| {}, None),
        )
        .1
        .expect("401")
        .nonce();
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::REFRESH, |_, _| {});
    assert_eq!((outcome, reply.code), (RequestOutcome::Mismatch, Some(437)));
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(0x7777, &[0; 4]);
    });
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::UnknownAttribute, Some(420))
    );
    assert_eq!(
        reply.attr(stun_attr::UNKNOWN_ATTRIBUTES),
        Some(vec![0x77, 0x77, 0x77, 0x77])
    );
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        w.attribute(turn_attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::Transport, Some(442))
    );
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w);
        w.attribute(
            turn_attr::REQUESTED_ADDRESS_FAMILY,
            &[family::IPV6, 0, 0, 0],
        );
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Family, Some(440)));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn spoofed_allocate_flood_keeps_no_state_and_is_throttled() {
    let config = TurnConfig {
        challenges_per_second: 100,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    let mut answered = 0;
    for i in 0..10_000u32 {
        let from = SocketAddr::new(
            IpAddr::from((0x0A00_0000 + i).to_be_bytes()),
            1000 + (i % 5000) as u16,
        );
        let tid = h.next_tid();
        let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
        let (_, reply) = h.send(from, &datagram);
        answered += usize::from(reply.is_some());
    }
    assert_eq!(answered, 100, "replies bounded by the challenge budget");
    assert_eq!(h.server.allocation_count(), 0);
    assert!(
        h.server.slots.is_empty() && h.server.by_client.is_empty() && h.server.per_user.is_empty()
    );
    assert!(h.sockets.open.is_empty());
}

#[test]
fn a_flood_from_one_source_leaves_the_challenges_of_others() {
    let mut h = Harness::new(server());
    let flooder = addr("203.0.113.66:5000");
    let mut answered = 0;
    for _ in 0..10_000 {
        let tid = h.next_tid();
        let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
        answered += usize::from(h.send(flooder, &datagram).1.is_some());
    }
    assert_eq!(answered, 100, "one source gets its burst, not the budget");
    let tid = h.next_tid();
    let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let (handled, reply) = h.send(addr(CLIENT), &datagram);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Allocate,
            outcome: RequestOutcome::Unauthorized
        }
    );
    assert_eq!(reply.expect("a new client is challenged").code, Some(401));
}

#[test]
fn live_allocations_refresh_past_a_stale_nonce_while_forged_sources_drain_the_budget() {
    let config = TurnConfig {
        challenges_per_second: 100,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    // The nonce lapses (600 s) while forged sources use up the whole budget.
    let later = NOW_UNIX + 601;
    for i in 0..1_000u32 {
        let from = SocketAddr::new(IpAddr::from((0x0A00_0000 + i).to_be_bytes()), 1000);
        let tid = h.next_tid();
        let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
        h.stun(from, later, &datagram);
    }
    let tid = h.next_tid();
    let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let (_, reply) = h.stun(addr("198.51.100.99:1"), later, &datagram);
    assert!(reply.is_none(), "the unauthenticated budget is spent");
    // A signed Refresh with the old nonce still gets its 438, and the new nonce works.
    let tid = h.next_tid();
    let refresh = request(
        method::REFRESH,
        Class::Request,
        tid,
        |_| {},
        Some((&alice, &nonce)),
    );
    let (handled, reply) = h.stun(addr(CLIENT), later, &refresh);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Refresh,
            outcome: RequestOutcome::StaleNonce
        }
    );
    let reply = reply.expect("438 despite the flood");
    assert_eq!(reply.code, Some(438));
    let fresh = reply.nonce();
    let tid = h.next_tid();
    let refresh = request(
        method::REFRESH,
        Class::Request,
        tid,
        |_| {},
        Some((&alice, &fresh)),
    );
    let (handled, _) = h.stun(addr(CLIENT), later, &refresh);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Refresh,
            outcome: RequestOutcome::Ok
        }
    );
    // A forged request with a stale nonce but no valid integrity is still budgeted.
    let mallory = User {
        username: alice.username.clone(),
        password: "not-the-password".into(),
    };
    let tid = h.next_tid();
    let forged = request(
        method::REFRESH,
        Class::Request,
        tid,
        |_| {},
        Some((&mallory, &nonce)),
    );
    let (handled, reply) = h.stun(addr("198.51.100.98:1"), later, &forged);
    assert_eq!(
        (handled, reply.map(|r| r.code)),
        (
            TurnHandled::Request {
                method: RequestMethod::Refresh,
                outcome: RequestOutcome::Throttled
            },
            None
        )
    );
    // The budget refills continuously: 100 ms later, ten new clients get answers.
    h.now += Duration::from_millis(100);
    let answered = (0..20u32)
        .filter(|i| {
            let from = SocketAddr::new(IpAddr::from((0x0C00_0000 + i).to_be_bytes()), 1000);
            let tid = h.next_tid();
            let datagram = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
            h.stun(from, later, &datagram).1.is_some()
        })
        .count();
    assert_eq!(answered, 10);
}

proptest! {
    #[test]
    fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut h = Harness::new(server());
        if let Ok(message) = Message::parse(&bytes) {
            let _ = h.handle(addr(CLIENT), NOW_UNIX, &message);
        }
        let _ = h.server.channel_data_from_client(h.now, addr(CLIENT), 0x4000, bytes.len());
    }

    #[test]
    fn arbitrary_attributes_on_an_allocation_never_panic(
        method_number in prop::sample::select(vec![method::ALLOCATE, method::REFRESH, method::CREATE_PERMISSION, method::CHANNEL_BIND, method::SEND]),
        attrs in proptest::collection::vec((prop::sample::select(vec![0x000Cu16, 0x000D, 0x0012, 0x0013, 0x0017, 0x0018, 0x0019, 0x001A, 0x0022, 0x8000]), proptest::collection::vec(any::<u8>(), 0..24)), 0..6),
    ) {
        let mut h = Harness::new(server());
        let alice = user("alice");
        let (_, nonce) = h.allocate(addr(CLIENT), &alice);
        let tid = h.next_tid();
        let class = if method_number == method::SEND { Class::Indication } else { Class::Request };
        let datagram = request(method_number, class, tid, |w| {
            for (ty, value) in &attrs {
                w.attribute(*ty, value);
            }
        }, Some((&alice, &nonce)));
        let message = Message::parse(&datagram).expect("well-formed");
        let _ = h.handle(addr(CLIENT), NOW_UNIX, &message);
        prop_assert!(h.server.allocation_count() <= 1);
    }
}

// Allocates waiting for their relay socket (the driver opens it between the request
// and the answer).

/// Challenge, then an authenticated Allocate (with `extra` attributes) that must
/// wait for its socket; returns the signed request, to retransmit.
fn allocate_pending(
    h: &mut Harness,
    client: SocketAddr,
    who: &User,
    extra: impl Fn(&mut MessageWriter<'_>),
) -> Vec<u8> {
    let tid = h.next_tid();
    let hello = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let nonce = h.send(client, &hello).1.expect("401").nonce();
    let tid = h.next_tid();
    let signed = request(
        method::ALLOCATE,
        Class::Request,
        tid,
        |w| {
            transport_udp(w);
            extra(w);
        },
        Some((who, &nonce)),
    );
    let (handled, reply) = h.send(client, &signed);
    assert_eq!(handled, TurnHandled::AwaitingRelay);
    assert!(reply.is_none(), "no answer before the socket is there");
    signed
}

#[test]
fn a_pending_allocate_is_answered_when_its_socket_is_reported() {
    let mut h = Harness::new(server());
    h.local = Some(SERVICE.parse().expect("ip"));
    h.sockets.hold = true;
    let alice = user("alice");
    let signed = allocate_pending(&mut h, addr(CLIENT), &alice, |_| {});
    // The driver is asked for an IPv4 socket on any port, on the address reached.
    let [(request, family, even_port, local)] = h.held[..] else {
        panic!("one open request: {:?}", h.held)
    };
    assert_eq!((family, even_port), (AddressFamily::V4, EvenPort::Any));
    assert_eq!(local, h.local);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.take_created(), 0);
    let relay = addr("192.0.2.10:50002");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Ok((relay, None))),
        Some(RequestOutcome::Ok)
    );
    h.service();
    let reply = h.reply().expect("the success, now");
    assert_eq!(reply.class, Class::Success);
    let tid = Message::parse(&signed).expect("parses").transaction_id();
    let relayed = stun::decode_xor_address(
        &reply.attr(turn_attr::XOR_RELAYED_ADDRESS).expect("relayed"),
        tid,
    );
    assert_eq!(relayed, Some(relay));
    let message = Message::parse(&reply.bytes).expect("parses");
    let key = long_term_key(&alice.username, REALM, &alice.password);
    assert_eq!(message.verify_integrity(&key), Ok(()));
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.take_created(), 1);
    // The reply leaves from the gateway address the client reached.
    assert_eq!(h.server.poll_transmit(), None);
    // A report for a request that is not pending (again) changes nothing and closes
    // what it reports.
    let stray = addr("192.0.2.10:50004");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Ok((stray, None))),
        None
    );
    h.service();
    assert_eq!(h.sockets.closed, vec![stray]);
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn the_open_request_carries_the_family_parity_and_the_address_reached() {
    let mut h = Harness::new(server());
    let reached: IpAddr = "2001:db8::1".parse().expect("ip");
    h.local = Some(reached);
    h.sockets.hold = true;
    let alice = user("alice");
    allocate_pending(&mut h, addr(CLIENT), &alice, |w| {
        w.attribute(
            turn_attr::REQUESTED_ADDRESS_FAMILY,
            &[family::IPV6, 0, 0, 0],
        );
        w.attribute(turn_attr::EVEN_PORT, &[0x00]);
    });
    allocate_pending(&mut h, addr("198.51.100.21:1"), &alice, |w| {
        w.attribute(turn_attr::EVEN_PORT, &[0x80]);
    });
    let asked: Vec<_> = h.held.iter().map(|(_, f, e, l)| (*f, *e, *l)).collect();
    assert_eq!(
        asked,
        vec![
            (AddressFamily::V6, EvenPort::Even, Some(reached)),
            (AddressFamily::V4, EvenPort::EvenReserveNext, Some(reached)),
        ]
    );
}

#[test]
fn a_failed_open_gets_the_error_a_failed_open_always_got() {
    let alice = user("alice");
    // No free port: 508, as when the socket layer said so synchronously.
    let mut h = Harness::new(server());
    h.sockets.no_ports = true;
    let tid = h.next_tid();
    let hello = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let nonce = h.send(addr(CLIENT), &hello).1.expect("401").nonce();
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Capacity, Some(508)));
    assert_eq!(reply.class, Class::Error);
    let key = long_term_key(&alice.username, REALM, &alice.password);
    let message = Message::parse(&reply.bytes).expect("parses");
    assert_eq!(message.verify_integrity(&key), Ok(()));
    // No relay address of the family: 440.
    h.sockets.hold = true;
    allocate_pending(&mut h, addr(CLIENT), &alice, |_| {});
    let (request, ..) = h.held.pop().expect("an open request");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Err(OpenError::FamilyUnavailable)),
        Some(RequestOutcome::Family)
    );
    assert_eq!(h.reply().expect("an answer").code, Some(440));
    // A pair asked for and a single socket reported: 508, and the socket closes.
    allocate_pending(&mut h, addr(CLIENT), &alice, |w| {
        w.attribute(turn_attr::EVEN_PORT, &[0x80]);
    });
    let (request, ..) = h.held.pop().expect("an open request");
    let lone = addr("192.0.2.10:50010");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Ok((lone, None))),
        Some(RequestOutcome::Capacity)
    );
    assert_eq!(h.reply().expect("an answer").code, Some(508));
    h.service();
    assert_eq!(h.sockets.closed, vec![lone]);
    // Nothing was kept: no allocation, no pending entry, no quota used.
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.server.pending.is_empty() && h.server.pending_by_client.is_empty());
    assert!(h.server.per_user.is_empty());
    h.sockets = FakeSockets::default();
    h.allocate(addr(CLIENT), &alice);
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn a_retransmitted_allocate_while_pending_opens_nothing_more_and_is_answered_once() {
    let mut h = Harness::new(server());
    h.sockets.hold = true;
    let alice = user("alice");
    let signed = allocate_pending(&mut h, addr(CLIENT), &alice, |_| {});
    // The retransmission: no second socket, no answer yet.
    let (handled, reply) = h.send(addr(CLIENT), &signed);
    assert_eq!(handled, TurnHandled::AwaitingRelay);
    assert!(reply.is_none());
    assert_eq!(h.held.len(), 1, "one socket for one Allocate");
    // Another transaction on the 5-tuple is a mismatch, as once allocated; another
    // user's is refused; other methods find no allocation yet.
    let tid = h.next_tid();
    let hello = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let nonce = h.send(addr(CLIENT), &hello).1.expect("401").nonce();
    let (outcome, reply) = h.authed(addr(CLIENT), &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Mismatch, Some(437)));
    let bob = user("bob");
    let (outcome, reply) = h.authed(addr(CLIENT), &bob, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::WrongCredentials, Some(441))
    );
    let (outcome, _) = h.authed(addr(CLIENT), &alice, &nonce, method::REFRESH, |_, _| {});
    assert_eq!(outcome, RequestOutcome::Mismatch);
    assert_eq!(h.held.len(), 1);
    // The socket is there: one answer, the success.
    let (request, ..) = h.held.pop().expect("an open request");
    let relay = addr("192.0.2.10:50002");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Ok((relay, None))),
        Some(RequestOutcome::Ok)
    );
    assert_eq!(h.reply().expect("the success").class, Class::Success);
    // Later retransmissions get the same success from the allocation.
    let (handled, reply) = h.send(addr(CLIENT), &signed);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Allocate,
            outcome: RequestOutcome::Ok
        }
    );
    assert_eq!(reply.expect("success").class, Class::Success);
    assert_eq!(h.take_created(), 1);
    assert!(h.held.is_empty());
}

#[test]
fn pending_allocates_count_toward_the_quotas() {
    let config = TurnConfig {
        max_allocations: 1,
        ..TurnConfig::default()
    };
    let mut h = Harness::new(server_with(config));
    h.sockets.hold = true;
    let alice = user("alice");
    allocate_pending(&mut h, addr(CLIENT), &alice, |_| {});
    let other = addr("198.51.100.21:1");
    let tid = h.next_tid();
    let hello = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let nonce = h.send(other, &hello).1.expect("401").nonce();
    let (outcome, reply) = h.authed(other, &alice, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    });
    assert_eq!((outcome, reply.code), (RequestOutcome::Quota, Some(486)));
    assert_eq!(h.held.len(), 1);
}

#[test]
fn a_pending_allocate_whose_report_never_comes_expires_and_a_late_socket_closes() {
    let mut h = Harness::new(server());
    h.sockets.hold = true;
    let alice = user("alice");
    let signed = allocate_pending(&mut h, addr(CLIENT), &alice, |_| {});
    let (request, ..) = h.held.pop().expect("an open request");
    // The core keeps a timer while anything is pending.
    assert!(h.server.poll_timeout().is_some());
    h.now += allocate::PENDING_LIFETIME - Duration::from_millis(1);
    h.timeout();
    assert_eq!(h.server.pending.len(), 1, "not yet");
    h.now += Duration::from_millis(1);
    h.timeout();
    assert!(h.server.pending.is_empty() && h.server.pending_by_client.is_empty());
    assert!(h.server.per_user.is_empty(), "its quota is given back");
    assert!(h.reply().is_none(), "no answer: the client retransmits");
    // The timer stops once nothing is left.
    h.now += Duration::from_secs(1);
    h.timeout();
    assert_eq!(h.server.poll_timeout(), None);
    // The late report finds nothing pending: its socket(s) close, nothing answers.
    let late = addr("192.0.2.10:50002");
    let reserved = addr("192.0.2.10:50003");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Ok((late, Some(reserved)))),
        None
    );
    h.service();
    assert_eq!(h.sockets.closed, vec![late, reserved]);
    assert!(h.reply().is_none());
    assert_eq!(h.server.allocation_count(), 0);
    // The client's next retransmission starts afresh.
    h.sockets.hold = false;
    let (handled, reply) = h.send(addr(CLIENT), &signed);
    assert_eq!(
        handled,
        TurnHandled::Request {
            method: RequestMethod::Allocate,
            outcome: RequestOutcome::Ok
        }
    );
    assert_eq!(reply.expect("success").class, Class::Success);
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn a_tcp_client_gone_while_pending_leaves_nothing_behind() {
    let mut h = Harness::new(server());
    h.sockets.hold = true;
    let alice = user("alice");
    let tcp = ClientAddr {
        addr: addr(CLIENT),
        transport: Transport::Tcp,
    };
    let tid = h.next_tid();
    let hello = request(method::ALLOCATE, Class::Request, tid, transport_udp, None);
    let nonce = h.send(tcp, &hello).1.expect("401").nonce();
    let tid = h.next_tid();
    let signed = request(
        method::ALLOCATE,
        Class::Request,
        tid,
        transport_udp,
        Some((&alice, &nonce)),
    );
    assert_eq!(h.send(tcp, &signed).0, TurnHandled::AwaitingRelay);
    let (request, ..) = h.held.pop().expect("an open request");
    h.server.remove_client(tcp);
    assert!(h.server.pending.is_empty() && h.server.per_user.is_empty());
    let relay = addr("192.0.2.10:50002");
    assert_eq!(
        h.server
            .handle_relay_opened(h.now, request, Ok((relay, None))),
        None
    );
    h.service();
    assert_eq!(h.sockets.closed, vec![relay]);
    assert_eq!(h.server.allocation_count(), 0);
}

// The fast-path instructions.

const SERVICE: &str = "192.0.2.10";

fn fast_harness(config: TurnConfig) -> Harness {
    let mut h = Harness::new(server_with(TurnConfig {
        fast_path: true,
        ..config
    }));
    h.local = Some(SERVICE.parse().expect("ip"));
    h
}

fn drained(h: &mut Harness) -> Vec<FastPath> {
    std::mem::take(&mut h.fast)
}

#[test]
fn fast_path_installs_a_bound_channel_with_its_earliest_deadline() {
    let mut h = fast_harness(TurnConfig::default());
    let alice = user("alice");
    let (relay, nonce) = h.allocate(addr(CLIENT), &alice);
    // Allocating and permitting alone install nothing: no channel yet.
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr(PEER)),
        RequestOutcome::Ok
    );
    assert_eq!(drained(&mut h), vec![]);
    let bound_at = h.now;
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER)),
        RequestOutcome::Ok
    );
    let expected = FastChannel {
        allocation: 0,
        client: addr(CLIENT),
        service: SERVICE.parse().expect("ip"),
        channel: 0x4001,
        relay,
        peer: addr(PEER),
        // The permission (300 s) lapses before the channel (600 s).
        expires: bound_at + Duration::from_secs(300),
    };
    assert_eq!(drained(&mut h), vec![FastPath::Install(expected)]);
    // Nothing changes in a sweep: no instruction.
    h.now += Duration::from_secs(10);
    h.timeout();
    assert_eq!(drained(&mut h), vec![]);
    // Refreshing the permission moves the deadline: the entry is updated.
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr(PEER)),
        RequestOutcome::Ok
    );
    assert_eq!(
        drained(&mut h),
        vec![FastPath::Install(FastChannel {
            expires: h.now + Duration::from_secs(300),
            ..expected
        })]
    );
}

#[test]
fn fast_path_entry_is_removed_when_the_permission_lapses_and_back_when_renewed() {
    let mut h = fast_harness(TurnConfig::default());
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER));
    let installed = drained(&mut h);
    assert!(matches!(installed[..], [FastPath::Install(_)]));
    h.now += Duration::from_secs(299);
    h.timeout();
    assert_eq!(drained(&mut h), vec![]);
    h.now += Duration::from_secs(2);
    h.timeout();
    let removed = drained(&mut h);
    assert!(
        matches!(removed[..], [FastPath::Remove(c)] if c.channel == 0x4001 && c.peer == addr(PEER)),
        "{removed:?}"
    );
    // The channel is still bound (600 s): a new permission brings the entry back.
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr(PEER)),
        RequestOutcome::Ok
    );
    assert!(matches!(drained(&mut h)[..], [FastPath::Install(c)] if c.channel == 0x4001));
}

#[test]
fn fast_path_entry_is_removed_when_the_channel_expires() {
    let mut h = fast_harness(TurnConfig::default());
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER));
    drained(&mut h);
    // Keep the permission alive past the channel's 600 s.
    h.now += Duration::from_secs(290);
    h.permit(addr(CLIENT), &alice, &nonce, addr(PEER));
    h.now += Duration::from_secs(290);
    h.permit(addr(CLIENT), &alice, &nonce, addr(PEER));
    let updates = drained(&mut h);
    assert!(
        updates.iter().all(|i| matches!(i, FastPath::Install(_))),
        "{updates:?}"
    );
    // The last update's deadline is the channel's own (600 s after binding).
    let FastPath::Install(last) = updates[updates.len() - 1] else {
        unreachable!()
    };
    assert_eq!(last.expires, h.now + Duration::from_secs(20));
    h.now += Duration::from_secs(21);
    h.timeout();
    assert!(matches!(drained(&mut h)[..], [FastPath::Remove(c)] if c.channel == 0x4001));
}

#[test]
fn fast_path_entries_go_with_a_deleted_or_expired_allocation() {
    let mut h = fast_harness(TurnConfig::default());
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER));
    h.bind(addr(CLIENT), &alice, &nonce, 0x4002, addr("8.8.4.4:7001"));
    assert_eq!(drained(&mut h).len(), 2);
    // Refresh with LIFETIME 0 deletes the allocation: both entries go.
    let (outcome, _) = h.authed(addr(CLIENT), &alice, &nonce, method::REFRESH, |w, _| {
        w.attribute(turn_attr::LIFETIME, &0u32.to_be_bytes());
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    let removed = drained(&mut h);
    assert_eq!(removed.len(), 2);
    assert!(removed.iter().all(|i| matches!(i, FastPath::Remove(_))));

    // An allocation that simply expires (the client keeps its channel and
    // permission fresh but not the allocation) loses its entries too.
    let bob = user("bob");
    let client = addr("198.51.100.21:40000");
    let (_, nonce) = h.allocate(client, &bob);
    h.bind(client, &bob, &nonce, 0x4001, addr(PEER));
    let FastPath::Install(first) = drained(&mut h)[0] else {
        panic!("expected an install")
    };
    for _ in 0..2 {
        h.now += Duration::from_secs(250);
        h.bind(client, &bob, &nonce, 0x4001, addr(PEER));
    }
    // 500 s in: the allocation's 600 s are the earliest deadline now.
    let updates = drained(&mut h);
    let Some(FastPath::Install(last)) = updates.last() else {
        panic!("expected updates: {updates:?}")
    };
    assert_eq!(last.expires, h.now + Duration::from_secs(100));
    assert_eq!(last.allocation, first.allocation);
    h.now += Duration::from_secs(101);
    h.timeout();
    assert!(matches!(drained(&mut h)[..], [FastPath::Remove(c)] if c.client == client));
}

#[test]
fn fast_path_never_serves_capped_allocations_or_denied_peers() {
    let mut h = fast_harness(TurnConfig {
        bandwidth_bytes_per_second: 1_000_000,
        ..TurnConfig::default()
    });
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER)),
        RequestOutcome::Ok
    );
    h.now += Duration::from_secs(400);
    h.timeout();
    assert_eq!(
        drained(&mut h),
        vec![],
        "capped: the core must see every packet"
    );

    let mut h = fast_harness(TurnConfig::default());
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    // Loopback, private and the gateway's own address are denied by policy.
    for denied in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "192.0.2.10:9",
        "[::ffff:127.0.0.1]:9",
    ] {
        assert_eq!(
            h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(denied)),
            RequestOutcome::Forbidden,
            "{denied}"
        );
        assert_eq!(
            h.permit(addr(CLIENT), &alice, &nonce, addr(denied)),
            RequestOutcome::Forbidden
        );
    }
    assert_eq!(drained(&mut h), vec![]);
}

#[test]
fn fast_path_is_silent_when_off_or_when_the_gateway_address_is_unknown() {
    let mut h = Harness::new(server());
    h.local = Some(SERVICE.parse().expect("ip"));
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER));
    assert_eq!(drained(&mut h), vec![]);

    let mut h = fast_harness(TurnConfig::default());
    h.local = None;
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    h.bind(addr(CLIENT), &alice, &nonce, 0x4001, addr(PEER));
    assert_eq!(drained(&mut h), vec![]);
}

/// A fresh client's authenticated Allocate: challenge, then the signed request.
fn fresh_allocate(h: &mut Harness, client: SocketAddr, who: &User) -> (RequestOutcome, Reply) {
    let tid = h.next_tid();
    let nonce = h
        .send(
            client,
            &request(method::ALLOCATE, Class::Request, tid, transport_udp, None),
        )
        .1
        .expect("401")
        .nonce();
    h.authed(client, who, &nonce, method::ALLOCATE, |w, _| {
        transport_udp(w)
    })
}

#[test]
fn draining_sends_new_allocations_elsewhere_and_keeps_serving_existing_ones() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (relayed, nonce) = h.allocate(addr(CLIENT), &alice);
    let alternate = addr("203.0.113.9:3478");
    h.server.set_draining(Some(Draining {
        alternate: Some(alternate),
    }));
    assert!(h.server.is_draining());
    // A newcomer is authenticated first (401 as always), then redirected, signed.
    let newcomer = addr("198.51.100.30:5000");
    let bob = user("bob");
    let (outcome, reply) = fresh_allocate(&mut h, newcomer, &bob);
    assert_eq!(
        (outcome, reply.code),
        (RequestOutcome::TryAlternate, Some(300))
    );
    let value = reply
        .attr(stun_attr::ALTERNATE_SERVER)
        .expect("ALTERNATE-SERVER");
    assert_eq!(crate::binding::decode_address(&value), Some(alternate));
    let key = long_term_key(&bob.username, REALM, &bob.password);
    Message::parse(&reply.bytes)
        .expect("parses")
        .verify_integrity(&key)
        .expect("the redirect is signed with the requester's key");
    assert_eq!(h.server.allocation_count(), 1, "nothing allocated");
    assert_eq!(h.sockets.open, vec![relayed], "no socket opened");
    // The existing allocation lives on: permission, channel, refresh.
    let peer = addr(PEER);
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, peer),
        RequestOutcome::Ok
    );
    assert_eq!(
        h.bind(addr(CLIENT), &alice, &nonce, 0x4001, peer),
        RequestOutcome::Ok
    );
    let (outcome, _) = h.authed(addr(CLIENT), &alice, &nonce, method::REFRESH, |w, _| {
        w.attribute(turn_attr::LIFETIME, &600u32.to_be_bytes());
    });
    assert_eq!(outcome, RequestOutcome::Ok);
    assert_eq!(
        h.server
            .channel_data_from_client(h.now, addr(CLIENT), 0x4001, 10),
        Ok((relayed, peer)),
        "data still relayed"
    );
    // Without an alternate, a newcomer gets 508 "Draining".
    h.server.set_draining(Some(Draining { alternate: None }));
    let (outcome, reply) = fresh_allocate(&mut h, newcomer, &bob);
    assert_eq!((outcome, reply.code), (RequestOutcome::Draining, Some(508)));
    assert!(
        String::from_utf8_lossy(&reply.bytes).contains("Draining"),
        "the reason says why"
    );
    // Ending the drain takes newcomers again.
    h.server.set_draining(None);
    let (outcome, _) = fresh_allocate(&mut h, newcomer, &bob);
    assert_eq!(outcome, RequestOutcome::Ok);
}

#[test]
fn a_rotated_secret_keeps_old_allocations_refreshing_and_accepts_new_credentials() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    // Rotate: a new current secret, the old one still accepted.
    let rotated = SharedSecret::new(b"the new secret").with_previous(SECRET);
    h.server.set_secret(rotated.clone());
    let refresh = |h: &mut Harness, who: &User, nonce: &str| {
        h.authed(addr(CLIENT), who, nonce, method::REFRESH, |w, _| {
            w.attribute(turn_attr::LIFETIME, &600u32.to_be_bytes());
        })
        .0
    };
    assert_eq!(refresh(&mut h, &alice, &nonce), RequestOutcome::Ok);
    let issued = rotated.issue("bob", NOW_UNIX + 3600).expect("issue");
    let bob = User {
        username: issued.username,
        password: issued.password,
    };
    let (outcome, _) = fresh_allocate(&mut h, addr("198.51.100.30:5000"), &bob);
    assert_eq!(outcome, RequestOutcome::Ok, "credentials of the new secret");
    // Once the old secret is dropped, its credentials are refused, but the
    // allocation itself stays until it expires.
    h.server.set_secret(SharedSecret::new(b"the new secret"));
    assert_eq!(
        refresh(&mut h, &alice, &nonce),
        RequestOutcome::Unauthorized
    );
    assert_eq!(h.server.allocation_count(), 2);
}

#[test]
fn a_reloaded_policy_and_limits_apply_to_new_requests() {
    let mut h = Harness::new(server());
    let alice = user("alice");
    let (_, nonce) = h.allocate(addr(CLIENT), &alice);
    let inside = addr("10.20.0.5:9");
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, inside),
        RequestOutcome::Forbidden
    );
    h.server.set_policy(PeerPolicy::new(
        vec![
            "10.20.0.0/16"
                .parse::<crate::peer_policy::PeerRange>()
                .expect("range"),
        ],
        vec![],
        vec![],
    ));
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, inside),
        RequestOutcome::Ok
    );
    // Limits change, the realm does not (it is in every client's key).
    h.server.set_config(TurnConfig {
        realm: "elsewhere".into(),
        max_permissions: 1,
        ..TurnConfig::default()
    });
    assert_eq!(h.server.config().realm, REALM);
    assert_eq!(h.server.config().max_permissions, 1);
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, addr("8.8.8.8:1")),
        RequestOutcome::Capacity,
        "the new cap applies; the permission it has stays"
    );
    assert_eq!(
        h.permit(addr(CLIENT), &alice, &nonce, inside),
        RequestOutcome::Ok,
        "refreshing an existing permission is not a new one"
    );
}
