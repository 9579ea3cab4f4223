//! A `gateway serve` relay on loopback for the relay's load tests (fairness, smoke):
//! a [`LoopbackGateway`] with the userspace relay only (no eBPF, no TCP relay) and
//! loopback peers allowed; killed on drop.
use std::net::{Ipv4Addr, SocketAddr};

use gateway::proto::turn::client::ClientConfig;

use crate::{loopback::LoopbackGateway, turn::BlockingClient};

pub use crate::loopback::{SECRET, free_udp};

/// A running `gateway serve` relay; everything else of [`LoopbackGateway`] through
/// `Deref` (`service`, `log`, `scrape`, `metric`, ...).
pub struct RelayGateway(LoopbackGateway);

impl std::ops::Deref for RelayGateway {
    type Target = LoopbackGateway;

    fn deref(&self) -> &LoopbackGateway {
        &self.0
    }
}

impl RelayGateway {
    /// Starts it (files in `dir`) and waits for its /metrics; panics on failure.
    pub fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// [`RelayGateway::start`] with further `gateway serve` flags.
    pub fn start_with(dir: &std::path::Path, extra: &[&str]) -> Self {
        let mut args = vec!["--no-relay-tcp", "--allow-peer", "127.0.0.0/8"];
        args.extend_from_slice(extra);
        Self(LoopbackGateway::start(dir, &args))
    }

    /// Datagrams relayed in `direction` (`client_to_peer` or `peer_to_client`).
    pub fn relayed(&self, direction: &str) -> f64 {
        self.metric(
            "gateway_relay_packets_total",
            &format!("direction=\"{direction}\""),
        )
    }

    /// A TURN client with REST credentials for `peer_id`, on a fresh loopback port.
    pub fn client(&self, peer_id: &str) -> BlockingClient {
        let (username, password) = self.credentials(peer_id);
        let config = ClientConfig::new(self.service, username, password);
        BlockingClient::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("socket")
    }
}
