//! The gateway's kernel programs: a tc classifier pair that counts UDP traffic on the
//! gateway's ports and follows punch flows through their first packets.
//!
//! * Egress packet of a punch flow: the hole is open on this side (first-seen time).
//! * Ingress packet after egress: the flow is punched, counted once, with the time
//!   since the first egress packet in a histogram.
//! * Ingress packet before any egress: it bounced (a stateful NAT or firewall at this
//!   point would drop it).
//! * ICMP/ICMPv6 errors quoting a punch flow, and TCP RSTs on a punch flow that is not
//!   punched yet: bounced, with the reason.
//!
//! Outcomes are counted per protocol: UDP and TCP flows have a slot each in
//! `PUNCH_STATS`.
//!
//! The relay's kernel fast path, `relay_fast_path`, is in [`relay`]: unlike the
//! observers it rewrites and redirects the packets it handles.
//!
//! Both observers always return `TC_ACT_UNSPEC` (`TCX_NEXT`): they observe, never change
//! the packet's fate, and let any later tc program on the interface run. Parsing is fixed-size, at constant offsets, with a bounds check
//! before every read (direct packet access); there are no loops. Only Ethernet-framed
//! devices (veth, physical NICs, loopback) are understood; IPv4 headers with options,
//! IPv6 extension headers and VLAN tags are not parsed (such packets are ignored).
#![no_std]
#![no_main]
// Atomic read-modify-write on shared map values: the BPF target declares no
// compare-and-swap, so `core::sync::atomic` offers only loads and stores there, while
// the BPF instruction set (v3) has atomic add, or and fetch.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod relay;

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use gateway_ebpf::{
    BounceReason, Direction, Endpoint, FAMILY_IPV4, FAMILY_IPV6, FLOW_PUNCHED, FLOW_TABLE_CAPACITY,
    FlowKey, FlowState, MAX_IGNORED_REMOTES, PORTS_PER_ENTRY, PunchProtocol, PunchStats,
    STUN_MAGIC_COOKIE, TC_ACT_UNSPEC, UdpCounters, WATCHED_PORTS_ENTRIES, punch_time_slot,
    settings, watch,
};

#[map(name = "UDP_COUNTERS")]
static UDP_COUNTERS: PerCpuArray<UdpCounters> = PerCpuArray::with_max_entries(Direction::COUNT, 0);

#[map(name = "WATCHED_PORTS")]
static WATCHED_PORTS: Array<[u8; PORTS_PER_ENTRY]> =
    Array::with_max_entries(WATCHED_PORTS_ENTRIES, 0);

#[map(name = "SETTINGS")]
static SETTINGS: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "IGNORED_REMOTES")]
static IGNORED_REMOTES: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_IGNORED_REMOTES, 0);

#[map(name = "PUNCH_FLOWS")]
static PUNCH_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(FLOW_TABLE_CAPACITY, 0);

#[map(name = "PUNCH_STATS")]
static PUNCH_STATS: PerCpuArray<PunchStats> =
    PerCpuArray::with_max_entries(PunchProtocol::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_HDR_LEN: usize = 8;
const TCP_RST: u8 = 0x04;
/// Bytes that must be in the linear part of the packet for the deepest parse (an
/// ICMPv6 error quoting IPv6 + ports is 14 + 40 + 8 + 40 + 4 = 106).
const PARSE_LEN: u32 = 128;

#[classifier]
pub fn observe_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Direction::Ingress);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn observe_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Direction::Egress);
    TC_ACT_UNSPEC
}

/// The overhead benchmark's baseline: the cheapest possible classifier.
#[classifier]
pub fn pass_through(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// `size_of::<T>()` bytes at the constant `offset`, if the linear packet data holds
/// them. Every offset in this file is a constant per address family (no IPv4 options,
/// no IPv6 extension headers), which is what keeps the verifier's range tracking
/// simple: with variable offsets LLVM recombines the pointer arithmetic and the
/// verifier loses the checked range.
#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: the bytes lie between data and data_end (checked above, and by the
    // verifier); packet data has no alignment guarantee, hence the unaligned read.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// The fixed layout of one IP version's packets.
trait Family {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    const TAG: u8;
    /// Length of the IP header (IPv4 without options, IPv6 without extensions).
    const HDR_LEN: usize;
    /// Offset of the source address within the IP header (the destination follows).
    const ADDRS: usize;
    /// Length of one address.
    const ADDR_LEN: usize;
    /// Offset of the protocol / next-header byte within the IP header.
    const PROTOCOL: usize;
    /// Protocol number of this version's ICMP.
    const ICMP: u8;
    /// Whether the IP header at `offset` is one this layout describes.
    fn plain_header(ctx: &TcContext, offset: usize) -> bool;
    /// The bounce reason of an ICMP error of this version, if it is one.
    fn bounce_reason(kind: u8, code: u8) -> Option<BounceReason>;
}

struct V4;
struct V6;

impl Family for V4 {
    const TAG: u8 = FAMILY_IPV4;
    const HDR_LEN: usize = 20;
    const ADDRS: usize = 12;
    const ADDR_LEN: usize = 4;
    const PROTOCOL: usize = 9;
    const ICMP: u8 = IPPROTO_ICMP;

    #[inline(always)]
    fn plain_header(ctx: &TcContext, offset: usize) -> bool {
        // Version 4 with a 20-byte header, and not a later fragment (those carry no
        // transport header).
        let (Some(version_ihl), Some(frag)) =
            (read::<u8>(ctx, offset), read::<u16>(ctx, offset + 6))
        else {
            return false;
        };
        version_ihl == 0x45 && u16::from_be(frag) & 0x1FFF == 0
    }

    #[inline(always)]
    fn bounce_reason(kind: u8, code: u8) -> Option<BounceReason> {
        Some(match (kind, code) {
            (3, 3) => BounceReason::IcmpPortUnreachable,
            (3, 1 | 7 | 12) => BounceReason::IcmpHostUnreachable,
            (3, 0 | 6 | 11) => BounceReason::IcmpNetUnreachable,
            (3, 9 | 10 | 13) => BounceReason::IcmpAdminProhibited,
            (11, _) => BounceReason::IcmpTimeExceeded,
            _ => return None,
        })
    }
}

impl Family for V6 {
    const TAG: u8 = FAMILY_IPV6;
    const HDR_LEN: usize = 40;
    const ADDRS: usize = 8;
    const ADDR_LEN: usize = 16;
    const PROTOCOL: usize = 6;
    const ICMP: u8 = IPPROTO_ICMPV6;

    #[inline(always)]
    fn plain_header(ctx: &TcContext, offset: usize) -> bool {
        read::<u8>(ctx, offset).is_some_and(|b| b >> 4 == 6)
    }

    #[inline(always)]
    fn bounce_reason(kind: u8, code: u8) -> Option<BounceReason> {
        Some(match (kind, code) {
            (1, 4) => BounceReason::IcmpPortUnreachable,
            (1, 3) => BounceReason::IcmpHostUnreachable,
            (1, 0) => BounceReason::IcmpNetUnreachable,
            (1, 1 | 5 | 6) => BounceReason::IcmpAdminProhibited,
            (3, _) => BounceReason::IcmpTimeExceeded,
            _ => return None,
        })
    }
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: Direction) {
    // Headers of locally made and veth packets are linear already; pull them in for
    // the rare packet (GRO, tunnels) whose first bytes are not.
    let want = if ctx.len() < PARSE_LEN {
        ctx.len()
    } else {
        PARSE_LEN
    };
    if ctx.data_end().saturating_sub(ctx.data()) < want as usize {
        let _ = ctx.pull_data(want);
    }
    let Some(ether_type) = read::<u16>(ctx, 12) else {
        return;
    };
    match u16::from_be(ether_type) {
        ETH_P_IP => transport::<V4>(ctx, direction),
        ETH_P_IPV6 => transport::<V6>(ctx, direction),
        _ => {}
    }
}

/// Dispatches on the transport protocol of a packet of family `F`.
#[inline(always)]
fn transport<F: Family>(ctx: &TcContext, direction: Direction) {
    if !F::plain_header(ctx, ETH_HDR_LEN) {
        return;
    }
    let Some(protocol) = read::<u8>(ctx, ETH_HDR_LEN + F::PROTOCOL) else {
        return;
    };
    if protocol == IPPROTO_UDP {
        udp::<F>(ctx, direction);
    } else if protocol == IPPROTO_TCP {
        tcp::<F>(ctx, direction);
    } else if protocol == F::ICMP && direction == Direction::Ingress {
        icmp_error::<F>(ctx);
    }
}

#[inline(always)]
fn settings() -> u32 {
    SETTINGS.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn watched(port: u16) -> u8 {
    let Some(entry) = WATCHED_PORTS.get(u32::from(port) / PORTS_PER_ENTRY as u32) else {
        return 0;
    };
    entry
        .get(usize::from(port) % PORTS_PER_ENTRY)
        .copied()
        .unwrap_or(0)
}

/// The address at `offset` as key words (IPv4: one word, the rest zero).
#[inline(always)]
fn read_addr<F: Family>(ctx: &TcContext, offset: usize) -> Option<[u32; 4]> {
    if F::TAG == FAMILY_IPV4 {
        Some([read::<u32>(ctx, offset)?, 0, 0, 0])
    } else {
        Some([
            read::<u32>(ctx, offset)?,
            read::<u32>(ctx, offset + 4)?,
            read::<u32>(ctx, offset + 8)?,
            read::<u32>(ctx, offset + 12)?,
        ])
    }
}

/// The flow key of the packet whose IP header starts at `ip`, seen in `direction`,
/// with transport ports `sport`/`dport`.
#[inline(always)]
fn flow_key<F: Family>(
    ctx: &TcContext,
    ip: usize,
    direction: Direction,
    sport: u16,
    dport: u16,
    protocol: u8,
) -> Option<FlowKey> {
    let source = Endpoint {
        addr: read_addr::<F>(ctx, ip + F::ADDRS)?,
        port: sport,
        family: F::TAG,
        pad: 0,
    };
    let destination = Endpoint {
        addr: read_addr::<F>(ctx, ip + F::ADDRS + F::ADDR_LEN)?,
        port: dport,
        family: F::TAG,
        pad: 0,
    };
    let (local, remote) = match direction {
        Direction::Egress => (source, destination),
        Direction::Ingress => (destination, source),
    };
    Some(FlowKey {
        local,
        remote,
        protocol: protocol as u32,
    })
}

/// The ports of the transport header at `offset`, in host order.
#[inline(always)]
fn ports(ctx: &TcContext, offset: usize) -> Option<(u16, u16)> {
    let [sport, dport] = read::<[u16; 2]>(ctx, offset)?;
    Some((u16::from_be(sport), u16::from_be(dport)))
}

#[inline(always)]
fn udp<F: Family>(ctx: &TcContext, direction: Direction) {
    let l4 = ETH_HDR_LEN + F::HDR_LEN;
    let Some((sport, dport)) = ports(ctx, l4) else {
        return;
    };
    let local_port = match direction {
        Direction::Egress => sport,
        Direction::Ingress => dport,
    };
    let flags = watched(local_port);
    if flags & watch::COUNT_UDP != 0
        && let Some(slot) = UDP_COUNTERS.get_ptr_mut(direction as u32)
    {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU meanwhile.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(ctx.len()).saturating_sub(ETH_HDR_LEN as u64);
        }
    }
    let config = settings();
    let punch = flags & watch::PUNCH_UDP != 0
        || (config & settings::STUN_COOKIE != 0
            && read::<u32>(ctx, l4 + 8 + 4) == Some(STUN_MAGIC_COOKIE.to_be()));
    if !punch {
        return;
    }
    let Some(key) = flow_key::<F>(ctx, ETH_HDR_LEN, direction, sport, dport, IPPROTO_UDP) else {
        return;
    };
    track(direction, &key, false, config);
}

#[inline(always)]
fn tcp<F: Family>(ctx: &TcContext, direction: Direction) {
    let l4 = ETH_HDR_LEN + F::HDR_LEN;
    let (Some((sport, dport)), Some(tcp_flags)) = (ports(ctx, l4), read::<u8>(ctx, l4 + 13)) else {
        return;
    };
    let local_port = match direction {
        Direction::Egress => sport,
        Direction::Ingress => dport,
    };
    if watched(local_port) & watch::PUNCH_TCP == 0 {
        return;
    }
    let Some(key) = flow_key::<F>(ctx, ETH_HDR_LEN, direction, sport, dport, IPPROTO_TCP) else {
        return;
    };
    track(direction, &key, tcp_flags & TCP_RST != 0, settings());
}

/// Whether flows to `remote` are not punch flows: the endpoint itself, or its whole
/// host (an entry with port 0: e.g. the gateway, whose relay ports are not known in
/// advance).
#[inline(always)]
fn ignored(remote: &Endpoint) -> bool {
    // SAFETY: presence tests only.
    if unsafe { IGNORED_REMOTES.get(remote) }.is_some() {
        return true;
    }
    let host = Endpoint { port: 0, ..*remote };
    unsafe { IGNORED_REMOTES.get(&host) }.is_some()
}

/// The precise clock, for the punch-time measurement.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The coarse clock (same base, a tick's resolution, cheaper), for idle expiry.
#[inline(always)]
fn coarse_now_ns() -> u64 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Atomically adds one to a counter in a map value shared by all CPUs.
///
/// # Safety
/// `field` points into a live map value (8-byte aligned).
#[inline(always)]
unsafe fn increment(field: *mut u64) {
    // SAFETY: per the contract; every concurrent writer uses atomic operations.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, 1);
    }
}

/// Atomically ORs `bits` into a flag word of a shared map value; the previous value.
///
/// # Safety
/// As for [`increment`].
#[inline(always)]
unsafe fn fetch_or(field: *mut u64, bits: u64) -> u64 {
    // SAFETY: per the contract.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(field, bits) }
}

/// Updates the flow table for a punch packet. The ignored remotes are consulted only
/// when the flow is not in the table (no flow is ever made for them).
#[inline(always)]
fn track(direction: Direction, key: &FlowKey, rst: bool, config: u32) {
    let flow = PUNCH_FLOWS.get_ptr_mut(key);
    if flow.is_none() && config & settings::HAS_IGNORED_REMOTES != 0 && ignored(&key.remote) {
        return;
    }
    match (direction, flow) {
        (Direction::Egress, Some(flow)) => {
            // SAFETY: a live map value (see `increment`).
            unsafe {
                increment(&raw mut (*flow).egress_packets);
                (*flow).last_seen_ns = coarse_now_ns();
            }
        }
        (Direction::Egress, None) => {
            // Field order as declared (see `FlowState`).
            let state = FlowState {
                flags: 0,
                first_egress_ns: now_ns(),
                ingress_packets: 0,
                last_seen_ns: coarse_now_ns(),
                bounced_packets: 0,
                egress_packets: 1,
                punched_ns: 0,
            };
            // Another CPU may have created it meanwhile: its first egress stands.
            if PUNCH_FLOWS.insert(key, &state, BPF_NOEXIST as u64).is_err()
                && let Some(flow) = PUNCH_FLOWS.get_ptr_mut(key)
            {
                // SAFETY: as above.
                unsafe {
                    increment(&raw mut (*flow).egress_packets);
                }
            }
        }
        (Direction::Ingress, None) => {
            // No egress yet. The flow is not created here, so unsolicited traffic
            // cannot fill the table.
            bounce(key, BounceReason::BeforeEgress);
        }
        (Direction::Ingress, Some(flow)) => {
            // SAFETY: a live map value (see `increment`).
            unsafe {
                let punched =
                    core::ptr::read_volatile(&raw const (*flow).flags) & FLOW_PUNCHED != 0;
                if rst {
                    if !punched {
                        increment(&raw mut (*flow).bounced_packets);
                        bounce(key, BounceReason::TcpRst);
                    }
                    return;
                }
                increment(&raw mut (*flow).ingress_packets);
                // Only the first ingress packets pay for the atomic flag and the clock;
                // of racing ones, exactly one sees the flag unset.
                if !punched && fetch_or(&raw mut (*flow).flags, FLOW_PUNCHED) & FLOW_PUNCHED == 0 {
                    let now = now_ns();
                    (*flow).punched_ns = now;
                    punched_after(key, now.saturating_sub((*flow).first_egress_ns));
                }
            }
        }
    }
}

/// The statistics slot of `key`'s protocol.
#[inline(always)]
fn stats_slot(key: &FlowKey) -> u32 {
    PunchProtocol::from_ip(key.protocol) as u32
}

#[inline(always)]
fn bounce(key: &FlowKey, reason: BounceReason) {
    if let Some(stats) = PUNCH_STATS.get_ptr_mut(stats_slot(key)) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU meanwhile.
        unsafe {
            if let Some(slot) = (*stats).bounced.get_mut(reason as usize) {
                *slot += 1;
            }
        }
    }
}

#[inline(always)]
fn punched_after(key: &FlowKey, elapsed_ns: u64) {
    if let Some(stats) = PUNCH_STATS.get_ptr_mut(stats_slot(key)) {
        // SAFETY: per-CPU slot, as in `bounce`.
        unsafe {
            if let Some(slot) = (*stats)
                .punch_time_buckets
                .get_mut(punch_time_slot(elapsed_ns))
            {
                *slot += 1;
            }
            (*stats).punch_time_sum_ns += elapsed_ns;
        }
    }
}

/// An ICMP error's quoted flow: counts a bounce when it is a punch flow.
#[inline(always)]
fn quoted_bounce(key: &FlowKey, reason: BounceReason) {
    if let Some(flow) = PUNCH_FLOWS.get_ptr_mut(key) {
        // SAFETY: a live map value (see `increment`).
        unsafe {
            increment(&raw mut (*flow).bounced_packets);
        }
        bounce(key, reason);
    }
}

/// An ICMP or ICMPv6 error arriving: a bounce when the packet it quotes (which this
/// side sent: source = local, destination = remote) belongs to a punch flow.
#[inline(always)]
fn icmp_error<F: Family>(ctx: &TcContext) {
    let l4 = ETH_HDR_LEN + F::HDR_LEN;
    let Some([kind, code]) = read::<[u8; 2]>(ctx, l4) else {
        return;
    };
    let Some(reason) = F::bounce_reason(kind, code) else {
        return;
    };
    let inner = l4 + ICMP_HDR_LEN;
    if !F::plain_header(ctx, inner) {
        return;
    }
    let Some(protocol) = read::<u8>(ctx, inner + F::PROTOCOL) else {
        return;
    };
    if protocol != IPPROTO_UDP && protocol != IPPROTO_TCP {
        return;
    }
    let Some((sport, dport)) = ports(ctx, inner + F::HDR_LEN) else {
        return;
    };
    if let Some(key) = flow_key::<F>(ctx, inner, Direction::Egress, sport, dport, protocol) {
        quoted_bounce(&key, reason);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
