//! The TURN relay's fast path: a tc ingress classifier that forwards bound channels
//! in the kernel, from maps that only userspace fills (from the TURN core's
//! `FastPath` instructions).
//!
//! Handled today (IPv4, a 20-byte IP header, not a fragment, UDP):
//! * ChannelData from a client on a bound channel whose peer is itself a relay address
//!   of this gateway whose allocation has a channel bound back to the sender's relay
//!   address (two clients relaying to each other through one server, the common WebRTC
//!   case): rewritten in place, in one pass and at the same size, into the ChannelData
//!   the second client would have received from the userspace relay (addresses, ports,
//!   channel number, IP and UDP checksums), then delivered up the local stack when
//!   that client is on this host, or routed out (FIB lookup, `bpf_redirect_neigh`).
//!
//! Everything else is left untouched (`TC_ACT_UNSPEC`) for the userspace relay, which
//! stays correct on its own: unknown flows, expired entries, ChannelData to a peer that
//! is not a local relay address, UDP from peers, truncated messages, IP options,
//! fragments, IPv6, and destinations the FIB cannot route from here (forwarding off).
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use gateway_ebpf::{
    RELAY_DESTINATION_LOCAL, RELAY_MAX_ALLOCATIONS, RELAY_MAX_ENTRIES, RelayChannel,
    RelayChannelKey, RelayCounters, RelayPeer, RelayPeerKey, RelaySettings, TC_ACT_OK,
    TC_ACT_UNSPEC,
};

use crate::read;

#[map(name = "RELAY_CHANNELS")]
static RELAY_CHANNELS: HashMap<RelayChannelKey, RelayChannel> =
    HashMap::with_max_entries(RELAY_MAX_ENTRIES, 0);

#[map(name = "RELAY_PEERS")]
static RELAY_PEERS: HashMap<RelayPeerKey, RelayPeer> =
    HashMap::with_max_entries(RELAY_MAX_ENTRIES, 0);

#[map(name = "RELAY_ALLOCATION_COUNTERS")]
static RELAY_ALLOCATION_COUNTERS: PerCpuArray<RelayCounters> =
    PerCpuArray::with_max_entries(RELAY_MAX_ALLOCATIONS, 0);

#[map(name = "RELAY_TOTALS")]
static RELAY_TOTALS: PerCpuArray<RelayCounters> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "RELAY_SETTINGS")]
static RELAY_SETTINGS: Array<RelaySettings> = Array::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
/// Offsets of an Ethernet frame carrying IPv4 without options and UDP.
const IP: usize = 14;
const IP_CHECK: usize = IP + 10;
const IP_SRC: usize = IP + 12;
const IP_DST: usize = IP + 16;
const UDP: usize = IP + 20;
const UDP_CHECK: usize = UDP + 6;
const PAYLOAD: usize = UDP + 8;
/// ChannelData header length.
const CHANNEL_HEADER: usize = 4;
/// Bytes the parse needs in the linear part of the packet.
const PARSE_LEN: u32 = (PAYLOAD + CHANNEL_HEADER) as u32;

/// The relay fast path (attached on ingress of the relay's interfaces).
#[classifier]
pub fn relay_fast_path(ctx: TcContext) -> i32 {
    ingress(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Option<i32> {
    let settings = RELAY_SETTINGS.get(0)?;
    if settings.service_port == 0 {
        return None;
    }
    if ctx.data_end().saturating_sub(ctx.data()) < PARSE_LEN as usize {
        if ctx.len() < PARSE_LEN {
            return None;
        }
        ctx.pull_data(PARSE_LEN).ok()?;
    }
    if u16::from_be(read::<u16>(ctx, 12)?) != ETH_P_IP {
        return None;
    }
    let [version_ihl, _] = read::<[u8; 2]>(ctx, IP)?;
    let frag = u16::from_be(read::<u16>(ctx, IP + 6)?);
    // 20-byte header, neither a later fragment nor one with more to come.
    if version_ihl != 0x45 || frag & 0x3FFF != 0 || read::<u8>(ctx, IP + 9)? != IPPROTO_UDP {
        return None;
    }
    let dport = read::<u16>(ctx, UDP + 2)?;
    if u16::from_be(dport) == settings.service_port {
        return channel_data(ctx, dport);
    }
    None
}

/// The coarse clock (CLOCK_MONOTONIC at a tick's resolution): entries' expiry.
#[inline(always)]
fn coarse_now_ns() -> u64 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// ChannelData arriving at the service port.
#[inline(always)]
fn channel_data(ctx: &TcContext, service_port: u16) -> Option<i32> {
    let [c0, c1, l0, l1] = read::<[u8; 4]>(ctx, PAYLOAD)?;
    if c0 & 0xC0 != 0x40 {
        return None;
    }
    let tot_len = u16::from_be(read::<u16>(ctx, IP + 2)?);
    let udp_len = u16::from_be(read::<u16>(ctx, UDP + 4)?);
    let data_len = u16::from_be_bytes([l0, l1]);
    // The IP packet is exactly IP + UDP, the skb holds all of it, and the ChannelData
    // message fits in the UDP payload (padding after it is kept as it is).
    if u32::from(tot_len) != 20 + u32::from(udp_len)
        || ctx.len() < IP as u32 + u32::from(tot_len)
        || u32::from(data_len) + (8 + CHANNEL_HEADER) as u32 > u32::from(udp_len)
    {
        return None;
    }
    let key = RelayChannelKey {
        client_ip: read::<u32>(ctx, IP_SRC)?,
        service_ip: read::<u32>(ctx, IP_DST)?,
        client_port: read::<u16>(ctx, UDP)?,
        service_port,
        channel: u16::from_ne_bytes([c0, c1]),
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let entry = *unsafe { RELAY_CHANNELS.get(&key) }?;
    let now = coarse_now_ns();
    if entry.expires_ns <= now {
        return None;
    }
    // Relay to relay: the peer is a relay address of ours whose allocation has a
    // channel bound to this allocation's relay address.
    let back = RelayPeerKey {
        peer_ip: entry.relay_ip,
        relay_ip: entry.peer_ip,
        peer_port: entry.relay_port,
        relay_port: entry.peer_port,
    };
    // SAFETY: as above.
    let other = *unsafe { RELAY_PEERS.get(&back) }?;
    if other.expires_ns <= now {
        return None;
    }
    let redirect = if other.flags & RELAY_DESTINATION_LOCAL != 0 {
        None
    } else {
        Some(route(ctx, other.service_ip, other.client_ip, tot_len)?)
    };
    // Same size: addresses, ports and channel number change, checksums follow.
    replace_u32(ctx, IP_SRC, key.client_ip, other.service_ip, true)?;
    replace_u32(ctx, IP_DST, key.service_ip, other.client_ip, true)?;
    replace_u16(ctx, UDP, key.client_port, other.service_port)?;
    replace_u16(ctx, UDP + 2, key.service_port, other.client_port)?;
    replace_u16(ctx, PAYLOAD, key.channel, other.channel)?;
    let bytes = u64::from(data_len);
    count(entry.allocation, true, bytes);
    count(other.allocation, false, bytes);
    count_totals(bytes);
    Some(match redirect {
        None => TC_ACT_OK,
        // SAFETY: no parameters: the kernel resolves the neighbour itself.
        Some(ifindex) => unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 },
    })
}

/// The interface a packet from `src` to `dst` leaves by (FIB lookup, as if forwarded
/// from the interface it arrived on); `None` when the FIB will not say (forwarding
/// disabled on that interface, no route, a local destination).
#[inline(always)]
fn route(ctx: &TcContext, src: u32, dst: u32, tot_len: u16) -> Option<u32> {
    // SAFETY: a plain C struct of integers: all zeroes is a valid value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: `skb` is the program's context pointer.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: `params` is a live, correctly sized bpf_fib_lookup.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    (ret == i64::from(BPF_FIB_LKUP_RET_SUCCESS)).then_some(params.ifindex)
}

/// Replaces the 4 bytes at `offset` (`from` → `to`, both as loaded) and updates the
/// UDP checksum, and with `ip` the IPv4 header checksum and the pseudo-header.
#[inline(always)]
fn replace_u32(ctx: &TcContext, offset: usize, from: u32, to: u32, ip: bool) -> Option<()> {
    if ip {
        ctx.l3_csum_replace(IP_CHECK, u64::from(from), u64::from(to), 4)
            .ok()?;
    }
    let pseudo = if ip { u64::from(BPF_F_PSEUDO_HDR) } else { 0 };
    ctx.l4_csum_replace(
        UDP_CHECK,
        u64::from(from),
        u64::from(to),
        pseudo | u64::from(BPF_F_MARK_MANGLED_0) | 4,
    )
    .ok()?;
    ctx.store(offset, &to, 0).ok()
}

/// Replaces the 2 bytes at `offset` and updates the UDP checksum.
#[inline(always)]
fn replace_u16(ctx: &TcContext, offset: usize, from: u16, to: u16) -> Option<()> {
    ctx.l4_csum_replace(
        UDP_CHECK,
        u64::from(from),
        u64::from(to),
        u64::from(BPF_F_MARK_MANGLED_0) | 2,
    )
    .ok()?;
    ctx.store(offset, &to, 0).ok()
}

/// Adds one datagram of `bytes` to allocation `id`'s counters, client to peer or
/// peer to client.
#[inline(always)]
fn count(id: u32, to_peer: bool, bytes: u64) {
    if let Some(slot) = RELAY_ALLOCATION_COUNTERS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU meanwhile.
        unsafe { add(slot, to_peer, !to_peer, bytes) }
    }
}

/// One relay-to-relay datagram in the totals: once each way.
#[inline(always)]
fn count_totals(bytes: u64) {
    if let Some(slot) = RELAY_TOTALS.get_ptr_mut(0) {
        // SAFETY: as in `count`.
        unsafe { add(slot, true, true, bytes) }
    }
}

/// # Safety
/// `slot` points at this CPU's live map value.
#[inline(always)]
unsafe fn add(slot: *mut RelayCounters, to_peer: bool, to_client: bool, bytes: u64) {
    // SAFETY: per the contract.
    unsafe {
        if to_peer {
            (*slot).to_peer_packets += 1;
            (*slot).to_peer_bytes += bytes;
        }
        if to_client {
            (*slot).to_client_packets += 1;
            (*slot).to_client_bytes += bytes;
        }
    }
}
