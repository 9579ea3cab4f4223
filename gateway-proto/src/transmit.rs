//! The one datagram type every state machine of the core hands to its driver.
//!
//! Each machine queues [`Transmit`]s and the driver takes them with
//! `poll_transmit()`; the fields say everything the driver needs to send the bytes
//! without knowing which machine made them.
use std::net::{IpAddr, SocketAddr};

/// The transport a datagram or message travels over between a client and the gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    #[default]
    Udp,
    /// A TCP connection (RFC 8656 §3.1: STUN and ChannelData framed on the stream).
    Tcp,
    /// A TLS connection over TCP (RFC 8656 `turns:`): the same framing as [`Self::Tcp`]
    /// inside TLS. Its own variant so a reply goes back on the connection it answers
    /// (a client may hold a TCP and a TLS connection from the same address) and the
    /// metrics can tell them apart.
    Tls,
}

impl Transport {
    /// True for the connection-oriented transports (TCP and TLS): the source address
    /// was proven by a handshake, and messages travel framed on a stream.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// A short lowercase name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// The driver's socket number 0: the machine's own (service or agent) socket.
pub const MAIN_SOCKET: u32 = 0;

/// A datagram (or framed message) for the driver to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// Which of the driver's sockets sends it: [`MAIN_SOCKET`], or a number the
    /// machine documents (the agent's birthday sockets, the gateway's discovery
    /// sockets).
    pub socket: u32,
    /// UDP, or the TCP connection the destination reached us on.
    pub transport: Transport,
    /// Local address to send from on a wildcard-bound socket, so the datagram leaves
    /// from the address the recipient's NAT mapping points at; `None` = the kernel's
    /// choice.
    pub from_local: Option<IpAddr>,
    /// IP TTL for this datagram only (low-TTL openers); `None` = the socket's.
    pub ttl: Option<u8>,
    /// The bytes.
    pub payload: Vec<u8>,
}

impl Transmit {
    /// A UDP datagram to `to` from the main socket, with the socket's defaults.
    pub fn udp(to: SocketAddr, payload: Vec<u8>) -> Self {
        Self {
            to,
            socket: MAIN_SOCKET,
            transport: Transport::Udp,
            from_local: None,
            ttl: None,
            payload,
        }
    }

    /// The same datagram, sent from socket number `socket`.
    #[must_use]
    pub fn on_socket(mut self, socket: u32) -> Self {
        self.socket = socket;
        self
    }

    /// The same datagram, sent from local address `local` (when known).
    #[must_use]
    pub fn from_local(mut self, local: Option<IpAddr>) -> Self {
        self.from_local = local;
        self
    }

    /// The same datagram, with IP TTL `ttl` (when set).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Option<u8>) -> Self {
        self.ttl = ttl;
        self
    }

    /// The same message, over `transport`.
    #[must_use]
    pub fn over(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }
}

/// The earliest of optional deadlines: how a machine made of sub-machines computes
/// its `poll_timeout` from theirs.
pub fn earliest<T: Ord>(deadlines: impl IntoIterator<Item = Option<T>>) -> Option<T> {
    deadlines.into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_ignores_missing_deadlines() {
        assert_eq!(earliest([None, Some(3), Some(1), None]), Some(1));
        assert_eq!(earliest::<u32>([None, None]), None);
    }

    #[test]
    fn builders_set_one_field_each() {
        let to: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let t = Transmit::udp(to, vec![1])
            .on_socket(3)
            .with_ttl(Some(2))
            .over(Transport::Tcp)
            .from_local(Some("198.51.100.1".parse().unwrap()));
        assert_eq!((t.socket, t.ttl, t.transport), (3, Some(2), Transport::Tcp));
        assert_eq!(t.from_local, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(Transmit::udp(to, vec![]).socket, MAIN_SOCKET);
    }
}
