//! Types shared between the gateway's eBPF programs and the userspace loader.
//!
//! Everything here is `no_std`, `#[repr(C)]` and plain old data so that the kernel
//! programs and the `aya` loader agree byte for byte on map keys and values. With the
//! `user` feature the types also implement [`aya::Pod`] so userspace can read them.
#![no_std]

/// Name of the per-CPU array that holds [`UdpCounters`], one slot per [`Direction`].
pub const UDP_COUNTERS_MAP: &str = "UDP_COUNTERS";
/// Name of the hash map whose keys are the UDP ports (host byte order) to count.
pub const WATCHED_UDP_PORTS_MAP: &str = "WATCHED_UDP_PORTS";
/// Name of the tc classifier attached on ingress.
pub const UDP_INGRESS_PROGRAM: &str = "udp_ingress";
/// Name of the tc classifier attached on egress.
pub const UDP_EGRESS_PROGRAM: &str = "udp_egress";
/// Capacity of [`WATCHED_UDP_PORTS_MAP`]: how many ports one loader can watch.
pub const MAX_WATCHED_UDP_PORTS: u32 = 64;

/// Direction of a packet relative to the interface the program is attached to.
///
/// The discriminant is the index into [`UDP_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Received on the interface, addressed to a watched port.
    Ingress = 0,
    /// Sent from the interface, from a watched port.
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

/// UDP traffic seen on a watched port in one direction, on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams seen.
    pub packets: u64,
    /// Bytes of those datagrams' IP packets, IP and UDP headers included.
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: `UdpCounters` is `#[repr(C)]`, made only of integers, and has no padding.
unsafe impl aya::Pod for UdpCounters {}
