//! The load generator's control plane: many sans-IO TURN clients, each with its own
//! non-blocking UDP socket connected to the server, driven together with poll(2).
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::{
    credentials::SharedSecret,
    turn::client::{Client, ClientConfig, TurnClientEvent},
};

use super::mmsg;

/// A TURN server to load: where it is and the REST secret its users' passwords derive
/// from.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its UDP address.
    pub server: SocketAddr,
    /// The shared secret (TURN REST credentials).
    pub secret: String,
    /// Its process, for CPU time and RSS from /proc.
    pub pid: Option<u32>,
}

/// One client: the state machine and its socket.
pub struct Member {
    /// The TURN client.
    pub client: Client,
    /// Its socket, connected to the server, non-blocking.
    pub socket: UdpSocket,
}

/// A local address no other socket of this process has used: for an IPv4 server,
/// the next address of 127.1.0.1..127.254.255.254 (all of 127/8 is local on Linux),
/// port chosen by the kernel; for IPv6, `[::1]:0`.
///
/// Servers may keep state for a 5-tuple after its allocation is released (coturn
/// answers a new Allocate from a reused 5-tuple with 437 for a while), so a benchmark
/// that opens thousands of sockets must never repeat one.
pub fn fresh_local_addr(server: SocketAddr) -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    if server.is_ipv6() {
        return SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    }
    // 254 * 256 * 254 addresses, skipping .0 and .255 in the last octet.
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (254 * 256 * 254);
    let last = (n % 254) + 1;
    let third = (n / 254) % 256;
    let second = n / (254 * 256) + 1;
    let octet = |v: u32| u8::try_from(v).unwrap_or(1);
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, octet(second), octet(third), octet(last))),
        0,
    )
}

impl Member {
    /// A fresh socket (see [`fresh_local_addr`]) and a client with credentials for
    /// peer id `load{id}`.
    pub fn new(target: &Target, id: usize) -> io::Result<Self> {
        let socket = UdpSocket::bind(fresh_local_addr(target.server))?;
        socket.connect(target.server)?;
        socket.set_nonblocking(true)?;
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + 3600;
        let credentials = SharedSecret::new(target.secret.as_bytes())
            .issue(&format!("load{id}"), expiry)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let config = ClientConfig::new(target.server, credentials.username, credentials.password);
        Ok(Self {
            client: Client::new(config, id as u64 ^ 0x5EED),
            socket,
        })
    }

    /// Sends every queued control datagram (a full socket buffer drops it: the
    /// client's retransmission covers that).
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some(transmit) = self.client.poll_transmit() {
            match self.socket.send(&transmit.payload) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Feeds everything queued on the socket to the client; returns how many
    /// datagrams were read.
    pub fn receive(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut count = 0;
        loop {
            match self.socket.recv(buf) {
                Ok(len) => {
                    count += 1;
                    let server = self.client.server();
                    let datagram = buf.get(..len).unwrap_or_default();
                    let _ = self
                        .client
                        .handle_datagram(Instant::now(), server, datagram);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    return Ok(count);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs the client's timers if due, then sends what they queued.
    pub fn tick(&mut self, now: Instant) -> io::Result<()> {
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        self.flush()
    }
}

/// Reusable buffers for [`step`].
#[derive(Default)]
pub struct Stepper {
    pollfds: Vec<libc::pollfd>,
    buf: Vec<u8>,
}

impl Stepper {
    /// One round of control-plane I/O for `members`: sends queued requests, waits up
    /// to `max_wait` (or the earliest timer) for datagrams, feeds them and due timers
    /// in, and appends each member's events with its index.
    pub fn step(
        &mut self,
        members: &mut [Member],
        max_wait: Duration,
        events: &mut Vec<(usize, TurnClientEvent)>,
    ) -> io::Result<()> {
        if self.buf.len() < 65_536 {
            self.buf = vec![0; 65_536];
        }
        for member in members.iter_mut() {
            member.flush()?;
        }
        let now = Instant::now();
        let wake = members
            .iter()
            .filter_map(|m| m.client.poll_timeout())
            .min()
            .map_or(max_wait, |t| t.saturating_duration_since(now).min(max_wait));
        self.pollfds.clear();
        self.pollfds.extend(members.iter().map(|m| libc::pollfd {
            fd: m.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        let wait_ms = i32::try_from(wake.as_millis()).unwrap_or(i32::MAX);
        mmsg::poll_readable(&mut self.pollfds, wait_ms)?;
        for (member, pollfd) in members.iter_mut().zip(&self.pollfds) {
            if pollfd.revents != 0 {
                member.receive(&mut self.buf)?;
            }
        }
        let now = Instant::now();
        for (index, member) in members.iter_mut().enumerate() {
            member.tick(now)?;
            while let Some(event) = member.client.poll_event() {
                events.push((index, event));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_local_addresses_never_repeat_and_are_bindable() {
        let server: SocketAddr = "127.0.0.1:3478".parse().expect("literal");
        let addrs: Vec<SocketAddr> = (0..600).map(|_| fresh_local_addr(server)).collect();
        let unique: std::collections::HashSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len());
        for addr in &addrs {
            let IpAddr::V4(ip) = addr.ip() else {
                panic!("IPv4 server, IPv6 address {addr}");
            };
            assert!(ip.is_loopback() && ip.octets()[1] >= 1, "{ip}");
            assert!(!matches!(ip.octets()[3], 0 | 255), "{ip}");
        }
        UdpSocket::bind(addrs[599]).expect("any 127/8 address binds on Linux");
        let v6: SocketAddr = "[::1]:3478".parse().expect("literal");
        assert_eq!(fresh_local_addr(v6), "[::1]:0".parse().expect("literal"));
    }
}
