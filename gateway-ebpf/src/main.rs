//! The gateway's kernel programs: tc classifiers that count UDP traffic on the
//! gateway's ports, per direction, in a per-CPU array.
//!
//! Both programs always return `TC_ACT_OK`: they observe and never change the
//! packet's fate. Only Ethernet-framed devices (veth, physical NICs, loopback) are
//! understood; IPv6 extension headers are not walked.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use gateway_ebpf::{Direction, MAX_WATCHED_UDP_PORTS, UdpCounters};

#[map(name = "UDP_COUNTERS")]
static UDP_COUNTERS: PerCpuArray<UdpCounters> = PerCpuArray::with_max_entries(Direction::COUNT, 0);

#[map(name = "WATCHED_UDP_PORTS")]
static WATCHED_UDP_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_WATCHED_UDP_PORTS, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
const IPV6_HDR_LEN: usize = 40;

#[classifier]
pub fn udp_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_OK as i32
}

#[classifier]
pub fn udp_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress);
    TC_ACT_OK as i32
}

/// Counts the packet if it is UDP to (ingress) or from (egress) a watched port.
#[inline(always)]
fn count(ctx: &TcContext, direction: Direction) {
    let Some((port_offset, ip_len)) = udp_ports_offset(ctx) else {
        return;
    };
    // Ingress: the destination port is ours; egress: the source port is ours.
    let port_offset = match direction {
        Direction::Ingress => port_offset + 2,
        Direction::Egress => port_offset,
    };
    let Ok(port_be) = ctx.load::<u16>(port_offset) else {
        return;
    };
    let port = u16::from_be(port_be);
    // SAFETY: the value is only tested for presence, never held across calls.
    if unsafe { WATCHED_UDP_PORTS.get(&port) }.is_none() {
        return;
    }
    if let Some(slot) = UDP_COUNTERS.get_ptr_mut(direction as u32) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU meanwhile.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += ip_len as u64;
        }
    }
}

/// For a UDP packet, the offset of its UDP header and the IP packet's length.
#[inline(always)]
fn udp_ports_offset(ctx: &TcContext) -> Option<(usize, u32)> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
    let frame_len = ctx.len();
    let ip_len = frame_len.checked_sub(ETH_HDR_LEN as u32)?;
    match ether_type {
        ETH_P_IP => {
            let version_ihl = ctx.load::<u8>(ETH_HDR_LEN).ok()?;
            if version_ihl >> 4 != 4 {
                return None;
            }
            let protocol = ctx.load::<u8>(ETH_HDR_LEN + 9).ok()?;
            if protocol != IPPROTO_UDP {
                return None;
            }
            // Fragments other than the first carry no UDP header.
            let frag = u16::from_be(ctx.load::<u16>(ETH_HDR_LEN + 6).ok()?);
            if frag & 0x1FFF != 0 {
                return None;
            }
            let ihl = ((version_ihl & 0x0F) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            Some((ETH_HDR_LEN + ihl, ip_len))
        }
        ETH_P_IPV6 => {
            let next_header = ctx.load::<u8>(ETH_HDR_LEN + 6).ok()?;
            if next_header != IPPROTO_UDP {
                return None;
            }
            Some((ETH_HDR_LEN + IPV6_HDR_LEN, ip_len))
        }
        _ => None,
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
