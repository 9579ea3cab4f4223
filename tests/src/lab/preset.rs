//! NAT behaviour presets (RFC 4787 terms) that a site router is built with.
use std::{fmt, str::FromStr, sync::OnceLock, time::Duration};

/// How the router chooses the external endpoint of a mapping (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// One external endpoint per internal endpoint, whatever the destination (EIM).
    EndpointIndependent,
    /// A new external endpoint per destination address (ADM).
    AddressDependent,
    /// A new external endpoint per destination address and port (APDM, "symmetric").
    AddressAndPortDependent,
}

/// Which inbound packets the router lets through to a mapping (RFC 4787 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// Anyone may send to a mapped external endpoint (EIF).
    EndpointIndependent,
    /// Only addresses the internal endpoint has sent to (ADF).
    AddressDependent,
    /// Only the exact address and port the internal endpoint has sent to (APDF).
    AddressAndPortDependent,
}

/// How the external port of a new mapping is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortAllocation {
    /// Keep the internal source port when it is free (only with endpoint-independent mapping).
    Preserve,
    /// A port that is not the internal one (a hash for EIM/ADM, random for APDM).
    Random,
    /// Each new mapping gets the next port (only with address-and-port-dependent mapping).
    Sequential,
}

/// What a router does with an inbound packet that matches no mapping or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unsolicited {
    /// Silently drop it (UDP and TCP).
    Drop,
    /// Answer UDP and TCP with ICMP port unreachable.
    IcmpPortUnreachable,
    /// Answer TCP with a RST; drop UDP.
    TcpReset,
}

/// What kind of box the site router is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouterKind {
    /// A NAT: private LAN (10.0.(i+1).0/24) behind the router's WAN address.
    Nat,
    /// A plain router: hosts have public addresses, everything is forwarded.
    NoNat,
    /// Hosts have public addresses; inbound only for established/related flows.
    FirewallOnly,
}

/// The behaviour of one site router. Fields are public so tests can build variants of
/// the named presets; [`NatPreset::name`] is what test names and docs use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPreset {
    /// Name of the preset (a named one, or anything for a custom variant).
    pub name: String,
    /// NAT, plain router or firewall.
    pub kind: RouterKind,
    /// Mapping behaviour (NAT only).
    pub mapping: Mapping,
    /// Filtering behaviour (NAT only).
    pub filtering: Filtering,
    /// Port allocation (NAT only).
    pub ports: PortAllocation,
    /// Whether LAN hosts reach each other through the WAN address (NAT only).
    pub hairpin: bool,
    /// Answer to unsolicited inbound packets.
    pub unsolicited: Unsolicited,
    /// Drop every forwarded UDP packet.
    pub udp_blocked: bool,
    /// UDP mapping (conntrack and nft map) timeout; `None` keeps Linux's defaults.
    pub udp_mapping_timeout: Option<Duration>,
    /// Random loss in percent, applied to forwarded packets in both directions.
    pub loss_percent: u8,
    /// Whether the router's own input chain accepts unsolicited WAN packets.
    pub router_accepts_unsolicited: bool,
}

/// A preset name that [`NatPreset::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown NAT preset {0:?}")]
pub struct UnknownPreset(pub String);

/// The names of all named presets, in documentation order.
const NAMES: &[&str] = &[
    "no-nat",
    "firewall-only",
    "full-cone",
    "restricted-cone",
    "port-restricted-cone",
    "eim-random-port",
    "symmetric",
    "symmetric-sequential",
    "address-dependent",
    "udp-blocked",
    "short-timeout",
    "lossy-5",
    "reject-icmp",
    "reject-rst",
    "hairpin",
    "router-accepts-unsolicited",
];

impl NatPreset {
    fn nat(name: &str, mapping: Mapping, filtering: Filtering, ports: PortAllocation) -> Self {
        Self {
            name: name.to_owned(),
            kind: RouterKind::Nat,
            mapping,
            filtering,
            ports,
            hairpin: false,
            unsolicited: Unsolicited::Drop,
            udp_blocked: false,
            udp_mapping_timeout: None,
            loss_percent: 0,
            router_accepts_unsolicited: false,
        }
    }

    /// Returns this preset under another name (for custom variants).
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// A plain router: hosts have public addresses, no filtering.
    pub fn no_nat() -> Self {
        Self {
            kind: RouterKind::NoNat,
            ..Self::port_restricted_cone().named("no-nat")
        }
    }

    /// Public host addresses behind a stateful firewall (inbound only for replies).
    pub fn firewall_only() -> Self {
        Self {
            kind: RouterKind::FirewallOnly,
            ..Self::port_restricted_cone().named("firewall-only")
        }
    }

    /// EIM + EIF, preserved ports.
    pub fn full_cone() -> Self {
        Self::nat(
            "full-cone",
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            PortAllocation::Preserve,
        )
    }

    /// EIM + ADF, preserved ports.
    pub fn restricted_cone() -> Self {
        Self::nat(
            "restricted-cone",
            Mapping::EndpointIndependent,
            Filtering::AddressDependent,
            PortAllocation::Preserve,
        )
    }

    /// EIM + APDF, preserved ports: what Linux masquerade does by itself.
    pub fn port_restricted_cone() -> Self {
        Self::nat(
            "port-restricted-cone",
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
            PortAllocation::Preserve,
        )
    }

    /// EIM + APDF with an external port that differs from the internal one.
    pub fn eim_random_port() -> Self {
        Self::nat(
            "eim-random-port",
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
            PortAllocation::Random,
        )
    }

    /// APDM with random ports + APDF.
    pub fn symmetric() -> Self {
        Self::nat(
            "symmetric",
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
            PortAllocation::Random,
        )
    }

    /// APDM with sequential ports + APDF (each new mapping gets the next port).
    pub fn symmetric_sequential() -> Self {
        Self::nat(
            "symmetric-sequential",
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
            PortAllocation::Sequential,
        )
    }

    /// ADM + ADF (a port per destination address).
    pub fn address_dependent() -> Self {
        Self::nat(
            "address-dependent",
            Mapping::AddressDependent,
            Filtering::AddressDependent,
            PortAllocation::Random,
        )
    }

    /// Port-restricted cone whose router drops all forwarded UDP (TCP still works).
    pub fn udp_blocked() -> Self {
        Self {
            udp_blocked: true,
            ..Self::port_restricted_cone().named("udp-blocked")
        }
    }

    /// Port-restricted cone with a 3 s UDP mapping timeout.
    pub fn short_timeout() -> Self {
        Self {
            udp_mapping_timeout: Some(Duration::from_secs(3)),
            ..Self::port_restricted_cone().named("short-timeout")
        }
    }

    /// Port-restricted cone losing 5 % of forwarded packets in each direction.
    pub fn lossy_5() -> Self {
        Self {
            loss_percent: 5,
            ..Self::port_restricted_cone().named("lossy-5")
        }
    }

    /// Port-restricted cone answering unsolicited packets with ICMP port unreachable.
    pub fn reject_icmp() -> Self {
        Self {
            unsolicited: Unsolicited::IcmpPortUnreachable,
            ..Self::port_restricted_cone().named("reject-icmp")
        }
    }

    /// Port-restricted cone answering unsolicited TCP with RST (UDP dropped).
    pub fn reject_rst() -> Self {
        Self {
            unsolicited: Unsolicited::TcpReset,
            ..Self::port_restricted_cone().named("reject-rst")
        }
    }

    /// Port-restricted cone with hairpinning.
    pub fn hairpin() -> Self {
        Self {
            hairpin: true,
            ..Self::port_restricted_cone().named("hairpin")
        }
    }

    /// Port-restricted cone whose router accepts unsolicited packets to itself.
    pub fn router_accepts_unsolicited() -> Self {
        Self {
            router_accepts_unsolicited: true,
            ..Self::port_restricted_cone().named("router-accepts-unsolicited")
        }
    }

    /// Every named preset, in documentation order.
    pub fn all_named() -> &'static [NatPreset] {
        static ALL: OnceLock<Vec<NatPreset>> = OnceLock::new();
        ALL.get_or_init(|| NAMES.iter().filter_map(|name| name.parse().ok()).collect())
    }

    /// The preset's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A one-line description derived from the fields.
    pub fn summary(&self) -> String {
        let mut parts = match self.kind {
            RouterKind::NoNat => vec!["no NAT, public host addresses, no filtering".to_owned()],
            RouterKind::FirewallOnly => {
                vec!["no NAT, public host addresses, stateful firewall".to_owned()]
            }
            RouterKind::Nat => {
                let mapping = match self.mapping {
                    Mapping::EndpointIndependent => "EIM",
                    Mapping::AddressDependent => "ADM",
                    Mapping::AddressAndPortDependent => "APDM",
                };
                let filtering = match self.filtering {
                    Filtering::EndpointIndependent => "EIF",
                    Filtering::AddressDependent => "ADF",
                    Filtering::AddressAndPortDependent => "APDF",
                };
                let ports = match self.ports {
                    PortAllocation::Preserve => "preserved ports",
                    PortAllocation::Random => "non-preserved ports",
                    PortAllocation::Sequential => "sequential ports",
                };
                let mut v = vec![format!("{mapping}+{filtering}, {ports}")];
                if self.hairpin {
                    v.push("hairpin".to_owned());
                }
                v
            }
        };
        match self.unsolicited {
            Unsolicited::Drop => {}
            Unsolicited::IcmpPortUnreachable => {
                parts.push("unsolicited -> ICMP port unreachable".to_owned());
            }
            Unsolicited::TcpReset => parts.push("unsolicited TCP -> RST".to_owned()),
        }
        if self.udp_blocked {
            parts.push("UDP blocked".to_owned());
        }
        if let Some(t) = self.udp_mapping_timeout {
            parts.push(format!("UDP timeout {} s", t.as_secs_f64()));
        }
        if self.loss_percent > 0 {
            parts.push(format!("{}% loss each way", self.loss_percent));
        }
        if self.router_accepts_unsolicited {
            parts.push("router input accepts unsolicited".to_owned());
        }
        parts.join(", ")
    }

    /// Why this combination cannot be built, if it cannot.
    pub(crate) fn invalid_reason(&self) -> Option<&'static str> {
        if self.loss_percent > 100 {
            return Some("loss_percent must be at most 100");
        }
        if let Some(t) = self.udp_mapping_timeout
            && t.as_secs() == 0
        {
            return Some("udp_mapping_timeout must be at least one second");
        }
        if self.kind != RouterKind::Nat {
            return None;
        }
        match (self.mapping, self.ports) {
            (Mapping::EndpointIndependent, PortAllocation::Sequential) => {
                Some("sequential ports need address-and-port-dependent mapping")
            }
            (Mapping::AddressDependent, PortAllocation::Sequential) => {
                Some("sequential ports need address-and-port-dependent mapping")
            }
            (Mapping::AddressDependent, PortAllocation::Preserve)
            | (Mapping::AddressAndPortDependent, PortAllocation::Preserve) => {
                Some("port preservation needs endpoint-independent mapping")
            }
            _ => None,
        }
    }
}

impl FromStr for NatPreset {
    type Err = UnknownPreset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "no-nat" => Self::no_nat(),
            "firewall-only" => Self::firewall_only(),
            "full-cone" => Self::full_cone(),
            "restricted-cone" => Self::restricted_cone(),
            "port-restricted-cone" => Self::port_restricted_cone(),
            "eim-random-port" => Self::eim_random_port(),
            "symmetric" => Self::symmetric(),
            "symmetric-sequential" => Self::symmetric_sequential(),
            "address-dependent" => Self::address_dependent(),
            "udp-blocked" => Self::udp_blocked(),
            "short-timeout" => Self::short_timeout(),
            "lossy-5" => Self::lossy_5(),
            "reject-icmp" => Self::reject_icmp(),
            "reject-rst" => Self::reject_rst(),
            "hairpin" => Self::hairpin(),
            "router-accepts-unsolicited" => Self::router_accepts_unsolicited(),
            other => return Err(UnknownPreset(other.to_owned())),
        })
    }
}

impl fmt::Display for NatPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_itself() {
        let all = NatPreset::all_named();
        assert_eq!(all.len(), NAMES.len());
        for preset in all {
            assert_eq!(preset.name().parse::<NatPreset>().as_ref(), Ok(preset));
            assert_eq!(preset.invalid_reason(), None, "{}", preset.name());
        }
        assert!("nope".parse::<NatPreset>().is_err());
    }
}
