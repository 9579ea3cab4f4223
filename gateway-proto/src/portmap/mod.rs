//! Asking the NAT for a hole: a port-mapping client for PCP (RFC 6887) and NAT-PMP
//! (RFC 6886). A granted mapping is endpoint-independent in both mapping and
//! filtering, so a peer behind a random-port NAT becomes directly reachable at the
//! mapped endpoint.
//!
//! [`PortMapClient`] probes the default router in both protocols at once with
//! requests that change nothing (PCP ANNOUNCE, NAT-PMP's external address), then
//! asks for the mapping in the first protocol that answered, so a router speaking
//! both does not end up with two mappings. It refreshes the mapping at half its
//! lifetime, notices a router that lost it (a refresh refused or unanswered, an epoch
//! that went back), and deletes it on [`PortMapClient::close`]. Every wait is
//! bounded: a router that never answers costs [`ATTEMPTS`] datagrams per protocol
//! over 3.75 seconds, then one [`PortMapEvent::Unavailable`]. UPnP-IGD (HTTP and
//! SOAP) is the driver's; its result joins through
//! [`PortMapClient::handle_upnp_mapping`].
//!
//! One shape as every machine: `handle_*(now, ...)` in; `poll_transmit`,
//! `poll_event`, `poll_timeout` out.
pub mod wire;

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use crate::Transmit;
pub use wire::MappedTransport;
use wire::{RouterAnswer, SERVER_PORT};

/// Transmissions of one request before a protocol counts as unanswered.
pub const ATTEMPTS: u32 = 4;
/// The first retransmission timeout (RFC 6886 §3.1: 250 ms, doubled each time).
pub const INITIAL_RTO: Duration = Duration::from_millis(250);
/// The lifetime asked for (RFC 6886 §3.3 recommends two hours).
pub const REQUESTED_LIFETIME: Duration = Duration::from_secs(7200);
/// Shortest interval between refreshes, whatever lifetime the router grants.
const MIN_REFRESH: Duration = Duration::from_secs(5);

/// A protocol that can grant a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappingProtocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// UPnP Internet Gateway Device (WANIPConnection), run by the driver.
    Upnp,
}

impl MappingProtocol {
    /// Lower-case name for status lines and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pcp => "pcp",
            Self::NatPmp => "nat-pmp",
            Self::Upnp => "upnp",
        }
    }
}

/// A mapping the router granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Which protocol granted it.
    pub protocol: MappingProtocol,
    /// The public endpoint that reaches the internal port.
    pub external: SocketAddr,
    /// How long it lasts from when it was granted.
    pub lifetime: Duration,
}

/// Why a protocol gave no mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolOutcome {
    /// No answer after [`ATTEMPTS`] transmissions.
    NoAnswer,
    /// The router speaks the other protocol (or another version).
    UnsupportedVersion,
    /// The router refused, with its result code and the code in words.
    Refused {
        /// The result code.
        code: u16,
        /// The code in words.
        text: &'static str,
    },
    /// The router granted a mapping for another internal port or transport, or an
    /// unusable external address (0.0.0.0).
    Unusable,
    /// The driver's protocol (UPnP-IGD) failed, in its words.
    Error(String),
}

impl std::fmt::Display for ProtocolOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoAnswer => f.write_str("no answer"),
            Self::UnsupportedVersion => f.write_str("not spoken by the router"),
            Self::Refused { code, text } => write!(f, "refused ({code}: {text})"),
            Self::Unusable => f.write_str("granted an unusable mapping"),
            Self::Error(e) => f.write_str(e),
        }
    }
}

/// What the client reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMapEvent {
    /// A mapping was granted (the first one, or a new one after a loss).
    Mapped(Mapping),
    /// A refresh kept the mapping; the external endpoint may have changed.
    Refreshed(Mapping),
    /// No protocol gave a mapping; each one's outcome.
    Unavailable(Vec<(MappingProtocol, ProtocolOutcome)>),
    /// A mapping held before is gone (refresh refused or unanswered, router
    /// rebooted and did not grant it again); the client asks again from scratch
    /// once, and reports [`PortMapEvent::Mapped`] or [`PortMapEvent::Unavailable`].
    Lost {
        /// The mapping that was lost.
        mapping: Mapping,
        /// Why.
        outcome: ProtocolOutcome,
    },
    /// The mapping was deleted at [`PortMapClient::close`] (or there was none).
    Closed,
}

/// What to map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapConfig {
    /// The default router (where NAT-PMP and PCP servers listen).
    pub router: IpAddr,
    /// This host's address toward the router (PCP's client address).
    pub client: IpAddr,
    /// The local port to map.
    pub internal_port: u16,
    /// UDP or TCP.
    pub transport: MappedTransport,
    /// Lifetime to ask for.
    pub lifetime: Duration,
}

impl PortMapConfig {
    /// A UDP mapping of `internal_port` on `client`, asked of `router`, for
    /// [`REQUESTED_LIFETIME`].
    pub fn udp(router: IpAddr, client: IpAddr, internal_port: u16) -> Self {
        Self {
            router,
            client,
            internal_port,
            transport: MappedTransport::Udp,
            lifetime: REQUESTED_LIFETIME,
        }
    }
}

/// One protocol's outstanding request.
#[derive(Clone, Debug)]
struct Pending {
    sent: u32,
    next: Instant,
}

impl Pending {
    fn new(now: Instant) -> Self {
        Self { sent: 0, next: now }
    }
}

/// Where one native protocol (PCP or NAT-PMP) stands.
#[derive(Clone, Debug, Default)]
struct Attempt {
    /// The request in flight (`None`: not asking now).
    pending: Option<Pending>,
    /// Why it gave nothing (set when it finished without a mapping).
    outcome: Option<ProtocolOutcome>,
}

/// NAT-PMP needs the external address (opcode 0) and the port (MAP) separately.
#[derive(Clone, Copy, Debug, Default)]
struct NatPmpParts {
    address: Option<Ipv4Addr>,
    port: Option<(u16, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Probing every protocol (nothing asked of the router yet).
    Probing,
    /// Asking for the mapping in the protocol that answered the probe first.
    Mapping(MappingProtocol),
    /// A mapping is held; refreshing it when due.
    Mapped,
    /// Nothing granted; idle until `retry` (driven by the agent).
    Idle,
    /// Deleting at close.
    Closing,
    /// Done.
    Closed,
}

/// The port-mapping client (see the module documentation).
#[derive(Debug)]
pub struct PortMapClient {
    config: PortMapConfig,
    nonce: [u8; 12],
    phase: Phase,
    pcp: Attempt,
    nat_pmp: Attempt,
    nat_pmp_parts: NatPmpParts,
    /// Whether the driver's UPnP attempt is still out (it reports through
    /// `handle_upnp_mapping`).
    upnp_outstanding: bool,
    upnp_outcome: Option<ProtocolOutcome>,
    mapping: Option<Mapping>,
    /// The mapping being deleted at close (its external endpoint is named in the
    /// delete request).
    deleting: Option<Mapping>,
    /// When the held mapping is refreshed.
    refresh_at: Option<Instant>,
    /// The router epoch seen last and when (RFC 6886 §3.6: a smaller one than
    /// expected means the router lost its mappings).
    epoch: Option<(u32, Instant)>,
    /// Whether the current ask follows a loss (so its outcome is reported as such).
    lost: Option<Mapping>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PortMapEvent>,
}

impl PortMapClient {
    /// Starts asking `config.router` in PCP and NAT-PMP at `now`; `nonce` names the
    /// PCP mapping (random, kept for refreshes and the delete); `upnp` says whether
    /// the driver also tries UPnP-IGD (then the client waits for its report before
    /// declaring nothing available).
    pub fn new(now: Instant, config: PortMapConfig, nonce: [u8; 12], upnp: bool) -> Self {
        let mut client = Self {
            config,
            nonce,
            phase: Phase::Probing,
            pcp: Attempt::default(),
            nat_pmp: Attempt::default(),
            nat_pmp_parts: NatPmpParts::default(),
            upnp_outstanding: upnp,
            upnp_outcome: None,
            mapping: None,
            deleting: None,
            refresh_at: None,
            epoch: None,
            lost: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        client.ask(now);
        client
    }

    /// The mapping held now, if any.
    pub fn mapping(&self) -> Option<Mapping> {
        self.mapping
    }

    fn router(&self) -> SocketAddr {
        SocketAddr::new(self.config.router, SERVER_PORT)
    }

    fn ask(&mut self, now: Instant) {
        self.phase = Phase::Probing;
        self.pcp = Attempt {
            pending: Some(Pending::new(now)),
            outcome: None,
        };
        self.nat_pmp = Attempt {
            pending: Some(Pending::new(now)),
            outcome: None,
        };
        self.nat_pmp_parts = NatPmpParts::default();
        self.send_due(now);
    }

    fn lifetime_secs(&self) -> u32 {
        u32::try_from(self.config.lifetime.as_secs()).unwrap_or(u32::MAX)
    }

    fn pcp_request(&self, lifetime_secs: u32) -> Vec<u8> {
        let suggested = self
            .mapping
            .or(self.deleting)
            .filter(|m| m.protocol == MappingProtocol::Pcp)
            .map(|m| m.external);
        wire::pcp_map_request(
            self.nonce,
            self.config.client,
            self.config.transport,
            self.config.internal_port,
            suggested,
            lifetime_secs,
        )
        .to_vec()
    }

    fn nat_pmp_requests(&self, lifetime_secs: u32) -> Vec<Vec<u8>> {
        let suggested = self
            .mapping
            .filter(|m| m.protocol == MappingProtocol::NatPmp)
            .map_or(self.config.internal_port, |m| m.external.port());
        let mut out = Vec::with_capacity(2);
        if self.nat_pmp_parts.address.is_none() && lifetime_secs > 0 {
            out.push(wire::nat_pmp_external_address_request().to_vec());
        }
        if self.nat_pmp_parts.port.is_none() {
            out.push(
                wire::nat_pmp_map_request(
                    self.config.transport,
                    self.config.internal_port,
                    if lifetime_secs == 0 { 0 } else { suggested },
                    lifetime_secs,
                )
                .to_vec(),
            );
        }
        out
    }

    /// Sends what is due in each protocol and gives up on those out of attempts.
    fn send_due(&mut self, now: Instant) {
        let router = self.router();
        let lifetime = if self.phase == Phase::Closing {
            0
        } else {
            self.lifetime_secs()
        };
        for protocol in [MappingProtocol::Pcp, MappingProtocol::NatPmp] {
            let attempt = match protocol {
                MappingProtocol::Pcp => &self.pcp,
                _ => &self.nat_pmp,
            };
            let Some(pending) = attempt.pending.clone() else {
                continue;
            };
            if pending.next > now {
                continue;
            }
            if pending.sent >= ATTEMPTS {
                self.finish(now, protocol, ProtocolOutcome::NoAnswer);
                continue;
            }
            let payloads = match (self.phase, protocol) {
                (Phase::Probing, MappingProtocol::Pcp) => {
                    vec![wire::pcp_announce_request(self.config.client).to_vec()]
                }
                (Phase::Probing, _) => vec![wire::nat_pmp_external_address_request().to_vec()],
                (_, MappingProtocol::Pcp) => vec![self.pcp_request(lifetime)],
                _ => self.nat_pmp_requests(lifetime),
            };
            for payload in payloads {
                self.transmits.push_back(Transmit::udp(router, payload));
            }
            let rto = INITIAL_RTO * 2u32.saturating_pow(pending.sent);
            let attempt = match protocol {
                MappingProtocol::Pcp => &mut self.pcp,
                _ => &mut self.nat_pmp,
            };
            attempt.pending = Some(Pending {
                sent: pending.sent + 1,
                next: now + rto,
            });
        }
        self.settle(now);
    }

    /// A protocol finished without a mapping.
    fn finish(&mut self, now: Instant, protocol: MappingProtocol, outcome: ProtocolOutcome) {
        let attempt = match protocol {
            MappingProtocol::Pcp => &mut self.pcp,
            MappingProtocol::NatPmp => &mut self.nat_pmp,
            MappingProtocol::Upnp => {
                self.upnp_outstanding = false;
                self.upnp_outcome = Some(outcome);
                self.settle(now);
                return;
            }
        };
        attempt.pending = None;
        attempt.outcome = Some(outcome);
        self.settle(now);
    }

    /// After any change: report a loss or unavailability once nothing is pending.
    fn settle(&mut self, _now: Instant) {
        match self.phase {
            Phase::Probing | Phase::Mapping(_) => {
                if self.pcp.pending.is_some()
                    || self.nat_pmp.pending.is_some()
                    || self.upnp_outstanding
                {
                    return;
                }
                let outcomes = [
                    (MappingProtocol::Pcp, self.pcp.outcome.clone()),
                    (MappingProtocol::NatPmp, self.nat_pmp.outcome.clone()),
                    (MappingProtocol::Upnp, self.upnp_outcome.clone()),
                ]
                .into_iter()
                .filter_map(|(p, o)| Some((p, o?)))
                .collect();
                self.phase = Phase::Idle;
                self.events.push_back(PortMapEvent::Unavailable(outcomes));
            }
            Phase::Closing => {
                if self.pcp.pending.is_none() && self.nat_pmp.pending.is_none() {
                    self.phase = Phase::Closed;
                    self.events.push_back(PortMapEvent::Closed);
                }
            }
            Phase::Mapped | Phase::Idle | Phase::Closed => {}
        }
    }

    /// The first protocol that answered the probe: ask it for the mapping, and stop
    /// probing the other.
    fn choose(&mut self, now: Instant, protocol: MappingProtocol) {
        self.phase = Phase::Mapping(protocol);
        match protocol {
            MappingProtocol::Pcp => {
                self.nat_pmp.pending = None;
                self.pcp.pending = Some(Pending::new(now));
            }
            _ => {
                self.pcp.pending = None;
                self.nat_pmp_parts.port = None;
                self.nat_pmp.pending = Some(Pending::new(now));
            }
        }
        self.send_due(now);
    }

    fn granted(&mut self, now: Instant, mapping: Mapping) {
        let was = self.mapping;
        let refresh = (mapping.lifetime / 2).max(MIN_REFRESH);
        self.mapping = Some(mapping);
        self.refresh_at = Some(now + refresh);
        // The other protocols stop: the first grant wins.
        self.pcp.pending = None;
        self.nat_pmp.pending = None;
        let refreshed = self.phase == Phase::Mapped;
        self.phase = Phase::Mapped;
        self.lost = None;
        if refreshed && was.is_some_and(|w| w.protocol == mapping.protocol) {
            self.events.push_back(PortMapEvent::Refreshed(mapping));
        } else {
            self.events.push_back(PortMapEvent::Mapped(mapping));
        }
    }

    /// A mapping held was refused or went unanswered on refresh: report and ask again
    /// from scratch, once.
    fn lose(&mut self, now: Instant, outcome: ProtocolOutcome) {
        let Some(mapping) = self.mapping.take() else {
            return;
        };
        self.refresh_at = None;
        self.events
            .push_back(PortMapEvent::Lost { mapping, outcome });
        if self.lost.is_none() {
            self.lost = Some(mapping);
            self.ask(now);
        } else {
            self.phase = Phase::Idle;
        }
    }

    /// Notes the router's epoch; `true` when it went back (the router restarted and
    /// lost its mappings).
    fn epoch_went_back(&mut self, now: Instant, epoch: u32) -> bool {
        let back = self.epoch.is_some_and(|(seen, at)| {
            // RFC 6886 §3.6: expected ≈ seen + 7/8 of the elapsed seconds, minus 2.
            let elapsed = now.saturating_duration_since(at).as_secs();
            let expected = u64::from(seen) + elapsed * 7 / 8;
            u64::from(epoch) + 2 < expected
        });
        self.epoch = Some((epoch, now));
        back
    }

    /// A datagram that arrived on the mapped socket; `true` when it was the router's
    /// answer (the caller drops it), `false` for anything else.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> bool {
        if from != self.router() {
            return false;
        }
        let Some(answer) = wire::parse_answer(bytes) else {
            return false;
        };
        let probing = self.phase == Phase::Probing;
        match answer {
            RouterAnswer::NatPmpUnsupportedVersion => {
                if probing && self.pcp.pending.is_some() {
                    self.finish(
                        now,
                        MappingProtocol::Pcp,
                        ProtocolOutcome::UnsupportedVersion,
                    );
                }
            }
            RouterAnswer::PcpError { result, .. } => {
                if u16::from(result) == wire::UNSUPPORTED_VERSION {
                    if probing && self.nat_pmp.pending.is_some() {
                        self.finish(
                            now,
                            MappingProtocol::NatPmp,
                            ProtocolOutcome::UnsupportedVersion,
                        );
                    }
                } else if !probing && self.pcp.pending.is_some() {
                    self.pcp_refused(now, u16::from(result));
                }
            }
            RouterAnswer::PcpAnnounce { result, epoch } => {
                if !probing || self.pcp.pending.is_none() {
                    return true;
                }
                self.epoch_went_back(now, epoch);
                match u16::from(result) {
                    0 => self.choose(now, MappingProtocol::Pcp),
                    wire::UNSUPPORTED_VERSION => {
                        self.finish(
                            now,
                            MappingProtocol::Pcp,
                            ProtocolOutcome::UnsupportedVersion,
                        );
                    }
                    code => self.pcp_refused(now, code),
                }
            }
            RouterAnswer::PcpMap {
                result,
                lifetime_secs,
                epoch,
                nonce,
                transport,
                internal_port,
                external,
            } => {
                if nonce != self.nonce || probing || self.pcp.pending.is_none() {
                    return true;
                }
                // A restart seen through the epoch needs nothing more than this
                // answer: the request it answers re-creates the mapping.
                self.epoch_went_back(now, epoch);
                if self.phase == Phase::Closing {
                    self.pcp.pending = None;
                    self.settle(now);
                    return true;
                }
                if result != 0 {
                    self.pcp_refused(now, u16::from(result));
                    return true;
                }
                if transport != Some(self.config.transport)
                    || internal_port != self.config.internal_port
                    || external.ip().is_unspecified()
                    || external.port() == 0
                {
                    self.finish(now, MappingProtocol::Pcp, ProtocolOutcome::Unusable);
                    return true;
                }
                self.granted(
                    now,
                    Mapping {
                        protocol: MappingProtocol::Pcp,
                        external,
                        lifetime: Duration::from_secs(u64::from(lifetime_secs)),
                    },
                );
            }
            RouterAnswer::NatPmpExternalAddress {
                result,
                epoch,
                address,
            } => {
                if self.nat_pmp.pending.is_none() {
                    return true;
                }
                self.epoch_went_back(now, epoch);
                if result != 0 {
                    self.nat_pmp_refused(now, result);
                    return true;
                }
                if address.is_unspecified() {
                    self.finish(now, MappingProtocol::NatPmp, ProtocolOutcome::Unusable);
                    return true;
                }
                self.nat_pmp_parts.address = Some(address);
                if probing {
                    self.choose(now, MappingProtocol::NatPmp);
                } else {
                    self.nat_pmp_complete(now);
                }
            }
            RouterAnswer::NatPmpMap {
                transport,
                result,
                epoch,
                internal_port,
                external_port,
                lifetime_secs,
            } => {
                if probing || self.nat_pmp.pending.is_none() || transport != self.config.transport {
                    return true;
                }
                let back = self.epoch_went_back(now, epoch);
                if self.phase == Phase::Closing {
                    self.nat_pmp.pending = None;
                    self.settle(now);
                    return true;
                }
                if result != 0 {
                    self.nat_pmp_refused(now, result);
                    return true;
                }
                if internal_port != self.config.internal_port || external_port == 0 {
                    self.finish(now, MappingProtocol::NatPmp, ProtocolOutcome::Unusable);
                    return true;
                }
                if back {
                    // The router restarted: its external address may have changed too.
                    self.nat_pmp_parts.address = None;
                }
                self.nat_pmp_parts.port = Some((external_port, lifetime_secs));
                self.nat_pmp_complete(now);
            }
        }
        true
    }

    fn pcp_refused(&mut self, now: Instant, code: u16) {
        let outcome = ProtocolOutcome::Refused {
            code,
            text: wire::pcp_result_text(u8::try_from(code).unwrap_or(u8::MAX)),
        };
        self.refused(now, MappingProtocol::Pcp, outcome);
    }

    fn nat_pmp_refused(&mut self, now: Instant, code: u16) {
        let outcome = ProtocolOutcome::Refused {
            code,
            text: wire::nat_pmp_result_text(code),
        };
        self.refused(now, MappingProtocol::NatPmp, outcome);
    }

    fn refused(&mut self, now: Instant, protocol: MappingProtocol, outcome: ProtocolOutcome) {
        if self.phase == Phase::Mapped && self.mapping.is_some_and(|m| m.protocol == protocol) {
            self.lose(now, outcome);
        } else {
            self.finish(now, protocol, outcome);
        }
    }

    fn nat_pmp_complete(&mut self, now: Instant) {
        let (Some(address), Some((port, lifetime))) =
            (self.nat_pmp_parts.address, self.nat_pmp_parts.port)
        else {
            // Still waiting for the other half: resend only what is missing.
            if let Some(pending) = &mut self.nat_pmp.pending {
                pending.next = pending.next.min(now + INITIAL_RTO);
            }
            return;
        };
        self.granted(
            now,
            Mapping {
                protocol: MappingProtocol::NatPmp,
                external: SocketAddr::new(IpAddr::V4(address), port),
                lifetime: Duration::from_secs(u64::from(lifetime)),
            },
        );
    }

    /// The driver's UPnP-IGD attempt ended: a mapping, or why not. Returns whether
    /// the client took the mapping: `false` when PCP or NAT-PMP answered first (the
    /// driver then deletes its UPnP mapping, so the router keeps one).
    pub fn handle_upnp_mapping(
        &mut self,
        now: Instant,
        result: Result<Mapping, ProtocolOutcome>,
    ) -> bool {
        if !self.upnp_outstanding {
            return false;
        }
        self.upnp_outstanding = false;
        match result {
            // Probes change nothing at the router, so UPnP may win over them; a
            // native MAP in flight may create a mapping, so UPnP waits for its fate.
            Ok(mapping)
                if self.phase == Phase::Probing
                    || (matches!(self.phase, Phase::Mapping(_))
                        && self.pcp.pending.is_none()
                        && self.nat_pmp.pending.is_none()) =>
            {
                self.pcp.pending = None;
                self.nat_pmp.pending = None;
                self.granted(now, mapping);
                true
            }
            Ok(_) => false,
            Err(outcome) => {
                self.upnp_outcome = Some(outcome);
                self.settle(now);
                false
            }
        }
    }

    /// The driver's renewal of the UPnP-IGD lease it holds for this client ended:
    /// kept ([`PortMapEvent::Refreshed`]), or failed, which loses the mapping like
    /// an unanswered PCP or NAT-PMP refresh ([`PortMapEvent::Lost`], then one ask
    /// from scratch), so the agent stops announcing an endpoint that may be gone.
    /// Ignored unless the mapping held is a UPnP one.
    pub fn handle_upnp_renewal(&mut self, now: Instant, result: Result<Mapping, ProtocolOutcome>) {
        if self.phase != Phase::Mapped
            || self
                .mapping
                .is_none_or(|m| m.protocol != MappingProtocol::Upnp)
        {
            return;
        }
        match result {
            Ok(mapping) if mapping.protocol == MappingProtocol::Upnp => self.granted(now, mapping),
            Ok(_) => {}
            Err(outcome) => self.lose(now, outcome),
        }
    }

    /// Asks again from scratch (e.g. after the agent's network changed, or a while
    /// after [`PortMapEvent::Unavailable`]); `upnp` as in [`PortMapClient::new`].
    pub fn retry(&mut self, now: Instant, upnp: bool) {
        if matches!(self.phase, Phase::Closing | Phase::Closed) {
            return;
        }
        self.mapping = None;
        self.refresh_at = None;
        self.upnp_outstanding = upnp;
        self.upnp_outcome = None;
        self.lost = None;
        self.ask(now);
    }

    /// Deletes the mapping (a request with lifetime 0, bounded retries); reports
    /// [`PortMapEvent::Closed`] when answered or given up. UPnP mappings are the
    /// driver's to delete.
    pub fn close(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Closing | Phase::Closed) {
            return;
        }
        let held = self.mapping.take();
        self.deleting = held;
        self.refresh_at = None;
        self.upnp_outstanding = false;
        self.pcp.pending = None;
        self.nat_pmp.pending = None;
        self.phase = Phase::Closing;
        match held.map(|m| m.protocol) {
            Some(MappingProtocol::Pcp) => self.pcp.pending = Some(Pending::new(now)),
            Some(MappingProtocol::NatPmp) => {
                self.nat_pmp_parts = NatPmpParts {
                    address: self.nat_pmp_parts.address,
                    port: None,
                };
                self.nat_pmp.pending = Some(Pending::new(now));
            }
            _ => {}
        }
        self.send_due(now);
        self.settle(now);
    }

    /// Timers: retransmissions, give-ups and refreshes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Mapped
            && let Some(at) = self.refresh_at
            && at <= now
        {
            self.refresh_at = None;
            match self.mapping.map(|m| m.protocol) {
                Some(MappingProtocol::Pcp) => self.pcp.pending = Some(Pending::new(now)),
                Some(MappingProtocol::NatPmp) => {
                    self.nat_pmp_parts.port = None;
                    self.nat_pmp.pending = Some(Pending::new(now));
                }
                // UPnP leases are the driver's to renew.
                _ => {}
            }
        }
        // A refresh that goes unanswered loses the mapping.
        if self.phase == Phase::Mapped {
            for protocol in [MappingProtocol::Pcp, MappingProtocol::NatPmp] {
                let attempt = match protocol {
                    MappingProtocol::Pcp => &self.pcp,
                    _ => &self.nat_pmp,
                };
                if attempt
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.sent >= ATTEMPTS && p.next <= now)
                {
                    match protocol {
                        MappingProtocol::Pcp => self.pcp.pending = None,
                        _ => self.nat_pmp.pending = None,
                    }
                    self.lose(now, ProtocolOutcome::NoAnswer);
                    return;
                }
            }
        }
        self.send_due(now);
    }

    /// The next datagram to send (from the mapped socket, to the router).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PortMapEvent> {
        self.events.pop_front()
    }

    /// When [`PortMapClient::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.pcp.pending.as_ref().map(|p| p.next),
            self.nat_pmp.pending.as_ref().map(|p| p.next),
            self.refresh_at.filter(|_| self.phase == Phase::Mapped),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests;
