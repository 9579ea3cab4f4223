//! A blocking driver for the sans-IO TURN client over a std UDP socket, for tests that
//! talk to a real TURN server (coturn, or the gateway's relay).
use std::{
    collections::VecDeque,
    net::{SocketAddr, UdpSocket},
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

/// A [`Client`] with its own socket, driven synchronously.
#[derive(Debug)]
pub struct BlockingClient {
    /// The state machine (public so tests can call it directly).
    pub client: Client,
    socket: UdpSocket,
    events: VecDeque<TurnClientEvent>,
    received: VecDeque<Received>,
}

impl BlockingClient {
    /// Binds a socket on `bind` and wraps a client for `config`.
    pub fn new(bind: SocketAddr, config: ClientConfig) -> Result<Self, DriveError> {
        let socket = UdpSocket::bind(bind)?;
        Ok(Self {
            client: Client::new(config, rand::random()),
            socket,
            events: VecDeque::new(),
            received: VecDeque::new(),
        })
    }

    /// The socket's local address (what the server should report as mapped).
    pub fn local_addr(&self) -> Result<SocketAddr, DriveError> {
        Ok(self.socket.local_addr()?)
    }

    fn flush(&mut self) -> Result<(), DriveError> {
        while let Some(transmit) = self.client.poll_transmit() {
            self.socket.send_to(&transmit.payload, transmit.to)?;
        }
        while let Some(event) = self.client.poll_event() {
            self.events.push_back(event);
        }
        Ok(())
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
        self.socket.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 65_536];
        match self.socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                if let Some(data) = self
                    .client
                    .handle_datagram(Instant::now(), from, &buf[..len])
                {
                    self.received.push_back(Received {
                        peer: data.peer,
                        data: data.data.to_vec(),
                        channel: data.channel,
                    });
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
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
        self.socket.send_to(&out, self.client.server())?;
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
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), DriveError> {
        self.socket.send_to(bytes, self.client.server())?;
        Ok(())
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
