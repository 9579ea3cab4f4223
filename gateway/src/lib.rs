//! The gateway: a rendezvous and relay gateway for peer-to-peer NAT traversal.
//!
//! Layout (see `docs/architecture.md`):
//! - [`proto`]: the sans-IO protocol core (wire codecs and state machines; no sockets,
//!   no clock reads);
//! - [`server`]: the thin tokio driver that feeds datagrams to the core;
//! - [`ebpf`]: loads and attaches the kernel programs and reads their counters;
//! - [`metrics`]: the Prometheus registry and the `/metrics` HTTP endpoint;
//! - [`peer`]: the peer agent's driver (`gateway peer`);
//! - [`relay`]: the TURN relay's sockets and per-allocation forwarding tasks;
//! - [`tcp_punch`]: TCP hole punching's sockets (the agent's `--tcp`);
//! - [`observe`]: eBPF punch observability with its own `/metrics`, for the agent and
//!   for `gateway watch` (NAT routers);
//! - [`tcp_raw`]: raw TCP packet crafting, capture and injection (pnet) for
//!   sequence-number-exchange TCP splicing;
//! - [`config`]: the TOML configuration and its defaults.
pub mod config;
pub mod ebpf;
pub mod fast_path;
pub mod metrics;
pub mod observe;
pub mod peer;
/// The sans-IO protocol core, re-exported so `gateway::proto::...` paths keep working.
pub use gateway_proto as proto;
pub mod relay;
pub mod server;
pub mod tcp_punch;
pub mod tcp_raw;
