//! The TURN relay's state machine (RFC 8656, clients over UDP or TCP): allocations,
//! permissions, channels, lifetimes, long-term authentication with stateless nonces,
//! quotas, bandwidth caps and the peer-address policy.
//!
//! Sans-IO, in the crate's one shape. Inputs: [`TurnServer::handle_stun`],
//! [`TurnServer::handle_relay_opened`], [`TurnServer::handle_timeout`] and
//! [`TurnServer::remove_client`]. Outputs: [`TurnServer::poll_transmit`] (replies; a
//! TCP client's with `transport: Tcp`), [`TurnServer::poll_event`] (relay sockets to
//! open and close, kernel fast-path instructions, allocations created) and
//! [`TurnServer::poll_timeout`].
//!
//! Opening a relay socket is I/O, so an Allocate that passes every check becomes a
//! pending allocation and a [`TurnServerEvent::OpenRelay`]: the driver opens the
//! socket without holding whatever lock guards the core and reports back through
//! [`TurnServer::handle_relay_opened`], which queues the answer (success, or the same
//! error a failed open always got). A report that never comes is forgotten after a
//! few seconds; a success reported too late has its sockets closed.
//!
//! The data plane is deliberately different: per-datagram relay lookups
//! ([`TurnServer::channel_data_from_client`], [`TurnServer::data_from_peer`], and Send
//! indications through [`TurnHandled::Relay`]) return a route, and the driver sends
//! the payload straight from its receive buffer (zero-copy); only control messages
//! are queued.
use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use super::{AddressFamily, method};
use crate::{
    budget::{ReplyBudget, ReplyBudgetConfig},
    credentials::SharedSecret,
    drain::{DRAINING_REASON, Draining, TRY_ALTERNATE_REASON},
    nonce::NonceIssuer,
    peer_policy::PeerPolicy,
    stun::{Class, Message, MessageType, MessageWriter, attr as stun_attr},
    transmit::Transmit,
};

mod allocate;
mod auth;
mod data;
mod fast;
mod permission;

pub use crate::transmit::Transport;
pub use data::ToClient;
pub use fast::{FastChannel, FastPath};

use allocate::PendingAllocation;

/// The relay's limits and timers.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    /// REALM sent in challenges and used in the long-term key.
    pub realm: String,
    /// Allocation lifetime when the client asks for less (RFC 8656: 10 minutes).
    pub default_lifetime: Duration,
    /// Longest allocation lifetime granted (RFC 8656 recommends 3600 s).
    pub max_lifetime: Duration,
    /// Permission lifetime (fixed at 300 s by RFC 8656).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (fixed at 600 s by RFC 8656).
    pub channel_lifetime: Duration,
    /// Allocations in total; more get 486.
    pub max_allocations: usize,
    /// Allocations per peer id (the id part of `expiry:peer-id`); more get 486.
    pub max_allocations_per_user: usize,
    /// Permissions per allocation; more get 508.
    pub max_permissions: usize,
    /// Channels per allocation; more get 508.
    pub max_channels: usize,
    /// Relayed bytes per second per allocation, both directions together; 0 means
    /// no cap. Bursts of one second's worth pass.
    pub bandwidth_bytes_per_second: u64,
    /// Replies to unauthenticated requests (401 challenges, 400) per second, all
    /// sources together; each source (IPv4 address, IPv6 /64) also gets at most 100
    /// at once and 50 per second (see [`crate::budget`]). Bounds how much a
    /// spoofed-source flood can reflect. A 438 to a correctly signed request is not
    /// counted.
    pub challenges_per_second: u32,
    /// Replies to unauthenticated requests per second to one source (IPv4 address,
    /// IPv6 /64), bursts of twice that; 0: no reply budget at all.
    pub replies_per_source: u32,
    /// Emit [`FastPath`] instructions for a kernel fast path (as
    /// [`TurnServerEvent::FastPath`]); off, the core emits none.
    pub fast_path: bool,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            realm: "gateway".into(),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            max_allocations: 100_000,
            max_allocations_per_user: 32,
            max_permissions: 64,
            max_channels: 64,
            bandwidth_bytes_per_second: 0,
            challenges_per_second: 10_000,
            replies_per_source: crate::budget::DEFAULT_PER_SOURCE,
            fast_path: false,
        }
    }
}

/// Why the driver could not open a relay socket (reported through
/// [`TurnServer::handle_relay_opened`]; each maps to the error answer it always got).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No relay address of that family is configured (answered 440).
    #[error("no relay address of that family")]
    FamilyUnavailable,
    /// Every port of the range is taken (answered 508).
    #[error("no free relay port")]
    NoPort,
}

/// Names one [`TurnServerEvent::OpenRelay`] so its report finds the pending Allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayRequestId(u64);

/// The port parity an Allocate asked for (EVEN-PORT, RFC 8656 §7.2), so the driver
/// knows which port(s) to bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvenPort {
    /// No EVEN-PORT: any free port of the range.
    Any,
    /// EVEN-PORT without the R bit: an even port.
    Even,
    /// EVEN-PORT with the R bit: an even port, and the next (odd) one opened too and
    /// reported as the reserved socket, kept for a later Allocate with the token.
    EvenReserveNext,
}

/// What the core asks of its driver, besides sending replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnServerEvent {
    /// Open the relay socket(s) of a pending Allocate, without holding the core's
    /// lock, then call [`TurnServer::handle_relay_opened`] with `request`.
    OpenRelay {
        /// Which pending Allocate this is (pass it back with the result).
        request: RelayRequestId,
        /// The family of the relayed address.
        family: AddressFamily,
        /// Which port(s) to bind.
        even_port: EvenPort,
        /// The gateway address the client reached: where the socket opens when no
        /// relay address of `family` is configured.
        local: Option<IpAddr>,
    },
    /// Close the relay socket bound to this address (its allocation or reservation
    /// is gone, or it was opened for a request that is no longer pending).
    CloseRelay(SocketAddr),
    /// Apply this instruction to the kernel fast path (only with
    /// [`TurnConfig::fast_path`]), in order, before handing the core more input.
    FastPath(FastPath),
    /// An allocation was created (one per allocation: the `_total` counter).
    AllocationCreated {
        /// The client whose allocation it is.
        client: ClientAddr,
        /// Its relayed address.
        relay: SocketAddr,
    },
}

/// The client's end of an allocation's 5-tuple (the gateway's end is implied by the
/// listening socket): its address and the transport it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    /// The client's address as the gateway sees it.
    pub addr: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
}

impl From<SocketAddr> for ClientAddr {
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Udp,
        }
    }
}

/// The TURN request methods, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestMethod {
    /// Allocate.
    Allocate,
    /// Refresh.
    Refresh,
    /// CreatePermission.
    CreatePermission,
    /// ChannelBind.
    ChannelBind,
}

impl RequestMethod {
    /// All methods (for pre-registering metric label sets).
    pub const ALL: [Self; 4] = [
        Self::Allocate,
        Self::Refresh,
        Self::CreatePermission,
        Self::ChannelBind,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allocate => "allocate",
            Self::Refresh => "refresh",
            Self::CreatePermission => "create_permission",
            Self::ChannelBind => "channel_bind",
        }
    }

    fn number(self) -> u16 {
        match self {
            Self::Allocate => method::ALLOCATE,
            Self::Refresh => method::REFRESH,
            Self::CreatePermission => method::CREATE_PERMISSION,
            Self::ChannelBind => method::CHANNEL_BIND,
        }
    }
}

/// How a TURN request ended (a bounded set: metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Success response sent.
    Ok,
    /// 401 challenge (no or bad credentials).
    Unauthorized,
    /// 438 Stale Nonce (expired, or issued to another address).
    StaleNonce,
    /// 441 Wrong Credentials (another user's allocation).
    WrongCredentials,
    /// 403 Forbidden (peer address denied by policy).
    Forbidden,
    /// 486 Allocation Quota Reached.
    Quota,
    /// 508 Insufficient Capacity (ports, permissions, channels).
    Capacity,
    /// 400 Bad Request.
    BadRequest,
    /// 437 Allocation Mismatch.
    Mismatch,
    /// 440 / 443: address family not supported or mismatched.
    Family,
    /// 442 Unsupported Transport Protocol.
    Transport,
    /// 420 Unknown Attribute.
    UnknownAttribute,
    /// No reply: over the challenge budget.
    Throttled,
    /// 300 Try Alternate: a new Allocate while draining, sent to another node.
    TryAlternate,
    /// 508 "Draining": a new Allocate while draining, with no other node to name.
    Draining,
}

impl RequestOutcome {
    /// All outcomes (for pre-registering metric label sets).
    pub const ALL: [Self; 15] = [
        Self::Ok,
        Self::Unauthorized,
        Self::StaleNonce,
        Self::WrongCredentials,
        Self::Forbidden,
        Self::Quota,
        Self::Capacity,
        Self::BadRequest,
        Self::Mismatch,
        Self::Family,
        Self::Transport,
        Self::UnknownAttribute,
        Self::Throttled,
        Self::TryAlternate,
        Self::Draining,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unauthorized => "unauthorized",
            Self::StaleNonce => "stale_nonce",
            Self::WrongCredentials => "wrong_credentials",
            Self::Forbidden => "forbidden",
            Self::Quota => "quota",
            Self::Capacity => "capacity",
            Self::BadRequest => "bad_request",
            Self::Mismatch => "allocation_mismatch",
            Self::Family => "address_family",
            Self::Transport => "unsupported_transport",
            Self::UnknownAttribute => "unknown_attribute",
            Self::Throttled => "throttled",
            Self::TryAlternate => "try_alternate",
            Self::Draining => "draining",
        }
    }
}

/// Why relayed data was dropped (a bounded set: metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No allocation for this client or relay address.
    NoAllocation,
    /// The peer has no (live) permission.
    NoPermission,
    /// ChannelData on a channel that is not bound.
    NoChannel,
    /// The peer address is denied by policy.
    DeniedPeer,
    /// Over the allocation's bandwidth cap.
    Bandwidth,
    /// A Send indication without XOR-PEER-ADDRESS or DATA, or otherwise malformed.
    Malformed,
}

impl DropReason {
    /// All reasons (for pre-registering metric label sets).
    pub const ALL: [Self; 6] = [
        Self::NoAllocation,
        Self::NoPermission,
        Self::NoChannel,
        Self::DeniedPeer,
        Self::Bandwidth,
        Self::Malformed,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoAllocation => "no_allocation",
            Self::NoPermission => "no_permission",
            Self::NoChannel => "no_channel",
            Self::DeniedPeer => "denied_peer",
            Self::Bandwidth => "bandwidth",
            Self::Malformed => "malformed",
        }
    }
}

/// What the core made of a STUN message from a client (the relay's verdict; the
/// rendezvous has a `Handled` of its own).
#[derive(Debug, PartialEq, Eq)]
pub enum TurnHandled<'a> {
    /// Not a TURN method: the caller should hand it to the rendezvous.
    NotTurn,
    /// A request was answered (or deliberately not: see the outcome); the reply, if
    /// any, is queued for [`TurnServer::poll_transmit`].
    Request {
        /// Which method.
        method: RequestMethod,
        /// How it ended.
        outcome: RequestOutcome,
    },
    /// An Allocate passed every check and waits for its relay socket (a
    /// [`TurnServerEvent::OpenRelay`] was queued, or already was for this
    /// transaction): its answer and outcome come from
    /// [`TurnServer::handle_relay_opened`].
    AwaitingRelay,
    /// A Send indication to relay: send `data` from `relay` to `peer`.
    Relay {
        /// The allocation's relay address (which socket to send from).
        relay: SocketAddr,
        /// The peer.
        peer: SocketAddr,
        /// The application data.
        data: &'a [u8],
    },
    /// A Send indication (or other TURN indication) that was dropped.
    Dropped(DropReason),
}

#[derive(Debug)]
struct Permission {
    ip: IpAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
    /// The deadline of the fast-path entry installed for this channel, if any.
    fast: Option<Instant>,
}

#[derive(Debug)]
struct TokenBucket {
    tokens: u64,
    last: Instant,
}

#[derive(Debug)]
struct Allocation {
    client: ClientAddr,
    local: Option<IpAddr>,
    relay: SocketAddr,
    username: Box<str>,
    user: Box<str>,
    created_by: [u8; 12],
    expires: Instant,
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
    bucket: TokenBucket,
    /// The token of the port this allocation reserved (EVEN-PORT's R bit), while
    /// that reservation stands: it ends with the allocation.
    reservation: Option<[u8; 8]>,
}

/// A relay socket held by EVEN-PORT's R bit for a later Allocate with its token.
/// It counts against its user's quota like an allocation, only that user may redeem
/// it, and it ends with the allocation that made it.
#[derive(Debug)]
struct Reservation {
    relay: SocketAddr,
    expires: Instant,
    user: Box<str>,
    /// The slot of the allocation that made it (which ends it when removed).
    made_by: usize,
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    fn channel_to(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number)
    }
}

/// The TURN server state.
#[derive(Debug)]
pub struct TurnServer {
    config: TurnConfig,
    secret: SharedSecret,
    nonces: NonceIssuer,
    policy: PeerPolicy,
    slots: Vec<Option<Allocation>>,
    free: Vec<usize>,
    by_client: HashMap<ClientAddr, usize>,
    by_relay: HashMap<SocketAddr, usize>,
    /// Allocations (live and pending) and reservations per user, for the per-user
    /// quota.
    per_user: HashMap<Box<str>, usize>,
    /// Replies to unauthenticated requests, per source and in total.
    budget: ReplyBudget,
    next_sweep: Option<Instant>,
    tid_counter: u64,
    /// Relay sockets reserved by EVEN-PORT's R bit, by token.
    reservations: HashMap<[u8; 8], Reservation>,
    token_key: [u8; 32],
    /// Allocates waiting for their relay socket, by request.
    pending: HashMap<RelayRequestId, PendingAllocation>,
    /// The pending Allocate of each client (at most one per 5-tuple).
    pending_by_client: HashMap<ClientAddr, RelayRequestId>,
    next_request: u64,
    /// Replies not yet polled.
    transmits: VecDeque<Transmit>,
    /// Events not yet polled.
    events: VecDeque<TurnServerEvent>,
    /// Refusing new allocations ([`TurnServer::set_draining`]).
    draining: Option<Draining>,
}

/// How often expired allocations, permissions, channels and pending Allocates are
/// swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// UNKNOWN-ATTRIBUTES lists at most this many types.
const MAX_UNKNOWN_LISTED: usize = 8;

impl TurnServer {
    /// A relay with `config`, authenticating against `secret`, with nonces keyed by
    /// `nonce_key` (random per process) and the peer `policy`.
    pub fn new(
        config: TurnConfig,
        secret: SharedSecret,
        nonce_key: [u8; 32],
        nonce_lifetime_secs: u32,
        policy: PeerPolicy,
    ) -> Self {
        let budget = ReplyBudget::new(
            ReplyBudgetConfig::new(config.replies_per_source, config.challenges_per_second),
            nonce_key[16..].try_into().unwrap_or([0; 16]),
        );
        Self {
            config,
            secret,
            nonces: NonceIssuer::new(nonce_key, nonce_lifetime_secs),
            policy,
            slots: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::new(),
            by_relay: HashMap::new(),
            per_user: HashMap::new(),
            budget,
            next_sweep: None,
            tid_counter: u64::from_be_bytes(nonce_key[..8].try_into().unwrap_or([0; 8])),
            reservations: HashMap::new(),
            token_key: nonce_key,
            pending: HashMap::new(),
            pending_by_client: HashMap::new(),
            next_request: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            draining: None,
        }
    }

    /// Replaces the accepted secrets (a configuration reload, a secret rotation):
    /// requests are checked against the new set from now on; allocations,
    /// permissions and channels stay, and their next request authenticates anew.
    pub fn set_secret(&mut self, secret: SharedSecret) {
        self.secret = secret;
    }

    /// Replaces the peer-address policy (a reload). It applies to new permissions
    /// and channels and to every datagram a client sends from now on (the data path
    /// checks each one); kernel fast-path entries of peers it now denies are removed
    /// in the next sweep. Nothing else established changes.
    pub fn set_policy(&mut self, policy: PeerPolicy) {
        self.policy = policy;
    }

    /// Replaces the limits and timers (a reload): quotas, lifetimes and the
    /// bandwidth cap apply to requests from now on; allocations over a lowered quota
    /// stay. The REALM and [`TurnConfig::fast_path`] are kept as they were: a new
    /// realm would change every client's key, and the fast path is set up at start.
    pub fn set_config(&mut self, config: TurnConfig) {
        let realm = std::mem::take(&mut self.config.realm);
        let fast_path = self.config.fast_path;
        self.config = TurnConfig {
            realm,
            fast_path,
            ..config
        };
    }

    /// The limits and timers in force.
    pub fn config(&self) -> &TurnConfig {
        &self.config
    }

    /// Starts (`Some`) or ends (`None`) draining: while draining, an Allocate from a
    /// 5-tuple without an allocation (or one pending) is refused after
    /// authentication, with 300 Try Alternate and ALTERNATE-SERVER when
    /// [`Draining::alternate`] names another node (RFC 8489 §10, RFC 8656 §7.2),
    /// else with 508 and the reason "Draining" (a capacity problem, which clients
    /// take as a cue to try another server). Refresh, CreatePermission, ChannelBind,
    /// Send and ChannelData of existing allocations go on as before, and so does a
    /// retransmitted Allocate of an allocation that exists.
    pub fn set_draining(&mut self, draining: Option<Draining>) {
        self.draining = draining;
    }

    /// Whether new allocations are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Deletes the allocation (or pending Allocate) of `client`, if any: a TCP
    /// client's connection closed, and RFC 8656 §3.1 ends the allocation with it.
    pub fn remove_client(&mut self, client: ClientAddr) {
        if let Some(index) = self.by_client.get(&client).copied() {
            self.remove(index);
        }
        if let Some(request) = self.pending_by_client.get(&client).copied() {
            self.forget_pending(request);
        }
    }

    /// Live allocations.
    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// The peer-address policy in force.
    pub fn policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// When [`TurnServer::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// The next reply to send (to the client's address, over its transport, from the
    /// gateway address it reached).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next thing the driver must do or know (see [`TurnServerEvent`]).
    pub fn poll_event(&mut self) -> Option<TurnServerEvent> {
        self.events.pop_front()
    }

    /// Expires allocations (closing their sockets), permissions, channels,
    /// reservations and pending Allocates whose socket was never reported.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| slot.as_ref().filter(|a| a.expires <= now).map(|_| i))
            .collect();
        for index in expired {
            self.remove(index);
        }
        let fast = self.fast_path_allowed();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(allocation) = slot else { continue };
            if fast || allocation.channels.iter().any(|c| c.fast.is_some()) {
                fast::sync_fast_path(allocation, index, now, fast, &self.policy, &mut self.events);
            }
            allocation.permissions.retain(|p| p.expires > now);
            allocation.channels.retain(|c| c.expires > now);
        }
        let lapsed: Vec<[u8; 8]> = self
            .reservations
            .iter()
            .filter(|(_, reservation)| reservation.expires <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in lapsed {
            self.release_reservation(&token);
        }
        self.expire_pending(now);
        self.next_sweep = (!self.by_client.is_empty()
            || !self.reservations.is_empty()
            || !self.pending.is_empty())
        .then(|| now + SWEEP_INTERVAL);
    }

    fn remove(&mut self, index: usize) {
        let Some(allocation) = self.slots.get_mut(index).and_then(Option::take) else {
            return;
        };
        for channel in &allocation.channels {
            if channel.fast.is_some() {
                self.events
                    .push_back(TurnServerEvent::FastPath(FastPath::Remove(
                        fast::fast_channel(&allocation, index, channel),
                    )));
            }
        }
        self.by_client.remove(&allocation.client);
        self.by_relay.remove(&allocation.relay);
        self.release_user(&allocation.user);
        if let Some(token) = allocation.reservation {
            self.release_reservation(&token);
        }
        self.events
            .push_back(TurnServerEvent::CloseRelay(allocation.relay));
        self.free.push(index);
    }

    /// Ends the reservation of `token`, if it still stands: its socket closes and
    /// its user's quota gets the slot back.
    fn release_reservation(&mut self, token: &[u8; 8]) {
        if let Some(reservation) = self.reservations.remove(token) {
            self.events
                .push_back(TurnServerEvent::CloseRelay(reservation.relay));
            self.release_user(&reservation.user);
        }
    }

    /// One allocation (live or pending) or reservation of `user` less.
    fn release_user(&mut self, user: &str) {
        if let Some(count) = self.per_user.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_user.remove(user);
            }
        }
    }

    /// True for the methods this core serves (the driver's demultiplexer).
    pub fn is_turn_method(method_number: u16) -> bool {
        matches!(
            method_number,
            method::ALLOCATE
                | method::REFRESH
                | method::SEND
                | method::DATA
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
        )
    }

    /// Handles a STUN message from `client` (received on the gateway address
    /// `local`). A reply, if any, is queued for [`TurnServer::poll_transmit`].
    pub fn handle_stun<'a>(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: impl Into<ClientAddr>,
        local: Option<IpAddr>,
        message: &Message<'a>,
    ) -> TurnHandled<'a> {
        let client = client.into();
        let ty = message.message_type();
        match ty.class {
            Class::Indication if ty.method == method::SEND => {
                return self.send_indication(now, client, message);
            }
            Class::Indication if Self::is_turn_method(ty.method) => {
                return TurnHandled::Dropped(DropReason::Malformed);
            }
            Class::Request => {}
            _ => return TurnHandled::NotTurn,
        }
        let request_method = match ty.method {
            method::ALLOCATE => RequestMethod::Allocate,
            method::REFRESH => RequestMethod::Refresh,
            method::CREATE_PERMISSION => RequestMethod::CreatePermission,
            method::CHANNEL_BIND => RequestMethod::ChannelBind,
            _ => return TurnHandled::NotTurn,
        };
        let mut out = Vec::new();
        let outcome = self.request(
            now,
            now_unix,
            client,
            local,
            request_method,
            message,
            &mut out,
        );
        self.queue_reply(client, local, out);
        match outcome {
            Some(outcome) => TurnHandled::Request {
                method: request_method,
                outcome,
            },
            None => TurnHandled::AwaitingRelay,
        }
    }

    /// Queues `reply` (if not empty) for `client`, from the gateway address `local`.
    fn queue_reply(&mut self, client: ClientAddr, local: Option<IpAddr>, reply: Vec<u8>) {
        if !reply.is_empty() {
            self.transmits.push_back(
                Transmit::udp(client.addr, reply)
                    .from_local(local)
                    .over(client.transport),
            );
        }
    }

    /// Serves one request; `None` when it is an Allocate waiting for its socket.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: ClientAddr,
        local: Option<IpAddr>,
        request_method: RequestMethod,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Option<RequestOutcome> {
        let auth = match self.authenticate(now, now_unix, client, request_method, message, out) {
            Ok(auth) => auth,
            Err(outcome) => return Some(outcome),
        };
        let reply = Reply {
            method: request_method.number(),
            tid: message.transaction_id(),
            key: auth.key,
            sha256: auth.sha256,
        };
        // Attributes this server must understand (RFC 8489 §7.3.1: after auth).
        let mut unknown = [0u16; MAX_UNKNOWN_LISTED];
        let mut unknown_count = 0;
        for attribute in message.attributes().flatten() {
            if stun_attr::is_comprehension_required(attribute.ty) && !understood(attribute.ty) {
                if unknown_count < MAX_UNKNOWN_LISTED {
                    unknown[unknown_count] = attribute.ty;
                }
                unknown_count += 1;
            }
        }
        if unknown_count > 0 {
            let listed = unknown_count.min(MAX_UNKNOWN_LISTED);
            reply.error_with(out, 420, "Unknown Attribute", |w| {
                w.unknown_attributes(&unknown[..listed]);
            });
            return Some(RequestOutcome::UnknownAttribute);
        }
        // An existing (or pending) allocation on this 5-tuple must belong to the
        // same user.
        let existing = self.by_client.get(&client).copied();
        let owner = match existing {
            Some(index) => self.slots[index].as_ref().map(|a| &*a.username),
            None => self.pending_owner(client),
        };
        if owner.is_some_and(|owner| *owner != *auth.username) {
            reply.error(out, 441, "Wrong Credentials");
            return Some(RequestOutcome::WrongCredentials);
        }
        if request_method == RequestMethod::Allocate
            && existing.is_none()
            && !self.pending_by_client.contains_key(&client)
            && let Some(draining) = self.draining
        {
            return Some(match draining.alternate {
                Some(alternate) => {
                    reply.error_with(out, 300, TRY_ALTERNATE_REASON, |w| {
                        w.address(stun_attr::ALTERNATE_SERVER, alternate);
                    });
                    RequestOutcome::TryAlternate
                }
                None => {
                    reply.error(out, 508, DRAINING_REASON);
                    RequestOutcome::Draining
                }
            });
        }
        match request_method {
            RequestMethod::Allocate => {
                self.allocate(now, client, local, existing, auth, reply, message, out)
            }
            RequestMethod::Refresh => Some(self.refresh(now, existing, &reply, message, out)),
            RequestMethod::CreatePermission => {
                Some(self.create_permission(now, existing, &reply, message, out))
            }
            RequestMethod::ChannelBind => {
                Some(self.channel_bind(now, existing, &reply, message, out))
            }
        }
    }
}

fn read_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

fn understood(ty: u16) -> bool {
    use super::attr as turn_attr;
    matches!(
        ty,
        stun_attr::USERNAME
            | stun_attr::MESSAGE_INTEGRITY
            | stun_attr::MESSAGE_INTEGRITY_SHA256
            | stun_attr::REALM
            | stun_attr::NONCE
            | stun_attr::PASSWORD_ALGORITHM
            | turn_attr::CHANNEL_NUMBER
            | turn_attr::LIFETIME
            | turn_attr::XOR_PEER_ADDRESS
            | turn_attr::DATA
            | turn_attr::REQUESTED_ADDRESS_FAMILY
            | turn_attr::EVEN_PORT
            | turn_attr::REQUESTED_TRANSPORT
            | turn_attr::DONT_FRAGMENT
            | turn_attr::RESERVATION_TOKEN
    )
}

/// What an authenticated reply needs: method, transaction id and the integrity key.
struct Reply {
    method: u16,
    tid: [u8; 12],
    key: [u8; 16],
    /// Protect answers with MESSAGE-INTEGRITY-SHA256 (as the request was) rather than
    /// MESSAGE-INTEGRITY (RFC 8489 §9.2.4: the response uses the request's algorithm).
    sha256: bool,
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Reply")
            .field("method", &self.method)
            .field("tid", &self.tid)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl Reply {
    fn protect(&self, writer: &mut MessageWriter<'_>) {
        if self.sha256 {
            writer.message_integrity_sha256(&self.key);
        } else {
            writer.message_integrity(&self.key);
        }
    }

    fn error(&self, out: &mut Vec<u8>, code: u16, reason: &str) {
        self.error_with(out, code, reason, |_| {});
    }

    fn error_with(
        &self,
        out: &mut Vec<u8>,
        code: u16,
        reason: &str,
        extra: impl FnOnce(&mut MessageWriter<'_>),
    ) {
        out.clear();
        let mut writer = MessageWriter::new(
            out,
            MessageType {
                method: self.method,
                class: Class::Error,
            },
            self.tid,
        );
        writer.error_code(code, reason);
        extra(&mut writer);
        self.protect(&mut writer);
        writer.finish_with_fingerprint();
    }

    fn success_with(&self, out: &mut Vec<u8>, body: impl FnOnce(&mut MessageWriter<'_>)) {
        out.clear();
        let mut writer = MessageWriter::new(
            out,
            MessageType {
                method: self.method,
                class: Class::Success,
            },
            self.tid,
        );
        body(&mut writer);
        self.protect(&mut writer);
        writer.finish_with_fingerprint();
    }
}

#[cfg(test)]
mod tests;
