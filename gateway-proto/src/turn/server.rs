//! The TURN relay's state machine (RFC 8656 over UDP): allocations, permissions,
//! channels, lifetimes, long-term authentication with stateless nonces, quotas,
//! bandwidth caps and the peer-address policy.
//!
//! Sans-IO: the driver passes in the time, each datagram and its addresses; the core
//! writes replies into a caller buffer and tells the driver where relayed data goes.
//! Opening and closing relay sockets is the one thing it asks of the driver, through
//! [`RelaySockets`], so the core stays testable with a fake.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use super::{
    CHANNEL_MAX, CHANNEL_MIN, TRANSPORT_UDP, attr as turn_attr, family, method,
    xor_address_attribute,
};
use crate::{
    credentials::SharedSecret,
    nonce::{NonceCheck, NonceIssuer},
    peer_policy::PeerPolicy,
    stun::{self, Class, Message, MessageType, MessageWriter, attr as stun_attr},
};

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
    /// Replies to unauthenticated requests (401 challenges, 438) per second, in total:
    /// bounds how much a spoofed-source flood can reflect.
    pub challenges_per_second: u32,
    /// Emit [`FastPath`] instructions for a kernel fast path (see
    /// [`TurnServer::drain_fast_path`]); off, the core emits none.
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
            fast_path: false,
        }
    }
}

/// An address family of a relayed address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Why the driver could not open a relay socket.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No relay address of that family is configured.
    #[error("no relay address of that family")]
    FamilyUnavailable,
    /// Every port of the range is taken.
    #[error("no free relay port")]
    NoPort,
}

/// What the core needs from the I/O layer: relay sockets, one per allocation.
pub trait RelaySockets {
    /// Opens a UDP socket on a free port of the relay range (an even one when asked)
    /// for `family`, and returns its address as clients and peers see it.
    fn open(&mut self, family: Family, even_port: bool) -> Result<SocketAddr, OpenError>;
    /// Opens two sockets on an even port and the next one (EVEN-PORT with the R bit:
    /// the second is reserved for a later Allocate). Layers that cannot do it say
    /// [`OpenError::NoPort`].
    fn open_pair(&mut self, _family: Family) -> Result<(SocketAddr, SocketAddr), OpenError> {
        Err(OpenError::NoPort)
    }
    /// Closes the relay socket at `relay` (its allocation is gone).
    fn close(&mut self, relay: SocketAddr);
}

/// The transport between a client and the gateway (the relayed side is always UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP on the service port.
    Udp,
    /// A TCP connection to the service port (RFC 8656 §3.1: STUN and ChannelData
    /// framed on the stream).
    Tcp,
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
}

impl RequestOutcome {
    /// All outcomes (for pre-registering metric label sets).
    pub const ALL: [Self; 13] = [
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

/// What the core made of a STUN message from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled<'a> {
    /// Not a TURN method: the caller should hand it to the rendezvous.
    NotTurn,
    /// A request was answered (or deliberately not: see the outcome); the reply, if
    /// any, is in the output buffer.
    Request {
        /// Which method.
        method: RequestMethod,
        /// How it ended.
        outcome: RequestOutcome,
    },
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

/// Where data a peer sent to a relay address goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToClient {
    /// The client's address.
    pub client: ClientAddr,
    /// The gateway address the client talks to (reply source), when known.
    pub local: Option<IpAddr>,
    /// The channel bound to the peer, if any: ChannelData; otherwise a Data indication.
    pub channel: Option<u16>,
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

/// One bound channel as a kernel fast path sees it: ChannelData from `client` to
/// `service` on `channel` goes from `relay` to `peer`, and UDP from `peer` to
/// `relay` goes back to `client` as ChannelData on `channel`, until `expires`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastChannel {
    /// The allocation's id (stable while any of its channels is installed; reused
    /// only after every one of them was removed): the key of its counters.
    pub allocation: u32,
    /// The client's address (always UDP).
    pub client: SocketAddr,
    /// The gateway address the client talks to (its port is the driver's).
    pub service: IpAddr,
    /// The channel number.
    pub channel: u16,
    /// The allocation's relay address.
    pub relay: SocketAddr,
    /// The peer the channel is bound to (canonical form).
    pub peer: SocketAddr,
    /// When the entry stops being valid: the earliest of the channel's, the peer
    /// permission's and the allocation's expiry.
    pub expires: Instant,
}

/// An instruction to a kernel fast path, emitted only when [`TurnConfig::fast_path`]
/// is on. Entries exist only for channels that are bound, whose peer has a live
/// permission and passes the peer policy, of UDP clients whose allocation has no
/// bandwidth cap (the kernel applies no per-packet policy). Everything else, and
/// anything the kernel declines, goes through the core as before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPath {
    /// Install (or update: same client, channel and allocation) an entry.
    Install(FastChannel),
    /// Remove the entry installed for this channel (expired, unbound, permission
    /// lapsed, allocation deleted).
    Remove(FastChannel),
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

/// The authenticated part of a request.
struct Authenticated {
    username: String,
    user: String,
    key: [u8; 16],
    /// The request was protected with MESSAGE-INTEGRITY-SHA256 only: answer in kind.
    sha256: bool,
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
    per_user: HashMap<Box<str>, usize>,
    challenge_window: Option<Instant>,
    challenges_in_window: u32,
    next_sweep: Option<Instant>,
    created: u64,
    tid_counter: u64,
    /// Relay sockets reserved by EVEN-PORT's R bit: token → (address, expiry).
    reservations: HashMap<[u8; 8], (SocketAddr, Instant)>,
    token_key: [u8; 32],
    /// Fast-path instructions not yet drained by the driver.
    fast_path: Vec<FastPath>,
}

/// How long a port reserved by EVEN-PORT's R bit waits for its Allocate (RFC 8656
/// §7.2 suggests about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How often expired allocations, permissions and channels are swept.
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
            challenge_window: None,
            challenges_in_window: 0,
            next_sweep: None,
            created: 0,
            tid_counter: u64::from_be_bytes(nonce_key[..8].try_into().unwrap_or([0; 8])),
            reservations: HashMap::new(),
            token_key: nonce_key,
            fast_path: Vec::new(),
        }
    }

    /// Deletes the allocation of `client`, if any (a TCP client's connection closed:
    /// RFC 8656 §3.1 ends the allocation with it).
    pub fn remove_client(&mut self, client: ClientAddr, sockets: &mut dyn RelaySockets) {
        if let Some(index) = self.by_client.get(&client).copied() {
            self.remove(index, sockets);
        }
    }

    /// Live allocations.
    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Allocations created since the last call (for a `_total` counter).
    pub fn take_created(&mut self) -> u64 {
        std::mem::take(&mut self.created)
    }

    /// The peer-address policy in force.
    pub fn policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// When [`TurnServer::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Expires allocations (closing their sockets), permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant, sockets: &mut dyn RelaySockets) {
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| slot.as_ref().filter(|a| a.expires <= now).map(|_| i))
            .collect();
        for index in expired {
            self.remove(index, sockets);
        }
        let fast = self.fast_path_allowed();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(allocation) = slot else { continue };
            if fast || allocation.channels.iter().any(|c| c.fast.is_some()) {
                sync_fast_path(
                    allocation,
                    index,
                    now,
                    fast,
                    &self.policy,
                    &mut self.fast_path,
                );
            }
            allocation.permissions.retain(|p| p.expires > now);
            allocation.channels.retain(|c| c.expires > now);
        }
        let lapsed: Vec<[u8; 8]> = self
            .reservations
            .iter()
            .filter(|(_, (_, expires))| *expires <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in lapsed {
            if let Some((relay, _)) = self.reservations.remove(&token) {
                sockets.close(relay);
            }
        }
        self.next_sweep = (!self.by_client.is_empty() || !self.reservations.is_empty())
            .then(|| now + SWEEP_INTERVAL);
    }

    fn remove(&mut self, index: usize, sockets: &mut dyn RelaySockets) {
        let Some(allocation) = self.slots.get_mut(index).and_then(Option::take) else {
            return;
        };
        for channel in &allocation.channels {
            if channel.fast.is_some() {
                self.fast_path
                    .push(FastPath::Remove(fast_channel(&allocation, index, channel)));
            }
        }
        self.by_client.remove(&allocation.client);
        self.by_relay.remove(&allocation.relay);
        if let Some(count) = self.per_user.get_mut(&allocation.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_user.remove(&allocation.user);
            }
        }
        sockets.close(allocation.relay);
        self.free.push(index);
    }

    /// Whether the fast path may hold entries at all: asked for, and no per-packet
    /// policy (a bandwidth cap) that only the core can apply.
    fn fast_path_allowed(&self) -> bool {
        self.config.fast_path && self.config.bandwidth_bytes_per_second == 0
    }

    /// Brings allocation `index`'s fast-path entries in line with its state.
    fn sync_fast_path_of(&mut self, index: usize, now: Instant) {
        let fast = self.fast_path_allowed();
        if let Some(allocation) = self.slots.get_mut(index).and_then(Option::as_mut) {
            sync_fast_path(
                allocation,
                index,
                now,
                fast,
                &self.policy,
                &mut self.fast_path,
            );
        }
    }

    /// The fast-path instructions emitted since the last call, in order (the driver
    /// applies them before it next hands the core a datagram or a timeout).
    pub fn drain_fast_path(&mut self) -> std::vec::Drain<'_, FastPath> {
        self.fast_path.drain(..)
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
    /// `local`). Replies go into `out` (cleared first; empty means no reply).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_stun<'a>(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: impl Into<ClientAddr>,
        local: Option<IpAddr>,
        message: &Message<'a>,
        sockets: &mut dyn RelaySockets,
        out: &mut Vec<u8>,
    ) -> Handled<'a> {
        let client = client.into();
        out.clear();
        let ty = message.message_type();
        match ty.class {
            Class::Indication if ty.method == method::SEND => {
                return self.send_indication(now, client, message);
            }
            Class::Indication if Self::is_turn_method(ty.method) => {
                return Handled::Dropped(DropReason::Malformed);
            }
            Class::Request => {}
            _ => return Handled::NotTurn,
        }
        let request_method = match ty.method {
            method::ALLOCATE => RequestMethod::Allocate,
            method::REFRESH => RequestMethod::Refresh,
            method::CREATE_PERMISSION => RequestMethod::CreatePermission,
            method::CHANNEL_BIND => RequestMethod::ChannelBind,
            _ => return Handled::NotTurn,
        };
        let outcome = self.request(
            now,
            now_unix,
            client,
            local,
            request_method,
            message,
            sockets,
            out,
        );
        Handled::Request {
            method: request_method,
            outcome,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: ClientAddr,
        local: Option<IpAddr>,
        request_method: RequestMethod,
        message: &Message<'_>,
        sockets: &mut dyn RelaySockets,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let auth = match self.authenticate(now, now_unix, client, request_method, message, out) {
            Ok(auth) => auth,
            Err(outcome) => return outcome,
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
            let mut value = [0u8; 2 * MAX_UNKNOWN_LISTED];
            for (i, ty) in unknown[..listed].iter().enumerate() {
                value[2 * i..2 * i + 2].copy_from_slice(&ty.to_be_bytes());
            }
            reply.error_with(out, 420, "Unknown Attribute", |w| {
                w.attribute(stun_attr::UNKNOWN_ATTRIBUTES, &value[..2 * listed]);
            });
            return RequestOutcome::UnknownAttribute;
        }
        // An existing allocation on this 5-tuple must belong to the same user.
        let existing = self.by_client.get(&client).copied();
        if let Some(index) = existing
            && self.slots[index]
                .as_ref()
                .is_some_and(|a| *a.username != *auth.username)
        {
            reply.error(out, 441, "Wrong Credentials");
            return RequestOutcome::WrongCredentials;
        }
        match request_method {
            RequestMethod::Allocate => self.allocate(
                now, client, local, existing, auth, &reply, message, sockets, out,
            ),
            RequestMethod::Refresh => self.refresh(now, existing, &reply, message, sockets, out),
            RequestMethod::CreatePermission => {
                self.create_permission(now, existing, &reply, message, out)
            }
            RequestMethod::ChannelBind => self.channel_bind(now, existing, &reply, message, out),
        }
    }

    /// RFC 8489 §9.2.4 for long-term credentials: challenge, nonce, user, integrity.
    fn authenticate(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: ClientAddr,
        request_method: RequestMethod,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Authenticated, RequestOutcome> {
        let tid = message.transaction_id();
        let mut username = None;
        let mut realm = None;
        let mut nonce = None;
        let mut has_integrity = false;
        let mut has_fingerprint = false;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                stun_attr::USERNAME => username = Some(attribute.value),
                stun_attr::REALM => realm = Some(attribute.value),
                stun_attr::NONCE => nonce = Some(attribute.value),
                stun_attr::MESSAGE_INTEGRITY | stun_attr::MESSAGE_INTEGRITY_SHA256 => {
                    has_integrity = true;
                }
                stun_attr::FINGERPRINT => has_fingerprint = true,
                _ => {}
            }
        }
        let method_number = request_method.number();
        if !has_integrity {
            return Err(self.challenge(
                now,
                now_unix,
                client,
                method_number,
                tid,
                401,
                has_fingerprint,
                out,
            ));
        }
        let (Some(username), Some(realm), Some(nonce)) = (username, realm, nonce) else {
            // Integrity but no USERNAME/REALM/NONCE: 400, unauthenticated.
            if self.take_challenge_budget(now) {
                unauthenticated_error(out, method_number, tid, 400, "Bad Request", has_fingerprint);
                return Err(RequestOutcome::BadRequest);
            }
            return Err(RequestOutcome::Throttled);
        };
        match self.nonces.check(nonce, client.addr, now_unix) {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                return Err(self.challenge(
                    now,
                    now_unix,
                    client,
                    method_number,
                    tid,
                    438,
                    has_fingerprint,
                    out,
                ));
            }
        }
        let challenge_401 = |server: &mut Self, out: &mut Vec<u8>| {
            server.challenge(
                now,
                now_unix,
                client,
                method_number,
                tid,
                401,
                has_fingerprint,
                out,
            )
        };
        if realm != self.config.realm.as_bytes() {
            return Err(challenge_401(self, out));
        }
        let Ok(username) = std::str::from_utf8(username) else {
            return Err(challenge_401(self, out));
        };
        let Ok((user, password)) = self.secret.check(username, now_unix) else {
            return Err(challenge_401(self, out));
        };
        let user = user.to_owned();
        let key = super::long_term_key(username, &self.config.realm, &password);
        let sha1 = message.verify_integrity(&key).is_ok();
        let sha256 = !sha1 && message.verify_integrity_sha256(&key).is_ok();
        if !sha1 && !sha256 {
            return Err(challenge_401(self, out));
        }
        Ok(Authenticated {
            username: username.to_owned(),
            user,
            key,
            sha256,
        })
    }

    fn take_challenge_budget(&mut self, now: Instant) -> bool {
        let window_fresh = self
            .challenge_window
            .is_some_and(|start| now.saturating_duration_since(start) < Duration::from_secs(1));
        if !window_fresh {
            self.challenge_window = Some(now);
            self.challenges_in_window = 0;
        }
        if self.challenges_in_window >= self.config.challenges_per_second {
            return false;
        }
        self.challenges_in_window += 1;
        true
    }

    /// A 401 or 438 carrying REALM and a fresh NONCE bound to `client`. Kept small
    /// (short reason, 16-byte nonce, FINGERPRINT only when the request had one) so
    /// the reply to an unauthenticated request is barely larger than the request.
    #[allow(clippy::too_many_arguments)]
    fn challenge(
        &mut self,
        now: Instant,
        now_unix: u64,
        client: ClientAddr,
        method_number: u16,
        tid: [u8; 12],
        code: u16,
        fingerprint: bool,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        if !self.take_challenge_budget(now) {
            return RequestOutcome::Throttled;
        }
        let nonce = self.nonces.issue(client.addr, now_unix);
        let (reason, outcome) = if code == 438 {
            ("Stale Nonce", RequestOutcome::StaleNonce)
        } else {
            ("Unauthorized", RequestOutcome::Unauthorized)
        };
        let mut writer = MessageWriter::new(
            out,
            MessageType {
                method: method_number,
                class: Class::Error,
            },
            tid,
        );
        writer
            .error_code(code, reason)
            .attribute(stun_attr::REALM, self.config.realm.as_bytes())
            .attribute(stun_attr::NONCE, nonce.as_bytes());
        if fingerprint {
            writer.finish_with_fingerprint();
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        now: Instant,
        client: ClientAddr,
        local: Option<IpAddr>,
        existing: Option<usize>,
        auth: Authenticated,
        reply: &Reply,
        message: &Message<'_>,
        sockets: &mut dyn RelaySockets,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        if let Some(index) = existing {
            // A retransmission of the Allocate that created it gets the same answer.
            if let Some(allocation) = self.slots[index]
                .as_ref()
                .filter(|a| a.created_by == reply.tid)
            {
                let remaining = allocation.expires.saturating_duration_since(now);
                let relay = allocation.relay;
                reply.success_with(out, |w| {
                    xor_address_attribute(w, turn_attr::XOR_RELAYED_ADDRESS, relay, reply.tid);
                    w.attribute(
                        turn_attr::LIFETIME,
                        &(remaining.as_secs() as u32).to_be_bytes(),
                    );
                    w.xor_mapped_address(client.addr);
                });
                return RequestOutcome::Ok;
            }
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        }
        let mut transport = None;
        let mut requested_family = None;
        let mut even_port = false;
        let mut reserve_next = false;
        let mut reservation: Option<[u8; 8]> = None;
        let mut lifetime = None;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                turn_attr::REQUESTED_TRANSPORT => transport = attribute.value.first().copied(),
                turn_attr::REQUESTED_ADDRESS_FAMILY => {
                    requested_family = Some(attribute.value.first().copied().unwrap_or(0));
                }
                turn_attr::EVEN_PORT => {
                    even_port = true;
                    reserve_next = attribute.value.first().is_some_and(|b| b & 0x80 != 0);
                }
                turn_attr::RESERVATION_TOKEN => {
                    // A token of the wrong size matches nothing (508 below).
                    reservation = Some(attribute.value.try_into().unwrap_or([0xFF; 8]));
                }
                turn_attr::LIFETIME => lifetime = read_u32(attribute.value),
                _ => {}
            }
        }
        let Some(transport) = transport else {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        };
        if transport != TRANSPORT_UDP {
            reply.error(out, 442, "Unsupported Transport Protocol");
            return RequestOutcome::Transport;
        }
        if reservation.is_some() && (requested_family.is_some() || even_port) {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let family = match requested_family {
            None | Some(family::IPV4) => Family::V4,
            Some(family::IPV6) => Family::V6,
            Some(_) => {
                reply.error(out, 440, "Address Family not Supported");
                return RequestOutcome::Family;
            }
        };
        let user_count = self.per_user.get(auth.user.as_str()).copied().unwrap_or(0);
        if self.by_client.len() >= self.config.max_allocations
            || user_count >= self.config.max_allocations_per_user
        {
            reply.error(out, 486, "Allocation Quota Reached");
            return RequestOutcome::Quota;
        }
        let mut new_token = None;
        let opened = match reservation {
            // The port reserved by an earlier Allocate (RFC 8656 §7.2): its socket is
            // open already; an unknown or lapsed token gets 508.
            Some(token) => match self.reservations.remove(&token) {
                Some((relay, expires)) if expires > now => Ok(relay),
                Some((relay, _)) => {
                    sockets.close(relay);
                    Err(OpenError::NoPort)
                }
                None => Err(OpenError::NoPort),
            },
            None if reserve_next && self.reservations.len() < self.config.max_allocations => {
                sockets.open_pair(family).map(|(relay, reserved)| {
                    let token = self.next_token();
                    self.reservations
                        .insert(token, (reserved, now + RESERVATION_LIFETIME));
                    new_token = Some(token);
                    relay
                })
            }
            None if reserve_next => Err(OpenError::NoPort),
            None => sockets.open(family, even_port),
        };
        let relay = match opened {
            Ok(relay) => relay,
            Err(OpenError::FamilyUnavailable) => {
                reply.error(out, 440, "Address Family not Supported");
                return RequestOutcome::Family;
            }
            Err(OpenError::NoPort) => {
                reply.error(out, 508, "Insufficient Capacity");
                return RequestOutcome::Capacity;
            }
        };
        let lifetime = self.grant_lifetime(lifetime);
        let allocation = Allocation {
            client,
            local,
            relay,
            username: auth.username.into_boxed_str(),
            user: auth.user.clone().into_boxed_str(),
            created_by: reply.tid,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket: TokenBucket {
                tokens: self.config.bandwidth_bytes_per_second,
                last: now,
            },
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index] = Some(allocation);
                index
            }
            None => {
                self.slots.push(Some(allocation));
                self.slots.len() - 1
            }
        };
        self.by_client.insert(client, index);
        self.by_relay.insert(relay, index);
        *self.per_user.entry(auth.user.into_boxed_str()).or_insert(0) += 1;
        self.created += 1;
        self.next_sweep.get_or_insert(now + SWEEP_INTERVAL);
        reply.success_with(out, |w| {
            xor_address_attribute(w, turn_attr::XOR_RELAYED_ADDRESS, relay, reply.tid);
            w.attribute(
                turn_attr::LIFETIME,
                &(lifetime.as_secs() as u32).to_be_bytes(),
            );
            if let Some(token) = new_token {
                w.attribute(turn_attr::RESERVATION_TOKEN, &token);
            }
            w.xor_mapped_address(client.addr);
        });
        RequestOutcome::Ok
    }

    /// A reservation token nobody can guess from the ones before it.
    fn next_token(&mut self) -> [u8; 8] {
        use hmac::{Hmac, Mac};
        self.tid_counter = self.tid_counter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.token_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(&self.tid_counter.to_be_bytes());
        let tag = mac.finalize().into_bytes();
        let mut token = [0u8; 8];
        token.copy_from_slice(&tag[..8]);
        token
    }

    fn grant_lifetime(&self, requested: Option<u32>) -> Duration {
        let requested = requested
            .map(|s| Duration::from_secs(u64::from(s)))
            .unwrap_or(self.config.default_lifetime);
        requested.clamp(self.config.default_lifetime, self.config.max_lifetime)
    }

    fn refresh(
        &mut self,
        now: Instant,
        existing: Option<usize>,
        reply: &Reply,
        message: &Message<'_>,
        sockets: &mut dyn RelaySockets,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let Some(index) = existing else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        let requested = message
            .attributes()
            .flatten()
            .find(|a| a.ty == turn_attr::LIFETIME)
            .and_then(|a| read_u32(a.value));
        if requested == Some(0) {
            self.remove(index, sockets);
            reply.success_with(out, |w| {
                w.attribute(turn_attr::LIFETIME, &0u32.to_be_bytes());
            });
            return RequestOutcome::Ok;
        }
        let lifetime = match requested {
            Some(secs) => Duration::from_secs(u64::from(secs)).min(self.config.max_lifetime),
            None => self.config.default_lifetime,
        };
        if let Some(allocation) = self.slots[index].as_mut() {
            allocation.expires = now + lifetime;
        }
        self.sync_fast_path_of(index, now);
        reply.success_with(out, |w| {
            w.attribute(
                turn_attr::LIFETIME,
                &(lifetime.as_secs() as u32).to_be_bytes(),
            );
        });
        RequestOutcome::Ok
    }

    /// Checks a peer address against the allocation's family and the policy.
    fn check_peer(&self, relay: SocketAddr, peer: SocketAddr) -> Result<(), PeerRefusal> {
        let peer_ip = peer.ip().to_canonical();
        if peer_ip.is_ipv4() != relay.is_ipv4() {
            return Err(PeerRefusal::Family);
        }
        self.policy
            .check(peer.ip())
            .map_err(|_| PeerRefusal::Denied)
    }

    /// The slot and relay address of an existing allocation.
    fn relay_of(&self, existing: Option<usize>) -> Option<(usize, SocketAddr)> {
        let index = existing?;
        Some((index, self.slots.get(index)?.as_ref()?.relay))
    }

    fn create_permission(
        &mut self,
        now: Instant,
        existing: Option<usize>,
        reply: &Reply,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let Some((index, relay)) = self.relay_of(existing) else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        // All or nothing: every peer is checked before any permission is installed.
        let mut peers = [None; 8];
        let mut count = 0;
        for attribute in message.attributes().flatten() {
            if attribute.ty != turn_attr::XOR_PEER_ADDRESS {
                continue;
            }
            let Some(peer) = stun::decode_xor_address(attribute.value, reply.tid) else {
                reply.error(out, 400, "Bad Request");
                return RequestOutcome::BadRequest;
            };
            if let Err(refusal) = self.check_peer(relay, peer) {
                return refusal.answer(reply, out);
            }
            if count == peers.len() {
                reply.error(out, 508, "Insufficient Capacity");
                return RequestOutcome::Capacity;
            }
            peers[count] = Some(peer.ip().to_canonical());
            count += 1;
        }
        if count == 0 {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let lifetime = self.config.permission_lifetime;
        let max = self.config.max_permissions;
        let Some(allocation) = self.slots[index].as_mut() else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        let new = peers
            .iter()
            .flatten()
            .filter(|ip| !allocation.permissions.iter().any(|p| p.ip == **ip))
            .count();
        let live = allocation
            .permissions
            .iter()
            .filter(|p| p.expires > now)
            .count();
        if live + new > max {
            reply.error(out, 508, "Insufficient Capacity");
            return RequestOutcome::Capacity;
        }
        allocation.permissions.retain(|p| p.expires > now);
        for ip in peers.iter().flatten() {
            install_permission(allocation, *ip, now + lifetime);
        }
        self.sync_fast_path_of(index, now);
        reply.success_with(out, |_| {});
        RequestOutcome::Ok
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        existing: Option<usize>,
        reply: &Reply,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let Some((index, relay)) = self.relay_of(existing) else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        let mut number = None;
        let mut peer = None;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                turn_attr::CHANNEL_NUMBER => {
                    number = attribute
                        .value
                        .get(..2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]));
                }
                turn_attr::XOR_PEER_ADDRESS => {
                    peer = stun::decode_xor_address(attribute.value, reply.tid);
                }
                _ => {}
            }
        }
        let (Some(number), Some(peer)) = (number, peer) else {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if let Err(refusal) = self.check_peer(relay, peer) {
            return refusal.answer(reply, out);
        }
        let channel_lifetime = self.config.channel_lifetime;
        let permission_lifetime = self.config.permission_lifetime;
        let max_channels = self.config.max_channels;
        let max_permissions = self.config.max_permissions;
        let Some(allocation) = self.slots[index].as_mut() else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        // The number must not be bound to another peer, nor the peer to another number.
        let conflict = allocation
            .channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer));
        if conflict {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let rebinding = allocation.channels.iter().any(|c| c.number == number);
        let needs_permission = !allocation.permissions.iter().any(|p| p.ip == peer.ip());
        if (!rebinding && allocation.channels.len() >= max_channels)
            || (needs_permission && allocation.permissions.len() >= max_permissions)
        {
            reply.error(out, 508, "Insufficient Capacity");
            return RequestOutcome::Capacity;
        }
        match allocation.channels.iter_mut().find(|c| c.number == number) {
            Some(channel) => channel.expires = now + channel_lifetime,
            None => allocation.channels.push(Channel {
                number,
                peer,
                expires: now + channel_lifetime,
                fast: None,
            }),
        }
        install_permission(allocation, peer.ip(), now + permission_lifetime);
        self.sync_fast_path_of(index, now);
        reply.success_with(out, |_| {});
        RequestOutcome::Ok
    }

    fn send_indication<'a>(
        &mut self,
        now: Instant,
        client: ClientAddr,
        message: &Message<'a>,
    ) -> Handled<'a> {
        let Some(index) = self.by_client.get(&client).copied() else {
            return Handled::Dropped(DropReason::NoAllocation);
        };
        let tid = message.transaction_id();
        let mut peer = None;
        let mut data = None;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                turn_attr::XOR_PEER_ADDRESS => {
                    peer = stun::decode_xor_address(attribute.value, tid)
                }
                turn_attr::DATA => data = Some(attribute.value),
                _ => {}
            }
        }
        let (Some(peer), Some(data)) = (peer, data) else {
            return Handled::Dropped(DropReason::Malformed);
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        match self.outbound(now, index, peer, data.len()) {
            Ok(relay) => Handled::Relay { relay, peer, data },
            Err(reason) => Handled::Dropped(reason),
        }
    }

    /// The checks every client-to-peer packet passes: permission, policy, bandwidth.
    fn outbound(
        &mut self,
        now: Instant,
        index: usize,
        peer: SocketAddr,
        len: usize,
    ) -> Result<SocketAddr, DropReason> {
        if self.policy.check(peer.ip()).is_err() {
            return Err(DropReason::DeniedPeer);
        }
        let rate = self.config.bandwidth_bytes_per_second;
        let allocation = self
            .slots
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(DropReason::NoAllocation)?;
        if !allocation.permitted(peer.ip(), now) {
            return Err(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut allocation.bucket, rate, now, len) {
            return Err(DropReason::Bandwidth);
        }
        Ok(allocation.relay)
    }

    /// ChannelData from `client` on `channel` carrying `len` bytes: where to send it
    /// (the relay socket and the peer), or why not.
    pub fn channel_data_from_client(
        &mut self,
        now: Instant,
        client: impl Into<ClientAddr>,
        channel: u16,
        len: usize,
    ) -> Result<(SocketAddr, SocketAddr), DropReason> {
        let client = client.into();
        let index = *self
            .by_client
            .get(&client)
            .ok_or(DropReason::NoAllocation)?;
        let peer = self
            .slots
            .get(index)
            .and_then(Option::as_ref)
            .and_then(|a| {
                a.channels
                    .iter()
                    .find(|c| c.number == channel && c.expires > now)
            })
            .map(|c| c.peer)
            .ok_or(DropReason::NoChannel)?;
        let relay = self.outbound(now, index, peer, len)?;
        Ok((relay, peer))
    }

    /// A datagram of `len` bytes from `peer` arrived at the relay address `relay`:
    /// whether and how it goes to the client.
    pub fn data_from_peer(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        len: usize,
    ) -> Result<ToClient, DropReason> {
        let index = *self.by_relay.get(&relay).ok_or(DropReason::NoAllocation)?;
        let rate = self.config.bandwidth_bytes_per_second;
        let allocation = self
            .slots
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(DropReason::NoAllocation)?;
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if !allocation.permitted(peer.ip(), now) {
            return Err(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut allocation.bucket, rate, now, len) {
            return Err(DropReason::Bandwidth);
        }
        Ok(ToClient {
            client: allocation.client,
            local: allocation.local,
            channel: allocation.channel_to(peer, now),
        })
    }

    /// Writes a Data indication carrying `data` from `peer` into `out` (cleared first).
    pub fn data_indication(&mut self, peer: SocketAddr, data: &[u8], out: &mut Vec<u8>) {
        // Indications need unique-enough transaction ids, not secret ones.
        self.tid_counter = self.tid_counter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.tid_counter.to_be_bytes());
        super::data_indication(tid, peer, data, out);
    }
}

enum PeerRefusal {
    Family,
    Denied,
}

impl PeerRefusal {
    /// The error answer for a refused peer: 443 for a family mismatch, 403 for policy.
    fn answer(self, reply: &Reply, out: &mut Vec<u8>) -> RequestOutcome {
        match self {
            Self::Family => {
                reply.error(out, 443, "Peer Address Family Mismatch");
                RequestOutcome::Family
            }
            Self::Denied => {
                reply.error(out, 403, "Forbidden");
                RequestOutcome::Forbidden
            }
        }
    }
}

/// The fast-path view of `channel` of the allocation in slot `index`.
fn fast_channel(allocation: &Allocation, index: usize, channel: &Channel) -> FastChannel {
    FastChannel {
        allocation: index as u32,
        client: allocation.client.addr,
        service: allocation
            .local
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        channel: channel.number,
        relay: allocation.relay,
        peer: channel.peer,
        expires: channel.fast.unwrap_or(channel.expires),
    }
}

/// Emits the Install and Remove instructions that make the fast-path entries of
/// `allocation` (in slot `index`) match its channels and permissions at `now`.
/// `allowed`: the relay allows the fast path at all (see
/// [`TurnServer::fast_path_allowed`]).
fn sync_fast_path(
    allocation: &mut Allocation,
    index: usize,
    now: Instant,
    allowed: bool,
    policy: &PeerPolicy,
    out: &mut Vec<FastPath>,
) {
    // Only UDP clients whose gateway address is known, and allocation ids that fit.
    let eligible = allowed
        && allocation.client.transport == Transport::Udp
        && allocation.local.is_some()
        && u32::try_from(index).is_ok()
        && allocation.expires > now;
    for i in 0..allocation.channels.len() {
        let channel = &allocation.channels[i];
        let permission = allocation
            .permissions
            .iter()
            .find(|p| p.ip == channel.peer.ip().to_canonical() && p.expires > now)
            .map(|p| p.expires);
        let wanted = match permission {
            Some(permission)
                if eligible && channel.expires > now && policy.check(channel.peer.ip()).is_ok() =>
            {
                Some(channel.expires.min(permission).min(allocation.expires))
            }
            _ => None,
        };
        if wanted == channel.fast {
            continue;
        }
        let removed = channel.fast.is_some() && wanted.is_none();
        if removed {
            out.push(FastPath::Remove(fast_channel(allocation, index, channel)));
        }
        allocation.channels[i].fast = wanted;
        if wanted.is_some() {
            let channel = &allocation.channels[i];
            out.push(FastPath::Install(fast_channel(allocation, index, channel)));
        }
    }
}

fn install_permission(allocation: &mut Allocation, ip: IpAddr, expires: Instant) {
    let ip = ip.to_canonical();
    match allocation.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(permission) => permission.expires = expires,
        None => allocation.permissions.push(Permission { ip, expires }),
    }
}

fn take_bandwidth(bucket: &mut TokenBucket, rate: u64, now: Instant, len: usize) -> bool {
    if rate == 0 {
        return true;
    }
    let elapsed = now.saturating_duration_since(bucket.last);
    let refill =
        (elapsed.as_nanos().min(u128::from(u64::MAX)) as u64).saturating_mul(rate) / 1_000_000_000;
    if refill > 0 {
        bucket.tokens = bucket.tokens.saturating_add(refill).min(rate);
        bucket.last = now;
    }
    let len = len as u64;
    if bucket.tokens >= len {
        bucket.tokens -= len;
        true
    } else {
        false
    }
}

fn read_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

fn understood(ty: u16) -> bool {
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

fn unauthenticated_error(
    out: &mut Vec<u8>,
    method_number: u16,
    tid: [u8; 12],
    code: u16,
    reason: &str,
    fingerprint: bool,
) {
    out.clear();
    let mut writer = MessageWriter::new(
        out,
        MessageType {
            method: method_number,
            class: Class::Error,
        },
        tid,
    );
    writer.error_code(code, reason);
    if fingerprint {
        writer.finish_with_fingerprint();
    }
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
