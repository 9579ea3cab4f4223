//! Integration-test support for the gateway: the NAT lab harness and helpers that
//! run the real `gateway` binary inside it.
//!
//! The lab builds network topologies out of Linux network namespaces, veth pairs and
//! nftables NAT rules, so that hole punching and relaying are tested against real
//! kernels and real NAT behaviour. See `docs/lab.md`.
pub mod cluster_lab;
pub mod coturn;
pub mod daemon;
pub mod dashboards;
pub mod lab;
pub mod loopback;
pub mod prometheus;
pub mod punch;
pub mod redis;
pub mod relay_gateway;
pub mod soak;
pub mod tcp;
pub mod tls;
pub mod turn;
