//! Injection of crafted packets through raw `IPPROTO_RAW` sockets (socket2).
//!
//! The splice's SYN-ACK (and any other crafted segment) must leave with the exact
//! header the codec built, sequence numbers and TTL included, which only a raw
//! socket with a caller-built IP header allows. This module owns those sockets.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{
    RawError,
    codec::{Segment, too_short},
    io_err,
};

/// Sends crafted packets as they are through raw sockets (`IPPROTO_RAW`, which
/// implies a caller-built IP header, for IPv4 and IPv6). The sockets are opened on
/// first use per family, in the calling thread's network namespace, and closed on
/// drop.
#[derive(Debug, Default)]
pub struct Injector {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl Injector {
    /// An injector with no socket open yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn socket(&mut self, v6: bool) -> Result<&Socket, RawError> {
        let (slot, domain) = if v6 {
            (&mut self.v6, Domain::IPV6)
        } else {
            (&mut self.v4, Domain::IPV4)
        };
        if slot.is_none() {
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
                .map_err(io_err("opening a raw IPPROTO_RAW socket"))?;
            *slot = Some(socket);
        }
        slot.as_ref().ok_or_else(too_short)
    }

    /// Crafts `segment` and sends it to its destination address.
    pub fn send(&mut self, segment: &Segment) -> Result<(), RawError> {
        let packet = segment.to_packet()?;
        let dst = segment.dst.ip();
        // Port 0: a raw socket's destination port field means "protocol" to Linux.
        let to = match segment.dst {
            SocketAddr::V4(a) => SockAddr::from(SocketAddr::new(IpAddr::V4(*a.ip()), 0)),
            SocketAddr::V6(a) => {
                SockAddr::from(std::net::SocketAddrV6::new(*a.ip(), 0, 0, a.scope_id()))
            }
        };
        let sent = self
            .socket(dst.is_ipv6())?
            .send_to(&packet, &to)
            .map_err(io_err(format!("raw send to {dst}")))?;
        if sent != packet.len() {
            return Err(RawError::ShortSend {
                dst,
                len: packet.len(),
                sent,
            });
        }
        tracing::debug!(segment = ?segment, "injected crafted segment");
        Ok(())
    }

    /// Sends `segment` at least once and up to `attempts` times, `interval` apart,
    /// until `done()` says it worked (checked every few milliseconds after each
    /// send). Returns the number of sends made, or `None` when all were made and
    /// `done()` never held.
    pub fn send_until(
        &mut self,
        segment: &Segment,
        attempts: u32,
        interval: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Result<Option<u32>, RawError> {
        for sent in 1..=attempts.max(1) {
            self.send(segment)?;
            let until = Instant::now() + interval;
            loop {
                if done() {
                    return Ok(Some(sent));
                }
                if Instant::now() >= until {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5).min(interval));
            }
        }
        Ok(None)
    }
}
