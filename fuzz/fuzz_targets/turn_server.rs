//! Fuzzes the TURN relay core with arbitrary datagrams from a client and from a peer:
//! no input may panic, unauthenticated input may create no allocation, and a reply is
//! never much larger than what provoked it.
#![no_main]

use std::{net::SocketAddr, time::Instant};

use gateway::proto::{
    credentials::SharedSecret,
    peer_policy::PeerPolicy,
    stun::Message,
    turn::{
        ChannelData, is_channel_data,
        server::{TurnConfig, TurnServer, TurnServerEvent},
    },
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let client: SocketAddr = "203.0.113.9:4000".parse().expect("literal");
    let policy = PeerPolicy::new(Vec::new(), Vec::new(), Vec::new());
    let mut server = TurnServer::new(TurnConfig::default(), SharedSecret::new(b"fuzz"), [7; 32], 600, policy);
    if is_channel_data(data) {
        if let Ok(message) = ChannelData::parse(data) {
            let _ = server.channel_data_from_client(now, client, message.channel, message.data.len());
        }
    } else if let Ok(message) = Message::parse(data) {
        let _ = server.handle_stun(now, 1_800_000_000, client, None, &message);
        // Socket requests are carried out as a driver would (none should come).
        while let Some(event) = server.poll_event() {
            if let TurnServerEvent::OpenRelay { request, .. } = event {
                let relay = "192.0.2.10:50000".parse().expect("literal");
                let _ = server.handle_relay_opened(now, request, Ok((relay, None)));
            }
        }
        while let Some(reply) = server.poll_transmit() {
            let out = reply.payload;
            assert!(out.len() <= data.len() + 64, "reply {} for {} bytes", out.len(), data.len());
        }
    }
    assert_eq!(server.allocation_count(), 0);
    let _ = server.data_from_peer(now, "192.0.2.10:50000".parse().expect("literal"), client, data.len());
});
