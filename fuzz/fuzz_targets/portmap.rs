//! Fuzzes the port-mapping client (PCP and NAT-PMP) with answers from its router at
//! every stage (probing, mapping, mapped and refreshing, closing): no input may
//! panic, every timer moves forward, and the client always comes to rest (bounded
//! retries) with at most one mapping.
//!
//! The input is cut into datagrams at 0xFF bytes. A datagram's first byte picks how
//! it is used: raw bytes from the router; the same from another address (must be
//! ignored); a time step; or an answer shaped like the client's latest request with
//! the R bit set (so the fuzzer reaches the grant handling without guessing the
//! nonce), its result, lifetime, epoch and ports from the fuzz bytes.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use gateway::proto::portmap::{PortMapClient, PortMapConfig, PortMapEvent, wire::SERVER_PORT};
use libfuzzer_sys::fuzz_target;

const ROUTER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1));
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2));

/// An answer to `latest` (the client's last request): the R bit set, the rest of
/// the header and the ports overwritten from `body`.
fn shaped(latest: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = latest.to_vec();
    if out.len() < 2 {
        return out;
    }
    out[1] |= 0x80;
    if out[0] == 0 {
        // NAT-PMP answers are longer than requests: result, epoch, then the rest.
        out.resize(16, 0);
    }
    for (i, b) in body.iter().enumerate() {
        let at = 2 + i;
        if at >= out.len() {
            break;
        }
        out[at] = *b;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let router = SocketAddr::new(ROUTER, SERVER_PORT);
    let mut client = PortMapClient::new(now, PortMapConfig::udp(ROUTER, CLIENT, 4500), [3; 12], false);
    let mut latest = Vec::new();
    let mut closed = false;
    for (i, piece) in data.split(|&b| b == 0xFF).enumerate() {
        while let Some(t) = client.poll_transmit() {
            assert_eq!(t.to, router, "only the router is asked");
            latest = t.payload;
        }
        while let Some(event) = client.poll_event() {
            if event == PortMapEvent::Closed {
                closed = true;
            }
        }
        let Some((&kind, body)) = piece.split_first() else {
            continue;
        };
        match kind % 5 {
            0 => {
                client.handle_datagram(now, router, body);
            }
            1 => {
                let elsewhere = SocketAddr::new(ROUTER, SERVER_PORT + 1);
                assert!(!client.handle_datagram(now, elsewhere, body));
            }
            2 => {
                let step = u64::from(body.first().copied().unwrap_or(1)) * 100;
                now += Duration::from_millis(step);
                client.handle_timeout(now);
            }
            3 => {
                let answer = shaped(&latest, body);
                client.handle_datagram(now, router, &answer);
            }
            _ => {
                if i % 7 == 0 {
                    client.close(now);
                } else {
                    client.retry(now, false);
                }
            }
        }
        if let Some(at) = client.poll_timeout()
            && at <= now
        {
            // A timer that is due runs; none may stay due after it ran.
            client.handle_timeout(now);
            assert!(client.poll_timeout().is_none_or(|next| next > now));
        }
    }
    // Left alone, it comes to rest or holds a mapping it refreshes.
    let mut steps = 0;
    while let Some(at) = client.poll_timeout() {
        if client.mapping().is_some() || closed {
            break;
        }
        now = now.max(at);
        client.handle_timeout(now);
        while client.poll_transmit().is_some() {}
        while client.poll_event().is_some() {}
        steps += 1;
        assert!(steps < 64, "retries without end");
    }
});
