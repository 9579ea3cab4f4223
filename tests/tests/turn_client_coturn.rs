//! Interop of the gateway's sans-IO TURN client with a real TURN server: coturn's
//! `turnserver` on loopback, REST credentials from the gateway's own credential code.
//! These fail (never skip) when coturn is missing: `cargo xtask setup` installs it.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use gateway::proto::{
    credentials::SharedSecret,
    turn::{
        AddressFamily,
        client::{AllocationState, ClientConfig, Framing, Request, TurnClientEvent},
    },
};
use gateway_tests::{
    coturn::{Coturn, CoturnConfig},
    turn::{BlockingClient, Received},
};

const SECRET: &str = "interop-secret";
const REALM: &str = "interop.test";
const WAIT: Duration = Duration::from_secs(5);

fn start(config: &CoturnConfig) -> Coturn {
    Coturn::start(config).unwrap_or_else(|e| panic!("cannot run coturn: {e}"))
}

fn client_config(coturn: &Coturn, secret: &str, peer_id: &str) -> ClientConfig {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    let credentials = SharedSecret::new(secret.as_bytes())
        .issue(peer_id, expiry)
        .expect("valid peer id");
    ClientConfig::new(coturn.addr(), credentials.username, credentials.password)
}

fn bind_addr(coturn: &Coturn) -> SocketAddr {
    SocketAddr::new(coturn.addr().ip(), 0)
}

fn allocate(client: &mut BlockingClient) -> SocketAddr {
    client
        .client
        .allocate(std::time::Instant::now())
        .expect("idle");
    match client.wait_event(WAIT, |e| {
        matches!(
            e,
            TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
        )
    }) {
        Ok(TurnClientEvent::Allocated {
            relayed,
            mapped,
            lifetime,
        }) => {
            assert_eq!(mapped, Some(client.local_addr().expect("bound")));
            assert!(lifetime > Duration::ZERO);
            relayed
        }
        other => panic!("allocation failed: {other:?}"),
    }
}

fn peer_recv(peer: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    peer.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut buf = [0u8; 2048];
    let (len, from) = peer.recv_from(&mut buf).expect("the peer receives");
    (buf[..len].to_vec(), from)
}

#[test]
fn allocates_and_relays_both_ways_through_send_indications_and_channels() {
    let coturn = start(&CoturnConfig::loopback(SECRET, REALM));
    let mut client =
        BlockingClient::new(bind_addr(&coturn), client_config(&coturn, SECRET, "alice"))
            .expect("socket");
    let relayed = allocate(&mut client);
    assert_eq!(relayed.ip(), coturn.addr().ip());

    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer socket");
    let peer_addr = peer.local_addr().expect("bound");
    client
        .client
        .create_permission(std::time::Instant::now(), peer_addr.ip())
        .expect("allocated");
    let event = client
        .wait_event(WAIT, |e| !matches!(e, TurnClientEvent::Refreshed { .. }))
        .expect("permission answer");
    assert_eq!(
        event,
        TurnClientEvent::PermissionCreated {
            peer: peer_addr.ip()
        }
    );

    // Send indication → peer, then the peer's reply → Data indication.
    assert_eq!(
        client
            .send(peer_addr, b"via send indication")
            .expect("send"),
        Framing::SendIndication
    );
    assert_eq!(peer_recv(&peer), (b"via send indication".to_vec(), relayed));
    peer.send_to(b"reply as data indication", relayed)
        .expect("peer sends");
    assert_eq!(
        client.recv(WAIT).expect("data indication"),
        Received {
            peer: peer_addr,
            data: b"reply as data indication".to_vec(),
            channel: None
        }
    );

    // Bind a channel: ChannelData both ways.
    let channel = client
        .client
        .bind_channel(std::time::Instant::now(), peer_addr)
        .expect("allocated");
    let event = client
        .wait_event(WAIT, |e| {
            matches!(
                e,
                TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
            )
        })
        .expect("channel answer");
    assert_eq!(
        event,
        TurnClientEvent::ChannelBound {
            peer: peer_addr,
            channel
        }
    );
    assert_eq!(
        client.send(peer_addr, b"via channel").expect("send"),
        Framing::ChannelData(channel)
    );
    assert_eq!(peer_recv(&peer), (b"via channel".to_vec(), relayed));
    let big: Vec<u8> = (0..1200u32).map(|i| (i % 251) as u8).collect();
    peer.send_to(&big, relayed).expect("peer sends");
    assert_eq!(
        client.recv(WAIT).expect("channel data"),
        Received {
            peer: peer_addr,
            data: big,
            channel: Some(channel)
        }
    );

    // Deallocate: coturn confirms, and the relayed address stops relaying.
    client.client.close(std::time::Instant::now());
    let event = client
        .wait_event(WAIT, |e| {
            matches!(
                e,
                TurnClientEvent::Deallocated | TurnClientEvent::Failed { .. }
            )
        })
        .expect("close answer");
    assert_eq!(event, TurnClientEvent::Deallocated);
    assert_eq!(client.client.state(), AllocationState::Closed);
    peer.send_to(b"after close", relayed).expect("peer sends");
    client.run_for(Duration::from_millis(300)).expect("drive");
    assert!(client.recv(Duration::from_millis(1)).is_err());
}

#[test]
fn two_clients_relay_to_each_other_through_their_channels() {
    // The benchmark's topology: A's channel to B's relayed address and back.
    let coturn = start(&CoturnConfig::loopback(SECRET, REALM));
    let mut a = BlockingClient::new(bind_addr(&coturn), client_config(&coturn, SECRET, "a"))
        .expect("socket");
    let mut b = BlockingClient::new(bind_addr(&coturn), client_config(&coturn, SECRET, "b"))
        .expect("socket");
    let relayed_a = allocate(&mut a);
    let relayed_b = allocate(&mut b);
    let now = std::time::Instant::now();
    let channel_a = a.client.bind_channel(now, relayed_b).expect("allocated");
    let channel_b = b.client.bind_channel(now, relayed_a).expect("allocated");
    for (client, relayed) in [(&mut a, relayed_b), (&mut b, relayed_a)] {
        let event = client
            .wait_event(WAIT, |e| {
                matches!(
                    e,
                    TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
                )
            })
            .expect("channel answer");
        assert!(
            matches!(event, TurnClientEvent::ChannelBound { peer, .. } if peer == relayed),
            "{event:?}"
        );
    }
    for i in 0..20u8 {
        let payload = [i; 120];
        assert_eq!(
            a.send(relayed_b, &payload).expect("send"),
            Framing::ChannelData(channel_a)
        );
        assert_eq!(
            b.recv(WAIT).expect("b receives"),
            Received {
                peer: relayed_a,
                data: payload.to_vec(),
                channel: Some(channel_b)
            }
        );
        let echo = [i ^ 0xFF; 120];
        b.send(relayed_a, &echo).expect("send");
        assert_eq!(
            a.recv(WAIT).expect("a receives"),
            Received {
                peer: relayed_b,
                data: echo.to_vec(),
                channel: Some(channel_a)
            }
        );
    }
}

#[test]
fn wrong_secret_fails_with_401() {
    let coturn = start(&CoturnConfig::loopback(SECRET, REALM));
    let mut client = BlockingClient::new(
        bind_addr(&coturn),
        client_config(&coturn, "not-the-secret", "mallory"),
    )
    .expect("socket");
    client
        .client
        .allocate(std::time::Instant::now())
        .expect("idle");
    let event = client.wait_event(WAIT, |_| true).expect("an answer");
    match event {
        TurnClientEvent::Failed {
            request: Request::Allocate,
            failure,
        } => assert_eq!(failure.code(), Some(401), "{failure}"),
        other => panic!("expected a 401 failure, got {other:?}"),
    }
    assert_eq!(client.client.state(), AllocationState::Failed);
}

#[test]
fn stale_nonce_is_renewed_transparently() {
    // Nonces that go stale after a second: a request two seconds later meets 438 and
    // the client must retry with the new nonce on its own.
    let mut config = CoturnConfig::loopback(SECRET, REALM);
    config.extra_args.push("--stale-nonce=1".into());
    let coturn = start(&config);
    let mut client =
        BlockingClient::new(bind_addr(&coturn), client_config(&coturn, SECRET, "slow"))
            .expect("socket");
    allocate(&mut client);
    std::thread::sleep(Duration::from_millis(2100));
    let peer: IpAddr = "127.0.0.1".parse().expect("literal");
    client
        .client
        .create_permission(std::time::Instant::now(), peer)
        .expect("allocated");
    let event = client.wait_event(WAIT, |_| true).expect("an answer");
    assert_eq!(event, TurnClientEvent::PermissionCreated { peer });
}

#[test]
fn ipv6_relayed_address_on_request() {
    let mut config = CoturnConfig::loopback(SECRET, REALM);
    config.relay_ips.push("::1".parse().expect("literal"));
    let coturn = start(&config);
    let mut turn_config = client_config(&coturn, SECRET, "six");
    turn_config.family = AddressFamily::V6;
    let mut client = BlockingClient::new(bind_addr(&coturn), turn_config).expect("socket");
    let relayed = allocate(&mut client);
    assert_eq!(relayed.ip(), "::1".parse::<IpAddr>().expect("literal"));

    let peer = UdpSocket::bind("[::1]:0").expect("peer socket");
    let peer_addr = peer.local_addr().expect("bound");
    client
        .client
        .bind_channel(std::time::Instant::now(), peer_addr)
        .expect("allocated");
    let event = client
        .wait_event(WAIT, |e| {
            matches!(
                e,
                TurnClientEvent::ChannelBound { .. } | TurnClientEvent::Failed { .. }
            )
        })
        .expect("channel answer");
    assert!(
        matches!(event, TurnClientEvent::ChannelBound { .. }),
        "{event:?}"
    );
    client.send(peer_addr, b"over v6").expect("send");
    assert_eq!(peer_recv(&peer), (b"over v6".to_vec(), relayed));
    peer.send_to(b"back over v6", relayed).expect("peer sends");
    assert_eq!(client.recv(WAIT).expect("data").data, b"back over v6");
}
