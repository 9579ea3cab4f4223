//! Registers N peers (default 1,000,000) in the sans-IO rendezvous core and reports
//! the process's resident memory before and after: the memory cost per registered
//! peer. Run with `cargo run --release -p gateway --example registry_memory [N]`.
use std::{net::SocketAddr, time::Instant};

use gateway::proto::{
    credentials::SharedSecret,
    rendezvous::{
        RendezvousConfig, RendezvousServer,
        client::{self, PeerCredentials},
        wire::NatClass,
    },
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let now_unix = 1_800_000_000;
    let secret = SharedSecret::new(b"memory secret");
    let mut server = RendezvousServer::new(secret.clone(), RendezvousConfig::default(), 1);
    let before = rss_kib();
    let started = Instant::now();
    let now = Instant::now();
    for i in 0..n {
        let issued = secret
            .issue(&format!("peer-{i:08}"), now_unix + 3600)
            .expect("issue");
        let creds = PeerCredentials {
            username: issued.username,
            password: issued.password,
        };
        let from = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40_000));
        let host = SocketAddr::from(([192, 168, 1, 2], 40_000));
        // First contact: the answer carries the nonce bound to this address.
        let hello = client::register(
            [1; 12],
            &creds,
            None,
            &[host],
            NatClass::EndpointIndependent,
            30,
        );
        server.handle_datagram(now, now_unix, from, None, &hello);
        let nonce = server
            .poll_transmit()
            .and_then(|t| client::parse_response(&t.payload, &creds.password))
            .and_then(|r| r.nonce)
            .expect("a nonce on first contact");
        let request = client::register(
            [1; 12],
            &creds,
            Some(&nonce),
            &[host],
            NatClass::EndpointIndependent,
            30,
        );
        server.handle_datagram(now, now_unix, from, None, &request);
        while server.poll_transmit().is_some() {}
    }
    let after = rss_kib();
    assert_eq!(server.peer_count(), n);
    println!(
        "peers {n} rss_before_mib {:.1} rss_after_mib {:.1} bytes_per_peer {:.0} registrations_per_s {:.0}",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before) * 1024) as f64 / n as f64,
        n as f64 / started.elapsed().as_secs_f64()
    );
}
