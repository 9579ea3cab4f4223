//! Fuzzes the peer agent over every transport toward its gateway: a real
//! rendezvous core answers what the agent sends (over UDP, TCP or TLS, as the agent
//! chose), while the fuzz input decides what gets through (UDP blocked or not, lost
//! messages), when time passes, which streams close, and injects raw bytes as UDP
//! datagrams from the gateway or a peer and as frames on the agent's streams.
//!
//! Beyond "no panic": a message for the gateway goes to its address or, over TLS,
//! to the TLS endpoint; the transport the agent says it uses is one it can use (TLS
//! only with an endpoint); and timers make progress (a deadline that stays due after
//! being handled a hundred times is a finding).
//!
//! The input is cut at 0xFF bytes; each piece's first byte picks the operation.
#![no_main]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gateway_proto::{
    Transmit, Transport,
    agent::{Agent, AgentConfig},
    credentials::SharedSecret,
    rendezvous::{RendezvousConfig, RendezvousServer, client::PeerCredentials},
};
use libfuzzer_sys::fuzz_target;

const NOW_UNIX: u64 = 1_800_000_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fuzz_target!(|data: &[u8]| {
    let server = addr("192.0.2.10:3478");
    let tls = addr("192.0.2.10:443");
    let me = addr("198.51.100.2:4000");
    let peer = addr("198.51.100.6:5000");
    let secret = SharedSecret::new(b"fuzz agent secret");
    let issued = secret.issue("alice", NOW_UNIX + 86_400).expect("peer id");
    let mut config = AgentConfig::new(
        server,
        PeerCredentials {
            username: issued.username,
            password: issued.password,
        },
    );
    let with_tls = data.first().is_some_and(|b| b & 1 == 1);
    if with_tls {
        config.server_tls = Some(tls);
    }
    config.udp_retry_interval = Duration::from_secs(2);
    let start = Instant::now();
    let mut now = start;
    let mut agent = Agent::new(config, now, 7);
    let mut gateway = RendezvousServer::new(secret, RendezvousConfig::default(), 9);
    let mut to_gateway: Vec<Transmit> = Vec::new();
    let mut udp_blocked = false;
    for piece in data.split(|&b| b == 0xFF) {
        // Run due timers, bounded: a deadline that stays due is a spin.
        let mut spins = 0;
        while agent.poll_timeout().is_some_and(|at| at <= now) {
            agent.handle_timeout(now);
            spins += 1;
            assert!(spins < 100, "a timer stays due at {:?}", now - start);
        }
        while let Some(t) = agent.poll_transmit() {
            match t.transport {
                Transport::Tls => {
                    assert!(with_tls, "TLS without an endpoint");
                    assert_eq!(t.to, tls, "TLS goes to the TLS endpoint");
                }
                Transport::Tcp => assert_eq!(t.to, server, "TCP goes to the gateway"),
                Transport::Udp => {}
            }
            if t.to == server || t.to == tls {
                to_gateway.push(t);
            }
        }
        while agent.poll_event().is_some() {}
        if agent.server_transport() == Transport::Tls {
            assert!(with_tls);
        }
        let Some((&kind, body)) = piece.split_first() else {
            continue;
        };
        match kind % 10 {
            0 => {
                // Everything queued for the gateway arrives (UDP unless blocked);
                // its answers come back over the transport each request used.
                let unix = NOW_UNIX + now.duration_since(start).as_secs();
                for t in to_gateway.drain(..) {
                    if t.transport == Transport::Udp && udp_blocked {
                        continue;
                    }
                    gateway.handle_message(now, unix, me, t.transport, None, &t.payload);
                }
                while let Some(reply) = gateway.poll_transmit() {
                    match reply.transport {
                        Transport::Udp if !udp_blocked => {
                            agent.handle_datagram(now, server, &reply.payload)
                        }
                        Transport::Udp => {}
                        Transport::Tcp => {
                            agent.handle_stream_frame(now, Transport::Tcp, server, &reply.payload)
                        }
                        Transport::Tls => {
                            agent.handle_stream_frame(now, Transport::Tls, tls, &reply.payload)
                        }
                    }
                }
                while gateway.poll_event().is_some() {}
            }
            1 => udp_blocked = !udp_blocked,
            2 => {
                let step = u64::from(body.first().copied().unwrap_or(1)) * 20;
                now += Duration::from_millis(step);
            }
            3 => to_gateway.clear(),
            4 => agent.handle_datagram(now, server, body),
            5 => agent.handle_stream_frame(now, Transport::Tcp, server, body),
            6 => agent.handle_stream_frame(now, Transport::Tls, tls, body),
            7 => {
                let transport = if body.first().is_some_and(|b| b & 1 == 1) {
                    Transport::Tls
                } else {
                    Transport::Tcp
                };
                agent.handle_stream_closed(now, transport);
            }
            8 => agent.handle_datagram(now, peer, body),
            _ => {
                if body.first().is_some_and(|b| b & 1 == 1) {
                    let _ = agent.send_data("bob", body);
                } else {
                    agent.connect("bob", now);
                }
            }
        }
    }
});
