//! The nftables rule set of a site router, generated from its [`NatPreset`].
//!
//! Every router has one table, `ip lab`. The WAN interface is always `wan`; everything
//! else (the LAN bridge `br0` and its ports) counts as LAN, which keeps the rules right
//! whether or not `br_netfilter` shows bridged frames to the IP hooks.
use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use super::preset::{Filtering, Mapping, NatPreset, PortAllocation, RouterKind, Unsolicited};

/// Protocols whose mappings the rules handle explicitly.
const PROTOS: [&str; 2] = ["udp", "tcp"];

/// First port of the sequential allocator.
const SEQUENTIAL_BASE: u32 = 30000;
/// How many ports the sequential allocator cycles through.
const SEQUENTIAL_PORTS: u32 = 1000;

/// Default lifetime of the dynamic UDP map entries: Linux's `nf_conntrack_udp_timeout_stream`.
const DEFAULT_UDP_MAP_TIMEOUT: Duration = Duration::from_secs(120);
/// Lifetime of the dynamic TCP map entries.
const TCP_MAP_TIMEOUT: Duration = Duration::from_secs(3600);

/// The rule set for a router whose WAN address is `wan` and whose LAN is `lan` (CIDR).
pub(crate) fn router_ruleset(preset: &NatPreset, wan: Ipv4Addr, lan: &str) -> String {
    let mut out = String::new();
    out.push_str("table ip lab {\n");
    match preset.kind {
        RouterKind::Nat => nat_router(&mut out, preset, wan, lan),
        RouterKind::NoNat => {
            out.push_str(
                "  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
            );
            impairments(&mut out, preset);
            out.push_str("  }\n");
            input_chain(&mut out, preset, None);
        }
        RouterKind::FirewallOnly => {
            out.push_str(
                "  chain forward {\n    type filter hook forward priority filter; policy drop;\n",
            );
            impairments(&mut out, preset);
            out.push_str("    ct state established,related accept\n");
            out.push_str("    iifname != \"wan\" accept\n");
            unsolicited(&mut out, preset.unsolicited);
            out.push_str("  }\n");
            input_chain(&mut out, preset, None);
        }
    }
    out.push_str("}\n");
    out
}

/// Loss and UDP blocking, first in the forward chain so they hit both directions.
fn impairments(out: &mut String, preset: &NatPreset) {
    if preset.udp_blocked {
        out.push_str("    meta l4proto udp drop\n");
    }
    if preset.loss_percent > 0 {
        let _ = writeln!(
            out,
            "    numgen random mod 100 < {} drop",
            preset.loss_percent
        );
    }
}

/// What happens to an unsolicited packet that arrived on the WAN.
fn unsolicited(out: &mut String, action: Unsolicited) {
    match action {
        Unsolicited::Drop => {}
        Unsolicited::IcmpPortUnreachable => out.push_str(
            "    iifname \"wan\" meta l4proto { udp, tcp } reject with icmp type port-unreachable\n",
        ),
        Unsolicited::TcpReset => {
            out.push_str("    iifname \"wan\" meta l4proto tcp reject with tcp reset\n");
        }
    }
    out.push_str("    iifname \"wan\" drop\n");
}

/// The router's own input chain. `wan_from_lan` is the WAN address that LAN hosts must
/// not reach directly (a NAT without hairpin, or a hairpin miss).
fn input_chain(out: &mut String, preset: &NatPreset, wan_from_lan: Option<Ipv4Addr>) {
    out.push_str("  chain input {\n    type filter hook input priority filter; policy accept;\n");
    if let Some(wan) = wan_from_lan {
        let _ = writeln!(out, "    iifname != \"wan\" ip daddr {wan} drop");
    }
    out.push_str("    iifname \"wan\" ct state established,related accept\n");
    out.push_str("    iifname \"wan\" icmp type echo-request accept\n");
    if preset.router_accepts_unsolicited {
        out.push_str("    iifname \"wan\" accept\n");
    } else {
        unsolicited(out, preset.unsolicited);
    }
    out.push_str("  }\n");
}

/// The `snat` statement (without matches) that gives a new `proto` flow its mapping.
fn snat_statement(preset: &NatPreset, wan: Ipv4Addr, proto: &str) -> String {
    match (preset.mapping, preset.ports) {
        (Mapping::EndpointIndependent, PortAllocation::Preserve) => format!("snat to {wan}"),
        (Mapping::EndpointIndependent, _) => {
            format!("snat to {wan}:jhash ip saddr . {proto} sport mod 20000 offset 30000")
        }
        (Mapping::AddressDependent, _) => format!(
            "snat to {wan}:jhash ip saddr . {proto} sport . ip daddr mod 20000 offset 30000"
        ),
        (Mapping::AddressAndPortDependent, PortAllocation::Sequential) => {
            // `numgen` yields a host-order number but NAT reads the register as a
            // network-order port (nft 1.0.6 adds no conversion), so the counter goes
            // through a map whose values are typed ports.
            let mut elements = String::new();
            for i in 0..SEQUENTIAL_PORTS {
                let _ = write!(
                    elements,
                    "{}{i} : {}",
                    if i == 0 { "" } else { ", " },
                    SEQUENTIAL_BASE + i
                );
            }
            format!("snat to {wan}:numgen inc mod {SEQUENTIAL_PORTS} map {{ {elements} }}")
        }
        (Mapping::AddressAndPortDependent, _) => format!("snat to {wan} fully-random"),
    }
}

fn nat_router(out: &mut String, preset: &NatPreset, wan: Ipv4Addr, lan: &str) {
    let relaxed = preset.filtering != Filtering::AddressAndPortDependent;
    let needs_map = relaxed || preset.hairpin;
    let adf = preset.filtering == Filtering::AddressDependent;
    let udp_timeout = preset
        .udp_mapping_timeout
        .unwrap_or(DEFAULT_UDP_MAP_TIMEOUT)
        .as_secs()
        .max(1);
    let timeout = |proto: &str| {
        if proto == "udp" {
            udp_timeout
        } else {
            TCP_MAP_TIMEOUT.as_secs()
        }
    };

    // external port -> internal endpoint, learnt from outbound packets after SNAT.
    if needs_map {
        for p in PROTOS {
            let _ = writeln!(
                out,
                "  map eim_{p} {{\n    typeof {p} dport : ip saddr . {p} sport\n    flags dynamic,timeout\n    timeout {}s\n  }}",
                timeout(p)
            );
        }
    }
    // (internal endpoint . remote address) pairs that the internal endpoint sent to.
    if adf {
        for p in PROTOS {
            let _ = writeln!(
                out,
                "  set adf_{p} {{\n    typeof ip saddr . {p} sport . ip daddr\n    flags dynamic,timeout\n    timeout {}s\n  }}",
                timeout(p)
            );
        }
    }

    out.push_str(
        "  chain pre_nat {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    for p in PROTOS {
        if relaxed {
            let _ = writeln!(
                out,
                "    iifname \"wan\" ip daddr {wan} meta l4proto {p} dnat ip addr . port to {p} dport map @eim_{p}"
            );
        }
        if preset.hairpin {
            let _ = writeln!(
                out,
                "    iifname != \"wan\" ip daddr {wan} meta l4proto {p} dnat ip addr . port to {p} dport map @eim_{p}"
            );
        }
    }
    out.push_str("  }\n");

    out.push_str(
        "  chain post_nat {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for p in PROTOS {
        let snat = snat_statement(preset, wan, p);
        if preset.hairpin {
            // The receiving host must see the sender's public endpoint.
            let _ = writeln!(
                out,
                "    ip saddr {lan} oifname != \"wan\" ct status dnat meta l4proto {p} {snat}"
            );
        }
        let _ = writeln!(out, "    oifname \"wan\" meta l4proto {p} {snat}");
    }
    let _ = writeln!(out, "    oifname \"wan\" snat to {wan}");
    out.push_str("  }\n");

    if needs_map {
        out.push_str(
            "  chain post_map {\n    type filter hook postrouting priority 200; policy accept;\n",
        );
        for p in PROTOS {
            let _ = writeln!(
                out,
                "    oifname \"wan\" ct direction original meta l4proto {p} update @eim_{p} {{ {p} sport : ct original ip saddr . ct original proto-src }}"
            );
        }
        out.push_str("  }\n");
    }

    out.push_str("  chain forward {\n    type filter hook forward priority filter; policy drop;\n");
    impairments(out, preset);
    if adf {
        for p in PROTOS {
            let _ = writeln!(
                out,
                "    iifname != \"wan\" oifname \"wan\" ct direction original meta l4proto {p} update @adf_{p} {{ ip saddr . {p} sport . ip daddr }}"
            );
        }
    }
    out.push_str("    ct state established,related accept\n");
    out.push_str("    iifname != \"wan\" accept\n");
    match preset.filtering {
        Filtering::EndpointIndependent => {
            out.push_str("    iifname \"wan\" ct status dnat accept\n")
        }
        Filtering::AddressDependent => {
            for p in PROTOS {
                let _ = writeln!(
                    out,
                    "    iifname \"wan\" ct status dnat meta l4proto {p} ip daddr . {p} dport . ip saddr @adf_{p} accept"
                );
            }
        }
        Filtering::AddressAndPortDependent => {}
    }
    unsolicited(out, preset.unsolicited);
    out.push_str("  }\n");

    input_chain(out, preset, Some(wan));
}
