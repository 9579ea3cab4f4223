//! Raw TCP packet toolkit: the building blocks of sequence-number-exchange
//! ("NATBlaster style") TCP splicing, technique 3 of `docs/tcp-splicing.md`.
//!
//! - Crafting and parsing ([`Segment`], [`Segment::to_packet`], [`parse_ip`]): pure
//!   functions that build a whole IPv4 or IPv6 packet carrying a TCP SYN, SYN-ACK or
//!   any other header-only segment, with the IP and TCP checksums filled in (pnet's
//!   `pnet_packet`). In `codec.rs`.
//! - Capture ([`SynCapture`]): an `AF_PACKET` socket (pnet's `pnet_datalink`) on the
//!   interface that carries a local address, which sees this host's own outgoing SYN
//!   and so learns the initial sequence number the kernel chose. In `capture.rs`.
//! - Injection ([`Injector`]): a raw `IPPROTO_RAW` socket (header included, through
//!   socket2) that sends a crafted packet as it is, in IPv4 or IPv6. In `inject.rs`.
//! - Kernel helpers: [`tcp_state`] reads a kernel socket's TCP state (to see it reach
//!   ESTABLISHED after an injected SYN-ACK) and [`set_socket_ttl`] sets its TTL (in
//!   `tcp_info.rs`); [`SuppressionRules`] installs nftables rules that keep the
//!   kernel from killing the attempt (RSTs to the peer, ICMP time-exceeded answers to
//!   a low-TTL SYN), removed again by the guard it returns ([`NftGuard`]) on drop, on
//!   error paths and while unwinding (in `guard.rs`).
//!
//! Every raw socket is owned by a value here and closed when that value is dropped.
//! All of it needs `CAP_NET_RAW` (and `CAP_NET_ADMIN` for the rules); only Linux.
//!
//! The submodules are private: everything public is re-exported here, so callers
//! name it `tcp_raw::X` whichever file it lives in. The error type they share,
//! [`RawError`], lives in this file.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

mod capture;
mod codec;
mod guard;
mod inject;
mod tcp_info;

pub use capture::{SynCapture, interface_with_addr};
pub use codec::{
    DEFAULT_MSS, DEFAULT_TTL, DEFAULT_WINDOW, ParsedSegment, Segment, TcpOptions, parse_ethernet,
    parse_ip,
};
pub use guard::{NftGuard, SuppressionRules};
pub use inject::Injector;
pub use tcp_info::{TcpState, set_socket_ttl, tcp_state, wait_for_state};

/// What went wrong with a raw packet operation.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// Source and destination of a segment are not of the same address family.
    #[error("source {src} and destination {dst} are not of the same address family")]
    MixedFamilies {
        /// The source address.
        src: IpAddr,
        /// The destination address.
        dst: IpAddr,
    },
    /// A capture or rule was asked for an unspecified address.
    #[error("a specific local address is needed, not {0}")]
    Unspecified(IpAddr),
    /// No interface of this host carries the address.
    #[error("no network interface has address {0}")]
    NoInterface(IpAddr),
    /// No interface has this name.
    #[error("no network interface is called {0:?}")]
    UnknownInterface(String),
    /// pnet opened something other than an Ethernet-framed channel.
    #[error("interface {0:?} did not give an Ethernet-framed packet channel")]
    UnsupportedChannel(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The awaited SYN did not show up in time.
    #[error("no outgoing SYN from {local} seen on {interface} within {timeout:?}")]
    CaptureTimeout {
        /// The local endpoint whose SYN was awaited.
        local: SocketAddr,
        /// The interface listened on.
        interface: String,
        /// How long was waited.
        timeout: Duration,
    },
    /// The kernel took fewer bytes than the packet had.
    #[error("raw send of {len} bytes to {dst} sent only {sent}")]
    ShortSend {
        /// The destination.
        dst: IpAddr,
        /// The packet's length.
        len: usize,
        /// What was sent.
        sent: usize,
    },
    /// `nft` failed.
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Nft {
        /// The arguments (and script, if any).
        args: String,
        /// The exit status.
        status: String,
        /// What nft wrote to stderr.
        stderr: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RawError {
    let what = what.into();
    move |source| RawError::Io { what, source }
}
