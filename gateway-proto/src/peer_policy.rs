//! Which peer addresses the relay may send to: the defence against using a public
//! TURN server to reach the operator's internal network (see the SSRF lessons in
//! `../shared/reference/security.md`).
//!
//! An address is first canonicalised: IPv4 embedded in IPv6 (IPv4-mapped,
//! IPv4-compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo `2001::/32`) is
//! judged as the IPv4 address it reaches. NAT64 prefixes are decoded as RFC 6052 lays
//! out the IPv4 address for their length: the operator's own prefixes
//! ([`PeerPolicy::set_nat64_prefixes`]) exactly, and the local-use `64:ff9b:1::/48`
//! of RFC 8215, whose layout depends on the sub-prefix an operator picked, under every
//! layout it can have (/48, /56, /64 and /96): it is refused if any reading is.
//!
//! Then the operator's allowed ranges win (a range may name ports:
//! `127.0.0.1:49152-65535`); otherwise loopback, private, shared (CGNAT), link-local,
//! multicast, documentation, benchmarking and other reserved ranges, the operator's
//! denied ranges and the gateway's own addresses are refused. An allowed range never
//! opens the gateway's own service ports ([`PeerPolicy::protect_ports`]) on an address
//! the defaults would refuse: allowing the relay's own address for client-to-client
//! relaying on one host does not make its STUN, metrics or TCP listeners reachable
//! through the relay.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An address range in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`, or a bare
/// address meaning a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

/// Why a range string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The address part does not parse.
    #[error("`{0}` is not an IP address or CIDR range")]
    BadAddress(String),
    /// The prefix length is not a number or too long for the family.
    #[error("`{0}` has a bad prefix length")]
    BadPrefix(String),
    /// Bits are set below the prefix (`10.0.0.1/8`): almost always a typo.
    #[error("`{0}` has host bits set below its prefix; did you mean the network address?")]
    HostBits(String),
    /// The port part is not `PORT` or `LOW-HIGH` with 1 <= LOW <= HIGH <= 65535.
    #[error("`{0}` has a bad port range (write PORT or LOW-HIGH, e.g. 127.0.0.1:49152-65535)")]
    BadPorts(String),
    /// A NAT64 prefix whose length RFC 6052 does not define.
    #[error(
        "`{0}` is not a NAT64 prefix: RFC 6052 allows /32, /40, /48, /56, /64 and /96 IPv6 prefixes"
    )]
    BadNat64(String),
}

impl IpRange {
    /// A range from a network address and prefix length; `None` when the prefix is too
    /// long for the family or host bits are set.
    pub fn new(network: IpAddr, prefix: u8) -> Option<Self> {
        let max = if network.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        let range = Self { network, prefix };
        (mask(network, prefix) == network).then_some(range)
    }

    /// True when `addr` (same family) is inside the range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.network.is_ipv4() && mask(addr, self.prefix) == self.network
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for IpRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| RangeError::BadAddress(text.to_owned()))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| RangeError::BadPrefix(text.to_owned()))?,
        };
        Self::new(network, prefix).ok_or_else(|| RangeError::HostBits(text.to_owned()))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// An allowed range of peers: addresses, and optionally a port range (`10.0.0.0/8`,
/// `127.0.0.1:49152-65535`, `[::1]:5000`, `[2001:db8::/32]:1000-2000`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRange {
    addresses: IpRange,
    /// Inclusive port range; `None`: every port.
    ports: Option<(u16, u16)>,
}

impl PeerRange {
    /// True when `addr` is inside the address range (any port).
    pub fn contains_ip(&self, addr: IpAddr) -> bool {
        self.addresses.contains(addr)
    }

    /// True when `ip` and `port` are inside the range.
    pub fn contains(&self, ip: IpAddr, port: u16) -> bool {
        self.addresses.contains(ip)
            && self
                .ports
                .is_none_or(|(low, high)| (low..=high).contains(&port))
    }
}

impl From<IpRange> for PeerRange {
    fn from(addresses: IpRange) -> Self {
        Self {
            addresses,
            ports: None,
        }
    }
}

impl FromStr for PeerRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addresses, ports) = if let Some(rest) = text.strip_prefix('[') {
            // [IPv6 or IPv6/len]:ports
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| RangeError::BadAddress(text.to_owned()))?;
            let ports = after
                .strip_prefix(':')
                .ok_or_else(|| RangeError::BadPorts(text.to_owned()))?;
            (inner, Some(ports))
        } else if text.matches(':').count() == 1 {
            // IPv4 (or IPv4/len) with ports.
            let (addresses, ports) = text
                .split_once(':')
                .ok_or_else(|| RangeError::BadAddress(text.to_owned()))?;
            (addresses, Some(ports))
        } else {
            (text, None)
        };
        let addresses: IpRange = addresses.parse().map_err(|e| match e {
            RangeError::BadAddress(_) => RangeError::BadAddress(text.to_owned()),
            RangeError::BadPrefix(_) => RangeError::BadPrefix(text.to_owned()),
            other => other,
        })?;
        let ports = match ports {
            None => None,
            Some(ports) => {
                let bad = || RangeError::BadPorts(text.to_owned());
                let (low, high) = ports.split_once('-').unwrap_or((ports, ports));
                let low: u16 = low.trim().parse().map_err(|_| bad())?;
                let high: u16 = high.trim().parse().map_err(|_| bad())?;
                if low == 0 || low > high {
                    return Err(bad());
                }
                Some((low, high))
            }
        };
        Ok(Self { addresses, ports })
    }
}

impl fmt::Display for PeerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ports {
            None => write!(f, "{}", self.addresses),
            Some((low, high)) if self.addresses.network.is_ipv6() => {
                write!(f, "[{}]:{low}-{high}", self.addresses)
            }
            Some((low, high)) => write!(f, "{}:{low}-{high}", self.addresses),
        }
    }
}

/// Why an address was refused (bounded set, used as a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918, RFC 6598 shared space, fc00::/7 unique local.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8, and 255.255.255.255.
    Multicast,
    /// Unspecified, "this network", documentation, benchmarking, IETF protocol
    /// assignments, 240.0.0.0/4, discard-only and other special-purpose ranges.
    Reserved,
    /// One of the gateway's own addresses.
    Own,
    /// In a range the operator denied.
    Operator,
}

impl DenyReason {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::Multicast => "multicast",
            Self::Reserved => "reserved",
            Self::Own => "own_address",
            Self::Operator => "operator_denied",
        }
    }
}

/// The relay's peer-address policy.
#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    allowed: Vec<PeerRange>,
    denied: Vec<IpRange>,
    own: Vec<IpAddr>,
    /// The gateway's own service ports, never opened by an allowed range.
    protected_ports: Vec<u16>,
    /// The operator's NAT64 prefixes (RFC 6052 lengths only).
    nat64: Vec<IpRange>,
    /// The relay's own port range: on the gateway's own addresses, these ports (its
    /// relayed addresses, never a service port) may be reached, so two clients of
    /// this relay can relay to each other.
    own_relay_ports: Option<std::ops::RangeInclusive<u16>>,
}

/// RFC 6052 §2.2 prefix lengths.
const NAT64_PREFIX_LENGTHS: [u8; 6] = [32, 40, 48, 56, 64, 96];

impl PeerPolicy {
    /// A policy with the operator's allowed and denied ranges and the gateway's own
    /// addresses (all canonicalised).
    pub fn new(allowed: Vec<PeerRange>, denied: Vec<IpRange>, own: Vec<IpAddr>) -> Self {
        Self {
            allowed,
            denied,
            own: own.into_iter().map(canonicalize).collect(),
            protected_ports: Vec::new(),
            nat64: Vec::new(),
            own_relay_ports: None,
        }
    }

    /// Lets the relay reach the gateway's own addresses on `ports` (its relay port
    /// range) and nowhere else there: two clients of this relay that both relay
    /// (e.g. two agents whose sites block UDP, each with an allocation over TCP or
    /// TLS) then reach each other's relayed addresses, as with any TURN server, while
    /// the gateway's service ports stay out of reach. A permission (an address only)
    /// is granted; every datagram is then checked with its port.
    pub fn allow_own_relay_ports(&mut self, ports: std::ops::RangeInclusive<u16>) {
        self.own_relay_ports = Some(ports);
    }

    /// Adds addresses of the gateway itself (e.g. its relay addresses).
    pub fn add_own(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.own.extend(addrs.into_iter().map(canonicalize));
    }

    /// Marks the gateway's own service ports (STUN/TURN, discovery, metrics, TCP):
    /// no allowed range opens them on an address the defaults refuse.
    pub fn protect_ports(&mut self, ports: impl IntoIterator<Item = u16>) {
        self.protected_ports.extend(ports);
        self.protected_ports.sort_unstable();
        self.protected_ports.dedup();
    }

    /// The operator's NAT64 prefixes: an address inside one is judged as the IPv4
    /// address RFC 6052 embeds in it for that prefix length.
    pub fn set_nat64_prefixes(&mut self, prefixes: Vec<IpRange>) -> Result<(), RangeError> {
        if let Some(bad) = prefixes
            .iter()
            .find(|p| p.network.is_ipv4() || !NAT64_PREFIX_LENGTHS.contains(&p.prefix))
        {
            return Err(RangeError::BadNat64(bad.to_string()));
        }
        self.nat64 = prefixes;
        Ok(())
    }

    /// Decides whether the relay may send to `addr` on some port (what a
    /// permission, which RFC 8656 keys by address only, needs).
    pub fn check(&self, addr: IpAddr) -> Result<(), DenyReason> {
        self.judge(addr, None)
    }

    /// Decides whether the relay may send to `peer` (address and port).
    pub fn check_peer(&self, peer: std::net::SocketAddr) -> Result<(), DenyReason> {
        self.judge(peer.ip(), Some(peer.port()))
    }

    fn judge(&self, addr: IpAddr, port: Option<u16>) -> Result<(), DenyReason> {
        let mut readings = [None; MAX_READINGS];
        for (slot, reading) in readings.iter_mut().zip(self.readings(addr)) {
            *slot = Some(reading);
        }
        for reading in readings.into_iter().flatten() {
            self.judge_one(reading, port)?;
        }
        Ok(())
    }

    fn judge_one(&self, addr: IpAddr, port: Option<u16>) -> Result<(), DenyReason> {
        let allowed = self.allowed.iter().any(|r| match port {
            Some(port) => r.contains(addr, port),
            None => r.contains_ip(addr),
        });
        let default = self.default_verdict(addr);
        if default == Err(DenyReason::Own)
            && let Some(relay_ports) = &self.own_relay_ports
        {
            // A relayed address of ours (or a port an allowed range names), never
            // a service port.
            return match port {
                None => Ok(()),
                Some(p)
                    if !self.protected_ports.contains(&p)
                        && (relay_ports.contains(&p) || allowed) =>
                {
                    Ok(())
                }
                Some(_) => Err(DenyReason::Own),
            };
        }
        if allowed {
            // An allowed range opens what the defaults refuse, except the gateway's
            // own service ports there.
            if default.is_err() && port.is_some_and(|p| self.protected_ports.contains(&p)) {
                return Err(DenyReason::Own);
            }
            return Ok(());
        }
        default
    }

    fn default_verdict(&self, addr: IpAddr) -> Result<(), DenyReason> {
        if let Some(reason) = special_purpose(addr) {
            return Err(reason);
        }
        if self.own.contains(&addr) {
            return Err(DenyReason::Own);
        }
        if self.denied.iter().any(|r| r.contains(addr)) {
            return Err(DenyReason::Operator);
        }
        Ok(())
    }

    /// Every address a packet to `addr` may reach: its canonical form, or for NAT64
    /// prefixes the IPv4 address(es) embedded.
    fn readings(&self, addr: IpAddr) -> impl Iterator<Item = IpAddr> + '_ {
        let IpAddr::V6(v6) = addr else {
            return Readings::One(Some(addr));
        };
        if let Some(prefix) = self.nat64.iter().find(|p| p.contains(addr)) {
            return Readings::One(Some(IpAddr::V4(rfc6052_embedded(v6, prefix.prefix))));
        }
        let seg = v6.segments();
        if seg[0] == 0x0064 && seg[1] == 0xff9b && seg[2] == 0x0001 {
            return Readings::LocalUse(v6, 0);
        }
        Readings::One(Some(canonicalize(addr)))
    }
}

/// At most this many readings of one address (the local-use NAT64 layouts).
const MAX_READINGS: usize = 4;

/// The layouts an address in RFC 8215's `64:ff9b:1::/48` may have.
const LOCAL_USE_LENGTHS: [u8; MAX_READINGS] = [96, 64, 56, 48];

enum Readings {
    One(Option<IpAddr>),
    LocalUse(Ipv6Addr, usize),
}

impl Iterator for Readings {
    type Item = IpAddr;

    fn next(&mut self) -> Option<IpAddr> {
        match self {
            Readings::One(addr) => addr.take(),
            Readings::LocalUse(v6, next) => {
                let length = LOCAL_USE_LENGTHS.get(*next)?;
                *next += 1;
                Some(IpAddr::V4(rfc6052_embedded(*v6, *length)))
            }
        }
    }
}

/// The IPv4 address RFC 6052 §2.2 embeds in `v6` under a prefix of `length` bits
/// (32, 40, 48, 56, 64 or 96; bits 64..71, the "u" octet, are skipped).
pub fn rfc6052_embedded(v6: Ipv6Addr, length: u8) -> Ipv4Addr {
    let o = v6.octets();
    let bytes = match length {
        32 => [o[4], o[5], o[6], o[7]],
        40 => [o[5], o[6], o[7], o[9]],
        48 => [o[6], o[7], o[9], o[10]],
        56 => [o[7], o[9], o[10], o[11]],
        64 => [o[9], o[10], o[11], o[12]],
        _ => [o[12], o[13], o[14], o[15]],
    };
    Ipv4Addr::from(bytes)
}

/// The address a packet to `addr` really reaches: IPv4 embedded in IPv6 forms is
/// unwrapped so that e.g. `::ffff:127.0.0.1` or `2002:7f00:1::` is judged as
/// 127.0.0.1.
pub fn canonicalize(addr: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = addr else {
        return addr;
    };
    let bits = u128::from(v6);
    let low32 = Ipv4Addr::from((bits & 0xFFFF_FFFF) as u32);
    let seg = v6.segments();
    // IPv4-mapped ::ffff:a.b.c.d
    if bits >> 32 == 0xFFFF {
        return IpAddr::V4(low32);
    }
    // IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks); not :: or ::1.
    if bits >> 32 == 0 && bits > 1 {
        return IpAddr::V4(low32);
    }
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
    if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        return IpAddr::V4(low32);
    }
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): the /96 layout here; the
    // policy judges every layout (see `PeerPolicy::readings`).
    if seg[0] == 0x0064 && seg[1] == 0xff9b && seg[2] == 0x0001 {
        return IpAddr::V4(low32);
    }
    // 6to4 2002:AABB:CCDD::/48 (RFC 3056): the IPv4 address follows the prefix.
    if seg[0] == 0x2002 {
        let v4 = (u32::from(seg[1]) << 16) | u32::from(seg[2]);
        return IpAddr::V4(Ipv4Addr::from(v4));
    }
    // Teredo 2001:0::/32 (RFC 4380): the client's IPv4 address is the last 32 bits,
    // inverted.
    if seg[0] == 0x2001 && seg[1] == 0 {
        return IpAddr::V4(Ipv4Addr::from(!((bits & 0xFFFF_FFFF) as u32)));
    }
    addr
}

fn special_purpose(addr: IpAddr) -> Option<DenyReason> {
    match addr {
        IpAddr::V4(v4) => special_purpose_v4(v4),
        IpAddr::V6(v6) => special_purpose_v6(v6),
    }
}

fn special_purpose_v4(v4: Ipv4Addr) -> Option<DenyReason> {
    let o = v4.octets();
    if v4.is_loopback() {
        Some(DenyReason::Loopback)
    } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xC0) == 64) {
        Some(DenyReason::Private)
    } else if v4.is_link_local() {
        Some(DenyReason::LinkLocal)
    } else if v4.is_multicast() || v4.is_broadcast() {
        Some(DenyReason::Multicast)
    } else if o[0] == 0                          // "this network"
        || o[0] >= 240                           // reserved (and broadcast above)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 192 && o[1] == 0 && o[2] == 2) // TEST-NET-1
        || (o[0] == 198 && o[1] == 51 && o[2] == 100) // TEST-NET-2
        || (o[0] == 203 && o[1] == 0 && o[2] == 113) // TEST-NET-3
        || (o[0] == 198 && (o[1] & 0xFE) == 18)  // benchmarking 198.18.0.0/15
        || (o[0] == 192 && o[1] == 88 && o[2] == 99)
    // deprecated 6to4 relay anycast
    {
        Some(DenyReason::Reserved)
    } else {
        None
    }
}

fn special_purpose_v6(v6: Ipv6Addr) -> Option<DenyReason> {
    let seg = v6.segments();
    if v6.is_loopback() {
        Some(DenyReason::Loopback)
    } else if v6.is_unspecified() {
        Some(DenyReason::Reserved)
    } else if (seg[0] & 0xFE00) == 0xFC00 {
        Some(DenyReason::Private)
    } else if (seg[0] & 0xFFC0) == 0xFE80 || (seg[0] & 0xFFC0) == 0xFEC0 {
        // link-local, and the deprecated site-local fec0::/10
        Some(DenyReason::LinkLocal)
    } else if v6.is_multicast() {
        Some(DenyReason::Multicast)
    } else if (seg[0] == 0x2001 && seg[1] == 0x0db8)      // documentation
        || (seg[0] == 0x3fff && seg[1] <= 0x0fff)          // documentation (RFC 9637)
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0])    // discard-only 100::/64
        || (seg[0] == 0x2001 && seg[1] < 0x0200)           // IETF protocol assignments
        || (seg[0] & 0xE000) != 0x2000
    // outside global unicast 2000::/3
    {
        Some(DenyReason::Reserved)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn default_policy() -> PeerPolicy {
        PeerPolicy::new(vec![], vec![], vec![ip("198.51.200.7")])
    }

    #[test]
    fn ranges_parse_and_reject_typos() {
        let r: IpRange = "10.0.0.0/8".parse().expect("valid");
        assert!(r.contains(ip("10.255.1.2")));
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(!r.contains(ip("::ffff:10.0.0.1")), "families never mix");
        let host: IpRange = "2001:db8::1".parse().expect("bare address");
        assert!(host.contains(ip("2001:db8::1")));
        assert!(!host.contains(ip("2001:db8::2")));
        assert_eq!(
            "10.0.0.1/8".parse::<IpRange>(),
            Err(RangeError::HostBits("10.0.0.1/8".into()))
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<IpRange>(),
            Err(RangeError::BadPrefix(_))
        ));
        assert!(matches!(
            "ten/8".parse::<IpRange>(),
            Err(RangeError::BadAddress(_))
        ));
        assert_eq!(
            "0.0.0.0/0"
                .parse::<IpRange>()
                .map(|r| r.contains(ip("8.8.8.8"))),
            Ok(true)
        );
    }

    #[test]
    fn defaults_deny_internal_and_special_ranges() {
        let policy = default_policy();
        for (addr, reason) in [
            ("127.0.0.1", DenyReason::Loopback),
            ("::1", DenyReason::Loopback),
            ("10.1.2.3", DenyReason::Private),
            ("172.16.0.1", DenyReason::Private),
            ("192.168.1.1", DenyReason::Private),
            ("100.64.0.1", DenyReason::Private),
            ("fd00::1", DenyReason::Private),
            ("169.254.169.254", DenyReason::LinkLocal),
            ("fe80::1", DenyReason::LinkLocal),
            ("224.0.0.1", DenyReason::Multicast),
            ("255.255.255.255", DenyReason::Multicast),
            ("ff02::1", DenyReason::Multicast),
            ("0.0.0.0", DenyReason::Reserved),
            ("240.0.0.1", DenyReason::Reserved),
            ("192.0.2.1", DenyReason::Reserved),
            ("203.0.113.9", DenyReason::Reserved),
            ("198.18.0.1", DenyReason::Reserved),
            ("::", DenyReason::Reserved),
            ("2001:db8::1", DenyReason::Reserved),
            ("198.51.200.7", DenyReason::Own),
        ] {
            assert_eq!(policy.check(ip(addr)), Err(reason), "{addr}");
        }
        for addr in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
            assert_eq!(policy.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn ipv4_in_ipv6_forms_are_judged_as_ipv4() {
        let policy = default_policy();
        for form in [
            "::ffff:127.0.0.1",                     // IPv4-mapped
            "::127.0.0.1",                          // IPv4-compatible
            "64:ff9b::7f00:1",                      // NAT64 well-known prefix
            "64:ff9b:1::7f00:1",                    // NAT64 local-use prefix
            "2002:7f00:1::",                        // 6to4
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
        ] {
            assert_eq!(canonicalize(ip(form)), ip("127.0.0.1"), "{form}");
            assert_eq!(policy.check(ip(form)), Err(DenyReason::Loopback), "{form}");
        }
        assert_eq!(
            policy.check(ip("::ffff:10.0.0.1")),
            Err(DenyReason::Private)
        );
        assert_eq!(
            policy.check(ip("::ffff:198.51.200.7")),
            Err(DenyReason::Own)
        );
        assert_eq!(policy.check(ip("::ffff:8.8.8.8")), Ok(()));
    }

    #[test]
    fn operator_ranges_allow_and_deny() {
        let policy = PeerPolicy::new(
            vec![
                "10.9.0.0/16".parse().expect("valid"),
                "127.0.0.1".parse().expect("valid"),
            ],
            vec!["8.8.8.0/24".parse().expect("valid")],
            vec![],
        );
        assert_eq!(policy.check(ip("10.9.1.1")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:10.9.1.1")), Ok(()));
        assert_eq!(policy.check(ip("10.8.1.1")), Err(DenyReason::Private));
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("127.0.0.2")), Err(DenyReason::Loopback));
        assert_eq!(policy.check(ip("8.8.8.8")), Err(DenyReason::Operator));
    }

    #[test]
    fn local_use_nat64_is_judged_under_every_rfc_6052_layout() {
        let policy = default_policy();
        // 64:ff9b:1::/48 laid out as a /48: 169.254.169.254 around the u octet, while
        // the low 32 bits read 8.8.8.8.
        let tricky = ip("64:ff9b:1:a9fe:a9:fe00:808:808");
        assert_eq!(
            rfc6052_embedded(
                match tricky {
                    IpAddr::V6(v6) => v6,
                    IpAddr::V4(_) => unreachable!(),
                },
                48
            ),
            Ipv4Addr::new(169, 254, 169, 254)
        );
        assert_eq!(policy.check(tricky), Err(DenyReason::LinkLocal));
        // Under a /64 sub-prefix: 10.0.0.1 after the u octet.
        assert_eq!(
            policy.check(ip("64:ff9b:1:0:a:0:100:808")),
            Err(DenyReason::Private)
        );
        // Every reading public: allowed.
        assert_eq!(policy.check(ip("64:ff9b:1:808:8:808:808:808")), Ok(()));
    }

    #[test]
    fn operator_nat64_prefixes_are_decoded_by_their_length() {
        let mut policy = default_policy();
        policy
            .set_nat64_prefixes(vec![
                "2a00:1:2::/48".parse().expect("range"),
                "2a00:5::/96".parse().expect("range"),
            ])
            .expect("valid lengths");
        // /48: 10.0.0.1 at octets 6-7 and 9-10.
        assert_eq!(
            policy.check(ip("2a00:1:2:a00:1:0:808:808")),
            Err(DenyReason::Private)
        );
        assert_eq!(
            policy.check(ip("2a00:5::a9fe:a9fe")),
            Err(DenyReason::LinkLocal)
        );
        assert_eq!(policy.check(ip("2a00:5::808:808")), Ok(()));
        // Outside the prefixes, an IPv6 address is itself.
        assert_eq!(policy.check(ip("2a00:6::a9fe:a9fe")), Ok(()));
        assert!(matches!(
            policy.set_nat64_prefixes(vec!["2a00:1::/60".parse().expect("range")]),
            Err(RangeError::BadNat64(_))
        ));
        assert!(matches!(
            policy.set_nat64_prefixes(vec!["10.0.0.0/8".parse().expect("range")]),
            Err(RangeError::BadNat64(_))
        ));
    }

    #[test]
    fn allowed_ranges_may_name_ports_and_never_open_the_service_ports() {
        let ranges: Vec<PeerRange> = ["127.0.0.1:49152-65535", "[::1]:5000", "10.1.0.0/16"]
            .iter()
            .map(|r| r.parse().expect("valid"))
            .collect();
        assert_eq!(ranges[0].to_string(), "127.0.0.1/32:49152-65535");
        assert_eq!(ranges[1].to_string(), "[::1/128]:5000-5000");
        let mut policy = PeerPolicy::new(ranges, vec![], vec![ip("10.1.0.1")]);
        policy.protect_ports([3478, 9090]);
        let peer = |text: &str| text.parse::<std::net::SocketAddr>().expect("peer");
        assert_eq!(policy.check_peer(peer("127.0.0.1:50000")), Ok(()));
        assert_eq!(
            policy.check_peer(peer("127.0.0.1:3478")),
            Err(DenyReason::Loopback),
            "outside the allowed ports"
        );
        assert_eq!(
            policy.check(ip("127.0.0.1")),
            Ok(()),
            "a permission is by address"
        );
        assert_eq!(policy.check_peer(peer("[::1]:5000")), Ok(()));
        assert_eq!(
            policy.check_peer(peer("[::1]:5001")),
            Err(DenyReason::Loopback)
        );
        // A whole allowed range that holds the gateway's own address: every port
        // but its service ports.
        assert_eq!(policy.check_peer(peer("10.1.0.1:50000")), Ok(()));
        assert_eq!(
            policy.check_peer(peer("10.1.0.1:3478")),
            Err(DenyReason::Own)
        );
        assert_eq!(
            policy.check_peer(peer("10.1.0.1:9090")),
            Err(DenyReason::Own)
        );
        // Public addresses keep every port.
        assert_eq!(policy.check_peer(peer("8.8.8.8:3478")), Ok(()));
        for bad in [
            "127.0.0.1:0",
            "127.0.0.1:9-1",
            "127.0.0.1:x",
            "[::1]",
            "[::1]:70000",
        ] {
            assert!(bad.parse::<PeerRange>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn mapped_form_gets_the_same_verdict(bits in any::<u32>()) {
            let policy = default_policy();
            let v4 = Ipv4Addr::from(bits);
            prop_assert_eq!(
                policy.check(IpAddr::V6(v4.to_ipv6_mapped())),
                policy.check(IpAddr::V4(v4))
            );
        }

        #[test]
        fn range_parsing_never_panics(text in ".{0,60}") {
            let _ = text.parse::<IpRange>();
        }
    }

    #[test]
    fn own_relay_ports_are_reachable_and_nothing_else_of_ours() {
        let own: IpAddr = "1.2.3.4".parse().unwrap();
        let mut policy = PeerPolicy::new(Vec::new(), Vec::new(), vec![own]);
        policy.protect_ports([3478, 9478]);
        // By default the gateway's own address is refused outright.
        assert_eq!(policy.check(own), Err(DenyReason::Own));
        policy.allow_own_relay_ports(49152..=65535);
        // A permission (address only) is granted; datagrams are judged by port.
        assert_eq!(policy.check(own), Ok(()));
        assert_eq!(policy.check_peer((own, 50000).into()), Ok(()));
        assert_eq!(policy.check_peer((own, 65535).into()), Ok(()));
        assert_eq!(policy.check_peer((own, 3478).into()), Err(DenyReason::Own));
        assert_eq!(policy.check_peer((own, 9478).into()), Err(DenyReason::Own));
        assert_eq!(policy.check_peer((own, 22).into()), Err(DenyReason::Own));
        // Other addresses are judged as before.
        assert_eq!(
            policy.check("10.0.0.1".parse().unwrap()),
            Err(DenyReason::Private)
        );
        // A relay port range that covers a service port still leaves it closed.
        policy.allow_own_relay_ports(3000..=10000);
        assert_eq!(policy.check_peer((own, 3478).into()), Err(DenyReason::Own));
        assert_eq!(policy.check_peer((own, 5000).into()), Ok(()));
    }
}
