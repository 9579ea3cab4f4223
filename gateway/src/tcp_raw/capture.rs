//! Capture of this host's own outgoing SYN on an `AF_PACKET` socket (pnet's
//! `pnet_datalink`).
//!
//! Splicing by sequence-number exchange needs the initial sequence number the
//! kernel chose for a `connect()`, and the kernel tells no one: the only way to
//! learn it is to watch the SYN leave. This module owns that packet socket and the
//! search for the interface carrying a local address.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use pnet_datalink::{Channel, DataLinkReceiver, NetworkInterface};

use super::{
    RawError,
    codec::{Segment, parse_ethernet},
};

/// The interface of this host (in the calling thread's network namespace) that
/// carries `addr`.
pub fn interface_with_addr(addr: IpAddr) -> Result<NetworkInterface, RawError> {
    if addr.is_unspecified() {
        return Err(RawError::Unspecified(addr));
    }
    pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.ips.iter().any(|n| n.ip() == addr))
        .ok_or(RawError::NoInterface(addr))
}

/// Watches an interface for this host's own outgoing SYN from one local endpoint,
/// to learn the initial sequence number the kernel picked for a `connect()`.
///
/// Open it *before* the `connect()` (the socket buffers what it sees), then
/// [`SynCapture::wait`]. The `AF_PACKET` socket is closed when this is dropped.
pub struct SynCapture {
    rx: Box<dyn DataLinkReceiver>,
    interface: String,
    local: SocketAddr,
    remote: Option<SocketAddr>,
}

impl std::fmt::Debug for SynCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynCapture")
            .field("interface", &self.interface)
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// How often a capture's blocking read wakes up to check its deadline.
const CAPTURE_POLL: Duration = Duration::from_millis(20);

impl SynCapture {
    /// Listens on the interface that carries `local`'s address for a SYN from
    /// `local` (to `remote`, when given).
    pub fn for_local(local: SocketAddr, remote: Option<SocketAddr>) -> Result<Self, RawError> {
        let interface = interface_with_addr(local.ip())?;
        Self::open(&interface, local, remote)
    }

    /// Listens on the interface called `name`.
    pub fn on_interface(
        name: &str,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> Result<Self, RawError> {
        let interface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| RawError::UnknownInterface(name.to_owned()))?;
        Self::open(&interface, local, remote)
    }

    fn open(
        interface: &NetworkInterface,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> Result<Self, RawError> {
        if local.ip().is_unspecified() {
            return Err(RawError::Unspecified(local.ip()));
        }
        let config = pnet_datalink::Config {
            read_buffer_size: 65536,
            read_timeout: Some(CAPTURE_POLL),
            promiscuous: false,
            ..pnet_datalink::Config::default()
        };
        let rx = match pnet_datalink::channel(interface, config) {
            Ok(Channel::Ethernet(_tx, rx)) => rx,
            Ok(_) => return Err(RawError::UnsupportedChannel(interface.name.clone())),
            Err(e) => {
                return Err(RawError::Io {
                    what: format!("opening a packet socket on {}", interface.name),
                    source: e,
                });
            }
        };
        Ok(Self {
            rx,
            interface: interface.name.clone(),
            local,
            remote,
        })
    }

    /// The interface listened on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Whether `segment` is the SYN this capture waits for.
    pub fn matches(&self, segment: &Segment) -> bool {
        segment.is_syn()
            && segment.src == self.local
            && self.remote.is_none_or(|r| segment.dst == r)
    }

    /// Waits up to `timeout` for the SYN and returns it (its `seq` is the ISN).
    pub fn wait(&mut self, timeout: Duration) -> Result<Segment, RawError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.rx.next() {
                Ok(frame) => {
                    if let Some(p) = parse_ethernet(frame)
                        && self.matches(&p.segment)
                    {
                        tracing::debug!(
                            interface = %self.interface,
                            local = %self.local,
                            isn = p.segment.seq,
                            "captured own SYN"
                        );
                        return Ok(p.segment);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(RawError::Io {
                        what: format!("reading packets on {}", self.interface),
                        source: e,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(RawError::CaptureTimeout {
                    local: self.local,
                    interface: self.interface.clone(),
                    timeout,
                });
            }
        }
    }
}
