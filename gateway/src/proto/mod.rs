//! The sans-IO protocol core: wire codecs and state machines.
//!
//! Nothing in here opens a socket or reads a clock. Callers pass datagrams (and, where
//! a state machine needs it, the current time) in and get datagrams out, which keeps
//! the logic testable in virtual time and fuzzable.
pub mod agent;
pub mod binding;
pub mod credentials;
pub mod nonce;
pub mod peer_policy;
pub mod rendezvous;
pub mod stun;
pub mod tcp_punch;
pub mod turn;
