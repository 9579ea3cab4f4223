//! TURN and the rendezvous over streams against the real `gateway serve` on
//! loopback: TURN over TLS with real clients (coturn's `turnutils_uclient -S`,
//! aioice with a `turns:` server), the rendezvous over TCP and TLS, the
//! certificate's reload, and what bad input on the TLS port gets (a deadline or a
//! clear close, a counter, and every slot and descriptor back).
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gateway::proto::turn::client::TurnClientEvent;
use gateway_tests::{
    loopback::{LoopbackGateway, SECRET, closed_within, free_tcp},
    tls::{StreamPeer, StreamTurn, TestCa, connect_tls, not_after, peer_certificate},
};

/// A loopback gateway with one TLS listener and loopback peers allowed.
struct TlsGateway {
    gateway: LoopbackGateway,
    tls: SocketAddr,
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsGateway {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Self::start`] with further `gateway serve` flags.
    fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new(dir.path());
        let (cert, key) = ca.leaf("first");
        let tls = free_tcp();
        let tls_arg = tls.to_string();
        let mut args = vec![
            "--allow-peer",
            "127.0.0.0/8",
            "--tls-listen",
            &tls_arg,
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        let gateway = LoopbackGateway::start(dir.path(), &args);
        Self {
            gateway,
            tls,
            ca,
            cert,
            key,
            _dir: dir,
        }
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        self.gateway.metric(name, labels)
    }

    fn handshakes(&self, outcome: &str) -> f64 {
        self.metric(
            "gateway_tls_handshakes_total",
            &format!("outcome=\"{outcome}\""),
        )
    }

    /// Waits (10 s at most) until `name{labels}` reaches `value`.
    fn wait_metric(&self, name: &str, labels: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(name, labels);
            if now == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{{{labels}}} is {now}, not {value}; log:\n{}",
                self.gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Open descriptors of the gateway process.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.gateway.pid()))
            .expect("the gateway's fds")
            .count()
    }
}

fn uclient(tls: SocketAddr, mode: &[&str], clients: u32, messages: u32, length: u32) -> String {
    let output = Command::new("timeout")
        .args([
            "60",
            "turnutils_uclient",
            "-t",
            "-S",
            "-p",
            &tls.port().to_string(),
        ])
        .args(["-W", SECRET, "-r", "gateway", "-u", "uclient"])
        .args(["-m", &clients.to_string(), "-n", &messages.to_string()])
        .args(["-l", &length.to_string()])
        .args(mode)
        .arg(tls.ip().to_string())
        .output()
        .expect("turnutils_uclient: install Debian's coturn package (cargo xtask setup does)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The numbers after `key=` in the last line that has them.
fn last_count(output: &str, key: &str) -> Option<u64> {
    output
        .lines()
        .rev()
        .find_map(|line| line.split(key).nth(1))
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
}

fn assert_all_delivered(output: &str, expected: u64) {
    assert_eq!(
        last_count(output, "tot_send_msgs="),
        Some(expected),
        "{output}"
    );
    assert_eq!(
        last_count(output, "tot_recv_msgs="),
        Some(expected),
        "{output}"
    );
    assert!(
        output.contains("Total lost packets 0 (0.000000%)"),
        "{output}"
    );
}

#[test]
fn coturn_uclient_relays_over_tls_and_allocations_end_with_the_connection() {
    let gw = TlsGateway::start();
    // TURN over TLS over TCP between client and gateway (-t -S; -S alone is DTLS),
    // UDP on the relayed side:
    // channels, then Send indications.
    let channels = uclient(gw.tls, &["-y", "-c"], 2, 200, 120);
    assert_all_delivered(&channels, 400);
    let indications = uclient(gw.tls, &["-y", "-s", "-c"], 2, 50, 1200);
    assert_all_delivered(&indications, 100);
    assert!(gw.metric("gateway_turn_allocations_total", "") >= 4.0);
    assert!(gw.handshakes("ok") >= 4.0, "{}", gw.gateway.log_text());
    // uclient closed its connections: each allocation ended with its connection.
    gw.wait_metric("gateway_turn_allocations", "", 0.0);
    gw.wait_metric("gateway_tls_connections", "", 0.0);
}

fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned();
    let python = root.join("target/python/bin/python3");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it makes a venv with aioice from PyPI)",
        python.display()
    );
    python
}

#[test]
fn aioice_agents_connect_through_a_turns_relay() {
    let gw = TlsGateway::start();
    let (user_a, pass_a) = gw.gateway.credentials("alice");
    let (user_b, pass_b) = gw.gateway.credentials("bob");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/aioice_relay.py");
    let output = Command::new(python())
        .arg(script)
        .arg(gw.tls.ip().to_string())
        .arg(gw.tls.port().to_string())
        .args([&user_a, &pass_a, &user_b, &pass_b])
        .arg("20")
        .arg(&gw.ca.cert)
        .output()
        .expect("python");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "aioice over turns: failed:\n{said}"
    );
    let result: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{said}"));
    assert_eq!(result["received_by_a"], 20, "{said}");
    assert_eq!(result["received_by_b"], 20, "{said}");
    assert_eq!(gw.metric("gateway_turn_allocations_total", ""), 2.0);
    // The allocations were made over TLS (the TLS port is the only way in).
    assert!(gw.handshakes("ok") >= 2.0);
}

#[test]
fn peers_register_and_are_introduced_over_tcp_and_tls() {
    let gw = TlsGateway::start();
    // Alice over TLS, bob over TCP on the service port.
    let tls = connect_tls(gw.tls, gw.ca.client_config()).expect("TLS handshake");
    let mut alice = StreamPeer::new(tls, gw.gateway.credentials("alice"));
    let tcp = TcpStream::connect(gw.gateway.service).expect("TCP connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut bob = StreamPeer::new(tcp, gw.gateway.credentials("bob"));
    let registered = alice.register();
    assert_eq!(registered.result, Ok(()));
    let alice_addr = alice.stream.sock.local_addr().expect("address");
    assert_eq!(
        registered.mapped,
        Some(alice_addr),
        "its TLS connection's address"
    );
    let registered = bob.register();
    assert_eq!(registered.result, Ok(()));
    let bob_addr = bob.stream.local_addr().expect("address");
    assert_eq!(gw.metric("gateway_registered_peers", ""), 2.0);
    // Bob asks for alice: both get their introduction on their own connection.
    let answer = bob.connect("alice");
    assert_eq!(answer.result, Ok(()));
    let to_bob = bob.introduction();
    let to_alice = alice.introduction();
    assert_eq!(Some(to_bob.intro_id), answer.intro_id);
    assert_eq!(to_alice.intro_id, to_bob.intro_id);
    assert_eq!(to_bob.peer_id, "alice");
    assert_eq!(to_alice.peer_id, "bob");
    assert_eq!(to_bob.candidates[0].addr, alice_addr);
    assert_eq!(to_alice.candidates[0].addr, bob_addr);
    // And the other way, started over TLS.
    let answer = alice.connect("bob");
    assert_eq!(answer.result, Ok(()));
    assert_eq!(alice.introduction().peer_id, "bob");
    assert_eq!(bob.introduction().peer_id, "alice");
    assert!(
        gw.metric("gateway_stun_datagrams_total", "outcome=\"introduced\"") >= 2.0,
        "counted as over UDP"
    );
    // Carol over UDP: her Connect to alice (made in the UDP service loop) reaches
    // alice on her TLS connection, and alice's to carol reaches carol over UDP.
    let mut carol = StreamPeer::new(
        UdpFramed::to(gw.gateway.service),
        gw.gateway.credentials("carol"),
    );
    assert_eq!(carol.register().result, Ok(()));
    assert_eq!(carol.connect("alice").result, Ok(()));
    assert_eq!(carol.introduction().peer_id, "alice");
    assert_eq!(alice.introduction().peer_id, "carol");
    assert_eq!(alice.connect("carol").result, Ok(()));
    assert_eq!(alice.introduction().peer_id, "carol");
    assert_eq!(carol.introduction().peer_id, "alice");
    // Bob's connection closes: his registration goes with it (nothing could reach
    // him), and a Connect to him is refused rather than answered with a dead end.
    assert_eq!(gw.metric("gateway_registered_peers", ""), 3.0);
    drop(bob);
    gw.wait_metric("gateway_registered_peers", "", 2.0);
    assert_eq!(alice.connect("bob").result, Err(404));
}

/// A connected UDP socket as a stream of whole datagrams (what [`StreamPeer`]
/// needs: each write one datagram, reads served from the last datagram received).
struct UdpFramed {
    socket: std::net::UdpSocket,
    pending: Vec<u8>,
}

impl UdpFramed {
    fn to(server: SocketAddr) -> Self {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("socket");
        socket.connect(server).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Self {
            socket,
            pending: Vec::new(),
        }
    }
}

impl Read for UdpFramed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            let mut datagram = vec![0u8; 2048];
            let len = self.socket.recv(&mut datagram)?;
            datagram.truncate(len);
            self.pending = datagram;
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

impl Write for UdpFramed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.socket.send(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_certificate_reload_keeps_established_connections_and_serves_new_handshakes() {
    let gw = TlsGateway::start();
    // A fresh client configuration per connection: a resumed session would not
    // show the server's certificate again.
    let config = || gw.ca.client_config();
    let first = connect_tls(gw.tls, config()).expect("handshake");
    let first_cert = peer_certificate(&first);
    let mut alice = StreamPeer::new(first, gw.gateway.credentials("alice"));
    assert_eq!(alice.register().result, Ok(()));
    // And a TURN allocation over TLS.
    let stream = connect_tls(gw.tls, config()).expect("handshake");
    let mut turn = StreamTurn::new(stream, gw.tls, gw.gateway.credentials("relayed"));
    turn.client.allocate(Instant::now()).expect("allocate");
    let allocated = turn.wait_event(|e| matches!(e, TurnClientEvent::Allocated { .. }));
    let TurnClientEvent::Allocated { relayed, .. } = allocated else {
        unreachable!()
    };
    assert_eq!(gw.metric("gateway_turn_allocations", ""), 1.0);
    let expiry = |gw: &TlsGateway| gw.metric("gateway_tls_certificate_expiry_seconds", "");
    assert_eq!(expiry(&gw), not_after(&gw.cert) as f64);
    // A renewal (valid longer) written in place, then SIGHUP.
    let (cert, key) = gw.ca.leaf_for_days("second", 30);
    std::fs::copy(&cert, &gw.cert).expect("cert");
    std::fs::copy(&key, &gw.key).expect("key");
    let pid = i32::try_from(gw.gateway.pid()).expect("pid");
    // SAFETY: a signal to the gateway process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    gw.wait_metric(
        "gateway_tls_certificate_reloads_total",
        "outcome=\"success\"",
        1.0,
    );
    let second = connect_tls(gw.tls, config()).expect("handshake");
    let second_cert = peer_certificate(&second);
    assert_ne!(
        second_cert, first_cert,
        "new handshakes get the new certificate"
    );
    assert_eq!(second_cert, pem_der(&cert));
    assert_eq!(expiry(&gw), not_after(&cert) as f64, "the renewal's expiry");
    // The established connections still serve, with the old certificate: the
    // registration, and the allocation (a permission, then a peer's datagram
    // relayed to the client over TLS).
    assert_eq!(alice.connect("nobody").result, Err(404));
    assert_eq!(peer_certificate(&alice.stream), first_cert);
    assert_eq!(gw.metric("gateway_turn_allocations", ""), 1.0);
    let peer = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer");
    turn.client
        .create_permission(Instant::now(), peer.local_addr().expect("addr").ip())
        .expect("permission");
    turn.wait_event(|e| matches!(e, TurnClientEvent::PermissionCreated { .. }));
    peer.send_to(b"after the reload", relayed).expect("send");
    while turn.received.is_empty() {
        // A Data indication: read by the next wait (no event comes of it).
        let frame = gateway_tests::tls::read_frame(&mut turn.stream).expect("Data");
        let server = turn.client.server();
        if let Some(data) = turn.client.handle_datagram(Instant::now(), server, &frame) {
            turn.received.push((data.peer, data.data.to_vec()));
        }
    }
    assert_eq!(turn.received[0].1, b"after the reload");
    // A broken key is refused: the reload fails and the certificate stays.
    std::fs::write(
        &gw.key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .expect("key");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    gw.wait_metric("gateway_config_reloads_total", "outcome=\"failed\"", 1.0);
    let third = connect_tls(gw.tls, config()).expect("handshake");
    assert_eq!(peer_certificate(&third), second_cert);
    assert!(
        gw.metric(
            "gateway_tls_certificate_reloads_total",
            "outcome=\"failed\""
        ) >= 1.0
    );
    // A renewal without a signal is noticed by the file check (every 10 s).
    let (cert, key) = gw.ca.leaf("third");
    std::fs::copy(&key, &gw.key).expect("key");
    std::fs::copy(&cert, &gw.cert).expect("cert");
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let fresh = connect_tls(gw.tls, config()).expect("handshake");
        if peer_certificate(&fresh) == pem_der(&cert) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changed files were not picked up; log:\n{}",
            gw.gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(alice.connect("nobody").result, Err(404), "still served");
    // Two reloads put a certificate in force: the SIGHUP and the file change.
    gw.wait_metric(
        "gateway_tls_certificate_reloads_total",
        "outcome=\"success\"",
        2.0,
    );
}

/// The DER of the first certificate in a PEM file.
fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_file(path)
        .expect("a certificate")
        .to_vec()
}

#[test]
fn plaintext_and_garbage_on_the_tls_port_are_closed_and_counted() {
    let gw = TlsGateway::start();
    // Plaintext STUN (a Binding request) on the TLS port: closed at once.
    let mut stream = TcpStream::connect(gw.tls).expect("connect");
    let mut binding = Vec::new();
    gateway::proto::binding::binding_request([3; 12], &mut binding);
    stream.write_all(&binding).expect("write");
    let closed = closed_within(&mut stream, Duration::from_secs(3)).expect("closed");
    assert!(closed < Duration::from_secs(2), "closed after {closed:?}");
    // An HTTP request: the same.
    let mut stream = TcpStream::connect(gw.tls).expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert!(closed_within(&mut stream, Duration::from_secs(3)).is_some());
    gw.wait_metric("gateway_tls_handshakes_total", "outcome=\"plaintext\"", 2.0);
    // A handshake record header followed by garbage: refused by TLS.
    let mut stream = TcpStream::connect(gw.tls).expect("connect");
    stream
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
            11, 12, 13,
        ])
        .expect("write");
    assert!(closed_within(&mut stream, Duration::from_secs(3)).is_some());
    gw.wait_metric("gateway_tls_handshakes_total", "outcome=\"error\"", 1.0);
    // A TLS client speaking garbage after the handshake: closed as not STUN; a
    // frame over the largest datagram: closed as oversized, not read.
    let mut tls = connect_tls(gw.tls, gw.ca.client_config()).expect("handshake");
    tls.write_all(&[0xFF; 12]).expect("write");
    tls.flush().expect("flush");
    let mut buf = [0u8; 16];
    assert!(matches!(tls.read(&mut buf), Ok(0) | Err(_)), "closed");
    let mut tls = connect_tls(gw.tls, gw.ca.client_config()).expect("handshake");
    tls.write_all(&[0x00, 0x01, 0xFF, 0xFC]).expect("write");
    tls.flush().expect("flush");
    assert!(matches!(tls.read(&mut buf), Ok(0) | Err(_)), "closed");
    gw.wait_metric(
        "gateway_stream_closed_total",
        "reason=\"not_stun\",transport=\"tls\"",
        1.0,
    );
    gw.wait_metric(
        "gateway_stream_closed_total",
        "reason=\"oversized\",transport=\"tls\"",
        1.0,
    );
    gw.wait_metric("gateway_stream_connections", "transport=\"tls\"", 0.0);
    gw.wait_metric("gateway_tls_connections", "", 0.0);
}

#[test]
fn a_stalled_handshake_is_closed_at_its_deadline() {
    let gw = TlsGateway::start();
    // Nothing at all after connecting, and a ClientHello's first bytes only.
    let mut silent = TcpStream::connect(gw.tls).expect("connect");
    let mut partial = TcpStream::connect(gw.tls).expect("connect");
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("write");
    let closed = closed_within(&mut silent, Duration::from_secs(15)).expect("closed");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&closed),
        "closed after {closed:?}: the deadline is 10 s"
    );
    assert!(closed_within(&mut partial, Duration::from_secs(3)).is_some());
    gw.wait_metric("gateway_tls_handshakes_total", "outcome=\"timeout\"", 2.0);
    gw.wait_metric("gateway_stream_connections", "transport=\"tls\"", 0.0);
}

#[test]
fn one_source_gets_its_share_of_slots_across_tcp_and_tls_and_gets_them_back() {
    let gw = TlsGateway::start();
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = gw.open_fds();
    let budget_before = gw.metric("gateway_relay_fd_budget_used", "");
    // 32 idle TCP and 32 idle TLS connections (handshake done) from 127.0.0.7 (its
    // own address, so its thousands of ports never collide with a port another test
    // binds on 127.0.0.1).
    let source = Ipv4Addr::new(127, 0, 0, 7);
    let held: Vec<TcpStream> = (0..32)
        .map(|_| socket_from(source, gw.gateway.service))
        .collect();
    let mut held_tls: Vec<_> = (0..32)
        .map(|_| tls_over(socket_from(source, gw.tls), gw.tls, &gw.ca))
        .collect();
    gw.wait_metric("gateway_stream_connections", "transport=\"tls\"", 32.0);
    gw.wait_metric("gateway_stream_connections", "transport=\"tcp\"", 32.0);
    // The 65th, on either port, is closed at once and counted.
    let mut extra = socket_from(source, gw.tls);
    assert!(closed_within(&mut extra, Duration::from_secs(3)).is_some());
    let mut extra = socket_from(source, gw.gateway.service);
    assert!(closed_within(&mut extra, Duration::from_secs(3)).is_some());
    assert!(gw.metric("gateway_turn_tcp_refused_total", "") >= 2.0);
    // Thousands more from the same source: each closed at once and counted, none
    // holding a slot or a descriptor.
    let refused = gw.metric("gateway_turn_tcp_refused_total", "");
    for i in 0..2000 {
        let to = if i % 2 == 0 {
            gw.tls
        } else {
            gw.gateway.service
        };
        drop(socket_from(source, to));
    }
    gw.wait_metric("gateway_turn_tcp_refused_total", "", refused + 2000.0);
    assert_eq!(
        gw.metric("gateway_stream_connections", "transport=\"tls\""),
        32.0
    );
    // Another source is served meanwhile.
    let mut tls2 = socket_from(Ipv4Addr::new(127, 0, 0, 2), gw.tls);
    assert!(
        closed_within(&mut tls2, Duration::from_millis(500)).is_none(),
        "127.0.0.2 has its own share"
    );
    // A freed slot serves again.
    drop(held_tls.remove(8));
    gw.wait_metric("gateway_tls_connections", "", 31.0);
    let again = tls_over(socket_from(source, gw.tls), gw.tls, &gw.ca);
    held_tls.push(again);
    gw.wait_metric("gateway_tls_connections", "", 32.0);
    // Everything closed: the slots, the descriptor budget and the fds come back.
    drop(held_tls);
    drop(held);
    drop(tls2);
    gw.wait_metric("gateway_stream_connections", "transport=\"tls\"", 0.0);
    gw.wait_metric("gateway_stream_connections", "transport=\"tcp\"", 0.0);
    gw.wait_metric("gateway_relay_fd_budget_used", "", budget_before);
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.open_fds() > fds_before {
        assert!(
            Instant::now() < deadline,
            "{} fds open, {fds_before} before",
            gw.open_fds()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP connection to `to` from address `from` (any port).
fn socket_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .expect("bind");
    socket.connect(&to.into()).expect("connect");
    socket.into()
}

#[test]
fn a_client_certificate_nobody_asked_for_changes_nothing() {
    let gw = TlsGateway::start();
    // A client that has a certificate to offer: the gateway asks for none, so the
    // handshake completes without it and the connection is served.
    let (cert, key) = gw.ca.leaf("client");
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = vec![CertificateDer::from_pem_file(&cert).expect("cert")];
    let key = PrivateKeyDer::from_pem_file(&key).expect("key");
    let pem = std::fs::read(&gw.ca.cert).expect("CA");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pem) {
        roots.add(ca.expect("PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth config");
    let tls = connect_tls(gw.tls, std::sync::Arc::new(config)).expect("handshake");
    let mut alice = StreamPeer::new(tls, gw.gateway.credentials("alice"));
    assert_eq!(alice.register().result, Ok(()));
    assert_eq!(gw.handshakes("ok"), 1.0);
    assert_eq!(gw.handshakes("error"), 0.0);
    // What goes over the wire (OpenSSL's message trace), in both versions: the
    // gateway sends no CertificateRequest, and the client's certificate never leaves.
    let (cert, key) = gw.ca.leaf("client");
    for version in ["-tls1_2", "-tls1_3"] {
        let output = Command::new("openssl")
            .args(["s_client", "-msg", "-connect", &gw.tls.to_string(), version])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .arg("-CAfile")
            .arg(&gw.ca.cert)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl");
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{said}");
        assert!(
            said.lines()
                .any(|l| l.starts_with("<<<") && l.ends_with("Finished")),
            "the handshake completed:\n{said}"
        );
        assert!(!said.contains("CertificateRequest"), "{said}");
        assert!(
            !said
                .lines()
                .any(|l| l.starts_with(">>>") && l.ends_with(", Certificate")),
            "no client certificate sent:\n{said}"
        );
    }
    assert_eq!(gw.handshakes("ok"), 3.0);
}

#[test]
fn a_second_connection_from_the_same_address_and_transport_is_closed() {
    // Two TLS listeners; one client port connected to both (SO_REUSEADDR).
    let second = free_tcp();
    let second_arg = second.to_string();
    let gw = TlsGateway::start_with(&["--tls-listen", &second_arg]);
    let from = free_tcp();
    let bound = |to: SocketAddr| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.bind(&from.into()).expect("bind the shared port");
        socket.connect(&to.into()).expect("connect");
        TcpStream::from(socket)
    };
    let first = tls_over(bound(gw.tls), gw.tls, &gw.ca);
    let mut alice = StreamPeer::new(first, gw.gateway.credentials("alice"));
    assert_eq!(alice.register().result, Ok(()));
    let mut other = tls_over(bound(second), second, &gw.ca);
    let mut buf = [0u8; 16];
    let read = other.read(&mut buf);
    assert!(
        match &read {
            Ok(0) => true,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            Ok(_) => false,
        },
        "the second is closed, not left open: {read:?}"
    );
    gw.wait_metric(
        "gateway_stream_closed_total",
        "reason=\"duplicate\",transport=\"tls\"",
        1.0,
    );
    // The first keeps its connection, its registration and its writer.
    assert_eq!(alice.connect("nobody").result, Err(404));
    assert_eq!(alice.register().result, Ok(()));
}

/// Completes a TLS handshake with `to` on an already connected `tcp`.
fn tls_over(tcp: TcpStream, to: SocketAddr, ca: &TestCa) -> gateway_tests::tls::TlsStream {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let connection = rustls::ClientConnection::new(ca.client_config(), name).expect("client");
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("handshake");
    }
    stream
}

#[test]
fn only_tls_1_2_and_1_3_are_spoken() {
    let gw = TlsGateway::start();
    // OpenSSL's client at security level 0, so it offers TLS 1.1 at all: the
    // gateway refuses it; 1.2 and 1.3 complete.
    let s_client = |version: &str| {
        let output = Command::new("openssl")
            .args(["s_client", "-connect", &gw.tls.to_string(), version])
            .args(["-cipher", "DEFAULT@SECLEVEL=0", "-CAfile"])
            .arg(&gw.ca.cert)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl");
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let (ok, said) = s_client("-tls1_1");
    assert!(!ok && said.contains("alert"), "TLS 1.1 must fail:\n{said}");
    gw.wait_metric("gateway_tls_handshakes_total", "outcome=\"error\"", 1.0);
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, said) = s_client(flag);
        assert!(ok && said.contains(&format!("New, {name}")), "{said}");
    }
    gw.wait_metric("gateway_tls_handshakes_total", "outcome=\"ok\"", 2.0);
}
