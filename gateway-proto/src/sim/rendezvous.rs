//! Test-only: a rendezvous server in virtual time with the helpers its tests share
//! (credentials, addresses) and a driver that sorts what the server sends the way
//! the gateway's service loop does: service socket, discovery sockets, SYN-ACKs to
//! forge, events for metrics.
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use crate::credentials::SharedSecret;
use crate::rendezvous::{
    ForgedSynAck, RelayEndpoints, RendezvousConfig, RendezvousEvent, RendezvousHandled,
    RendezvousServer, Transmit, client::PeerCredentials, client::parse_response, client::register,
    discovery_index, wire::NatClass,
};

/// The wall clock every test runs at.
pub(crate) const NOW_UNIX: u64 = 1_800_000_000;

/// The operator's secret.
pub(crate) fn secret() -> SharedSecret {
    SharedSecret::new(b"operator secret")
}

/// Valid credentials for `peer`.
pub(crate) fn creds(peer: &str) -> PeerCredentials {
    let issued = secret().issue(peer, NOW_UNIX + 3600).expect("issue");
    PeerCredentials {
        username: issued.username,
        password: issued.password,
    }
}

/// A literal address.
pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// A CHANGE-REQUEST answer to send from discovery socket `endpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Redirected {
    /// Index of the discovery socket (as given to `set_alternates`).
    pub endpoint: usize,
    /// The datagram.
    pub transmit: Transmit,
}

/// The server and the driver's side of it.
pub(crate) struct World {
    /// The server under test.
    pub server: RendezvousServer,
    /// Virtual time.
    pub now: Instant,
    /// Answers for discovery sockets, not yet looked at.
    redirected: Vec<Redirected>,
    /// Events other than SYN-ACKs to forge, not yet looked at.
    events: Vec<RendezvousEvent>,
    /// SYN-ACKs to forge, not yet looked at.
    forged: Vec<ForgedSynAck>,
}

impl World {
    /// A server with the default configuration.
    pub fn new() -> Self {
        Self::seeded(7)
    }

    /// A server with the default configuration whose generator starts from `seed`
    /// (several servers need different ones, or their introduction ids collide).
    pub fn seeded(seed: u64) -> Self {
        Self::configured(seed, RendezvousConfig::default())
    }

    /// A server with `config` whose generator starts from `seed`.
    pub fn configured(seed: u64, config: RendezvousConfig) -> Self {
        let mut server = RendezvousServer::new(secret(), config, seed);
        server.set_relay_endpoints(Some(RelayEndpoints {
            addresses: vec![IpAddr::from([203, 0, 113, 50])],
            ports: 1..=65535,
        }));
        Self {
            server,
            now: Instant::now(),
            redirected: Vec::new(),
            events: Vec::new(),
            forged: Vec::new(),
        }
    }

    /// The nonce the server gives `from` (what an agent learns on first contact).
    pub fn nonce(&self, from: SocketAddr) -> String {
        self.server.issue_nonce(from, NOW_UNIX)
    }

    /// Hands `datagram` from `from` to the server as received on 192.0.2.10; returns
    /// what became of it and what leaves from the service socket.
    pub fn send(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
    ) -> (RendezvousHandled, Vec<Transmit>) {
        let local = Some(IpAddr::from([192, 0, 2, 10]));
        self.deliver(NOW_UNIX, from, local, datagram)
    }

    /// [`Self::send`] at wall-clock time `now_unix`, received on `local`.
    pub fn deliver(
        &mut self,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
    ) -> (RendezvousHandled, Vec<Transmit>) {
        let handled = self
            .server
            .handle_datagram(self.now, now_unix, from, local, datagram);
        (handled, self.collect())
    }

    /// Takes what the server queued (after any input): returns what leaves from the
    /// service socket and keeps the rest (discovery answers, SYN-ACKs to forge,
    /// events) for the `drain_*` methods.
    pub fn collect(&mut self) -> Vec<Transmit> {
        let mut out = Vec::new();
        while let Some(transmit) = self.server.poll_transmit() {
            match discovery_index(transmit.socket) {
                Some(endpoint) => self.redirected.push(Redirected { endpoint, transmit }),
                None => out.push(transmit),
            }
        }
        while let Some(event) = self.server.poll_event() {
            match event {
                RendezvousEvent::ForgeSynAck(synack) => self.forged.push(synack),
                event => self.events.push(event),
            }
        }
        out
    }

    /// The answers for discovery sockets since the last call.
    pub fn drain_redirected(&mut self) -> std::vec::Drain<'_, Redirected> {
        self.redirected.drain(..)
    }

    /// The events (but SYN-ACKs to forge) since the last call.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, RendezvousEvent> {
        self.events.drain(..)
    }

    /// The SYN-ACKs to forge since the last call.
    pub fn drain_forged(&mut self) -> std::vec::Drain<'_, ForgedSynAck> {
        self.forged.drain(..)
    }

    /// Registers `peer` from `from` (with a valid nonce) and checks the answer.
    pub fn register(
        &mut self,
        peer: &str,
        from: SocketAddr,
        hosts: &[SocketAddr],
        nat: NatClass,
        rtt: u32,
    ) {
        let c = creds(peer);
        let (handled, out) = self.send(
            from,
            &register([1; 12], &c, Some(&self.nonce(from)), hosts, nat, rtt),
        );
        assert_eq!(handled, RendezvousHandled::Registered);
        let response = parse_response(&out[0].payload, &c.password).expect("signed response");
        assert_eq!(response.result, Ok(()));
        assert_eq!(response.mapped, Some(from));
    }
}
