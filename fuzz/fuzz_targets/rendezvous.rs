//! Fuzzes the rendezvous server and the peer agent with arbitrary datagrams: no input
//! may panic, unauthenticated input may create no registration, and replies stay small.
#![no_main]

use std::time::Instant;

use gateway::proto::{
    agent::{Agent, AgentConfig},
    credentials::SharedSecret,
    rendezvous::{RendezvousConfig, RendezvousServer, client::PeerCredentials},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let from = "203.0.113.9:4000".parse().expect("literal");
    let mut server = RendezvousServer::new(SharedSecret::new(b"fuzz"), RendezvousConfig::default(), 1);
    server.handle_datagram(now, 1_800_000_000, from, None, data);
    assert_eq!(server.peer_count(), 0);
    while let Some(transmit) = server.poll_transmit() {
        assert!(transmit.payload.len() <= 96);
    }
    while server.poll_event().is_some() {}

    let server_addr = "192.0.2.10:3478".parse().expect("literal");
    let credentials = PeerCredentials { username: "1900000000:alice".into(), password: "pw".into() };
    let mut agent = Agent::new(AgentConfig::new(server_addr, credentials), now, 1);
    agent.handle_datagram(now, from, data);
    agent.handle_datagram(now, server_addr, data);
    agent.handle_datagram_on(now, 1, from, data);
    agent.handle_timeout(now);
    while agent.poll_transmit().is_some() {}
    while agent.poll_event().is_some() {}
});
