//! The TURN relay's fast path: a tc ingress classifier that forwards bound channels
//! in the kernel, from maps that only userspace fills (from the TURN core's
//! `FastPath` instructions).
//!
//! Handled (IPv4, a 20-byte IP header, not a fragment, not a GSO packet, UDP):
//! * ChannelData from a client on a bound channel whose peer is itself a relay address
//!   of this gateway whose allocation has a channel bound back to the sender's relay
//!   address (two clients relaying to each other through one server, the common WebRTC
//!   case): rewritten in place, in one pass and at the same size, into the ChannelData
//!   the second client would have received from the userspace relay (addresses, ports,
//!   channel number, IP and UDP checksums).
//! * ChannelData from a client on any other bound channel: turned into the plain UDP
//!   datagram the allocation's relay address would send to the peer (the 4-byte header
//!   and any padding stripped: the packet shrinks).
//! * UDP from a peer to a relay address whose allocation has a channel bound to that
//!   peer: turned into the ChannelData the client would get (the packet grows by 4).
//!
//! Rewritten packets are delivered up the local stack when their new destination is on
//! this host, or routed out (FIB lookup, `bpf_redirect_neigh`).
//!
//! **Resizing and checksum offload.** The IP and UDP headers never move: the payload
//! is shifted by 4 bytes inside the packet (in bounded chunks) and the tail trimmed or
//! extended with `bpf_skb_change_tail`. A packet sent on this host (loopback, or a
//! veth from a local namespace) carries `CHECKSUM_PARTIAL`: the kernel (or the NIC)
//! completes the UDP checksum later from `csum_start`, which points at the UDP header
//! and would be stale had the header moved (as `bpf_skb_adjust_room` moves it). Every
//! change reaches the checksum field through `bpf_l4_csum_replace`, which updates a full
//! checksum and, for a partial one, only its pseudo-header part: both kinds stay right.
//! Shifting by 4 bytes keeps every byte's 16-bit alignment, so the moved data adds
//! nothing to the sum; the ChannelData header words and padding are taken out of (or
//! put into) it explicitly.
//!
//! Everything else is left untouched (`TC_ACT_UNSPEC`) for the userspace relay, which
//! stays correct on its own: unknown flows, expired entries, truncated messages,
//! padding other than to the next multiple of 4, data over [`MAX_MOVE`] bytes, IP
//! options, fragments, GSO packets, IPv6, and destinations the FIB cannot route from
//! here (forwarding off, or a grown packet over the route's MTU).
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup as FibParams,
    },
    helpers::{
        bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect_neigh, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
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

/// One chunk of packet bytes being shifted (per CPU: a program runs to the end on
/// one CPU).
#[map(name = "RELAY_SCRATCH")]
static RELAY_SCRATCH: PerCpuArray<[u8; CHUNK]> = PerCpuArray::with_max_entries(1, 0);

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
/// The most data bytes the program shifts when it resizes a packet (larger datagrams
/// stay in userspace): 16 chunks of [`CHUNK`].
pub const MAX_MOVE: usize = 16 * CHUNK;
/// Bytes shifted per helper call (a stack buffer).
const CHUNK: usize = 128;

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
    // The headers, and the ChannelData header when there is room for one (a peer's
    // datagram may be shorter).
    let want = ctx.len().min(PARSE_LEN);
    if want < PAYLOAD as u32 {
        return None;
    }
    if ctx.data_end().saturating_sub(ctx.data()) < want as usize {
        ctx.pull_data(want).ok()?;
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
    // SAFETY: `skb` is the program's context pointer.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return None;
    }
    let dport = read::<u16>(ctx, UDP + 2)?;
    let port = u16::from_be(dport);
    if port == settings.service_port {
        return channel_data(ctx, dport);
    }
    if port >= settings.relay_port_min && port <= settings.relay_port_max {
        return from_peer(ctx);
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
    let Some(other) = (unsafe { RELAY_PEERS.get(&back) }).copied() else {
        return to_peer(ctx, &key, &entry, tot_len, udp_len, data_len);
    };
    if other.expires_ns <= now {
        return to_peer(ctx, &key, &entry, tot_len, udp_len, data_len);
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
    count_totals(true, true, bytes);
    Some(verdict(redirect))
}

/// ChannelData on a bound channel to a peer the relay-to-relay rewrite does not cover:
/// the plain UDP datagram from the relay address to the peer (shrunk by the
/// ChannelData header and padding).
#[inline(always)]
fn to_peer(
    ctx: &TcContext,
    key: &RelayChannelKey,
    entry: &RelayChannel,
    tot_len: u16,
    udp_len: u16,
    data_len: u16,
) -> Option<i32> {
    let data = usize::from(data_len);
    let pad = usize::from(udp_len) - 8 - CHANNEL_HEADER - data;
    // Only no padding or padding to the next multiple of 4 (what RFC 8656 describes).
    if data > MAX_MOVE || (pad != 0 && pad != (4 - data % 4) % 4) {
        return None;
    }
    let new_udp_len = 8 + data_len;
    let new_tot_len = 20 + new_udp_len;
    let redirect = if entry.flags & RELAY_DESTINATION_LOCAL != 0 {
        None
    } else {
        Some(route(ctx, entry.relay_ip, entry.peer_ip, new_tot_len)?)
    };
    // The padding bytes leave the sum: the aligned word holding them becomes the same
    // word with them zeroed (as the checksum pads an odd tail).
    if pad != 0 {
        let offset = PAYLOAD + CHANNEL_HEADER + (data & !3);
        let old = u32::from_ne_bytes(ctx.load::<[u8; 4]>(offset).ok()?);
        // The first `data % 4` bytes (in memory order) are data and stay.
        let keep = match data % 4 {
            1 => [0xFF, 0, 0, 0],
            2 => [0xFF, 0xFF, 0, 0],
            _ => [0xFF, 0xFF, 0xFF, 0],
        };
        csum_only(ctx, old, old & u32::from_ne_bytes(keep))?;
    }
    // The ChannelData header leaves the sum.
    let header = read::<u32>(ctx, PAYLOAD)?;
    csum_only(ctx, header, 0)?;
    rewrite_headers(
        ctx,
        Headers {
            src: (key.client_ip, entry.relay_ip),
            dst: (key.service_ip, entry.peer_ip),
            sport: (key.client_port, entry.relay_port),
            dport: (key.service_port, entry.peer_port),
            tot_len: (tot_len, new_tot_len),
            udp_len: (udp_len, new_udp_len),
        },
    )?;
    shift_down(ctx, PAYLOAD + CHANNEL_HEADER, PAYLOAD, data)?;
    // SAFETY: `skb` is the program's context pointer.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), IP as u32 + u32::from(new_tot_len), 0) }
        != 0
    {
        // The packet is half rewritten: drop it rather than pass it on.
        return Some(TC_ACT_SHOT);
    }
    let bytes = u64::from(data_len);
    count(entry.allocation, true, bytes);
    count_totals(true, false, bytes);
    Some(verdict(redirect))
}

/// UDP from a peer to a relay address: when that allocation has a channel bound to
/// the peer, the ChannelData its client would get (grown by the 4-byte header).
#[inline(always)]
fn from_peer(ctx: &TcContext) -> Option<i32> {
    let tot_len = u16::from_be(read::<u16>(ctx, IP + 2)?);
    let udp_len = u16::from_be(read::<u16>(ctx, UDP + 4)?);
    if u32::from(tot_len) != 20 + u32::from(udp_len)
        || udp_len < 8
        || ctx.len() < IP as u32 + u32::from(tot_len)
    {
        return None;
    }
    let data_len = udp_len - 8;
    let data = usize::from(data_len);
    if data > MAX_MOVE {
        return None;
    }
    let key = RelayPeerKey {
        peer_ip: read::<u32>(ctx, IP_SRC)?,
        relay_ip: read::<u32>(ctx, IP_DST)?,
        peer_port: read::<u16>(ctx, UDP)?,
        relay_port: read::<u16>(ctx, UDP + 2)?,
    };
    // SAFETY: the value is copied out at once.
    let entry = *unsafe { RELAY_PEERS.get(&key) }?;
    if entry.expires_ns <= coarse_now_ns() {
        return None;
    }
    let new_udp_len = udp_len + CHANNEL_HEADER as u16;
    let new_tot_len = 20 + new_udp_len;
    let redirect = if entry.flags & RELAY_DESTINATION_LOCAL != 0 {
        None
    } else {
        Some(route(ctx, entry.service_ip, entry.client_ip, new_tot_len)?)
    };
    let [c0, c1] = entry.channel.to_ne_bytes();
    let [l0, l1] = data_len.to_be_bytes();
    let header = [c0, c1, l0, l1];
    // The ChannelData header joins the sum (the data keeps its alignment).
    csum_only(ctx, 0, u32::from_ne_bytes(header))?;
    rewrite_headers(
        ctx,
        Headers {
            src: (key.peer_ip, entry.service_ip),
            dst: (key.relay_ip, entry.client_ip),
            sport: (key.peer_port, entry.service_port),
            dport: (key.relay_port, entry.client_port),
            tot_len: (tot_len, new_tot_len),
            udp_len: (udp_len, new_udp_len),
        },
    )?;
    // SAFETY: `skb` is the program's context pointer.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), IP as u32 + u32::from(new_tot_len), 0) }
        != 0
    {
        return Some(TC_ACT_SHOT);
    }
    if shift_up(ctx, PAYLOAD, PAYLOAD + CHANNEL_HEADER, data).is_none()
        || ctx.store(PAYLOAD, &header, 0).is_err()
    {
        return Some(TC_ACT_SHOT);
    }
    let bytes = u64::from(data_len);
    count(entry.allocation, false, bytes);
    count_totals(false, true, bytes);
    Some(verdict(redirect))
}

/// `TC_ACT_SHOT`: drop (only for a packet a helper failed on half way).
const TC_ACT_SHOT: i32 = 2;

/// What to return for a rewritten packet: local delivery, or the redirect.
#[inline(always)]
fn verdict(redirect: Option<u32>) -> i32 {
    match redirect {
        None => TC_ACT_OK,
        // SAFETY: no parameters: the kernel resolves the neighbour itself.
        Some(ifindex) => unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 },
    }
}

/// Old and new values (as loaded) of the header fields a resizing rewrite changes.
struct Headers {
    src: (u32, u32),
    dst: (u32, u32),
    sport: (u16, u16),
    dport: (u16, u16),
    /// Host order.
    tot_len: (u16, u16),
    /// Host order.
    udp_len: (u16, u16),
}

/// Writes the new IP and UDP header fields, with both checksums.
#[inline(always)]
fn rewrite_headers(ctx: &TcContext, h: Headers) -> Option<()> {
    replace_u32(ctx, IP_SRC, h.src.0, h.src.1, true)?;
    replace_u32(ctx, IP_DST, h.dst.0, h.dst.1, true)?;
    let (old_tot, new_tot) = (h.tot_len.0.to_be(), h.tot_len.1.to_be());
    ctx.l3_csum_replace(IP_CHECK, u64::from(old_tot), u64::from(new_tot), 2)
        .ok()?;
    ctx.store(IP + 2, &new_tot, 0).ok()?;
    replace_u16(ctx, UDP, h.sport.0, h.sport.1)?;
    replace_u16(ctx, UDP + 2, h.dport.0, h.dport.1)?;
    // The UDP length is in the pseudo-header and in the UDP header: a full checksum
    // changes twice, a partial one (pseudo-header only) once.
    let (old_len, new_len) = (h.udp_len.0.to_be(), h.udp_len.1.to_be());
    ctx.l4_csum_replace(
        UDP_CHECK,
        u64::from(old_len),
        u64::from(new_len),
        u64::from(BPF_F_PSEUDO_HDR) | u64::from(BPF_F_MARK_MANGLED_0) | 2,
    )
    .ok()?;
    replace_u16(ctx, UDP + 4, old_len, new_len)
}

/// Changes the UDP checksum as if the 4 bytes `from` became `to` (both as loaded),
/// without writing them: for bytes that come or go.
#[inline(always)]
fn csum_only(ctx: &TcContext, from: u32, to: u32) -> Option<()> {
    ctx.l4_csum_replace(
        UDP_CHECK,
        u64::from(from),
        u64::from(to),
        u64::from(BPF_F_MARK_MANGLED_0) | 4,
    )
    .ok()
}

/// Copies `N` (at most [`CHUNK`]) bytes from `from` to `to` through this CPU's
/// scratch buffer (the stack has no room for it).
#[inline(always)]
fn copy<const N: usize>(ctx: &TcContext, from: usize, to: usize) -> Option<()> {
    let buf = RELAY_SCRATCH.get_ptr_mut(0)?;
    let skb = ctx.skb.skb.cast();
    // SAFETY: `buf` is this CPU's live map value of CHUNK >= N bytes; the helpers
    // check the packet offsets themselves.
    unsafe {
        if bpf_skb_load_bytes(skb, from as u32, buf.cast(), N as u32) != 0 {
            return None;
        }
        (bpf_skb_store_bytes(ctx.skb.skb, to as u32, buf.cast(), N as u32, 0) == 0).then_some(())
    }
}

/// Copies `len` (at most [`MAX_MOVE`]) bytes from `from` down to `to` < `from`,
/// lowest first (so overlapping ranges are safe).
#[inline(always)]
fn shift_down(ctx: &TcContext, from: usize, to: usize, len: usize) -> Option<()> {
    let whole = len / CHUNK;
    let mut i = 0;
    while i < MAX_MOVE / CHUNK {
        if i >= whole {
            break;
        }
        copy::<CHUNK>(ctx, from + i * CHUNK, to + i * CHUNK)?;
        i += 1;
    }
    let mut at = whole * CHUNK;
    let rest = len % CHUNK;
    macro_rules! piece {
        ($n:literal) => {
            if rest & $n != 0 {
                copy::<$n>(ctx, from + at, to + at)?;
                at += $n;
            }
        };
    }
    piece!(64);
    piece!(32);
    piece!(16);
    piece!(8);
    piece!(4);
    piece!(2);
    piece!(1);
    let _ = at;
    Some(())
}

/// Copies `len` (at most [`MAX_MOVE`]) bytes from `from` up to `to` > `from`, highest
/// first (so overlapping ranges are safe).
#[inline(always)]
fn shift_up(ctx: &TcContext, from: usize, to: usize, len: usize) -> Option<()> {
    let whole = len / CHUNK;
    let rest = len % CHUNK;
    let mut i = 0;
    while i < MAX_MOVE / CHUNK {
        if i >= whole {
            break;
        }
        let at = len - (i + 1) * CHUNK;
        copy::<CHUNK>(ctx, from + at, to + at)?;
        i += 1;
    }
    let mut at = rest;
    macro_rules! piece {
        ($n:literal) => {
            if rest & $n != 0 {
                at -= $n;
                copy::<$n>(ctx, from + at, to + at)?;
            }
        };
    }
    piece!(1);
    piece!(2);
    piece!(4);
    piece!(8);
    piece!(16);
    piece!(32);
    piece!(64);
    let _ = at;
    Some(())
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

/// One datagram in the totals: a relay-to-relay one counts once each way.
#[inline(always)]
fn count_totals(to_peer: bool, to_client: bool, bytes: u64) {
    if let Some(slot) = RELAY_TOTALS.get_ptr_mut(0) {
        // SAFETY: as in `count`.
        unsafe { add(slot, to_peer, to_client, bytes) }
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
