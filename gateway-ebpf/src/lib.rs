//! Types shared between the gateway's eBPF programs and the userspace loader.
//!
//! Everything here is `no_std`, `#[repr(C)]` and plain old data so that the kernel
//! programs and the `aya` loader agree byte for byte on map keys and values. With the
//! `user` feature the types also implement [`aya::Pod`] so userspace can read them.
#![no_std]

/// Name of the per-CPU array that holds [`UdpCounters`], one slot per [`Direction`].
pub const UDP_COUNTERS_MAP: &str = "UDP_COUNTERS";
/// Name of the array holding every local port's [`watch`] flags: entry `port / 64`,
/// byte `port % 64` (an array lookup costs no hashing on the hot path).
pub const WATCHED_PORTS_MAP: &str = "WATCHED_PORTS";
/// Ports per [`WATCHED_PORTS_MAP`] entry.
pub const PORTS_PER_ENTRY: usize = 64;
/// Entries of [`WATCHED_PORTS_MAP`]: all 65,536 ports.
pub const WATCHED_PORTS_ENTRIES: u32 = 65_536 / PORTS_PER_ENTRY as u32;
/// Name of the one-slot array holding the [`settings`] flags.
pub const SETTINGS_MAP: &str = "SETTINGS";
/// Name of the hash map of remote [`Endpoint`]s that are never punch flows (the
/// rendezvous server and its discovery endpoints: an agent talks to them first).
pub const IGNORED_REMOTES_MAP: &str = "IGNORED_REMOTES";
/// Name of the LRU hash map from [`FlowKey`] to [`FlowState`]: the punch flow table.
pub const PUNCH_FLOWS_MAP: &str = "PUNCH_FLOWS";
/// Name of the per-CPU array holding one [`PunchStats`] per [`PunchProtocol`].
pub const PUNCH_STATS_MAP: &str = "PUNCH_STATS";
/// Name of the tc classifier attached on ingress.
pub const INGRESS_PROGRAM: &str = "observe_ingress";
/// Name of the tc classifier attached on egress.
pub const EGRESS_PROGRAM: &str = "observe_egress";
/// Name of a classifier that only returns [`TC_ACT_UNSPEC`]: the baseline the overhead
/// benchmark runs beside the real programs. Never attached by the gateway.
pub const PASS_THROUGH_PROGRAM: &str = "pass_through";
/// What every program returns: `TC_ACT_UNSPEC`, which is `TCX_NEXT` under TCX (run the
/// next program on the interface, pass the packet at the end of the chain) and, for a
/// netlink `cls_bpf` filter in direct-action mode, "continue". An observer must not
/// return `TC_ACT_OK` (`TCX_PASS`): that ends the chain, and a second observer on the
/// same interface (another gateway, any later tc program) would never run.
pub const TC_ACT_UNSPEC: i32 = -1;
/// Capacity of [`IGNORED_REMOTES_MAP`].
pub const MAX_IGNORED_REMOTES: u32 = 16;
/// Capacity of [`PUNCH_FLOWS_MAP`]; the least recently used flow is evicted beyond it.
pub const FLOW_TABLE_CAPACITY: u32 = 16_384;

/// Flags of a [`WATCHED_PORTS_MAP`] entry: what to do with traffic on that local port.
pub mod watch {
    /// Count UDP datagrams and bytes in [`crate::UDP_COUNTERS_MAP`] (the server's ports).
    pub const COUNT_UDP: u8 = 1;
    /// UDP flows on this port are punch flows (an agent's punch socket).
    pub const PUNCH_UDP: u8 = 2;
    /// TCP flows on this port are punch flows (a TCP punch or splice attempt).
    pub const PUNCH_TCP: u8 = 4;
}

/// Flags in the single slot of [`SETTINGS_MAP`].
pub mod settings {
    /// Any UDP datagram whose payload carries the STUN magic cookie at offset 4 is a
    /// punch packet, whatever its port (for NAT routers, which run no agent).
    pub const STUN_COOKIE: u32 = 1;
    /// [`crate::IGNORED_REMOTES_MAP`] has entries (skips the lookup when it has none).
    pub const HAS_IGNORED_REMOTES: u32 = 2;
}

/// The STUN magic cookie (RFC 8489), at UDP payload offset 4 of every STUN message.
pub const STUN_MAGIC_COOKIE: u32 = 0x2112_A442;

/// Direction of a packet relative to the interface the program is attached to.
///
/// The discriminant is the index into [`UDP_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Received on the interface.
    Ingress = 0,
    /// Sent from the interface.
    Egress = 1,
}

impl Direction {
    /// Every direction, in map-index order.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];
    /// Number of slots in [`UDP_COUNTERS_MAP`].
    pub const COUNT: u32 = 2;

    /// The label value used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// UDP traffic seen on a counted port in one direction, on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams seen.
    pub packets: u64,
    /// Bytes of those datagrams' IP packets, IP and UDP headers included.
    pub bytes: u64,
}

/// Address family tag of an [`Endpoint`] holding an IPv4 address.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag of an [`Endpoint`] holding an IPv6 address.
pub const FAMILY_IPV6: u8 = 6;

/// One end of a flow: an address and a port as seen on the wire at the interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The address bytes in wire order, as four native-endian words (what a 32-bit
    /// load from the packet gives): IPv6, or IPv4 in the first word (the rest zero).
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Always zero (keys are compared byte for byte).
    pub pad: u8,
}

/// A punch flow: local and remote endpoint and the transport protocol.
///
/// "Local" is this side of the interface: the source of egress packets, the
/// destination of ingress ones (on a NAT router's WAN: the external mapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// This side.
    pub local: Endpoint,
    /// The other side.
    pub remote: Endpoint,
    /// IP protocol number (17 UDP, 6 TCP), widened so the key has no padding bytes.
    pub protocol: u32,
}

/// [`FlowState::flags`]: the flow has been punched (ingress seen after egress).
pub const FLOW_PUNCHED: u64 = 1;

/// What the programs know about one punch flow. Shared by all CPUs: counters are
/// updated atomically, timestamps are `bpf_ktime_get_ns` (CLOCK_MONOTONIC) values.
///
/// The fields that start at zero alternate with the others: the BPF backend turns a
/// run of zero stores into an out-of-line `memset` call, which the hot path avoids.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// [`FLOW_PUNCHED`].
    pub flags: u64,
    /// When the first egress packet was seen: the hole opened on this side.
    pub first_egress_ns: u64,
    /// Ingress packets seen after the flow existed (bounces excluded).
    pub ingress_packets: u64,
    /// When this side last sent on the flow, from the coarse clock
    /// (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE: a tick's resolution, cheap
    /// enough for every packet). Only idle expiry reads it: like a NAT mapping, which
    /// outbound traffic refreshes (RFC 4787 REQ-6), a flow lives on its egress.
    pub last_seen_ns: u64,
    /// ICMP errors and TCP resets counted as bounces for this flow.
    pub bounced_packets: u64,
    /// Egress packets seen.
    pub egress_packets: u64,
    /// When the flow was punched (first ingress after egress); 0 until then.
    pub punched_ns: u64,
}

/// Why a packet counts as bounced. The discriminant indexes [`PunchStats::bounced`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BounceReason {
    /// An ingress packet of a punch flow before any egress on it: a stateful NAT or
    /// firewall at this point would have dropped it.
    BeforeEgress = 0,
    /// ICMP/ICMPv6 port unreachable quoting a punch flow.
    IcmpPortUnreachable = 1,
    /// ICMP host unreachable (codes 1, 7, 12) / ICMPv6 address unreachable.
    IcmpHostUnreachable = 2,
    /// ICMP communication administratively prohibited (codes 9, 10, 13) / ICMPv6
    /// administratively prohibited, source address failed policy, reject route.
    IcmpAdminProhibited = 3,
    /// ICMP/ICMPv6 time exceeded (a low-TTL opener expiring, a routing loop).
    IcmpTimeExceeded = 4,
    /// A TCP RST answering a punch flow's SYN (before the flow was punched).
    TcpRst = 5,
    /// ICMP network unreachable (codes 0, 6, 11) / ICMPv6 no route: typically a probe
    /// to a peer's private host candidate that the Internet cannot route.
    IcmpNetUnreachable = 6,
}

impl BounceReason {
    /// Every reason, in index order.
    pub const ALL: [BounceReason; 7] = [
        BounceReason::BeforeEgress,
        BounceReason::IcmpPortUnreachable,
        BounceReason::IcmpHostUnreachable,
        BounceReason::IcmpAdminProhibited,
        BounceReason::IcmpTimeExceeded,
        BounceReason::TcpRst,
        BounceReason::IcmpNetUnreachable,
    ];

    /// The `reason` label value of `gateway_bounced_packets_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BounceReason::BeforeEgress => "before_egress",
            BounceReason::IcmpPortUnreachable => "icmp_port_unreachable",
            BounceReason::IcmpHostUnreachable => "icmp_host_unreachable",
            BounceReason::IcmpAdminProhibited => "icmp_admin_prohibited",
            BounceReason::IcmpTimeExceeded => "icmp_time_exceeded",
            BounceReason::TcpRst => "tcp_rst",
            BounceReason::IcmpNetUnreachable => "icmp_net_unreachable",
        }
    }
}

/// Slots of [`PunchStats::bounced`] (one per [`BounceReason`], one spare).
pub const BOUNCE_SLOTS: usize = 8;

/// Upper bounds (inclusive, nanoseconds) of the punch-time histogram buckets, from
/// 1 ms to 10 s; [`PunchStats::punch_time_buckets`] has one more slot for the rest.
pub const PUNCH_TIME_BOUNDS_NS: [u64; 13] = [
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Slots of [`PunchStats::punch_time_buckets`].
pub const PUNCH_TIME_SLOTS: usize = PUNCH_TIME_BOUNDS_NS.len() + 1;

/// The transport protocol of a punch flow; the discriminant is its slot in
/// [`PUNCH_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PunchProtocol {
    /// UDP flows (and every flow of a protocol other than TCP).
    Udp = 0,
    /// TCP flows.
    Tcp = 1,
}

impl PunchProtocol {
    /// Every protocol, in slot order.
    pub const ALL: [PunchProtocol; 2] = [PunchProtocol::Udp, PunchProtocol::Tcp];
    /// Number of slots in [`PUNCH_STATS_MAP`].
    pub const COUNT: u32 = 2;

    /// The protocol of an IP protocol number (6: TCP; anything else counts as UDP).
    #[inline(always)]
    pub const fn from_ip(protocol: u32) -> Self {
        if protocol == 6 { Self::Tcp } else { Self::Udp }
    }

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// Punch outcomes of one [`PunchProtocol`] counted on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PunchStats {
    /// Bounced packets, indexed by [`BounceReason`].
    pub bounced: [u64; BOUNCE_SLOTS],
    /// Punched flows by time from first egress to first ingress: slot `i` counts times
    /// in `(PUNCH_TIME_BOUNDS_NS[i-1], PUNCH_TIME_BOUNDS_NS[i]]`, the last slot the rest.
    /// Their sum is the number of punched flows.
    pub punch_time_buckets: [u64; PUNCH_TIME_SLOTS],
    /// Sum of those times in nanoseconds.
    pub punch_time_sum_ns: u64,
}

/// The histogram slot of a punch time: the first bucket whose bound is not below it.
/// Written as a ladder of comparisons so the verifier sees no loop.
#[inline(always)]
pub const fn punch_time_slot(ns: u64) -> usize {
    let b = &PUNCH_TIME_BOUNDS_NS;
    if ns <= b[6] {
        if ns <= b[2] {
            if ns <= b[0] {
                0
            } else if ns <= b[1] {
                1
            } else {
                2
            }
        } else if ns <= b[3] {
            3
        } else if ns <= b[4] {
            4
        } else if ns <= b[5] {
            5
        } else {
            6
        }
    } else if ns <= b[9] {
        if ns <= b[7] {
            7
        } else if ns <= b[8] {
            8
        } else {
            9
        }
    } else if ns <= b[10] {
        10
    } else if ns <= b[11] {
        11
    } else if ns <= b[12] {
        12
    } else {
        13
    }
}

/// Name of the relay fast path's tc ingress classifier.
pub const RELAY_PROGRAM: &str = "relay_fast_path";
/// Name of the hash map from [`RelayChannelKey`] to [`RelayChannel`]: ChannelData from
/// a client on a bound channel.
pub const RELAY_CHANNELS_MAP: &str = "RELAY_CHANNELS";
/// Name of the hash map from [`RelayPeerKey`] to [`RelayPeer`]: UDP from a permitted
/// peer to a relay address whose allocation has a channel bound to it.
pub const RELAY_PEERS_MAP: &str = "RELAY_PEERS";
/// Name of the per-CPU array of [`RelayCounters`], one per allocation id.
pub const RELAY_ALLOCATION_COUNTERS_MAP: &str = "RELAY_ALLOCATION_COUNTERS";
/// Name of the one-slot per-CPU array of [`RelayCounters`]: all allocations together.
pub const RELAY_TOTALS_MAP: &str = "RELAY_TOTALS";
/// Name of the one-slot array holding [`RelaySettings`].
pub const RELAY_SETTINGS_MAP: &str = "RELAY_SETTINGS";
/// Capacity of the channel and peer maps (entries beyond it stay in userspace).
pub const RELAY_MAX_ENTRIES: u32 = 65_536;
/// Allocation ids the kernel counts (allocations with larger ids stay in userspace).
pub const RELAY_MAX_ALLOCATIONS: u32 = 16_384;
/// What the relay program returns for a packet it rewrote for local delivery:
/// `TC_ACT_OK` (`TCX_PASS`), up the stack with its new addresses.
pub const TC_ACT_OK: i32 = 0;
/// `TC_ACT_REDIRECT`, after `bpf_redirect_neigh`.
pub const TC_ACT_REDIRECT: i32 = 7;

/// [`RelayPeer::flags`] / [`RelayChannel::flags`]: the destination (the client, or
/// the peer) is an address of this host, so a rewritten packet is delivered up the
/// local stack rather than routed out.
pub const RELAY_DESTINATION_LOCAL: u32 = 1;

/// Which traffic the relay program looks at, in the single slot of
/// [`RELAY_SETTINGS_MAP`]. Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelaySettings {
    /// The TURN service port (ChannelData arrives there); 0 disables the program.
    pub service_port: u16,
    /// First relay port.
    pub relay_port_min: u16,
    /// Last relay port.
    pub relay_port_max: u16,
    /// Always zero.
    pub pad: u16,
}

/// A client's bound channel, as ChannelData from it arrives: IPv4 addresses as
/// native-endian words of their wire bytes (what a 32-bit load from the packet gives),
/// ports and channel in wire (big-endian) order, as loaded from the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RelayChannelKey {
    /// The client's address (the packet's source).
    pub client_ip: u32,
    /// The gateway address it sent to (the packet's destination).
    pub service_ip: u32,
    /// The client's port.
    pub client_port: u16,
    /// The service port.
    pub service_port: u16,
    /// The channel number.
    pub channel: u16,
    /// Always zero.
    pub pad: u16,
}

/// Where a client's channel goes: from `relay` to `peer` (encoding as in
/// [`RelayChannelKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayChannel {
    /// The allocation's relay address.
    pub relay_ip: u32,
    /// The peer's address.
    pub peer_ip: u32,
    /// The relay port.
    pub relay_port: u16,
    /// The peer's port.
    pub peer_port: u16,
    /// The allocation id: the slot of [`RELAY_ALLOCATION_COUNTERS_MAP`].
    pub allocation: u32,
    /// [`RELAY_DESTINATION_LOCAL`] when the peer is an address of this host.
    pub flags: u32,
    /// Always zero.
    pub pad: u32,
    /// When the entry lapses (CLOCK_MONOTONIC ns, compared with the coarse clock).
    pub expires_ns: u64,
}

/// A peer sending to a relay address (encoding as in [`RelayChannelKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RelayPeerKey {
    /// The peer's address (the packet's source).
    pub peer_ip: u32,
    /// The relay address (the packet's destination).
    pub relay_ip: u32,
    /// The peer's port.
    pub peer_port: u16,
    /// The relay port.
    pub relay_port: u16,
}

/// Where a peer's datagrams to a relay address go: to the client as ChannelData on
/// `channel`, from the service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayPeer {
    /// The client's address.
    pub client_ip: u32,
    /// The gateway address the client talks to.
    pub service_ip: u32,
    /// The client's port.
    pub client_port: u16,
    /// The service port.
    pub service_port: u16,
    /// The channel number bound to this peer.
    pub channel: u16,
    /// Always zero.
    pub pad: u16,
    /// The allocation id.
    pub allocation: u32,
    /// [`RELAY_DESTINATION_LOCAL`] when the client is an address of this host.
    pub flags: u32,
    /// When the entry lapses (CLOCK_MONOTONIC ns).
    pub expires_ns: u64,
}

/// Datagrams and application bytes (TURN framing excluded) the fast path relayed, on
/// one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Client to peer: datagrams.
    pub to_peer_packets: u64,
    /// Client to peer: bytes.
    pub to_peer_bytes: u64,
    /// Peer to client: datagrams.
    pub to_client_packets: u64,
    /// Peer to client: bytes.
    pub to_client_bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all of them): `#[repr(C)]`, made only of integers and integer arrays,
    // no padding (explicit `pad` fields keep every byte initialised).
    unsafe impl aya::Pod for super::UdpCounters {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::PunchStats {}
    unsafe impl aya::Pod for super::RelaySettings {}
    unsafe impl aya::Pod for super::RelayChannelKey {}
    unsafe impl aya::Pod for super::RelayChannel {}
    unsafe impl aya::Pod for super::RelayPeerKey {}
    unsafe impl aya::Pod for super::RelayPeer {}
    unsafe impl aya::Pod for super::RelayCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 44);
        assert_eq!(core::mem::size_of::<FlowState>(), 56);
        assert_eq!(core::mem::size_of::<RelaySettings>(), 8);
        assert_eq!(core::mem::size_of::<RelayChannelKey>(), 16);
        assert_eq!(core::mem::size_of::<RelayChannel>(), 32);
        assert_eq!(core::mem::size_of::<RelayPeerKey>(), 12);
        assert_eq!(core::mem::size_of::<RelayPeer>(), 32);
        assert_eq!(core::mem::size_of::<RelayCounters>(), 32);
        assert_eq!(
            core::mem::size_of::<PunchStats>(),
            8 * (BOUNCE_SLOTS + PUNCH_TIME_SLOTS + 1)
        );
    }

    #[test]
    fn punch_time_slot_matches_a_linear_search() {
        let mut probes = [0u64; 64];
        let mut n = 0;
        for bound in PUNCH_TIME_BOUNDS_NS {
            for v in [bound - 1, bound, bound + 1] {
                probes[n] = v;
                n += 1;
            }
        }
        probes[n] = 0;
        probes[n + 1] = u64::MAX;
        for &ns in &probes[..n + 2] {
            let expected = PUNCH_TIME_BOUNDS_NS
                .iter()
                .position(|&b| ns <= b)
                .unwrap_or(PUNCH_TIME_BOUNDS_NS.len());
            assert_eq!(punch_time_slot(ns), expected, "{ns} ns");
        }
    }

    #[test]
    fn reasons_index_their_slots() {
        for (i, reason) in BounceReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
            assert!((*reason as usize) < BOUNCE_SLOTS);
        }
    }
}
