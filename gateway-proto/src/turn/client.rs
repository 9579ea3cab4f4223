//! A sans-IO TURN client (RFC 8656 over UDP): one allocation on one server, its
//! permissions and channels, and the framing of application data to and from peers.
//!
//! It exists for the peer agent's relay fallback and for the relay load generator,
//! which must both speak standard TURN so they work against any server (coturn
//! included). Like the rest of `proto`, it opens no socket and reads no clock: the
//! driver passes `now` and the datagrams from the server in, and polls control
//! datagrams to send ([`Client::poll_transmit`]), the next timer
//! ([`Client::poll_timeout`]) and events ([`Client::poll_event`]). Application data is
//! encoded straight into a caller buffer ([`Client::encode_send`]) and decoded without
//! a copy ([`Client::handle_datagram`] returns a slice of the datagram).
//!
//! Authentication is the long-term credential mechanism (RFC 8489 §9.2): the first
//! Allocate goes out without credentials, the 401 answer carries REALM and NONCE, and
//! every later request carries USERNAME, REALM, NONCE and MESSAGE-INTEGRITY keyed with
//! MD5(username:realm:password). A 438 (Stale Nonce) is retried with the new nonce.
//! Requests are retransmitted over UDP as RFC 8489 §6.2.1 says (RTO 500 ms doubling,
//! 7 transmissions, then 16 RTO of waiting). Authenticated responses must carry a
//! valid MESSAGE-INTEGRITY; ones that do not are dropped as if never received.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    AddressFamily, CHANNEL_DATA_HEADER, CHANNEL_MAX, CHANNEL_MIN, ChannelData, TRANSPORT_UDP, attr,
    family, is_channel_data, long_term_key, method, xor_address_attribute,
};
use crate::{
    stun::{Class, Message, MessageType, MessageWriter, attr as stun_attr, decode_xor_address},
    transmit::Transmit,
};

/// How long a permission lasts on the server (RFC 8656 §9); fixed by the RFC.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a channel binding lasts on the server (RFC 8656 §12); fixed by the RFC.
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// When an installed permission is refreshed: a minute before it would lapse.
pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// When a bound channel is refreshed: a minute before it would lapse.
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(540);
/// The allocation lifetime assumed when a success response carries no LIFETIME
/// (the RFC's default).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Most data one Send indication or ChannelData message may carry: what fits a UDP
/// datagram with the TURN framing around it.
pub const MAX_DATA_LEN: usize = 65_535 - 8 - 40 - 36;

/// How many times one request may be resent with new credentials after 401 or 438.
const MAX_AUTH_RETRIES: u8 = 3;
/// Longest reason phrase kept from an ERROR-CODE (bytes).
const MAX_REASON_LEN: usize = 128;
/// Shortest refresh interval, so a server granting tiny lifetimes cannot make the
/// client spin.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// What the client needs to know and may tune.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The TURN server's UDP address; datagrams from anywhere else are ignored.
    pub server: SocketAddr,
    /// Long-term username (in the REST convention, `expiry:peer-id`).
    pub username: String,
    /// Long-term password.
    pub password: String,
    /// Family of the relayed address to ask for.
    pub family: AddressFamily,
    /// LIFETIME to ask for in Allocate and Refresh; `None` leaves it to the server.
    pub lifetime: Option<Duration>,
    /// Initial retransmission timeout (RFC 8489: 500 ms).
    pub rto: Duration,
    /// Transmissions of one request before giving up (RFC 8489's Rc: 7).
    pub max_transmissions: u32,
    /// After the last transmission, wait this many initial RTOs for an answer
    /// (RFC 8489's Rm: 16).
    pub last_wait_factor: u32,
}

impl ClientConfig {
    /// RFC defaults for everything but the server and the credentials.
    pub fn new(
        server: SocketAddr,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            server,
            username: username.into(),
            password: password.into(),
            family: AddressFamily::V4,
            lifetime: None,
            rto: Duration::from_millis(500),
            max_transmissions: 7,
            last_wait_factor: 16,
        }
    }
}

/// Where the allocation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocationState {
    /// Nothing asked yet ([`Client::allocate`] starts).
    Idle,
    /// Allocate sent, no success yet.
    Allocating,
    /// The relayed address is ours; data can flow.
    Allocated,
    /// Refresh with LIFETIME 0 sent.
    Closing,
    /// Deallocated (or given up while allocating); nothing more happens.
    Closed,
    /// The allocation could not be made or was lost; nothing more happens.
    Failed,
}

/// Which request an event or a failure is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Allocate.
    Allocate,
    /// Refresh keeping the allocation.
    Refresh,
    /// Refresh with LIFETIME 0.
    Deallocate,
    /// CreatePermission for one peer address.
    CreatePermission {
        /// The peer's IP (ports do not matter to permissions).
        peer: IpAddr,
    },
    /// ChannelBind of one channel to one peer.
    ChannelBind {
        /// The peer.
        peer: SocketAddr,
        /// The channel number.
        channel: u16,
    },
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The server answered with an error response.
    #[error("error response {code} {reason}")]
    Error {
        /// The STUN/TURN error code (300..=699).
        code: u16,
        /// The reason phrase as sent (lossy UTF-8, truncated).
        reason: String,
    },
    /// No valid answer after every retransmission.
    #[error("no answer after every retransmission")]
    Timeout,
    /// A success response lacked something the client needs.
    #[error("malformed success response: {0}")]
    BadResponse(&'static str),
}

impl Failure {
    /// The error code of an error response; `None` for timeouts and bad responses.
    pub fn code(&self) -> Option<u16> {
        match self {
            Failure::Error { code, .. } => Some(*code),
            Failure::Timeout | Failure::BadResponse(_) => None,
        }
    }
}

/// What happened, for the driver (and its user) to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnClientEvent {
    /// The allocation exists.
    Allocated {
        /// The relayed transport address peers send to.
        relayed: SocketAddr,
        /// Our address as the server sees it (XOR-MAPPED-ADDRESS), when sent.
        mapped: Option<SocketAddr>,
        /// The lifetime granted.
        lifetime: Duration,
    },
    /// A Refresh succeeded.
    Refreshed {
        /// The lifetime granted.
        lifetime: Duration,
    },
    /// A permission for `peer` is installed (by CreatePermission or a ChannelBind).
    PermissionCreated {
        /// The peer's IP.
        peer: IpAddr,
    },
    /// A channel is bound: data to and from `peer` now uses ChannelData.
    ChannelBound {
        /// The peer.
        peer: SocketAddr,
        /// The channel number.
        channel: u16,
    },
    /// A request failed. Allocate, Refresh and Deallocate failures end the
    /// allocation ([`AllocationState::Failed`] or [`AllocationState::Closed`]); a
    /// failed permission or channel is forgotten.
    Failed {
        /// The request.
        request: Request,
        /// Why.
        failure: Failure,
    },
    /// The allocation was released (Refresh with LIFETIME 0 succeeded).
    Deallocated,
}

/// Application data that came from a peer through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerData<'a> {
    /// The peer that sent it (its address as the relay saw it).
    pub peer: SocketAddr,
    /// The payload, borrowed from the datagram.
    pub data: &'a [u8],
    /// The channel it came on; `None` for a Data indication.
    pub channel: Option<u16>,
}

/// How [`Client::encode_send`] framed the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// ChannelData on this channel (4 bytes of overhead).
    ChannelData(u16),
    /// A Send indication (36 or 48 bytes of overhead).
    SendIndication,
}

/// Why the client refused a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The call needs an allocation and there is none (yet, or any more).
    #[error("no allocation (state {0:?})")]
    NotAllocated(AllocationState),
    /// [`Client::allocate`] was called a second time.
    #[error("allocate was already called (state {0:?})")]
    AlreadyStarted(AllocationState),
    /// The peer's address family differs from the relayed address's.
    #[error("peer {0} is not in the relayed address's family")]
    FamilyMismatch(IpAddr),
    /// Data for a peer without a permission (create one first).
    #[error("no permission for peer {0}")]
    NoPermission(IpAddr),
    /// All 4096 channel numbers are in use.
    #[error("every channel number is in use")]
    ChannelsExhausted,
    /// The data does not fit one datagram.
    #[error("{0} bytes of data do not fit a UDP datagram")]
    DataTooLarge(usize),
}

#[derive(Debug)]
struct Auth {
    realm: String,
    nonce: Vec<u8>,
    key: [u8; 16],
}

#[derive(Debug)]
struct Transaction {
    request: Request,
    bytes: Vec<u8>,
    authenticated: bool,
    transmissions: u32,
    next_at: Instant,
    rto: Duration,
    auth_retries: u8,
}

#[derive(Debug)]
struct Permission {
    installed: bool,
    /// When to send the next CreatePermission; `None` while one is in flight or
    /// while a ChannelBind is installing it.
    refresh_at: Option<Instant>,
}

#[derive(Debug)]
struct Channel {
    peer: SocketAddr,
    bound: bool,
    refresh_at: Option<Instant>,
}

/// One TURN allocation's client side. See the module documentation.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    rng: StdRng,
    state: AllocationState,
    auth: Option<Auth>,
    relayed: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    lifetime: Duration,
    refresh_at: Option<Instant>,
    transactions: HashMap<[u8; 12], Transaction>,
    permissions: HashMap<IpAddr, Permission>,
    channels: HashMap<u16, Channel>,
    channel_by_peer: HashMap<SocketAddr, u16>,
    next_channel: u16,
    outgoing: VecDeque<Transmit>,
    events: VecDeque<TurnClientEvent>,
}

impl Client {
    /// A client in [`AllocationState::Idle`]; `seed` drives transaction ids.
    pub fn new(config: ClientConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            state: AllocationState::Idle,
            auth: None,
            relayed: None,
            mapped: None,
            lifetime: DEFAULT_LIFETIME,
            refresh_at: None,
            transactions: HashMap::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            channel_by_peer: HashMap::new(),
            next_channel: CHANNEL_MIN,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The server this client talks to.
    pub fn server(&self) -> SocketAddr {
        self.config.server
    }

    /// Where the allocation stands.
    pub fn state(&self) -> AllocationState {
        self.state
    }

    /// The relayed transport address, once allocated.
    pub fn relayed_address(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// Our address as the server saw it, once allocated.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// The realm the server announced in its challenge, once known.
    pub fn realm(&self) -> Option<&str> {
        self.auth.as_ref().map(|auth| auth.realm.as_str())
    }

    /// The lifetime last granted.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Whether a permission for `peer` is installed (not merely requested).
    pub fn has_permission(&self, peer: IpAddr) -> bool {
        self.permissions.get(&peer).is_some_and(|p| p.installed)
    }

    /// The channel bound to `peer`, once the server confirmed it; a driver can put
    /// [`super::channel_data_header`] in front of data already in its buffer instead
    /// of calling [`Self::encode_send`].
    pub fn channel(&self, peer: SocketAddr) -> Option<u16> {
        let number = *self.channel_by_peer.get(&peer)?;
        self.channels
            .get(&number)
            .is_some_and(|c| c.bound)
            .then_some(number)
    }

    /// Starts the allocation: an Allocate without credentials, to learn the realm
    /// and a nonce.
    pub fn allocate(&mut self, now: Instant) -> Result<(), ClientError> {
        if self.state != AllocationState::Idle {
            return Err(ClientError::AlreadyStarted(self.state));
        }
        self.state = AllocationState::Allocating;
        self.start(now, Request::Allocate);
        Ok(())
    }

    /// Asks for a permission for `peer`'s IP and keeps it refreshed until the client
    /// closes. Calling it again for the same IP changes nothing.
    pub fn create_permission(&mut self, now: Instant, peer: IpAddr) -> Result<(), ClientError> {
        self.check_peer(peer)?;
        if self.permissions.contains_key(&peer) {
            return Ok(());
        }
        self.permissions.insert(
            peer,
            Permission {
                installed: false,
                refresh_at: None,
            },
        );
        self.start(now, Request::CreatePermission { peer });
        Ok(())
    }

    /// Binds a channel to `peer` (which also installs a permission for its IP, kept
    /// refreshed from then on) and returns its number. Until
    /// [`TurnClientEvent::ChannelBound`], data to the peer goes in Send indications. Calling it
    /// again for the same peer returns the same channel.
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> Result<u16, ClientError> {
        self.check_peer(peer.ip())?;
        if let Some(&number) = self.channel_by_peer.get(&peer) {
            return Ok(number);
        }
        if self.next_channel > CHANNEL_MAX {
            return Err(ClientError::ChannelsExhausted);
        }
        let channel = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(
            channel,
            Channel {
                peer,
                bound: false,
                refresh_at: None,
            },
        );
        self.channel_by_peer.insert(peer, channel);
        self.permissions.entry(peer.ip()).or_insert(Permission {
            installed: false,
            refresh_at: None,
        });
        self.start(now, Request::ChannelBind { peer, channel });
        Ok(channel)
    }

    /// Writes the datagram that carries `data` to `peer` into `out` (cleared first):
    /// ChannelData when a channel to the peer is bound, else a Send indication. It
    /// goes to [`Self::server`]. The peer needs a permission (requested or installed).
    pub fn encode_send(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Framing, ClientError> {
        self.check_peer(peer.ip())?;
        if !self.permissions.contains_key(&peer.ip()) {
            return Err(ClientError::NoPermission(peer.ip()));
        }
        if data.len() > MAX_DATA_LEN {
            return Err(ClientError::DataTooLarge(data.len()));
        }
        out.clear();
        if let Some(channel) = self.channel(peer) {
            out.reserve(CHANNEL_DATA_HEADER + data.len());
            super::encode_channel_data(channel, data, out);
            return Ok(Framing::ChannelData(channel));
        }
        let tid = self.rng.random();
        let mut writer = MessageWriter::new(
            out,
            MessageType {
                method: method::SEND,
                class: Class::Indication,
            },
            tid,
        );
        xor_address_attribute(&mut writer, attr::XOR_PEER_ADDRESS, peer, tid);
        writer.attribute(attr::DATA, data);
        writer.finish();
        Ok(Framing::SendIndication)
    }

    /// Releases the allocation (Refresh with LIFETIME 0) and stops every refresh.
    /// Before an allocation exists this just stops.
    pub fn close(&mut self, now: Instant) {
        // Requests not yet sent are moot (an unsent authenticated Allocate would
        // otherwise create an allocation nobody releases).
        self.outgoing.clear();
        self.transactions.clear();
        self.permissions.clear();
        self.channels.clear();
        self.channel_by_peer.clear();
        self.refresh_at = None;
        match self.state {
            AllocationState::Allocated => {
                self.state = AllocationState::Closing;
                self.start(now, Request::Deallocate);
            }
            AllocationState::Idle | AllocationState::Allocating => {
                self.state = AllocationState::Closed;
            }
            AllocationState::Closing | AllocationState::Closed | AllocationState::Failed => {}
        }
    }

    /// The next control datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outgoing.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<TurnClientEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next run; `None` when nothing is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let transactions = self.transactions.values().map(|t| t.next_at);
        let permissions = self.permissions.values().filter_map(|p| p.refresh_at);
        let channels = self.channels.values().filter_map(|c| c.refresh_at);
        transactions
            .chain(permissions)
            .chain(channels)
            .chain(self.refresh_at)
            .min()
    }

    /// Runs timers: retransmissions, request timeouts, and the refreshes of the
    /// allocation, permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<[u8; 12]> = self
            .transactions
            .iter()
            .filter(|(_, t)| t.next_at <= now)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in due {
            let Some(transaction) = self.transactions.get_mut(&tid) else {
                continue;
            };
            if transaction.transmissions >= self.config.max_transmissions {
                let request = transaction.request;
                self.transactions.remove(&tid);
                self.fail(request, Failure::Timeout);
                continue;
            }
            transaction.transmissions += 1;
            transaction.rto = transaction.rto.saturating_mul(2);
            transaction.next_at = if transaction.transmissions >= self.config.max_transmissions {
                now + self.config.rto.saturating_mul(self.config.last_wait_factor)
            } else {
                now + transaction.rto
            };
            self.outgoing
                .push_back(Transmit::udp(self.config.server, transaction.bytes.clone()));
        }
        if self.state != AllocationState::Allocated {
            return;
        }
        if self.refresh_at.is_some_and(|at| at <= now) {
            self.refresh_at = None;
            self.start(now, Request::Refresh);
        }
        let permissions: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, p)| p.refresh_at.is_some_and(|at| at <= now))
            .map(|(ip, _)| *ip)
            .collect();
        for peer in permissions {
            if let Some(permission) = self.permissions.get_mut(&peer) {
                permission.refresh_at = None;
            }
            self.start(now, Request::CreatePermission { peer });
        }
        let channels: Vec<(u16, SocketAddr)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.refresh_at.is_some_and(|at| at <= now))
            .map(|(number, c)| (*number, c.peer))
            .collect();
        for (channel, peer) in channels {
            if let Some(entry) = self.channels.get_mut(&channel) {
                entry.refresh_at = None;
            }
            self.start(now, Request::ChannelBind { peer, channel });
        }
    }

    /// Handles one datagram that arrived from `from`. Returns the peer data it
    /// carried, if it was a Data indication or ChannelData; responses update the
    /// state and queue events. Anything not from the server, malformed, unexpected
    /// or unauthentic is ignored.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &'a [u8],
    ) -> Option<PeerData<'a>> {
        if from != self.config.server {
            return None;
        }
        if is_channel_data(datagram) {
            let channel_data = ChannelData::parse(datagram).ok()?;
            let peer = self.channels.get(&channel_data.channel)?.peer;
            return Some(PeerData {
                peer,
                data: channel_data.data,
                channel: Some(channel_data.channel),
            });
        }
        let message = Message::parse(datagram).ok()?;
        let ty = message.message_type();
        match ty.class {
            Class::Indication if ty.method == method::DATA => data_indication(&message),
            Class::Success | Class::Error => {
                self.handle_response(now, &message);
                None
            }
            Class::Indication | Class::Request => None,
        }
    }

    fn check_peer(&self, peer: IpAddr) -> Result<(), ClientError> {
        if self.state != AllocationState::Allocated {
            return Err(ClientError::NotAllocated(self.state));
        }
        match self.relayed {
            Some(relayed) if relayed.is_ipv4() == peer.is_ipv4() => Ok(()),
            _ => Err(ClientError::FamilyMismatch(peer)),
        }
    }

    /// Sends a new transaction for `request` (fresh transaction id and, when known,
    /// the current nonce).
    fn start(&mut self, now: Instant, request: Request) {
        self.start_with_retries(now, request, 0);
    }

    fn start_with_retries(&mut self, now: Instant, request: Request, auth_retries: u8) {
        let tid: [u8; 12] = self.rng.random();
        let bytes = self.build_request(request, tid);
        self.outgoing
            .push_back(Transmit::udp(self.config.server, bytes.clone()));
        self.transactions.insert(
            tid,
            Transaction {
                request,
                bytes,
                authenticated: self.auth.is_some(),
                transmissions: 1,
                next_at: now + self.config.rto,
                rto: self.config.rto,
                auth_retries,
            },
        );
    }

    fn build_request(&self, request: Request, tid: [u8; 12]) -> Vec<u8> {
        let method = match request {
            Request::Allocate => method::ALLOCATE,
            Request::Refresh | Request::Deallocate => method::REFRESH,
            Request::CreatePermission { .. } => method::CREATE_PERMISSION,
            Request::ChannelBind { .. } => method::CHANNEL_BIND,
        };
        let mut buf = Vec::with_capacity(160);
        let mut writer = MessageWriter::new(
            &mut buf,
            MessageType {
                method,
                class: Class::Request,
            },
            tid,
        );
        let lifetime_value = |lifetime: Duration| {
            u32::try_from(lifetime.as_secs())
                .unwrap_or(u32::MAX)
                .to_be_bytes()
        };
        match request {
            Request::Allocate => {
                writer.attribute(attr::REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0]);
                if self.config.family == AddressFamily::V6 {
                    writer.attribute(attr::REQUESTED_ADDRESS_FAMILY, &[family::IPV6, 0, 0, 0]);
                }
                if let Some(lifetime) = self.config.lifetime {
                    writer.attribute(attr::LIFETIME, &lifetime_value(lifetime));
                }
            }
            Request::Refresh => {
                if let Some(lifetime) = self.config.lifetime {
                    writer.attribute(attr::LIFETIME, &lifetime_value(lifetime));
                }
            }
            Request::Deallocate => {
                writer.attribute(attr::LIFETIME, &[0; 4]);
            }
            Request::CreatePermission { peer } => {
                xor_address_attribute(
                    &mut writer,
                    attr::XOR_PEER_ADDRESS,
                    SocketAddr::new(peer, 0),
                    tid,
                );
            }
            Request::ChannelBind { peer, channel } => {
                let number = channel.to_be_bytes();
                writer.attribute(attr::CHANNEL_NUMBER, &[number[0], number[1], 0, 0]);
                xor_address_attribute(&mut writer, attr::XOR_PEER_ADDRESS, peer, tid);
            }
        }
        if let Some(auth) = &self.auth {
            writer
                .attribute(stun_attr::USERNAME, self.config.username.as_bytes())
                .attribute(stun_attr::REALM, auth.realm.as_bytes())
                .attribute(stun_attr::NONCE, &auth.nonce)
                .message_integrity(&auth.key);
        }
        writer.finish_with_fingerprint();
        buf
    }

    fn handle_response(&mut self, now: Instant, message: &Message<'_>) {
        let tid = message.transaction_id();
        let Some(transaction) = self.transactions.get(&tid) else {
            return;
        };
        let request = transaction.request;
        let expected_method = match request {
            Request::Allocate => method::ALLOCATE,
            Request::Refresh | Request::Deallocate => method::REFRESH,
            Request::CreatePermission { .. } => method::CREATE_PERMISSION,
            Request::ChannelBind { .. } => method::CHANNEL_BIND,
        };
        if message.message_type().method != expected_method {
            return;
        }
        let authenticated = transaction.authenticated;
        let auth_retries = transaction.auth_retries;
        let error = match message.message_type().class {
            Class::Error => Some(error_code(message)),
            _ => None,
        };
        // 401 and 438 answer requests the server could not authenticate, so they
        // cannot carry a MESSAGE-INTEGRITY we could check. Everything else answering
        // an authenticated request must be signed with our key.
        let challenge = matches!(error, Some((401 | 438, _)));
        if authenticated && !challenge {
            let verified = self
                .auth
                .as_ref()
                .is_some_and(|auth| message.verify_integrity(&auth.key).is_ok());
            // Error responses may come unsigned (RFC 8489 §9.2.5 lets a client act on
            // them); a signature that is present must be right, though.
            let present_and_wrong =
                !verified && has_attribute(message, stun_attr::MESSAGE_INTEGRITY);
            if (error.is_none() && !verified) || present_and_wrong {
                return;
            }
        }
        self.transactions.remove(&tid);
        match error {
            None => self.on_success(now, request, message),
            Some((code @ (401 | 438), reason)) => {
                let retry_allowed = auth_retries < MAX_AUTH_RETRIES
                    // A 401 to a request that carried our credentials means they are
                    // wrong; only a fresh nonce (438) is worth another try then.
                    && (code == 438 || !authenticated);
                if retry_allowed && self.learn_challenge(message) {
                    self.start_with_retries(now, request, auth_retries + 1);
                } else {
                    self.fail(request, Failure::Error { code, reason });
                }
            }
            Some((code, reason)) => self.fail(request, Failure::Error { code, reason }),
        }
    }

    /// Takes REALM (kept when absent, as a 438 may omit it) and NONCE from a
    /// challenge; false when they are missing.
    fn learn_challenge(&mut self, message: &Message<'_>) -> bool {
        let mut realm = None;
        let mut nonce = None;
        for attribute in message.attributes().filter_map(Result::ok) {
            match attribute.ty {
                stun_attr::REALM => realm = Some(String::from_utf8_lossy(attribute.value)),
                stun_attr::NONCE => nonce = Some(attribute.value.to_vec()),
                _ => {}
            }
        }
        let Some(nonce) = nonce else {
            return false;
        };
        let realm = match (realm, &self.auth) {
            (Some(realm), _) => realm.into_owned(),
            (None, Some(auth)) => auth.realm.clone(),
            (None, None) => return false,
        };
        let key = long_term_key(&self.config.username, &realm, &self.config.password);
        self.auth = Some(Auth { realm, nonce, key });
        true
    }

    fn on_success(&mut self, now: Instant, request: Request, message: &Message<'_>) {
        match request {
            Request::Allocate => self.on_allocated(now, message),
            Request::Refresh => {
                let lifetime = lifetime_of(message).unwrap_or(DEFAULT_LIFETIME);
                self.lifetime = lifetime;
                if self.state == AllocationState::Allocated {
                    self.refresh_at = Some(now + refresh_interval(lifetime));
                }
                self.events
                    .push_back(TurnClientEvent::Refreshed { lifetime });
            }
            Request::Deallocate => {
                self.state = AllocationState::Closed;
                self.events.push_back(TurnClientEvent::Deallocated);
            }
            Request::CreatePermission { peer } => {
                let Some(permission) = self.permissions.get_mut(&peer) else {
                    return;
                };
                permission.refresh_at = Some(now + PERMISSION_REFRESH);
                if !permission.installed {
                    permission.installed = true;
                    self.events
                        .push_back(TurnClientEvent::PermissionCreated { peer });
                }
            }
            Request::ChannelBind { peer, channel } => {
                let Some(entry) = self.channels.get_mut(&channel) else {
                    return;
                };
                entry.refresh_at = Some(now + CHANNEL_REFRESH);
                let newly_bound = !entry.bound;
                entry.bound = true;
                // The binding installed or refreshed the peer's permission too; from
                // now on CreatePermission keeps it alive (it lasts half as long).
                if let Some(permission) = self.permissions.get_mut(&peer.ip()) {
                    let in_flight = self
                        .transactions
                        .values()
                        .any(|t| t.request == Request::CreatePermission { peer: peer.ip() });
                    if !in_flight {
                        permission.refresh_at = Some(now + PERMISSION_REFRESH);
                    }
                    if !permission.installed {
                        permission.installed = true;
                        self.events
                            .push_back(TurnClientEvent::PermissionCreated { peer: peer.ip() });
                    }
                }
                if newly_bound {
                    self.events
                        .push_back(TurnClientEvent::ChannelBound { peer, channel });
                }
            }
        }
    }

    fn on_allocated(&mut self, now: Instant, message: &Message<'_>) {
        if self.state != AllocationState::Allocating {
            return;
        }
        let tid = message.transaction_id();
        let mut relayed = Vec::with_capacity(2);
        let mut mapped = None;
        for attribute in message.attributes().filter_map(Result::ok) {
            match attribute.ty {
                attr::XOR_RELAYED_ADDRESS => {
                    relayed.extend(decode_xor_address(attribute.value, tid));
                }
                stun_attr::XOR_MAPPED_ADDRESS => {
                    mapped = mapped.or(decode_xor_address(attribute.value, tid));
                }
                _ => {}
            }
        }
        let wanted = self.config.family;
        let Some(relayed) = relayed
            .iter()
            .find(|a| wanted.matches(a.ip()))
            .or(relayed.first())
            .copied()
        else {
            self.fail(
                Request::Allocate,
                Failure::BadResponse("no XOR-RELAYED-ADDRESS"),
            );
            return;
        };
        let lifetime = lifetime_of(message).unwrap_or(DEFAULT_LIFETIME);
        self.state = AllocationState::Allocated;
        self.relayed = Some(relayed);
        self.mapped = mapped;
        self.lifetime = lifetime;
        self.refresh_at = Some(now + refresh_interval(lifetime));
        self.events.push_back(TurnClientEvent::Allocated {
            relayed,
            mapped,
            lifetime,
        });
    }

    fn fail(&mut self, request: Request, failure: Failure) {
        match request {
            Request::Allocate | Request::Refresh => {
                if matches!(
                    self.state,
                    AllocationState::Allocating | AllocationState::Allocated
                ) {
                    self.state = AllocationState::Failed;
                    self.refresh_at = None;
                    self.transactions.clear();
                    self.permissions.clear();
                    self.channels.clear();
                    self.channel_by_peer.clear();
                }
            }
            Request::Deallocate => self.state = AllocationState::Closed,
            Request::CreatePermission { peer } => {
                self.permissions.remove(&peer);
            }
            Request::ChannelBind { peer, channel } => {
                self.channels.remove(&channel);
                self.channel_by_peer.remove(&peer);
                // The placeholder permission bind_channel made goes too, unless it
                // is installed, requested on its own, or another channel needs it.
                let permission_requested = self
                    .transactions
                    .values()
                    .any(|t| t.request == Request::CreatePermission { peer: peer.ip() });
                let permission_kept = self
                    .permissions
                    .get(&peer.ip())
                    .is_some_and(|p| p.installed)
                    || permission_requested
                    || self.channel_by_peer.keys().any(|p| p.ip() == peer.ip());
                if !permission_kept {
                    self.permissions.remove(&peer.ip());
                }
            }
        }
        self.events
            .push_back(TurnClientEvent::Failed { request, failure });
    }
}

/// Refresh at half the lifetime (RFC 8656 leaves the margin to the client; half
/// survives a lost Refresh and its retransmissions).
fn refresh_interval(lifetime: Duration) -> Duration {
    (lifetime / 2).max(MIN_REFRESH_INTERVAL)
}

fn has_attribute(message: &Message<'_>, ty: u16) -> bool {
    message
        .attributes()
        .filter_map(Result::ok)
        .any(|a| a.ty == ty)
}

fn lifetime_of(message: &Message<'_>) -> Option<Duration> {
    message
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == attr::LIFETIME)
        .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
        .map(|v| Duration::from_secs(u64::from(u32::from_be_bytes(v))))
}

/// The code and reason of an error response; 0 and an empty reason when it has no
/// well-formed ERROR-CODE.
fn error_code(message: &Message<'_>) -> (u16, String) {
    let Some(value) = message
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == stun_attr::ERROR_CODE)
        .map(|a| a.value)
    else {
        return (0, String::new());
    };
    let (Some(&class), Some(&number)) = (value.get(2), value.get(3)) else {
        return (0, String::new());
    };
    let code = u16::from(class & 0x07) * 100 + u16::from(number);
    let reason = crate::stun::error_reason(value);
    let reason = &reason[..reason.len().min(MAX_REASON_LEN)];
    (code, String::from_utf8_lossy(reason).into_owned())
}

fn data_indication<'a>(message: &Message<'a>) -> Option<PeerData<'a>> {
    let tid = message.transaction_id();
    let mut peer = None;
    let mut data = None;
    for attribute in message.attributes().filter_map(Result::ok) {
        match attribute.ty {
            attr::XOR_PEER_ADDRESS => peer = peer.or(decode_xor_address(attribute.value, tid)),
            attr::DATA => data = data.or(Some(attribute.value)),
            _ => {}
        }
    }
    Some(PeerData {
        peer: peer?,
        data: data?,
        channel: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{self, DecodeError, encode_xor_address};
    use proptest::prelude::*;

    const USERNAME: &str = "1900000000:alice";
    const PASSWORD: &str = "pw";
    const REALM: &str = "example.org";

    fn server() -> SocketAddr {
        "192.0.2.10:3478".parse().expect("literal")
    }
    fn relayed() -> SocketAddr {
        "192.0.2.10:50000".parse().expect("literal")
    }
    fn mapped() -> SocketAddr {
        "198.51.100.7:40000".parse().expect("literal")
    }
    fn peer() -> SocketAddr {
        "203.0.113.5:7000".parse().expect("literal")
    }
    fn key() -> [u8; 16] {
        long_term_key(USERNAME, REALM, PASSWORD)
    }

    fn take(client: &mut Client) -> Vec<u8> {
        let transmit = client.poll_transmit().expect("a datagram to send");
        assert_eq!(transmit.to, server());
        transmit.payload
    }

    fn attribute<'a>(message: &Message<'a>, ty: u16) -> Option<&'a [u8]> {
        message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == ty)
            .map(|a| a.value)
    }

    /// A response of `class` to `request`, with attributes from `body`, signed with
    /// `key` when given.
    fn respond(
        request: &[u8],
        class: Class,
        key: Option<&[u8]>,
        body: impl FnOnce(&mut MessageWriter<'_>, [u8; 12]),
    ) -> Vec<u8> {
        let request = Message::parse(request).expect("request parses");
        let tid = request.transaction_id();
        let mut out = Vec::new();
        let mut writer = MessageWriter::new(
            &mut out,
            MessageType {
                method: request.message_type().method,
                class,
            },
            tid,
        );
        body(&mut writer, tid);
        if let Some(key) = key {
            writer.message_integrity(key);
        }
        writer.finish_with_fingerprint();
        out
    }

    fn challenge(request: &[u8], code: u16, nonce: &[u8]) -> Vec<u8> {
        respond(request, Class::Error, None, |w, _| {
            w.error_code(code, "challenge")
                .attribute(stun_attr::REALM, REALM.as_bytes())
                .attribute(stun_attr::NONCE, nonce);
        })
    }

    fn allocate_success(request: &[u8], lifetime: u32) -> Vec<u8> {
        respond(request, Class::Success, Some(&key()), |w, tid| {
            xor_address_attribute(w, attr::XOR_RELAYED_ADDRESS, relayed(), tid);
            xor_address_attribute(w, stun_attr::XOR_MAPPED_ADDRESS, mapped(), tid);
            w.attribute(attr::LIFETIME, &lifetime.to_be_bytes());
        })
    }

    /// Runs the 401 dance and returns an allocated client (events drained).
    fn allocated(now: Instant) -> Client {
        let mut client = Client::new(ClientConfig::new(server(), USERNAME, PASSWORD), 7);
        client.allocate(now).expect("idle");
        let first = take(&mut client);
        client.handle_datagram(now, server(), &challenge(&first, 401, b"nonce-1"));
        let second = take(&mut client);
        client.handle_datagram(now, server(), &allocate_success(&second, 600));
        assert_eq!(client.state(), AllocationState::Allocated);
        while client.poll_event().is_some() {}
        client
    }

    #[test]
    fn allocate_authenticates_after_401_and_reports_addresses() {
        let now = Instant::now();
        let mut client = Client::new(ClientConfig::new(server(), USERNAME, PASSWORD), 1);
        client.allocate(now).expect("idle");
        assert_eq!(client.state(), AllocationState::Allocating);
        let first = take(&mut client);
        let message = Message::parse(&first).expect("parses");
        assert_eq!(
            message.message_type(),
            MessageType {
                method: method::ALLOCATE,
                class: Class::Request
            }
        );
        assert_eq!(
            attribute(&message, attr::REQUESTED_TRANSPORT),
            Some(&[17, 0, 0, 0][..])
        );
        assert_eq!(attribute(&message, stun_attr::MESSAGE_INTEGRITY), None);
        assert_eq!(attribute(&message, attr::REQUESTED_ADDRESS_FAMILY), None);

        client.handle_datagram(now, server(), &challenge(&first, 401, b"nonce-1"));
        let second = take(&mut client);
        let message = Message::parse(&second).expect("parses");
        assert_ne!(
            message.transaction_id(),
            Message::parse(&first).expect("parses").transaction_id()
        );
        assert_eq!(
            attribute(&message, stun_attr::USERNAME),
            Some(USERNAME.as_bytes())
        );
        assert_eq!(
            attribute(&message, stun_attr::REALM),
            Some(REALM.as_bytes())
        );
        assert_eq!(attribute(&message, stun_attr::NONCE), Some(&b"nonce-1"[..]));
        assert_eq!(message.verify_integrity(&key()), Ok(()));
        assert!(client.poll_event().is_none());

        client.handle_datagram(now, server(), &allocate_success(&second, 1200));
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Allocated {
                relayed: relayed(),
                mapped: Some(mapped()),
                lifetime: Duration::from_secs(1200),
            })
        );
        assert_eq!(client.relayed_address(), Some(relayed()));
        assert_eq!(client.mapped_address(), Some(mapped()));
        // Nothing left to retransmit: the next timer is the refresh at half life.
        assert_eq!(client.poll_timeout(), Some(now + Duration::from_secs(600)));
        assert_eq!(
            client.allocate(now),
            Err(ClientError::AlreadyStarted(AllocationState::Allocated))
        );
    }

    #[test]
    fn stale_nonce_is_retried_with_the_new_nonce() {
        let now = Instant::now();
        let mut client = allocated(now);
        client
            .create_permission(now, peer().ip())
            .expect("allocated");
        let request = take(&mut client);
        assert_eq!(
            attribute(&Message::parse(&request).expect("parses"), stun_attr::NONCE),
            Some(&b"nonce-1"[..])
        );
        client.handle_datagram(now, server(), &challenge(&request, 438, b"nonce-2"));
        let retry = take(&mut client);
        let message = Message::parse(&retry).expect("parses");
        assert_eq!(attribute(&message, stun_attr::NONCE), Some(&b"nonce-2"[..]));
        assert_eq!(message.verify_integrity(&key()), Ok(()));
        client.handle_datagram(
            now,
            server(),
            &respond(&retry, Class::Success, Some(&key()), |_, _| {}),
        );
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::PermissionCreated { peer: peer().ip() })
        );
        assert!(client.has_permission(peer().ip()));
    }

    #[test]
    fn stale_nonce_retries_are_bounded() {
        let now = Instant::now();
        let mut client = allocated(now);
        client
            .create_permission(now, peer().ip())
            .expect("allocated");
        for round in 0..MAX_AUTH_RETRIES {
            let request = take(&mut client);
            let nonce = format!("n{round}");
            client.handle_datagram(now, server(), &challenge(&request, 438, nonce.as_bytes()));
        }
        let request = take(&mut client);
        client.handle_datagram(now, server(), &challenge(&request, 438, b"again"));
        assert!(client.poll_transmit().is_none());
        assert!(matches!(
            client.poll_event(),
            Some(TurnClientEvent::Failed {
                request: Request::CreatePermission { .. },
                failure: Failure::Error { code: 438, .. }
            })
        ));
        assert!(!client.has_permission(peer().ip()));
    }

    #[test]
    fn wrong_credentials_fail_after_one_authenticated_try() {
        let now = Instant::now();
        let mut client = Client::new(ClientConfig::new(server(), USERNAME, PASSWORD), 1);
        client.allocate(now).expect("idle");
        let first = take(&mut client);
        client.handle_datagram(now, server(), &challenge(&first, 401, b"n"));
        let second = take(&mut client);
        client.handle_datagram(now, server(), &challenge(&second, 401, b"n"));
        assert!(client.poll_transmit().is_none());
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Failed {
                request: Request::Allocate,
                failure: Failure::Error {
                    code: 401,
                    reason: "challenge".into()
                }
            })
        );
        assert_eq!(client.state(), AllocationState::Failed);
        assert_eq!(client.poll_timeout(), None);
    }

    #[test]
    fn retransmits_with_doubling_rto_then_times_out() {
        let start = Instant::now();
        let mut client = Client::new(ClientConfig::new(server(), USERNAME, PASSWORD), 1);
        client.allocate(start).expect("idle");
        let first = take(&mut client);
        // RFC 8489 §6.2.1: sent at 0, 500, 1500, 3500, 7500, 15500, 31500 ms, and
        // given up 16 RTO (8 s) after the last one, at 39.5 s.
        let expected_ms = [500u64, 1500, 3500, 7500, 15500, 31500];
        for ms in expected_ms {
            let at = start + Duration::from_millis(ms);
            assert_eq!(client.poll_timeout(), Some(at));
            client.handle_timeout(at - Duration::from_millis(1));
            assert!(client.poll_transmit().is_none(), "not before {ms} ms");
            client.handle_timeout(at);
            assert_eq!(take(&mut client), first, "same bytes at {ms} ms");
        }
        let give_up = start + Duration::from_millis(39_500);
        assert_eq!(client.poll_timeout(), Some(give_up));
        client.handle_timeout(give_up);
        assert!(client.poll_transmit().is_none());
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Failed {
                request: Request::Allocate,
                failure: Failure::Timeout
            })
        );
        assert_eq!(client.state(), AllocationState::Failed);
    }

    #[test]
    fn unsigned_or_badly_signed_success_is_dropped() {
        let now = Instant::now();
        let mut client = allocated(now);
        client
            .create_permission(now, peer().ip())
            .expect("allocated");
        let request = take(&mut client);
        let unsigned = respond(&request, Class::Success, None, |_, _| {});
        client.handle_datagram(now, server(), &unsigned);
        let wrong_key = respond(&request, Class::Success, Some(b"wrong"), |_, _| {});
        client.handle_datagram(now, server(), &wrong_key);
        assert!(client.poll_event().is_none());
        assert!(!client.has_permission(peer().ip()));
        // Retransmission goes on, and a properly signed answer still counts.
        client.handle_timeout(now + Duration::from_millis(500));
        assert_eq!(take(&mut client), request);
        let signed = respond(&request, Class::Success, Some(&key()), |_, _| {});
        client.handle_datagram(now, server(), &signed);
        assert!(client.has_permission(peer().ip()));
        // A response from another address is ignored even when valid.
        let mut other = allocated(now);
        other
            .create_permission(now, peer().ip())
            .expect("allocated");
        let request = take(&mut other);
        let signed = respond(&request, Class::Success, Some(&key()), |_, _| {});
        other.handle_datagram(now, peer(), &signed);
        assert!(!other.has_permission(peer().ip()));
    }

    #[test]
    fn refreshes_at_half_lifetime_and_deallocates_on_close() {
        let start = Instant::now();
        let mut client = allocated(start);
        let half = start + Duration::from_secs(300);
        assert_eq!(client.poll_timeout(), Some(half));
        client.handle_timeout(half);
        let refresh = take(&mut client);
        let message = Message::parse(&refresh).expect("parses");
        assert_eq!(message.message_type().method, method::REFRESH);
        assert_eq!(attribute(&message, attr::LIFETIME), None);
        assert_eq!(message.verify_integrity(&key()), Ok(()));
        client.handle_datagram(
            half,
            server(),
            &respond(&refresh, Class::Success, Some(&key()), |w, _| {
                w.attribute(attr::LIFETIME, &100u32.to_be_bytes());
            }),
        );
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Refreshed {
                lifetime: Duration::from_secs(100)
            })
        );
        assert_eq!(client.poll_timeout(), Some(half + Duration::from_secs(50)));

        client.close(half);
        assert_eq!(client.state(), AllocationState::Closing);
        let dealloc = take(&mut client);
        let message = Message::parse(&dealloc).expect("parses");
        assert_eq!(message.message_type().method, method::REFRESH);
        assert_eq!(attribute(&message, attr::LIFETIME), Some(&[0u8; 4][..]));
        client.handle_datagram(
            half,
            server(),
            &respond(&dealloc, Class::Success, Some(&key()), |w, _| {
                w.attribute(attr::LIFETIME, &0u32.to_be_bytes());
            }),
        );
        assert_eq!(client.poll_event(), Some(TurnClientEvent::Deallocated));
        assert_eq!(client.state(), AllocationState::Closed);
        assert_eq!(client.poll_timeout(), None);
    }

    #[test]
    fn allocation_mismatch_on_refresh_ends_the_allocation() {
        let start = Instant::now();
        let mut client = allocated(start);
        client.handle_timeout(start + Duration::from_secs(300));
        let refresh = take(&mut client);
        let error = respond(&refresh, Class::Error, Some(&key()), |w, _| {
            w.error_code(437, "Allocation Mismatch");
        });
        client.handle_datagram(start, server(), &error);
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Failed {
                request: Request::Refresh,
                failure: Failure::Error {
                    code: 437,
                    reason: "Allocation Mismatch".into()
                }
            })
        );
        assert_eq!(client.state(), AllocationState::Failed);
        assert_eq!(
            client.create_permission(start, peer().ip()),
            Err(ClientError::NotAllocated(AllocationState::Failed))
        );
    }

    #[test]
    fn permission_request_carries_the_peer_and_is_refreshed() {
        let start = Instant::now();
        let mut client = allocated(start);
        client
            .create_permission(start, peer().ip())
            .expect("allocated");
        client.create_permission(start, peer().ip()).expect("no-op");
        let request = take(&mut client);
        assert!(client.poll_transmit().is_none(), "one request per IP");
        let message = Message::parse(&request).expect("parses");
        assert_eq!(message.message_type().method, method::CREATE_PERMISSION);
        let xor = attribute(&message, attr::XOR_PEER_ADDRESS).expect("peer");
        assert_eq!(
            decode_xor_address(xor, message.transaction_id()).map(|a| a.ip()),
            Some(peer().ip())
        );
        let ok = respond(&request, Class::Success, Some(&key()), |_, _| {});
        client.handle_datagram(start, server(), &ok);
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::PermissionCreated { peer: peer().ip() })
        );
        let refresh_at = start + PERMISSION_REFRESH;
        client.handle_timeout(refresh_at);
        let again = take(&mut client);
        let message = Message::parse(&again).expect("parses");
        assert_eq!(message.message_type().method, method::CREATE_PERMISSION);
        let ok = respond(&again, Class::Success, Some(&key()), |_, _| {});
        client.handle_datagram(refresh_at, server(), &ok);
        assert!(client.poll_event().is_none(), "a refresh is not news");
        assert!(client.has_permission(peer().ip()));
    }

    #[test]
    fn forbidden_permission_is_reported_and_forgotten() {
        let now = Instant::now();
        let mut client = allocated(now);
        client
            .create_permission(now, peer().ip())
            .expect("allocated");
        let request = take(&mut client);
        let error = respond(&request, Class::Error, Some(&key()), |w, _| {
            w.error_code(403, "Forbidden");
        });
        client.handle_datagram(now, server(), &error);
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Failed {
                request: Request::CreatePermission { peer: peer().ip() },
                failure: Failure::Error {
                    code: 403,
                    reason: "Forbidden".into()
                }
            })
        );
        let mut out = Vec::new();
        assert_eq!(
            client.encode_send(peer(), b"x", &mut out),
            Err(ClientError::NoPermission(peer().ip()))
        );
    }

    #[test]
    fn data_goes_in_send_indications_until_the_channel_is_bound() {
        let now = Instant::now();
        let mut client = allocated(now);
        let channel = client.bind_channel(now, peer()).expect("allocated");
        assert_eq!(channel, CHANNEL_MIN);
        assert_eq!(client.bind_channel(now, peer()), Ok(CHANNEL_MIN));
        let request = take(&mut client);
        let message = Message::parse(&request).expect("parses");
        assert_eq!(message.message_type().method, method::CHANNEL_BIND);
        assert_eq!(
            attribute(&message, attr::CHANNEL_NUMBER),
            Some(&[0x40, 0x00, 0, 0][..])
        );
        let xor = attribute(&message, attr::XOR_PEER_ADDRESS).expect("peer");
        assert_eq!(
            decode_xor_address(xor, message.transaction_id()),
            Some(peer())
        );

        let mut out = Vec::new();
        assert_eq!(
            client.encode_send(peer(), b"early", &mut out),
            Ok(Framing::SendIndication)
        );
        let send = Message::parse(&out).expect("a STUN message");
        assert_eq!(
            send.message_type(),
            MessageType {
                method: method::SEND,
                class: Class::Indication
            }
        );
        assert_eq!(attribute(&send, attr::DATA), Some(&b"early"[..]));
        let xor = attribute(&send, attr::XOR_PEER_ADDRESS).expect("peer");
        assert_eq!(decode_xor_address(xor, send.transaction_id()), Some(peer()));
        assert_eq!(client.channel(peer()), None);

        let ok = respond(&request, Class::Success, Some(&key()), |_, _| {});
        client.handle_datagram(now, server(), &ok);
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::PermissionCreated { peer: peer().ip() })
        );
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::ChannelBound {
                peer: peer(),
                channel
            })
        );
        assert_eq!(client.channel(peer()), Some(channel));
        assert_eq!(
            client.encode_send(peer(), b"late", &mut out),
            Ok(Framing::ChannelData(channel))
        );
        assert_eq!(out, [0x40, 0x00, 0x00, 0x04, b'l', b'a', b't', b'e']);

        // The permission is refreshed at 4 minutes, the channel at 9.
        assert_eq!(client.poll_timeout(), Some(now + PERMISSION_REFRESH));
        client.handle_timeout(now + PERMISSION_REFRESH);
        let permission = take(&mut client);
        assert_eq!(
            Message::parse(&permission)
                .expect("parses")
                .message_type()
                .method,
            method::CREATE_PERMISSION
        );
        let ok = respond(&permission, Class::Success, Some(&key()), |_, _| {});
        client.handle_datagram(now + PERMISSION_REFRESH, server(), &ok);
        // By 9 minutes the allocation and the permission are due again too.
        client.handle_timeout(now + CHANNEL_REFRESH);
        let mut rebinds = Vec::new();
        while let Some(transmit) = client.poll_transmit() {
            let message = Message::parse(&transmit.payload).expect("parses");
            if message.message_type().method == method::CHANNEL_BIND {
                rebinds.push(attribute(&message, attr::CHANNEL_NUMBER).map(<[u8]>::to_vec));
            }
        }
        assert_eq!(rebinds, [Some(vec![0x40, 0x00, 0, 0])]);
    }

    #[test]
    fn incoming_data_indications_and_channel_data_decode() {
        let now = Instant::now();
        let mut client = allocated(now);
        let mut indication = Vec::new();
        let tid = [9; 12];
        let mut writer = MessageWriter::new(
            &mut indication,
            MessageType {
                method: method::DATA,
                class: Class::Indication,
            },
            tid,
        );
        xor_address_attribute(&mut writer, attr::XOR_PEER_ADDRESS, peer(), tid);
        writer.attribute(attr::DATA, b"from the peer");
        writer.finish();
        assert_eq!(
            client.handle_datagram(now, server(), &indication),
            Some(PeerData {
                peer: peer(),
                data: b"from the peer",
                channel: None
            })
        );
        assert_eq!(client.handle_datagram(now, peer(), &indication), None);

        let channel = client.bind_channel(now, peer()).expect("allocated");
        let mut channel_data = Vec::new();
        super::super::encode_channel_data(channel, b"on a channel", &mut channel_data);
        assert_eq!(
            client.handle_datagram(now, server(), &channel_data),
            Some(PeerData {
                peer: peer(),
                data: b"on a channel",
                channel: Some(channel)
            })
        );
        let mut unknown = Vec::new();
        super::super::encode_channel_data(channel + 1, b"?", &mut unknown);
        assert_eq!(client.handle_datagram(now, server(), &unknown), None);
    }

    #[test]
    fn ipv6_allocation_asks_for_the_family_and_refuses_ipv4_peers() {
        let now = Instant::now();
        let mut config = ClientConfig::new(server(), USERNAME, PASSWORD);
        config.family = AddressFamily::V6;
        config.lifetime = Some(Duration::from_secs(900));
        let mut client = Client::new(config, 3);
        client.allocate(now).expect("idle");
        let first = take(&mut client);
        let message = Message::parse(&first).expect("parses");
        assert_eq!(
            attribute(&message, attr::REQUESTED_ADDRESS_FAMILY),
            Some(&[0x02, 0, 0, 0][..])
        );
        assert_eq!(
            attribute(&message, attr::LIFETIME),
            Some(&900u32.to_be_bytes()[..])
        );
        client.handle_datagram(now, server(), &challenge(&first, 401, b"n"));
        let second = take(&mut client);
        let relayed_v6: SocketAddr = "[2001:db8::1]:50000".parse().expect("literal");
        let ok = respond(&second, Class::Success, Some(&key()), |w, tid| {
            // A dual allocation's IPv4 address first: the client must pick the v6 one.
            xor_address_attribute(w, attr::XOR_RELAYED_ADDRESS, relayed(), tid);
            xor_address_attribute(w, attr::XOR_RELAYED_ADDRESS, relayed_v6, tid);
        });
        client.handle_datagram(now, server(), &ok);
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Allocated {
                relayed: relayed_v6,
                mapped: None,
                lifetime: DEFAULT_LIFETIME,
            })
        );
        assert_eq!(
            client.create_permission(now, peer().ip()),
            Err(ClientError::FamilyMismatch(peer().ip()))
        );
        let v6_peer: IpAddr = "2001:db8::99".parse().expect("literal");
        assert_eq!(client.create_permission(now, v6_peer), Ok(()));
    }

    #[test]
    fn success_without_relayed_address_fails_the_allocation() {
        let now = Instant::now();
        let mut client = Client::new(ClientConfig::new(server(), USERNAME, PASSWORD), 1);
        client.allocate(now).expect("idle");
        let first = take(&mut client);
        client.handle_datagram(now, server(), &challenge(&first, 401, b"n"));
        let second = take(&mut client);
        let ok = respond(&second, Class::Success, Some(&key()), |_, _| {});
        client.handle_datagram(now, server(), &ok);
        assert_eq!(
            client.poll_event(),
            Some(TurnClientEvent::Failed {
                request: Request::Allocate,
                failure: Failure::BadResponse("no XOR-RELAYED-ADDRESS")
            })
        );
        assert_eq!(client.state(), AllocationState::Failed);
    }

    #[test]
    fn calls_before_allocation_are_refused() {
        let now = Instant::now();
        let mut client = Client::new(ClientConfig::new(server(), USERNAME, PASSWORD), 1);
        let mut out = Vec::new();
        assert_eq!(
            client.encode_send(peer(), b"x", &mut out),
            Err(ClientError::NotAllocated(AllocationState::Idle))
        );
        assert_eq!(
            client.bind_channel(now, peer()),
            Err(ClientError::NotAllocated(AllocationState::Idle))
        );
        assert_eq!(client.poll_timeout(), None);
        client.close(now);
        assert_eq!(client.state(), AllocationState::Closed);
        assert!(client.poll_transmit().is_none());
    }

    #[test]
    fn too_large_data_is_refused() {
        let now = Instant::now();
        let mut client = allocated(now);
        client
            .create_permission(now, peer().ip())
            .expect("allocated");
        let mut out = Vec::new();
        let big = vec![0; MAX_DATA_LEN + 1];
        assert_eq!(
            client.encode_send(peer(), &big, &mut out),
            Err(ClientError::DataTooLarge(MAX_DATA_LEN + 1))
        );
        let max = vec![0; MAX_DATA_LEN];
        assert_eq!(
            client.encode_send(peer(), &max, &mut out),
            Ok(Framing::SendIndication)
        );
        assert!(Message::parse(&out).is_ok());
    }

    #[test]
    fn channel_numbers_run_out_after_4096() {
        let now = Instant::now();
        let mut client = allocated(now);
        for i in 0..=u32::from(CHANNEL_MAX - CHANNEL_MIN) {
            let port = u16::try_from(1000 + i).expect("fits");
            let peer = SocketAddr::new(peer().ip(), port);
            assert_eq!(
                client.bind_channel(now, peer),
                Ok(CHANNEL_MIN + u16::try_from(i).expect("fits"))
            );
        }
        assert_eq!(
            client.bind_channel(now, "203.0.113.5:1".parse().expect("literal")),
            Err(ClientError::ChannelsExhausted)
        );
    }

    /// Bytes a server could send: anything, or STUN responses to the client's own
    /// pending transactions with arbitrary attributes.
    fn datagram_strategy() -> impl Strategy<Value = (u8, u16, Vec<u8>, bool)> {
        (
            any::<u8>(),
            0u16..0x4000,
            proptest::collection::vec(any::<u8>(), 0..200),
            any::<bool>(),
        )
    }

    proptest! {
        #[test]
        fn no_datagram_panics_the_client(
            inputs in proptest::collection::vec(datagram_strategy(), 1..12),
        ) {
            let start = Instant::now();
            let mut client = allocated(start);
            let _ = client.bind_channel(start, peer());
            let _ = client.create_permission(start, "203.0.113.6".parse().expect("literal"));
            let mut pending: Vec<Vec<u8>> = Vec::new();
            let mut now = start;
            for (mode, ty, body, sign) in inputs {
                while let Some(t) = client.poll_transmit() {
                    pending.push(t.payload);
                }
                let datagram = match (mode % 3, pending.last()) {
                    (0, _) | (_, None) => body,
                    (1, Some(request)) => {
                        // A response to a pending request: right tid, random type and
                        // attribute bytes.
                        let tid = Message::parse(request).map(|m| m.transaction_id()).unwrap_or([0; 12]);
                        let mut out = Vec::new();
                        out.extend_from_slice(&ty.to_be_bytes());
                        out.extend_from_slice(&[0, 0]);
                        out.extend_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
                        out.extend_from_slice(&tid);
                        out.extend_from_slice(&body);
                        out.truncate(stun::HEADER_LEN + (out.len() - stun::HEADER_LEN) / 4 * 4);
                        let len = u16::try_from(out.len() - stun::HEADER_LEN).unwrap_or(0);
                        out[2..4].copy_from_slice(&len.to_be_bytes());
                        out
                    }
                    (_, Some(request)) => {
                        // A well-formed response (maybe signed) carrying random
                        // attribute values of the types the client reads.
                        let class = if ty % 2 == 0 { Class::Success } else { Class::Error };
                        let key = sign.then(key);
                        respond(request, class, key.as_ref().map(|k| &k[..]), |w, _| {
                            for (i, chunk) in body.chunks(8).enumerate() {
                                let ty = [attr::XOR_RELAYED_ADDRESS, stun_attr::XOR_MAPPED_ADDRESS,
                                    attr::LIFETIME, stun_attr::ERROR_CODE, stun_attr::NONCE,
                                    stun_attr::REALM][i % 6];
                                w.attribute(ty, chunk);
                            }
                        })
                    }
                };
                let _ = client.handle_datagram(now, server(), &datagram);
                now += Duration::from_millis(u64::from(ty % 5000));
                client.handle_timeout(now);
                while client.poll_event().is_some() {}
                let _ = client.encode_send(peer(), &datagram, &mut Vec::new());
            }
            // Whatever happened, the client stays bounded and consistent.
            prop_assert!(client.transactions.len() <= 8);
            prop_assert!(client.poll_timeout().is_none_or(|at| at >= start));
        }

        #[test]
        fn encode_send_output_parses(data in proptest::collection::vec(any::<u8>(), 0..600), bind in any::<bool>()) {
            let now = Instant::now();
            let mut client = allocated(now);
            client.create_permission(now, peer().ip()).expect("allocated");
            if bind {
                client.bind_channel(now, peer()).expect("allocated");
                while let Some(t) = client.poll_transmit() {
                    let message = Message::parse(&t.payload).expect("own request parses");
                    if message.message_type().method == method::CHANNEL_BIND {
                        let ok = respond(&t.payload, Class::Success, Some(&key()), |_, _| {});
                        client.handle_datagram(now, server(), &ok);
                    }
                }
            }
            let mut out = Vec::new();
            let framing = client.encode_send(peer(), &data, &mut out).expect("permitted");
            match framing {
                Framing::ChannelData(channel) => {
                    let parsed = ChannelData::parse(&out).expect("parses");
                    prop_assert_eq!(parsed.channel, channel);
                    prop_assert_eq!(parsed.data, &data[..]);
                }
                Framing::SendIndication => {
                    let message = Message::parse(&out).map_err(|e: DecodeError| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(attribute(&message, attr::DATA), Some(&data[..]));
                }
            }
        }
    }

    #[test]
    fn xor_peer_address_in_requests_round_trips_ipv6() {
        // The XOR of an IPv6 peer depends on the transaction id: check the encoder
        // the client uses against the STUN decoder for a v6 address.
        let tid = [3; 12];
        let addr: SocketAddr = "[2001:db8::7]:9".parse().expect("literal");
        let value = encode_xor_address(addr, tid);
        assert_eq!(decode_xor_address(&value[..20], tid), Some(addr));
    }
}
