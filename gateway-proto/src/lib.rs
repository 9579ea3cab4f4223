//! The sans-IO protocol core: wire codecs and state machines.
//!
//! Nothing in here opens a socket or reads a clock. Callers pass datagrams (and, where
//! a state machine needs it, the current time) in and get datagrams out, which keeps
//! the logic testable in virtual time and fuzzable.
//!
//! Every state machine has one shape (as quinn-proto and str0m): inputs through
//! `handle_*(now, ...)`, outputs through `poll_transmit()` (one [`Transmit`] type),
//! `poll_event()` and `poll_timeout() -> Option<Instant>`. The crate forbids `unsafe`
//! and depends on no I/O crate (tokio, libc, socket2, aya, quinn-udp, pnet), so the
//! compiler keeps it sans-IO.
#![forbid(unsafe_code)]
pub mod agent;
pub mod binding;
pub mod budget;
pub mod credentials;
pub mod drain;
pub mod nonce;
pub mod peer_policy;
pub mod portmap;
pub mod rendezvous;
pub mod stun;
pub mod tcp_punch;
pub mod transmit;
pub mod turn;

#[cfg(test)]
mod sim;

pub use transmit::{MAIN_SOCKET, Transmit, Transport, earliest};
