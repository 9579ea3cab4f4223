//! No starved direction in the userspace relay: while one client floods ChannelData
//! through `gateway serve` as fast as one thread can send, a paced flow the other
//! way (a peer sending to another client's relayed address) loses under 1%.
//!
//! Before the fix the service loop never returned to the scheduler under a flood
//! (its socket was always readable), so a relay socket's task, spawned from that
//! loop into its worker's LIFO slot where other workers cannot steal it, never ran:
//! coturn's packet-flood method relayed nothing back at all.
//!
//! The other direction too: while a client floods ChannelData from several threads,
//! another client's paced ChannelData to its peer loses under 1% (the flooder gets
//! a socket of its own on the service port, see gateway/src/fair.rs).
//!
//! Loopback only, no root, no eBPF: the userspace relay alone.
use std::{
    net::{Ipv4Addr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway::proto::turn::client::Framing;
use gateway_tests::relay_gateway::RelayGateway as Gateway;

const WAIT: Duration = Duration::from_secs(5);
/// Datagrams of the paced flow, one a millisecond.
const PACED: u32 = 2_000;
/// Bounds of the flood (the test stops it once the paced flow is over).
const FLOOD_MAX: u64 = 50_000_000;
const FLOOD_FOR: Duration = Duration::from_secs(15);

#[test]
fn a_paced_flow_back_loses_under_one_percent_while_another_client_floods() {
    let dir = tempfile::tempdir().expect("dir");
    let gateway = Gateway::start(dir.path());

    // The flooder: a channel to a sink nobody reads (its drops are the kernel's).
    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sink");
    let mut flooder = gateway.client("flooder");
    flooder.allocate_now(WAIT);
    flooder
        .bind_now(sink.local_addr().expect("sink address"), WAIT)
        .expect("a channel");

    // The receiver: a paced peer sends to its relayed address.
    let paced_peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer");
    let mut receiver = gateway.client("receiver");
    let relayed = receiver.allocate_now(WAIT);
    receiver
        .bind_now(paced_peer.local_addr().expect("peer address"), WAIT)
        .expect("a channel");

    // Flood from another thread with the flooder's own socket and channel frames.
    let frame = {
        let mut out = Vec::new();
        let framing = flooder
            .client
            .encode_send(sink.local_addr().expect("sink"), &[0x42; 120], &mut out)
            .expect("frame");
        assert!(matches!(framing, Framing::ChannelData(_)));
        out
    };
    // The flood comes from the flooder's own socket (its allocation's 5-tuple).
    let flooding = Arc::new(AtomicBool::new(true));
    let flooded = Arc::new(AtomicU64::new(0));
    let flood = {
        let flooding = flooding.clone();
        let flooded = flooded.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while flooding.load(Ordering::Relaxed)
                && flooded.load(Ordering::Relaxed) < FLOOD_MAX
                && started.elapsed() < FLOOD_FOR
            {
                for _ in 0..256 {
                    if flooder.send_raw(&frame).is_ok() {
                        flooded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Stopped by the test, not by its own bounds.
            !flooding.load(Ordering::Relaxed)
        })
    };

    // Let the flood fill the service socket, then pace the other direction.
    std::thread::sleep(Duration::from_millis(300));
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for seq in 0..PACED {
            let due = start + Duration::from_millis(u64::from(seq));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = paced_peer.send_to(&seq.to_be_bytes(), relayed);
        }
    });
    let mut seen = vec![false; PACED as usize];
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(PACED)) + Duration::from_secs(4);
    while Instant::now() < deadline && seen.iter().any(|s| !s) {
        let Ok(received) = receiver.recv(Duration::from_millis(200)) else {
            continue;
        };
        if let Ok(seq) = <[u8; 4]>::try_from(received.data.as_slice())
            && let Some(slot) = seen.get_mut(u32::from_be_bytes(seq) as usize)
        {
            *slot = true;
        }
    }
    pacer.join().expect("pacer");
    flooding.store(false, Ordering::Relaxed);
    let flood_lasted = flood.join().expect("flood");
    let received = seen.iter().filter(|s| **s).count();
    let relayed_out = gateway.metric(
        "gateway_relay_packets_total",
        "direction=\"client_to_peer\"",
    );
    assert!(flood_lasted, "the flood must last the whole paced flow");
    assert!(
        relayed_out > 10_000.0,
        "the flood was relayed: {relayed_out} datagrams"
    );
    assert!(
        received * 100 >= PACED as usize * 99,
        "paced flow back: {received}/{PACED} arrived while {} flood datagrams were sent and {relayed_out} relayed; log:\n{}",
        flooded.load(Ordering::Relaxed),
        std::fs::read_to_string(&gateway.log).unwrap_or_default()
    );
}

/// One allocation's fair share of the way back: while a peer floods one client's
/// relayed address as fast as a thread can send, another peer's paced flow to
/// another client's relayed address loses under 1%. Each allocation has its own
/// relay socket (its own kernel queue: the flood overflows only its own), and each
/// socket's task relays a bounded turn of datagrams before the others get theirs,
/// so the flooded allocation is held to its share of the relay, not everyone's.
#[test]
fn a_flooded_allocation_gets_its_share_of_the_way_back_not_everyones() {
    let dir = tempfile::tempdir().expect("dir");
    let gateway = Gateway::start(dir.path());

    let flooding_peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer");
    let mut flooded = gateway.client("flooded");
    let flooded_relayed = flooded.allocate_now(WAIT);
    flooded
        .bind_now(flooding_peer.local_addr().expect("peer address"), WAIT)
        .expect("a channel");

    let paced_peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer");
    let mut receiver = gateway.client("receiver");
    let relayed = receiver.allocate_now(WAIT);
    receiver
        .bind_now(paced_peer.local_addr().expect("peer address"), WAIT)
        .expect("a channel");

    let flooding = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let flooding = flooding.clone();
        let sent = sent.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let payload = [0x42u8; 120];
            while flooding.load(Ordering::Relaxed) && started.elapsed() < FLOOD_FOR {
                for _ in 0..256 {
                    if flooding_peer.send_to(&payload, flooded_relayed).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            !flooding.load(Ordering::Relaxed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for seq in 0..PACED {
            let due = start + Duration::from_millis(u64::from(seq));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = paced_peer.send_to(&seq.to_be_bytes(), relayed);
        }
    });
    let mut seen = vec![false; PACED as usize];
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(PACED)) + Duration::from_secs(4);
    while Instant::now() < deadline && seen.iter().any(|s| !s) {
        let Ok(received) = receiver.recv(Duration::from_millis(200)) else {
            continue;
        };
        if let Ok(seq) = <[u8; 4]>::try_from(received.data.as_slice())
            && let Some(slot) = seen.get_mut(u32::from_be_bytes(seq) as usize)
        {
            *slot = true;
        }
    }
    pacer.join().expect("pacer");
    flooding.store(false, Ordering::Relaxed);
    let flood_lasted = flood.join().expect("flood");
    let received = seen.iter().filter(|s| **s).count();
    let relayed_back = gateway.relayed("peer_to_client");
    assert!(flood_lasted, "the flood must last the whole paced flow");
    assert!(
        relayed_back > 10_000.0,
        "the flood was relayed back: {relayed_back} datagrams"
    );
    assert!(
        received * 100 >= PACED as usize * 99,
        "paced flow to the other allocation: {received}/{PACED} arrived while the flooded one got {relayed_back} of {} sent; log:\n{}",
        sent.load(Ordering::Relaxed),
        gateway.log_text()
    );
}

/// Threads flooding through one allocation in the client-to-peer case.
const FLOOD_THREADS: usize = 4;

/// Datagrams one `sendmmsg` of a flooding thread carries.
const FLOOD_BURST: usize = 64;

/// Sends `frame` `FLOOD_BURST` times with one `sendmmsg` on `socket` (connected to
/// the server); how many the kernel took.
fn send_burst(socket: &UdpSocket, frame: &[u8]) -> usize {
    use std::os::fd::AsRawFd as _;
    let mut iovecs = [libc::iovec {
        iov_base: frame.as_ptr().cast_mut().cast(),
        iov_len: frame.len(),
    }; FLOOD_BURST];
    // SAFETY: an all-zero mmsghdr is a valid empty header.
    let mut headers: [libc::mmsghdr; FLOOD_BURST] = unsafe { std::mem::zeroed() };
    for (header, iovec) in headers.iter_mut().zip(iovecs.iter_mut()) {
        header.msg_hdr.msg_iov = iovec;
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at an iovec over `frame`, all alive for the call.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            FLOOD_BURST as u32,
            0,
        )
    };
    usize::try_from(sent).unwrap_or(0)
}

/// No starved direction the other way: while a client floods ChannelData toward its
/// peer from several threads (one allocation, as `turnutils_uclient -Y packet` with
/// several sender threads does, `sendmmsg` of 64), another client's paced
/// ChannelData (one a millisecond) through the same server reaches its own peer
/// with under 1% lost. Both go to the server's one service port, so this is the
/// flooding allocation held to its own share of the service port, not everyone's.
///
/// Before the fix every client's datagrams waited in the service socket's one kernel
/// queue, which the flood kept full: 1,294 of 2,000 arrived beside one flooding
/// thread, 655 beside two, 305 beside four; with the fair-share throttle alone (no
/// socket of its own for the flooder) 1,158 beside one and 364 beside four.
#[test]
fn a_paced_flow_out_loses_under_one_percent_while_another_client_floods_out() {
    let dir = tempfile::tempdir().expect("dir");
    let gateway = Gateway::start(dir.path());

    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sink");
    let sink_addr = sink.local_addr().expect("sink address");
    let mut flooder = gateway.client("flooder");
    flooder.allocate_now(WAIT);
    flooder.bind_now(sink_addr, WAIT).expect("a channel");

    let paced_peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer");
    let paced_peer_addr = paced_peer.local_addr().expect("peer address");
    let mut sender = gateway.client("sender");
    sender.allocate_now(WAIT);
    sender.bind_now(paced_peer_addr, WAIT).expect("a channel");

    let frame = {
        let mut out = Vec::new();
        let framing = flooder
            .client
            .encode_send(sink_addr, &[0x42; 120], &mut out)
            .expect("frame");
        assert!(matches!(framing, Framing::ChannelData(_)));
        out
    };
    let flooding = Arc::new(AtomicBool::new(true));
    let flooded = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = (0..FLOOD_THREADS)
        .map(|_| {
            let socket = flooder.clone_udp_socket().expect("a UDP client");
            socket.connect(gateway.service).expect("connect");
            let flooding = flooding.clone();
            let flooded = flooded.clone();
            let frame = frame.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while flooding.load(Ordering::Relaxed)
                    && flooded.load(Ordering::Relaxed) < FLOOD_MAX
                    && started.elapsed() < FLOOD_FOR
                {
                    let sent = send_burst(&socket, &frame);
                    flooded.fetch_add(sent as u64, Ordering::Relaxed);
                }
                !flooding.load(Ordering::Relaxed)
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(300));
    let frames: Vec<Vec<u8>> = (0..PACED)
        .map(|seq| {
            let mut out = Vec::new();
            let framing = sender
                .client
                .encode_send(paced_peer_addr, &seq.to_be_bytes(), &mut out)
                .expect("frame");
            assert!(matches!(framing, Framing::ChannelData(_)));
            out
        })
        .collect();
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for (seq, frame) in frames.iter().enumerate() {
            let due = start + Duration::from_millis(seq as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = sender.send_raw(frame);
        }
    });
    let mut seen = vec![false; PACED as usize];
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(PACED)) + Duration::from_secs(4);
    paced_peer
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    while Instant::now() < deadline && seen.iter().any(|s| !s) {
        let Ok(len) = paced_peer.recv(&mut buf) else {
            continue;
        };
        if let Ok(seq) = <[u8; 4]>::try_from(buf.get(..len).unwrap_or_default())
            && let Some(slot) = seen.get_mut(u32::from_be_bytes(seq) as usize)
        {
            *slot = true;
        }
    }
    pacer.join().expect("pacer");
    flooding.store(false, Ordering::Relaxed);
    let floods_lasted = floods.into_iter().all(|f| f.join().expect("flood"));
    let received = seen.iter().filter(|s| **s).count();
    let relayed_out = gateway.relayed("client_to_peer");
    eprintln!(
        "paced {received}/{PACED}; flood sent {}, relayed out {relayed_out}",
        flooded.load(Ordering::Relaxed)
    );
    assert!(floods_lasted, "the flood must last the whole paced flow");
    assert!(
        relayed_out > 10_000.0,
        "the flood was relayed: {relayed_out} datagrams"
    );
    // The flooder alone was given a queue of its own, not the paced client.
    let isolations = gateway.metric("gateway_udp_isolations_total", "");
    assert_eq!(isolations, 1.0, "clients isolated");
    assert!(
        received * 100 >= PACED as usize * 99,
        "paced flow out: {received}/{PACED} arrived while {} flood datagrams were sent and {relayed_out} relayed; log:\n{}",
        flooded.load(Ordering::Relaxed),
        gateway.log_text()
    );

    // Quiet for 5 s, the flooder's own socket closes, and its datagrams are served
    // from the service socket again.
    let released = Instant::now() + Duration::from_secs(10);
    while gateway.metric("gateway_udp_isolated_clients", "") > 0.0 {
        assert!(Instant::now() < released, "the isolated socket stays open");
        std::thread::sleep(Duration::from_millis(200));
    }
    sink.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 256];
    while sink.recv(&mut buf).is_ok() {}
    sink.set_nonblocking(false).expect("blocking");
    sink.set_read_timeout(Some(WAIT)).expect("timeout");
    flooder.send_raw(&frame).expect("send");
    let len = sink.recv(&mut buf).expect("relayed after the release");
    assert_eq!(buf.get(..len), Some(&[0x42; 120][..]));
}
