//! The gateway: a rendezvous and relay gateway for peer-to-peer NAT traversal.
//!
//! Layout (see `docs/architecture.md`):
//! - [`proto`]: the sans-IO protocol core (wire codecs and state machines; no sockets,
//!   no clock reads);
//! - [`service`]: the service loop that demultiplexes each datagram to the rendezvous
//!   core or the TURN driver and runs their timers;
//! - [`udp`]: batched UDP I/O for service sockets (recvmmsg, sendmmsg, GSO, pktinfo);
//! - [`fair`]: a flooding client held to its share of the service port (throttled,
//!   then given a connected socket of its own);
//! - [`ebpf`]: loads and attaches the kernel programs and reads their counters;
//! - [`metrics`]: the Prometheus registry and the `/metrics` HTTP endpoint;
//! - [`agent`]: the peer agent's driver (`gateway peer`; also reachable as `peer`);
//! - [`turn`]: the TURN server's driver: relay sockets and per-allocation forwarding
//!   tasks, TURN over TCP;
//! - [`tcp_punch`]: TCP hole punching's sockets (the agent's `--tcp`);
//! - [`observe`]: eBPF punch observability with its own `/metrics`, for the agent and
//!   for `gateway watch` (NAT routers);
//! - [`tcp_raw`]: raw TCP packet crafting, capture and injection (pnet) for
//!   sequence-number-exchange TCP splicing;
//! - [`config`]: the TOML configuration and its defaults;
//! - [`health`]: `/healthz` and `/readyz`: driver loops watched, readiness checks;
//! - [`lifecycle`]: signals (SIGHUP reload, SIGTERM drain, SIGINT stop) and the drain;
//! - [`reload`]: re-reading the configuration and secrets, applying what can change
//!   live;
//! - [`secrets`]: reading the shared secret files (permissions checked);
//! - [`logging`]: the tracing subscriber: text or JSON lines, a reloadable filter;
//! - [`capabilities`]: the process's effective capabilities (what eBPF loading needs);
//! - [`limits`]: the open-files limit and the descriptor budget of relay sockets;
//! - [`systemd`]: `sd_notify` readiness, stopping and watchdog messages.
pub mod agent;
pub mod capabilities;
pub mod cluster;
pub mod config;
pub mod ebpf;
pub mod fair;
pub mod fast_path;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod portmap;
pub mod reload;
pub mod rendezvous;
pub mod secrets;
/// The sans-IO protocol core, re-exported so `gateway::proto::...` paths keep working.
pub use gateway_proto as proto;
pub mod server_link;
pub mod service;
pub mod stream;
pub mod systemd;
pub mod tcp_punch;
pub mod tcp_raw;
pub mod tls;
pub mod turn;
pub mod udp;

/// The agent's driver under its historical name: `gateway::peer::PeerClient` is the
/// library API.
pub use agent as peer;
