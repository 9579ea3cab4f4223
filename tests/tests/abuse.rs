//! What an unauthenticated source can make the real `gateway serve` do, on loopback:
//! the budgets and deadlines of issue 14's adversarial run, each a check that failed
//! before its fix.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use gateway::proto::binding::binding_request;
use gateway_tests::loopback::{LoopbackGateway, closed_within};

#[test]
fn a_tcp_client_that_announces_a_frame_and_stops_is_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = LoopbackGateway::start(dir.path(), &[]);
    // A STUN header announcing 1,000 bytes, and nothing more: before the fix only the
    // header had a deadline (30 s for the first); the body could wait an hour.
    let mut stream = TcpStream::connect(gateway.service).expect("connect");
    stream.write_all(&[0x00, 0x03, 0x03, 0xE8]).expect("header");
    let closed = closed_within(&mut stream, Duration::from_secs(12));
    let closed = closed.expect("still open 12 s after a header whose body never came");
    assert!(
        closed >= Duration::from_secs(4),
        "closed after {closed:?}: before the 5 s body deadline"
    );
    // The same after a complete first frame (a Binding): the deadline is per frame.
    let mut stream = TcpStream::connect(gateway.service).expect("connect");
    let mut binding = Vec::new();
    binding_request([7; 12], &mut binding);
    stream.write_all(&binding).expect("binding");
    let mut answer = [0u8; 20];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.read_exact(&mut answer).expect("a Binding answer");
    stream.write_all(&[0x00, 0x01, 0x00, 0x40]).expect("header");
    assert!(
        closed_within(&mut stream, Duration::from_secs(12)).is_some(),
        "a later frame's body has a deadline too"
    );
}

#[test]
fn one_source_gets_at_most_its_share_of_tcp_slots() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = LoopbackGateway::start(dir.path(), &[]);
    let mut held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(gateway.service).expect("connect"))
        .collect();
    // Give the accept loop time to take them all.
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = TcpStream::connect(gateway.service).expect("the kernel accepts");
    assert!(
        closed_within(&mut extra, Duration::from_secs(3)).is_some(),
        "the 65th connection from one source is closed at once"
    );
    assert!(gateway.metric("gateway_turn_tcp_refused_total", "") >= 1.0);
    // The held ones are still served, and a slot given back can be taken again.
    let mut first = held.remove(0);
    assert!(closed_within(&mut first, Duration::from_millis(500)).is_none());
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = TcpStream::connect(gateway.service).expect("connect");
    assert!(
        closed_within(&mut again, Duration::from_millis(800)).is_none(),
        "a freed slot serves a new connection"
    );
}

#[test]
fn a_binding_burst_from_one_source_is_answered_within_its_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = LoopbackGateway::start(dir.path(), &[]);
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut request = Vec::new();
    for i in 0..300u32 {
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&i.to_be_bytes());
        binding_request(tid, &mut request);
        socket.send_to(&request, gateway.service).expect("send");
    }
    let mut answered = 0;
    let mut buf = [0u8; 256];
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        assert_eq!(from, gateway.service);
        answered += 1;
    }
    // The burst of 100 plus what refills while the burst is read (50 per second).
    assert!(
        (100..=120).contains(&answered),
        "{answered} of 300 answered from one source"
    );
    assert!(
        gateway.metric("gateway_stun_datagrams_total", "outcome=\"throttled\"") >= 150.0,
        "the dropped answers are counted"
    );
    // Another source (127.0.0.2: loopback is a /8) is answered meanwhile.
    let other = UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).expect("socket");
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    binding_request([9; 12], &mut request);
    other.send_to(&request, gateway.service).expect("send");
    let (_, from): (usize, SocketAddr) = other.recv_from(&mut buf).expect("an answer");
    assert_eq!(from, gateway.service);
}
