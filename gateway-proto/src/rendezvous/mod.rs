//! The rendezvous (see `docs/protocol.md`): peers register with the gateway, ask it
//! to be introduced to each other, punch, and report how it went.
//!
//! - [`wire`]: the vocabulary server and peers share (methods, attributes, error
//!   codes, candidates, NAT classes, TCP techniques), re-exported here;
//! - [`server`]: the gateway's state machine, [`RendezvousServer`] (with its
//!   authentication, CHANGE-REQUEST answers and what it forwards between the two
//!   sides of an introduction in submodules);
//! - [`client`]: the peer's builders and parsers (the agent keeps the state);
//! - [`cluster`]: several gateway nodes as one service: the registrations they
//!   share and the messages they exchange, with their codecs;
//! - [`forge`]: the lab-only server-assisted TCP splicing (pairing TCP-Seq halves,
//!   the SYN-ACKs to forge).
//!
//! Peer-side code imports the vocabulary from [`wire`]; the re-exports below keep
//! the older paths (`rendezvous::NatClass`, `rendezvous::RendezvousServer`, ...)
//! working.
pub mod client;
pub mod cluster;
pub mod forge;
pub mod server;
pub mod wire;

/// The core's one datagram type (see [`crate::Transmit`]).
pub use crate::Transmit;
pub use cluster::{
    ClusterDecodeError, ClusterMessage, ClusterRequest, CrossNodeOutcome, LOCATE_TIMEOUT,
    MAX_PARKED_CONNECTS, PeerEntry,
};
pub use forge::{ForgedSynAck, MAX_FORGED_PER_INTRODUCTION};
pub use server::{
    ConnectPolicy, DiscoveryEndpoints, MAX_REMEMBERED_INTRODUCTIONS, RelayEndpoints,
    RendezvousConfig, RendezvousEvent, RendezvousHandled, RendezvousServer, discovery_index,
    discovery_socket,
};
pub use wire::*;
