//! Structure-aware fuzzing of the TURN server and rendezvous cores: sequences of
//! well-formed, correctly signed requests (with raw datagrams between them) from a
//! few clients over virtual time, so the fuzzer reaches the states single datagrams
//! never do (allocations with permissions, channels, reservations and pending
//! sockets; registrations, introductions, relay offers).
//!
//! Beyond "no panic": every relay socket the core asks to close was open, the
//! quotas hold, and after the sequence, once every lifetime has passed, nothing is
//! left: no allocation, no socket, no registration (a leak is a finding).
#![no_main]

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use gateway_proto::{
    credentials::SharedSecret,
    peer_policy::PeerPolicy,
    rendezvous::{
        NatClass, RelayEndpoints, RendezvousConfig, RendezvousServer, SessionOutcome,
        client::{self, PeerCredentials},
    },
    stun::{self, Class, Message, MessageType, MessageWriter, attr as stun_attr},
    turn::{
        self, TRANSPORT_UDP, attr as turn_attr, method,
        server::{ClientAddr, EvenPort, OpenError, Transport, TurnConfig, TurnServer, TurnServerEvent},
    },
};
use libfuzzer_sys::fuzz_target;

const NOW_UNIX: u64 = 1_800_000_000;
const REALM: &str = "fuzz";
const CLIENTS: u8 = 8;
const USERS: [&str; 3] = ["alice", "bob", "red/carol"];
const MAX_PER_USER: usize = 3;
const MAX_ALLOCATIONS: usize = 6;

#[derive(Arbitrary, Debug)]
enum TurnOp {
    Allocate { client: u8, user: u8, parity: u8, lifetime: Option<u16>, token: Option<u8>, v6: bool },
    Refresh { client: u8, lifetime: Option<u16> },
    Permission { client: u8, peer: u8 },
    Bind { client: u8, channel: u16, peer: u8 },
    Send { client: u8, peer: u8, len: u16 },
    ChannelData { client: u8, channel: u16, len: u16 },
    FromPeer { relay: u8, peer: u8, len: u16 },
    StaleNonce { client: u8 },
    Advance { ms: u16 },
    Close { client: u8 },
    HoldOpens(bool),
    Raw { client: u8, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum RendezvousOp {
    Register { peer: u8, hosts: u8, nat: u8, rtt: u16 },
    Connect { peer: u8, target: u8 },
    Outcome { peer: u8, intro: u8, ok: bool },
    RelayOffer { peer: u8, intro: u8, port: u16, foreign: bool },
    TcpSeq { peer: u8, intro: u8, isn: u32 },
    Move { peer: u8 },
    Advance { ms: u16 },
    Raw { peer: u8, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    turn: Vec<TurnOp>,
    rendezvous: Vec<RendezvousOp>,
}

fn secret() -> SharedSecret {
    SharedSecret::new(b"fuzz secret")
}

fn credentials(user: &str) -> (String, String) {
    let issued = secret().issue(user, NOW_UNIX + 86_400).expect("valid id");
    (issued.username, issued.password)
}

fn client_addr(index: u8) -> ClientAddr {
    let index = index % CLIENTS;
    ClientAddr {
        addr: SocketAddr::from(([198, 51, 100, 1 + index / 2], 4000 + u16::from(index))),
        transport: if index % 2 == 0 { Transport::Udp } else { Transport::Tcp },
    }
}

fn peer_addr(index: u8) -> SocketAddr {
    SocketAddr::from(([1, 1, 1, 1 + index % 4], 7000 + u16::from(index % 3)))
}

/// The TURN core with a fake socket layer that carries out its events as a driver.
struct TurnWorld {
    server: TurnServer,
    now: Instant,
    tid: u32,
    open: HashSet<SocketAddr>,
    next_port: u16,
    hold: bool,
    held: Vec<(turn::server::RelayRequestId, EvenPort)>,
    nonces: HashMap<ClientAddr, String>,
    users: HashMap<ClientAddr, usize>,
    tokens: Vec<Vec<u8>>,
    relays: Vec<SocketAddr>,
}

impl TurnWorld {
    fn new() -> Self {
        let config = TurnConfig {
            realm: REALM.into(),
            max_allocations: MAX_ALLOCATIONS,
            max_allocations_per_user: MAX_PER_USER,
            max_permissions: 4,
            max_channels: 4,
            bandwidth_bytes_per_second: 10_000,
            challenges_per_second: 50,
            replies_per_source: 5,
            fast_path: true,
            ..TurnConfig::default()
        };
        let policy = PeerPolicy::new(Vec::new(), Vec::new(), vec![IpAddr::from([192, 0, 2, 10])]);
        Self {
            server: TurnServer::new(config, secret(), [3; 32], 600, policy),
            now: Instant::now(),
            tid: 0,
            open: HashSet::new(),
            next_port: 0,
            hold: false,
            held: Vec::new(),
            nonces: HashMap::new(),
            users: HashMap::new(),
            tokens: Vec::new(),
            relays: Vec::new(),
        }
    }

    fn unix(&self, start: Instant) -> u64 {
        NOW_UNIX + self.now.saturating_duration_since(start).as_secs()
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut tid = [0x5A; 12];
        tid[..4].copy_from_slice(&self.tid.to_be_bytes());
        tid
    }

    fn open_socket(&mut self, even: bool) -> SocketAddr {
        loop {
            self.next_port = self.next_port.wrapping_add(1);
            let port = 50_000 + (self.next_port % 10_000);
            let addr = SocketAddr::from(([192, 0, 2, 10], port));
            if (!even || port % 2 == 0) && !self.open.contains(&addr) {
                self.open.insert(addr);
                return addr;
            }
        }
    }

    fn report(&mut self, request: turn::server::RelayRequestId, parity: EvenPort) {
        let result: Result<(SocketAddr, Option<SocketAddr>), OpenError> = match parity {
            EvenPort::Any => Ok((self.open_socket(false), None)),
            EvenPort::Even => Ok((self.open_socket(true), None)),
            EvenPort::EvenReserveNext => {
                let even = self.open_socket(true);
                let odd = SocketAddr::new(even.ip(), even.port() + 1);
                if self.open.insert(odd) {
                    Ok((even, Some(odd)))
                } else {
                    self.open.remove(&even);
                    Err(OpenError::NoPort)
                }
            }
        };
        let _ = self.server.handle_relay_opened(self.now, request, result);
    }

    /// Carries out the core's events and reads its replies (nonces, tokens, relays).
    fn service(&mut self) {
        while let Some(event) = self.server.poll_event() {
            match event {
                TurnServerEvent::OpenRelay { request, even_port, .. } => {
                    if self.hold {
                        self.held.push((request, even_port));
                    } else {
                        self.report(request, even_port);
                    }
                }
                TurnServerEvent::CloseRelay(relay) => {
                    assert!(self.open.remove(&relay), "closed {relay}, which was not open");
                }
                TurnServerEvent::FastPath(_) | TurnServerEvent::AllocationCreated { .. } => {}
            }
        }
        while let Some(transmit) = self.server.poll_transmit() {
            assert!(transmit.payload.len() <= 600, "a {} byte reply", transmit.payload.len());
            let Ok(reply) = Message::parse(&transmit.payload) else { continue };
            let to = ClientAddr { addr: transmit.to, transport: transmit.transport };
            for attribute in reply.attributes().flatten() {
                match attribute.ty {
                    stun_attr::NONCE => {
                        if let Ok(nonce) = std::str::from_utf8(attribute.value) {
                            self.nonces.insert(to, nonce.to_owned());
                        }
                    }
                    turn_attr::RESERVATION_TOKEN => self.tokens.push(attribute.value.to_vec()),
                    turn_attr::XOR_RELAYED_ADDRESS => {
                        if let Some(relay) = stun::decode_xor_address(attribute.value, reply.transaction_id()) {
                            self.relays.push(relay);
                        }
                    }
                    _ => {}
                }
            }
        }
        assert!(self.server.allocation_count() <= MAX_ALLOCATIONS);
    }

    fn signed(&mut self, start: Instant, client: ClientAddr, method_number: u16, nonce: Option<String>, body: impl FnOnce(&mut MessageWriter<'_>, [u8; 12])) {
        let tid = self.next_tid();
        let user = USERS[self.users.get(&client).copied().unwrap_or(0) % USERS.len()];
        let (username, password) = credentials(user);
        let nonce = nonce.or_else(|| self.nonces.get(&client).cloned());
        let mut out = Vec::new();
        let mut writer = MessageWriter::new(&mut out, MessageType { method: method_number, class: Class::Request }, tid);
        body(&mut writer, tid);
        if let Some(nonce) = nonce {
            writer
                .attribute(stun_attr::USERNAME, username.as_bytes())
                .attribute(stun_attr::REALM, REALM.as_bytes())
                .attribute(stun_attr::NONCE, nonce.as_bytes());
            writer.message_integrity(&turn::long_term_key(&username, REALM, &password));
        }
        writer.finish_with_fingerprint();
        self.datagram(start, client, &out);
    }

    fn datagram(&mut self, start: Instant, client: ClientAddr, bytes: &[u8]) {
        let unix = self.unix(start);
        if turn::is_channel_data(bytes) {
            if let Ok(data) = turn::ChannelData::parse(bytes) {
                let _ = self.server.channel_data_from_client(self.now, client.addr, data.channel, data.data.len());
            }
        } else if let Ok(message) = Message::parse(bytes) {
            let _ = self.server.handle_stun(self.now, unix, client, None, &message);
        }
        self.service();
    }

    fn run(&mut self, ops: &[TurnOp]) {
        let start = self.now;
        for op in ops {
            match op {
                TurnOp::Allocate { client, user, parity, lifetime, token, v6 } => {
                    let c = client_addr(*client);
                    self.users.insert(c, usize::from(*user));
                    let token = token.and_then(|t| self.tokens.get(usize::from(t) % self.tokens.len().max(1)).cloned());
                    let (parity, lifetime, v6) = (*parity, *lifetime, *v6);
                    self.signed(start, c, method::ALLOCATE, None, |w, _| {
                        w.attribute(turn_attr::REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0]);
                        match parity % 3 {
                            1 => { w.attribute(turn_attr::EVEN_PORT, &[0]); }
                            2 => { w.attribute(turn_attr::EVEN_PORT, &[0x80]); }
                            _ => {}
                        }
                        if let Some(token) = &token {
                            w.attribute(turn_attr::RESERVATION_TOKEN, token);
                        }
                        if let Some(lifetime) = lifetime {
                            w.attribute(turn_attr::LIFETIME, &u32::from(lifetime).to_be_bytes());
                        }
                        if v6 {
                            w.attribute(turn_attr::REQUESTED_ADDRESS_FAMILY, &[turn::family::IPV6, 0, 0, 0]);
                        }
                    });
                }
                TurnOp::Refresh { client, lifetime } => {
                    let lifetime = *lifetime;
                    self.signed(start, client_addr(*client), method::REFRESH, None, |w, _| {
                        if let Some(lifetime) = lifetime {
                            w.attribute(turn_attr::LIFETIME, &u32::from(lifetime).to_be_bytes());
                        }
                    });
                }
                TurnOp::Permission { client, peer } => {
                    let peer = peer_addr(*peer);
                    self.signed(start, client_addr(*client), method::CREATE_PERMISSION, None, |w, tid| {
                        turn::xor_address_attribute(w, turn_attr::XOR_PEER_ADDRESS, peer, tid);
                    });
                }
                TurnOp::Bind { client, channel, peer } => {
                    let (peer, channel) = (peer_addr(*peer), 0x4000 | (channel & 0x0FFF));
                    self.signed(start, client_addr(*client), method::CHANNEL_BIND, None, |w, tid| {
                        w.attribute(turn_attr::CHANNEL_NUMBER, &[(channel >> 8) as u8, channel as u8, 0, 0]);
                        turn::xor_address_attribute(w, turn_attr::XOR_PEER_ADDRESS, peer, tid);
                    });
                }
                TurnOp::Send { client, peer, len } => {
                    let c = client_addr(*client);
                    let mut out = Vec::new();
                    let data = vec![0xAB; usize::from(*len % 1200)];
                    turn::data_indication(self.next_tid(), peer_addr(*peer), &data, &mut out);
                    // A Send indication is a Data indication's shape with the Send method.
                    out[1] = 0x16;
                    self.datagram(start, c, &out);
                }
                TurnOp::ChannelData { client, channel, len } => {
                    let mut out = Vec::new();
                    turn::encode_channel_data(0x4000 | (channel & 0x0FFF), &vec![1; usize::from(*len % 1200)], &mut out);
                    self.datagram(start, client_addr(*client), &out);
                }
                TurnOp::FromPeer { relay, peer, len } => {
                    if let Some(relay) = self.relays.get(usize::from(*relay) % self.relays.len().max(1)).copied() {
                        let _ = self.server.data_from_peer(self.now, relay, peer_addr(*peer), usize::from(*len));
                    }
                }
                TurnOp::StaleNonce { client } => {
                    self.signed(start, client_addr(*client), method::REFRESH, Some("obsolete-nonce-0000".into()), |_, _| {});
                }
                TurnOp::Advance { ms } => {
                    self.now += Duration::from_millis(u64::from(*ms) * 10);
                    self.server.handle_timeout(self.now);
                    self.service();
                }
                TurnOp::Close { client } => {
                    self.server.remove_client(client_addr(*client));
                    self.service();
                }
                TurnOp::HoldOpens(hold) => {
                    self.hold = *hold;
                    if !hold {
                        for (request, parity) in std::mem::take(&mut self.held) {
                            self.report(request, parity);
                        }
                        self.service();
                    }
                }
                TurnOp::Raw { client, bytes } => self.datagram(start, client_addr(*client), bytes),
            }
        }
        // Late reports of held opens, then every lifetime passes: nothing may be left.
        for (request, parity) in std::mem::take(&mut self.held) {
            self.report(request, parity);
        }
        self.service();
        for _ in 0..3 {
            self.now += Duration::from_secs(4_000);
            self.server.handle_timeout(self.now);
            self.service();
        }
        assert_eq!(self.server.allocation_count(), 0, "allocations outlive their lifetime");
        assert!(self.open.is_empty(), "relay sockets left open: {:?}", self.open);
    }
}

/// The rendezvous core and up to four peers.
struct RendezvousWorld {
    server: RendezvousServer,
    now: Instant,
    tid: u32,
    nonces: HashMap<u8, String>,
    homes: [SocketAddr; 4],
    intros: Vec<u64>,
}

const PEERS: [&str; 4] = ["alice", "bob", "red/carol", "red/dave"];

impl RendezvousWorld {
    fn new() -> Self {
        let mut server = RendezvousServer::new(secret(), RendezvousConfig { replies_per_source: 5, ..RendezvousConfig::default() }, 11);
        server.set_relay_endpoints(Some(RelayEndpoints { addresses: vec![IpAddr::from([192, 0, 2, 10])], ports: 49152..=65535 }));
        Self {
            server,
            now: Instant::now(),
            tid: 0,
            nonces: HashMap::new(),
            homes: std::array::from_fn(|i| SocketAddr::from(([203, 0, 113, 1 + i as u8], 5000))),
            intros: Vec::new(),
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut tid = [0xA5; 12];
        tid[..4].copy_from_slice(&self.tid.to_be_bytes());
        tid
    }

    fn creds(peer: u8) -> PeerCredentials {
        let (username, password) = credentials(PEERS[usize::from(peer % 4)]);
        PeerCredentials { username, password }
    }

    fn send(&mut self, start: Instant, peer: u8, datagram: &[u8]) {
        let peer = peer % 4;
        let unix = NOW_UNIX + self.now.saturating_duration_since(start).as_secs();
        let _ = self.server.handle_datagram(self.now, unix, self.homes[usize::from(peer)], None, datagram);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(transmit) = self.server.poll_transmit() {
            assert!(transmit.payload.len() <= 1_200, "a {} byte datagram", transmit.payload.len());
            let Some(peer) = self.homes.iter().position(|h| *h == transmit.to) else { continue };
            let creds = Self::creds(peer as u8);
            if let Some(response) = client::parse_response(&transmit.payload, &creds.password) {
                if let Some(nonce) = response.nonce {
                    self.nonces.insert(peer as u8, nonce);
                }
            } else if let Some(intro) = client::parse_introduction(&transmit.payload, &creds.password) {
                self.intros.push(intro.intro_id);
            }
        }
        while self.server.poll_event().is_some() {}
        assert!(self.server.peer_count() <= PEERS.len());
    }

    fn intro(&self, index: u8) -> u64 {
        self.intros.get(usize::from(index) % self.intros.len().max(1)).copied().unwrap_or(7)
    }

    fn run(&mut self, ops: &[RendezvousOp]) {
        let start = self.now;
        for op in ops {
            match op {
                RendezvousOp::Register { peer, hosts, nat, rtt } => {
                    let tid = self.next_tid();
                    let hosts: Vec<SocketAddr> = (0..hosts % 4).map(|i| SocketAddr::from(([10, 0, 0, 1 + i], 6000))).collect();
                    let nat = match nat % 4 { 0 => NatClass::None, 1 => NatClass::EndpointIndependent, 2 => NatClass::AddressAndPortDependent, _ => NatClass::Unknown };
                    let nonce = self.nonces.get(&(peer % 4)).cloned();
                    let datagram = client::register(tid, &Self::creds(*peer), nonce.as_deref(), &hosts, nat, u32::from(*rtt));
                    self.send(start, *peer, &datagram);
                }
                RendezvousOp::Connect { peer, target } => {
                    let tid = self.next_tid();
                    let nonce = self.nonces.get(&(peer % 4)).cloned();
                    let datagram = client::connect(tid, &Self::creds(*peer), nonce.as_deref(), PEERS[usize::from(target % 4)]);
                    self.send(start, *peer, &datagram);
                }
                RendezvousOp::Outcome { peer, intro, ok } => {
                    let tid = self.next_tid();
                    let nonce = self.nonces.get(&(peer % 4)).cloned();
                    let outcome = if *ok { SessionOutcome::Direct } else { SessionOutcome::Failed };
                    let datagram = client::outcome(tid, &Self::creds(*peer), nonce.as_deref(), self.intro(*intro), outcome, 20, 3);
                    self.send(start, *peer, &datagram);
                }
                RendezvousOp::RelayOffer { peer, intro, port, foreign } => {
                    let tid = self.next_tid();
                    let nonce = self.nonces.get(&(peer % 4)).cloned();
                    let ip = if *foreign { [198, 18, 0, 1] } else { [192, 0, 2, 10] };
                    let relayed = SocketAddr::from((ip, *port));
                    let datagram = client::relay_offer(tid, &Self::creds(*peer), nonce.as_deref(), self.intro(*intro), relayed);
                    self.send(start, *peer, &datagram);
                }
                RendezvousOp::TcpSeq { peer, intro, isn } => {
                    let tid = self.next_tid();
                    let nonce = self.nonces.get(&(peer % 4)).cloned();
                    let datagram = client::tcp_seq(tid, &Self::creds(*peer), nonce.as_deref(), self.intro(*intro), *isn, None, false);
                    self.send(start, *peer, &datagram);
                }
                RendezvousOp::Move { peer } => {
                    let home = &mut self.homes[usize::from(peer % 4)];
                    home.set_port(home.port().wrapping_add(1).max(1));
                }
                RendezvousOp::Advance { ms } => {
                    self.now += Duration::from_millis(u64::from(*ms) * 10);
                    let unix = NOW_UNIX + self.now.saturating_duration_since(start).as_secs();
                    self.server.handle_timeout(self.now, unix);
                    self.drain();
                }
                RendezvousOp::Raw { peer, bytes } => self.send(start, *peer, bytes),
            }
        }
        for _ in 0..3 {
            self.now += Duration::from_secs(700);
            let unix = NOW_UNIX + self.now.saturating_duration_since(start).as_secs();
            self.server.handle_timeout(self.now, unix);
            self.drain();
        }
        assert_eq!(self.server.peer_count(), 0, "registrations outlive their lifetime");
    }
}

fuzz_target!(|input: Input| {
    TurnWorld::new().run(&input.turn);
    RendezvousWorld::new().run(&input.rendezvous);
});
