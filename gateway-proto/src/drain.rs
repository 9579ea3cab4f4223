//! Draining: a server that is going away stops taking new work and keeps serving
//! what it has. Both the rendezvous and the TURN core take a [`Draining`] (see
//! `RendezvousServer::set_draining` and `TurnServer::set_draining`): new
//! registrations and new allocations are refused, with 300 Try Alternate and an
//! ALTERNATE-SERVER attribute (RFC 8489 §10) when another node is named, while
//! refreshes, permissions, channels, connects and data of what exists go on.
use std::net::SocketAddr;

/// How a draining server answers requests for new work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Draining {
    /// Another node to send newcomers to (300 Try Alternate with ALTERNATE-SERVER);
    /// `None`: refuse them with an error that says the server is draining.
    pub alternate: Option<SocketAddr>,
}

/// Reason phrase of the 300 answer.
pub const TRY_ALTERNATE_REASON: &str = "Try Alternate";
/// Reason phrase of the refusal without an alternate.
pub const DRAINING_REASON: &str = "Draining";
