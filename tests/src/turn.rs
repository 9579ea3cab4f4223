//! A blocking driver for the sans-IO TURN client over a std UDP socket or a TCP
//! connection (RFC 8656 §3.1 framing), for tests that talk to a real TURN server
//! (coturn, or the gateway's relay).
use std::{
    collections::VecDeque,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use gateway::proto::turn::client::{Client, ClientConfig, ClientError, Framing, TurnClientEvent};

/// Why driving the client failed.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// A socket operation failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The client refused a call.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Nothing matching arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Data a peer sent through the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The peer, as the relay saw it.
    pub peer: SocketAddr,
    /// The payload.
    pub data: Vec<u8>,
    /// The channel it came on; `None` for a Data indication.
    pub channel: Option<u16>,
}

/// How a [`BlockingClient`] reaches its server.
#[derive(Debug)]
enum Link {
    /// Datagrams on a UDP socket.
    Udp(UdpSocket),
    /// Frames on a TCP connection to the server, and the bytes read but not yet
    /// framed.
    Tcp(TcpStream, Vec<u8>),
}

/// The length of the frame at the start of `buf` on a TURN TCP stream (a STUN
/// message, or ChannelData padded to 4 bytes), once its 4-byte head is there.
fn stream_frame_len(buf: &[u8]) -> Option<usize> {
    let head = buf.get(..4)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    Some(match head[0] >> 6 {
        0 => 20 + len,
        _ => (4 + len).next_multiple_of(4),
    })
}

/// A [`Client`] with its own socket or TCP connection, driven synchronously.
#[derive(Debug)]
pub struct BlockingClient {
    /// The state machine (public so tests can call it directly).
    pub client: Client,
    link: Link,
    events: VecDeque<TurnClientEvent>,
    received: VecDeque<Received>,
}

impl BlockingClient {
    /// Binds a socket on `bind` and wraps a client for `config`.
    pub fn new(bind: SocketAddr, config: ClientConfig) -> Result<Self, DriveError> {
        Ok(Self::with_socket(UdpSocket::bind(bind)?, config))
    }

    /// Wraps a client for `config` around a socket made elsewhere (e.g. inside a lab
    /// namespace).
    pub fn with_socket(socket: UdpSocket, config: ClientConfig) -> Self {
        Self::with_link(Link::Udp(socket), config)
    }

    /// Wraps a client for `config` around a TCP connection to `config.server`: TURN
    /// over TCP, every message framed on the stream.
    pub fn over_tcp(stream: TcpStream, config: ClientConfig) -> Self {
        Self::with_link(Link::Tcp(stream, Vec::new()), config)
    }

    fn with_link(link: Link, config: ClientConfig) -> Self {
        Self {
            client: Client::new(config, rand::random()),
            link,
            events: VecDeque::new(),
            received: VecDeque::new(),
        }
    }

    /// The socket's local address (what the server should report as mapped).
    pub fn local_addr(&self) -> Result<SocketAddr, DriveError> {
        Ok(match &self.link {
            Link::Udp(socket) => socket.local_addr()?,
            Link::Tcp(stream, _) => stream.local_addr()?,
        })
    }

    /// A second handle on the client's UDP socket (the same socket, so datagrams
    /// sent on it share the client's 5-tuple: its allocation), e.g. for a load
    /// generator's threads; `None` over TCP.
    pub fn clone_udp_socket(&self) -> Option<UdpSocket> {
        match &self.link {
            Link::Udp(socket) => socket.try_clone().ok(),
            Link::Tcp(..) => None,
        }
    }

    /// Sends one message to `to` (over TCP: to the server, ChannelData padded).
    fn send_to(&mut self, bytes: &[u8], to: SocketAddr) -> Result<(), DriveError> {
        match &mut self.link {
            Link::Udp(socket) => {
                socket.send_to(bytes, to)?;
            }
            Link::Tcp(stream, _) => {
                let mut framed = bytes.to_vec();
                if framed.first().is_some_and(|b| b >> 6 == 1) {
                    framed.resize(framed.len().next_multiple_of(4), 0);
                }
                stream.write_all(&framed)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DriveError> {
        while let Some(transmit) = self.client.poll_transmit() {
            self.send_to(&transmit.payload, transmit.to)?;
        }
        while let Some(event) = self.client.poll_event() {
            self.events.push_back(event);
        }
        Ok(())
    }

    /// Waits up to `wait` for one datagram (or, over TCP, one whole frame) and
    /// returns it with its source; `None` when nothing came.
    fn receive(&mut self, wait: Duration) -> Result<Option<(Vec<u8>, SocketAddr)>, DriveError> {
        let server = self.client.server();
        let mut buf = [0u8; 65_536];
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        match &mut self.link {
            Link::Udp(socket) => {
                socket.set_read_timeout(Some(wait))?;
                match socket.recv_from(&mut buf) {
                    Ok((len, from)) => Ok(Some((buf[..len].to_vec(), from))),
                    Err(e) if timed_out(&e) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Link::Tcp(stream, pending) => loop {
                if let Some(len) = stream_frame_len(pending)
                    && pending.len() >= len
                {
                    let frame: Vec<u8> = pending.drain(..len).collect();
                    return Ok(Some((frame, server)));
                }
                stream.set_read_timeout(Some(wait))?;
                match stream.read(&mut buf) {
                    Ok(0) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the server closed the TCP connection",
                        )
                        .into());
                    }
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if timed_out(&e) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }

    /// Sends what is queued, then waits for one datagram or timer until `deadline`.
    fn step(&mut self, deadline: Instant) -> Result<(), DriveError> {
        self.flush()?;
        let now = Instant::now();
        let wake = self
            .client
            .poll_timeout()
            .map_or(deadline, |t| t.min(deadline));
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        if let Some((bytes, from)) = self.receive(wait)?
            && let Some(data) = self.client.handle_datagram(Instant::now(), from, &bytes)
        {
            self.received.push_back(Received {
                peer: data.peer,
                data: data.data.to_vec(),
                channel: data.channel,
            });
        }
        self.client.handle_timeout(Instant::now());
        self.flush()
    }

    /// Drives the client until an event matching `wanted` arrives (earlier events
    /// that do not match are dropped) or `timeout` passes.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&TurnClientEvent) -> bool,
    ) -> Result<TurnClientEvent, DriveError> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(event) = self.events.pop_front() {
                if wanted(&event) {
                    return Ok(event);
                }
            }
            if Instant::now() >= deadline {
                return Err(DriveError::Timeout("an event"));
            }
            self.step(deadline)?;
        }
    }

    /// Drives the client until peer data arrives or `timeout` passes.
    pub fn recv(&mut self, timeout: Duration) -> Result<Received, DriveError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(received) = self.received.pop_front() {
                return Ok(received);
            }
            if Instant::now() >= deadline {
                return Err(DriveError::Timeout("peer data"));
            }
            self.step(deadline)?;
        }
    }

    /// Sends `data` to `peer` through the relay (ChannelData once bound, else a Send
    /// indication).
    pub fn send(&mut self, peer: SocketAddr, data: &[u8]) -> Result<Framing, DriveError> {
        let mut out = Vec::new();
        let framing = self.client.encode_send(peer, data, &mut out)?;
        self.send_to(&out, self.client.server())?;
        Ok(framing)
    }

    /// Allocates and waits for the answer (up to `wait`); panics on a failure, as a
    /// test wants.
    pub fn allocate_now(&mut self, wait: Duration) -> SocketAddr {
        self.client.allocate(Instant::now()).expect("idle");
        match self.wait_event(wait, |e| {
            matches!(
                e,
                TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
            )
        }) {
            Ok(TurnClientEvent::Allocated { relayed, .. }) => relayed,
            other => panic!("allocation failed: {other:?}"),
        }
    }

    /// Binds a channel to `peer` and waits (up to `wait`): its number, or the event
    /// that refused it; panics when nothing answers.
    pub fn bind_now(&mut self, peer: SocketAddr, wait: Duration) -> Result<u16, TurnClientEvent> {
        let channel = self
            .client
            .bind_channel(Instant::now(), peer)
            .expect("allocated");
        match self.wait_event(wait, |e| {
            matches!(
                e,
                TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
            )
        }) {
            Ok(TurnClientEvent::ChannelBound { peer: bound, .. }) if bound == peer => Ok(channel),
            Ok(other) => Err(other),
            Err(e) => panic!("no answer to ChannelBind: {e}"),
        }
    }

    /// Sends bytes already framed (e.g. ChannelData built once with
    /// [`Client::encode_send`]) to the server from this client's socket, without
    /// driving the client: a load generator's inner loop.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), DriveError> {
        self.send_to(bytes, self.client.server())
    }

    /// Drives timers and datagrams for `duration` (e.g. to let a close go out).
    pub fn run_for(&mut self, duration: Duration) -> Result<(), DriveError> {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            self.step(deadline)?;
        }
        Ok(())
    }
}

/// One round trip over a bound channel: `client` sends `len` patterned bytes to
/// `peer` (they must arrive at `peer_socket` intact, from `relayed`), the peer echoes
/// them XOR 0x5A and the client must receive that on `channel`. Panics otherwise.
pub fn channel_round_trip(
    client: &mut BlockingClient,
    peer_socket: &UdpSocket,
    peer: SocketAddr,
    relayed: SocketAddr,
    channel: u16,
    len: usize,
    round: usize,
) {
    let mut buf = vec![0u8; 4096];
    let payload: Vec<u8> = (0..len).map(|i| (i * 13 + round) as u8).collect();
    assert_eq!(
        client.send(peer, &payload).expect("send"),
        Framing::ChannelData(channel)
    );
    let (n, from) = peer_socket.recv_from(&mut buf).expect("the peer receives");
    assert_eq!(from, relayed, "from the relayed address");
    assert_eq!(&buf[..n], payload.as_slice(), "{len} bytes to the peer");
    let echo: Vec<u8> = payload.iter().map(|x| x ^ 0x5A).collect();
    peer_socket.send_to(&echo, relayed).expect("peer sends");
    assert_eq!(
        client
            .recv(Duration::from_secs(5))
            .expect("the client receives"),
        Received {
            peer,
            data: echo,
            channel: Some(channel)
        },
        "{len} bytes back to the client"
    );
}
