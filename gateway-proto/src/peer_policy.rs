//! Which peer addresses the relay may send to: the defence against using a public
//! TURN server to reach the operator's internal network (see the SSRF lessons in
//! `../shared/reference/security.md`).
//!
//! An address is first canonicalised: IPv4 embedded in IPv6 (IPv4-mapped,
//! IPv4-compatible, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4 `2002::/16`,
//! Teredo `2001::/32`) is judged as the IPv4 address it reaches. Then the operator's
//! allowed ranges win; otherwise loopback, private, shared (CGNAT), link-local,
//! multicast, documentation, benchmarking and other reserved ranges, the operator's
//! denied ranges and the gateway's own addresses are refused.
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
    allowed: Vec<IpRange>,
    denied: Vec<IpRange>,
    own: Vec<IpAddr>,
}

impl PeerPolicy {
    /// A policy with the operator's allowed and denied ranges and the gateway's own
    /// addresses (all canonicalised).
    pub fn new(allowed: Vec<IpRange>, denied: Vec<IpRange>, own: Vec<IpAddr>) -> Self {
        Self {
            allowed,
            denied,
            own: own.into_iter().map(canonicalize).collect(),
        }
    }

    /// Adds addresses of the gateway itself (e.g. its relay addresses).
    pub fn add_own(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.own.extend(addrs.into_iter().map(canonicalize));
    }

    /// Decides whether the relay may send to `addr`.
    pub fn check(&self, addr: IpAddr) -> Result<(), DenyReason> {
        let addr = canonicalize(addr);
        if self.allowed.iter().any(|r| r.contains(addr)) {
            return Ok(());
        }
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
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): treat the low 32 bits as the
    // IPv4 address (the /96 layout, the common deployment).
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
}
