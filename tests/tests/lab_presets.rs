//! Self-tests of the NAT lab: every preset behaves as its name says, with real sockets
//! in the lab's namespaces, plus topology (TTL), cleanup and stale-removal guarantees.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    panic::AssertUnwindSafe,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use gateway_tests::lab::{
    Host, Lab, LabAvailability, MAX_SERVERS, NatPreset, REDIS_HOST_ADDR, Site, namespace_exists,
    remove_stale_namespaces, require_root, server_addrs,
};

/// Longest wait for a packet that must arrive.
const ARRIVES: Duration = Duration::from_secs(2);
/// How long to listen for a packet that must not arrive.
const SILENT: Duration = Duration::from_millis(500);
const S10: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const S11: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

macro_rules! require_lab {
    () => {
        if require_root() == LabAvailability::OptedOut {
            eprintln!("SKIPPED (GATEWAY_LAB_OPT_OUT=1): this lab test did NOT run");
            return;
        }
    };
}

fn lab(preset: NatPreset) -> Lab {
    Lab::builder()
        .site("a", preset)
        .build()
        .expect("lab builds")
}

fn site(lab: &Lab) -> &Site {
    lab.site("a").expect("site a")
}

fn host0(lab: &Lab) -> &Host {
    site(lab).host(0).expect("host 0")
}

/// A server socket on `ip:port`.
fn srv(lab: &Lab, ip: Ipv4Addr, port: u16) -> UdpSocket {
    lab.server()
        .udp_bind_on(SocketAddr::from((ip, port)))
        .expect("server bind")
}

/// One datagram within `timeout`, or `None`. Signals interrupting the wait (seen
/// here under load as EINTR) are retried.
fn recv(socket: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        socket.set_read_timeout(Some(left)).expect("timeout");
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => return Some((buf[..n].to_vec(), from)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Sends from `from` to `to`'s address and returns the source address `to` saw.
fn seen_by(from: &UdpSocket, to: &UdpSocket) -> SocketAddr {
    let dest = to.local_addr().expect("addr");
    from.send_to(b"probe", dest).expect("send");
    recv(to, ARRIVES)
        .unwrap_or_else(|| panic!("probe to {dest} did not arrive"))
        .1
}

/// Whether a datagram from `from` reaches `to` (at `to_addr`, its public endpoint).
fn reaches(from: &UdpSocket, to: &UdpSocket, to_addr: SocketAddr) -> bool {
    from.send_to(b"inbound", to_addr).expect("send");
    recv(to, SILENT).is_some()
}

#[test]
fn no_nat_hosts_are_seen_with_their_own_address_and_reachable() {
    require_lab!();
    let lab = lab(NatPreset::no_nat());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s2 = srv(&lab, S11, 5002);
    let own = SocketAddr::from((host0(&lab).addr(), 4000));
    assert_eq!(host0(&lab).addr(), Ipv4Addr::new(203, 0, 113, 2));
    assert_eq!(seen_by(&h, &s1), own);
    assert!(
        reaches(&s2, &h, own),
        "a plain router forwards unsolicited inbound"
    );
}

#[test]
fn firewall_only_allows_replies_but_not_unsolicited_inbound() {
    require_lab!();
    let lab = lab(NatPreset::firewall_only());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s2 = srv(&lab, S11, 5002);
    let own = SocketAddr::from((host0(&lab).addr(), 4000));
    assert_eq!(seen_by(&h, &s1), own);
    assert!(
        !reaches(&s2, &h, own),
        "unsolicited inbound must be dropped"
    );
    assert!(reaches(&s1, &h, own), "the reply must pass");
    // TCP: the host can connect out, the server cannot connect in.
    let listener = lab
        .server()
        .tcp_listen_on(SocketAddr::from((S10, 8000)))
        .expect("listen");
    host0(&lab)
        .tcp_connect(SocketAddr::from((S10, 8000)), ARRIVES)
        .expect("lab")
        .expect("outbound TCP");
    drop(listener);
    let _l = host0(&lab).tcp_listen(8001).expect("listen");
    let inbound = lab
        .server()
        .tcp_connect(SocketAddr::from((own.ip(), 8001)), SILENT)
        .expect("lab");
    assert_eq!(
        inbound.expect_err("inbound TCP must fail").kind(),
        io::ErrorKind::TimedOut
    );
}

#[test]
fn full_cone_maps_endpoint_independently_with_preserved_port_and_filters_nothing() {
    require_lab!();
    let lab = lab(NatPreset::full_cone());
    let wan = site(&lab).wan_addr();
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s2 = srv(&lab, S11, 5002);
    let s3 = srv(&lab, S11, 5003);
    let public = SocketAddr::from((wan, 4000));
    assert_eq!(seen_by(&h, &s1), public, "EIM with port preservation");
    assert!(
        reaches(&s3, &h, public),
        "EIF: a never-contacted endpoint reaches the mapping"
    );
    assert_eq!(
        seen_by(&h, &s2),
        public,
        "same mapping for the other address"
    );
    // The host's answer to the new endpoint goes out through the same mapping.
    assert_eq!(seen_by(&h, &s3), public);
    // No mapping, no entry: unsolicited traffic to an unmapped port is dropped.
    assert!(!reaches(&s3, &h, SocketAddr::from((wan, 4001))));
}

#[test]
fn restricted_cone_filters_by_address_only() {
    require_lab!();
    let lab = lab(NatPreset::restricted_cone());
    let wan = site(&lab).wan_addr();
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s1b = srv(&lab, S10, 5002);
    let s2 = srv(&lab, S11, 5003);
    let public = SocketAddr::from((wan, 4000));
    assert_eq!(seen_by(&h, &s1), public);
    assert!(
        reaches(&s1b, &h, public),
        "ADF: another port of a contacted address passes"
    );
    assert!(
        !reaches(&s2, &h, public),
        "ADF: a never-contacted address is filtered"
    );
    assert_eq!(seen_by(&h, &s2), public, "EIM");
    assert!(reaches(&s2, &h, public), "now contacted, it passes");
}

#[test]
fn port_restricted_cone_preserves_the_port_and_filters_by_address_and_port() {
    require_lab!();
    let lab = lab(NatPreset::port_restricted_cone());
    let wan = site(&lab).wan_addr();
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s1b = srv(&lab, S10, 5009);
    let s2 = srv(&lab, S11, 5002);
    let public = SocketAddr::from((wan, 4000));
    assert_eq!(seen_by(&h, &s1), public, "port preserved");
    assert_eq!(seen_by(&h, &s2), public, "EIM");
    assert!(
        !reaches(&s1b, &h, public),
        "APDF: other port of the address"
    );
    assert!(reaches(&s1, &h, public), "APDF: the contacted endpoint");
    assert!(
        reaches(&s2, &h, public),
        "APDF: the other contacted endpoint"
    );
}

#[test]
fn eim_random_port_keeps_one_mapping_on_another_port() {
    require_lab!();
    let lab = lab(NatPreset::eim_random_port());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s2 = srv(&lab, S11, 5002);
    let s3 = srv(&lab, S10, 5003);
    let a = seen_by(&h, &s1);
    assert_eq!(a.ip(), std::net::IpAddr::V4(site(&lab).wan_addr()));
    assert_ne!(a.port(), 4000, "the port must not be preserved");
    assert_eq!(seen_by(&h, &s2), a, "EIM: same mapping for another address");
    assert_eq!(seen_by(&h, &s3), a, "EIM: same mapping for another port");
    assert!(!reaches(&srv(&lab, S11, 5004), &h, a), "APDF");
    assert!(reaches(&s1, &h, a));
}

#[test]
fn symmetric_gives_a_new_random_port_per_destination() {
    require_lab!();
    let lab = lab(NatPreset::symmetric());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s1b = srv(&lab, S10, 5002);
    let s2 = srv(&lab, S11, 5001);
    let ports = [seen_by(&h, &s1), seen_by(&h, &s1b), seen_by(&h, &s2)];
    let p: Vec<u16> = ports.iter().map(SocketAddr::port).collect();
    assert!(p[0] != p[1] && p[1] != p[2] && p[0] != p[2], "APDM: {p:?}");
    assert!(!p.contains(&4000), "random ports: {p:?}");
    // APDF: s1b cannot use s1's mapping.
    assert!(!reaches(&s1b, &h, ports[0]));
    assert!(reaches(&s1, &h, ports[0]));
}

#[test]
fn symmetric_sequential_allocates_consecutive_ports() {
    require_lab!();
    let lab = lab(NatPreset::symmetric_sequential());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let mut ports = Vec::new();
    for i in 0..6u16 {
        let ip = if i % 2 == 0 { S10 } else { S11 };
        let s = srv(&lab, ip, 5001 + i);
        ports.push(seen_by(&h, &s).port());
    }
    let diffs: Vec<i32> = ports
        .windows(2)
        .map(|w| i32::from(w[1]) - i32::from(w[0]))
        .collect();
    eprintln!("symmetric-sequential ports {ports:?}, steps {diffs:?}");
    assert!(
        diffs.iter().all(|d| *d == 1),
        "each new mapping takes the next port: {ports:?}"
    );
    // A second internal socket continues the sequence.
    let h2 = host0(&lab).udp_bind(4001).expect("bind");
    let next = seen_by(&h2, &srv(&lab, S10, 6000)).port();
    assert_eq!(next, ports[5] + 1);
}

#[test]
fn address_dependent_maps_and_filters_per_address() {
    require_lab!();
    let lab = lab(NatPreset::address_dependent());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let s1b = srv(&lab, S10, 5002);
    let s2 = srv(&lab, S11, 5001);
    let a = seen_by(&h, &s1);
    assert_eq!(seen_by(&h, &s1b), a, "ADM: same port for the same address");
    let b = seen_by(&h, &s2);
    assert_ne!(a.port(), b.port(), "ADM: a new port for another address");
    // ADF, with a socket that only ever sent to 192.0.2.10.
    let g = host0(&lab).udp_bind(4100).expect("bind");
    let t1 = srv(&lab, S10, 7001);
    let t1b = srv(&lab, S10, 7002);
    let t2 = srv(&lab, S11, 7003);
    let m = seen_by(&g, &t1);
    assert!(
        reaches(&t1b, &g, m),
        "ADF: another port of the address passes"
    );
    assert!(!reaches(&t2, &g, m), "ADF: another address is filtered");
}

#[test]
fn udp_blocked_drops_udp_but_passes_tcp() {
    require_lab!();
    let lab = lab(NatPreset::udp_blocked());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    h.send_to(b"x", s1.local_addr().expect("addr"))
        .expect("send");
    assert!(recv(&s1, SILENT).is_none(), "UDP must not get out");
    let listener = lab
        .server()
        .tcp_listen_on(SocketAddr::from((S10, 8000)))
        .expect("listen");
    let mut stream = host0(&lab)
        .tcp_connect(SocketAddr::from((S10, 8000)), ARRIVES)
        .expect("lab")
        .expect("TCP gets out");
    stream.write_all(b"hello").expect("write");
    let (mut accepted, from) = loop {
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other.expect("accept"),
        }
    };
    assert_eq!(from.ip(), site(&lab).wan_addr());
    let mut buf = [0u8; 5];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hello");
}

#[test]
fn short_timeout_forgets_idle_mappings_after_three_seconds() {
    require_lab!();
    let lab = lab(NatPreset::short_timeout());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    let public = seen_by(&h, &s1);
    assert!(reaches(&s1, &h, public), "reply right away");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(reaches(&s1, &h, public), "still mapped after 1.5 s idle");
    std::thread::sleep(Duration::from_millis(4000));
    assert!(!reaches(&s1, &h, public), "gone after 4.5 s idle");
}

fn force_buffers(socket: &UdpSocket) {
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt on an open socket with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
    }
}

#[test]
fn lossy_5_loses_about_five_percent_each_way() {
    require_lab!();
    const N: u32 = 2000;
    let lab = lab(NatPreset::lossy_5());
    let h = host0(&lab).udp_bind(4000).expect("bind");
    let s1 = srv(&lab, S10, 5001);
    force_buffers(&h);
    force_buffers(&s1);
    let to = s1.local_addr().expect("addr");
    let server_got = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let echo = {
        let (s1, got, done) = (
            s1.try_clone().expect("clone"),
            server_got.clone(),
            done.clone(),
        );
        std::thread::spawn(move || {
            s1.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            while !done.load(Ordering::SeqCst) {
                if let Ok((n, from)) = s1.recv_from(&mut buf) {
                    got.fetch_add(1, Ordering::SeqCst);
                    s1.send_to(&buf[..n], from).expect("echo");
                }
            }
        })
    };
    for i in 0..N {
        h.send_to(&i.to_be_bytes(), to).expect("send");
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut host_got = 0u32;
    h.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match h.recv_from(&mut buf) {
            Ok(_) => host_got += 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done.store(true, Ordering::SeqCst);
    echo.join().expect("echo thread");
    let up = server_got.load(Ordering::SeqCst);
    let lost_up = N - up;
    let lost_down = up - host_got;
    eprintln!("lossy-5: {N} sent, lost {lost_up} upstream, {lost_down} of {up} downstream");
    // 5 % of 2000 is 100 with a standard deviation near 10.
    assert!((40..=170).contains(&lost_up), "upstream loss {lost_up}");
    let expected_down = up * 5 / 100;
    assert!(
        lost_down >= expected_down.saturating_sub(60) && lost_down <= expected_down + 70,
        "downstream loss {lost_down} of {up}"
    );
}

/// Whether a connected UDP socket from the server to `to` gets ECONNREFUSED (an ICMP
/// port unreachable) in answer to a datagram.
fn udp_refused(lab: &Lab, to: SocketAddr) -> bool {
    let s = lab.server().udp_bind(0).expect("bind");
    s.connect(to).expect("connect");
    s.send(b"unsolicited").expect("send");
    s.set_read_timeout(Some(SILENT)).expect("timeout");
    let mut buf = [0u8; 16];
    let mut result = s.recv(&mut buf);
    while matches!(&result, Err(e) if e.kind() == io::ErrorKind::Interrupted) {
        result = s.recv(&mut buf);
    }
    match result {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => true,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn two_sites(a: NatPreset, b: NatPreset) -> Lab {
    Lab::builder()
        .site("a", a)
        .site("b", b)
        .build()
        .expect("lab builds")
}

#[test]
fn reject_icmp_answers_unsolicited_with_port_unreachable_while_drop_stays_silent() {
    require_lab!();
    let lab = two_sites(NatPreset::reject_icmp(), NatPreset::port_restricted_cone());
    let wan_a = lab.site("a").expect("a").wan_addr();
    let wan_b = lab.site("b").expect("b").wan_addr();
    assert!(
        udp_refused(&lab, SocketAddr::from((wan_a, 4999))),
        "reject-icmp, UDP"
    );
    assert!(
        !udp_refused(&lab, SocketAddr::from((wan_b, 4999))),
        "drop, UDP"
    );
    let tcp = lab
        .server()
        .tcp_connect(SocketAddr::from((wan_a, 4999)), ARRIVES)
        .expect("lab");
    assert_eq!(
        tcp.expect_err("refused").kind(),
        io::ErrorKind::ConnectionRefused,
        "reject-icmp, TCP"
    );
}

#[test]
fn reject_rst_refuses_unsolicited_tcp_quickly_while_drop_times_out() {
    require_lab!();
    let lab = two_sites(NatPreset::reject_rst(), NatPreset::port_restricted_cone());
    let wan_a = lab.site("a").expect("a").wan_addr();
    let wan_b = lab.site("b").expect("b").wan_addr();
    let start = Instant::now();
    let rst = lab
        .server()
        .tcp_connect(SocketAddr::from((wan_a, 4999)), ARRIVES)
        .expect("lab");
    assert_eq!(
        rst.expect_err("refused").kind(),
        io::ErrorKind::ConnectionRefused
    );
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "RST is immediate"
    );
    let dropped = lab
        .server()
        .tcp_connect(SocketAddr::from((wan_b, 4999)), SILENT)
        .expect("lab");
    assert_eq!(
        dropped.expect_err("times out").kind(),
        io::ErrorKind::TimedOut
    );
    // UDP is dropped in reset mode.
    assert!(!udp_refused(&lab, SocketAddr::from((wan_a, 4999))));
}

/// Two hosts of site `a`: host 1 opens a mapping to the server, host 0 sends to it
/// through the WAN address. Returns what host 1 saw and host 0's public endpoint.
fn hairpin_probe(lab: &Lab) -> (Option<SocketAddr>, SocketAddr, UdpSocket, UdpSocket) {
    let site = site(lab);
    let h0 = site.host(0).expect("h0").udp_bind(5000).expect("bind");
    let h1 = site.host(1).expect("h1").udp_bind(5001).expect("bind");
    let s1 = srv(lab, S10, 7000);
    let p0 = seen_by(&h0, &s1);
    let p1 = seen_by(&h1, &s1);
    h0.send_to(b"hairpin", p1).expect("send");
    let got = recv(&h1, SILENT).map(|(_, from)| from);
    (got, p0, h0, h1)
}

#[test]
fn hairpin_delivers_through_the_wan_address_showing_the_public_endpoint() {
    require_lab!();
    let lab = Lab::builder()
        .site_with_hosts("a", NatPreset::hairpin(), 2)
        .build()
        .expect("lab");
    let (got, p0, h0, h1) = hairpin_probe(&lab);
    assert_eq!(got, Some(p0), "host 1 sees host 0's public endpoint");
    // And the answer finds its way back through the same hairpin flow.
    h1.send_to(b"back", p0).expect("send");
    let back = recv(&h0, ARRIVES).expect("answer arrives").1;
    assert_eq!(back, SocketAddr::from((site(&lab).wan_addr(), 5001)));
}

#[test]
fn without_hairpin_the_wan_address_is_unreachable_from_the_lan() {
    require_lab!();
    let lab = Lab::builder()
        .site_with_hosts("a", NatPreset::port_restricted_cone(), 2)
        .build()
        .expect("lab");
    let (got, _, _, _) = hairpin_probe(&lab);
    assert_eq!(got, None);
}

#[test]
fn router_accepting_unsolicited_steals_the_port_the_host_would_get() {
    require_lab!();
    let lab = two_sites(
        NatPreset::router_accepts_unsolicited(),
        NatPreset::port_restricted_cone(),
    );
    let mut seen = Vec::new();
    for (name, port) in [("a", 7000), ("b", 7001)] {
        let site = lab.site(name).expect("site");
        let s = srv(&lab, S10, port);
        // The "peer" sends first, before the host has a mapping.
        s.send_to(b"early", (site.wan_addr(), 4000)).expect("send");
        std::thread::sleep(Duration::from_millis(100));
        let h = site.host(0).expect("host").udp_bind(4000).expect("bind");
        seen.push(seen_by(&h, &s).port());
    }
    eprintln!("external port of internal 4000 after an early inbound packet: {seen:?}");
    assert_ne!(
        seen[0], 4000,
        "accepting router: conntrack entry of the early packet collides"
    );
    assert_eq!(seen[1], 4000, "filtering router: port preserved");
}

#[test]
fn ttl_two_dies_at_the_core_between_the_sites_while_ttl_64_arrives() {
    require_lab!();
    let lab = two_sites(NatPreset::port_restricted_cone(), NatPreset::no_nat());
    let a = lab.site("a").expect("a");
    let b = lab.site("b").expect("b");
    let target = b.host(0).expect("b0");
    assert_eq!(target.addr(), Ipv4Addr::new(203, 0, 113, 18));
    let rx = target.udp_bind(6000).expect("bind");
    let tx = a.host(0).expect("a0").udp_bind(4000).expect("bind");
    let to = SocketAddr::from((target.addr(), 6000));
    for (ttl, arrives) in [(2, false), (3, false), (4, true), (64, true)] {
        tx.set_ttl(ttl).expect("ttl");
        tx.send_to(b"ttl", to).expect("send");
        let got = recv(&rx, if arrives { ARRIVES } else { SILENT });
        assert_eq!(got.is_some(), arrives, "TTL {ttl}");
    }
    // The TTL=2 packet still opened a mapping in site a's own NAT.
    let table = a.conntrack().expect("conntrack");
    assert!(table.contains("dport=6000"), "{table}");
}

#[test]
fn namespaces_are_removed_on_drop_and_on_panic() {
    require_lab!();
    let lab = Lab::builder()
        .site("x", NatPreset::full_cone())
        .site_with_hosts("y", NatPreset::firewall_only(), 2)
        .build()
        .expect("lab");
    let names = lab.namespaces().to_vec();
    assert_eq!(names.len(), 2 + 2 + 3);
    assert!(names.iter().all(|n| namespace_exists(n)));
    let out = lab.core().sh("ip -br addr").expect("sh");
    assert!(out.contains("192.0.2.1/24"), "{out}");
    drop(lab);
    assert!(names.iter().all(|n| !namespace_exists(n)), "after drop");

    let built = std::sync::Mutex::new(Vec::new());
    let sleeper = std::sync::Mutex::new(None::<std::process::Child>);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::builder()
            .site("z", NatPreset::symmetric())
            .build()
            .expect("lab");
        *built.lock().expect("lock") = lab.namespaces().to_vec();
        // A process still running inside must not keep the namespace alive.
        let child = lab
            .server()
            .command("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        *sleeper.lock().expect("lock") = Some(child);
        lab.server()
            .run(|| panic!("test failure inside a namespace"))
            .ok();
    }));
    assert!(result.is_err());
    let names = built.into_inner().expect("lock");
    assert_eq!(names.len(), 4);
    assert!(names.iter().all(|n| !namespace_exists(n)), "after panic");
    let mut child = sleeper.into_inner().expect("lock").expect("spawned");
    let exit = child.wait().expect("wait");
    assert!(!exit.success(), "the process inside was killed: {exit}");
}

/// `servers(3).redis_host()`: three servers with two addresses each and a Redis host
/// share the public segment (a bridge in the core); a NAT host reaches every server
/// address through the core and is seen at its WAN address; servers reach each other
/// and the Redis host directly; everything, with a process inside, goes on drop.
#[test]
fn several_servers_and_a_redis_host_share_the_public_segment() {
    require_lab!();
    for bad in [0, MAX_SERVERS + 1] {
        assert!(
            Lab::builder().servers(bad).build().is_err(),
            "{bad} servers"
        );
    }
    let lab = Lab::builder()
        .site("a", NatPreset::port_restricted_cone())
        .servers(3)
        .redis_host()
        .build()
        .expect("lab");
    let names = lab.namespaces().to_vec();
    assert_eq!(
        names.len(),
        1 + 3 + 1 + 2,
        "core, servers, redis, router, host"
    );
    assert_eq!(lab.servers().len(), 3);
    assert_eq!(lab.server(), &lab.servers()[0]);
    let redis = lab.redis_host().expect("redis host").clone();
    assert_eq!(redis.addr(), REDIS_HOST_ADDR);
    let description = lab.describe();
    assert!(
        description.contains("192.0.2.30, 192.0.2.31"),
        "{description}"
    );
    assert!(description.contains("redis host"), "{description}");

    let host = host0(&lab);
    let tx = host.udp_bind(4000).expect("bind");
    for (k, server) in lab.servers().iter().enumerate() {
        assert_eq!(server.addrs(), server_addrs(k));
        for ip in server_addrs(k) {
            let rx = server
                .udp_bind_on(SocketAddr::from((ip, 5000)))
                .expect("bind");
            tx.send_to(b"hi", (ip, 5000)).expect("send");
            let (_, from) = recv(&rx, ARRIVES).unwrap_or_else(|| panic!("{ip} got nothing"));
            assert_eq!(from, SocketAddr::from((site(&lab).wan_addr(), 4000)));
        }
    }
    // Node to node and node to Redis: on the segment, one hop.
    let listener = redis
        .tcp_listen_on(SocketAddr::from((REDIS_HOST_ADDR, 6379)))
        .expect("listen");
    for server in lab.servers() {
        let stream = server
            .tcp_connect(SocketAddr::from((REDIS_HOST_ADDR, 6379)), ARRIVES)
            .expect("lab");
        assert!(stream.is_ok(), "{} -> redis: {stream:?}", server.role());
    }
    drop(listener);
    let rx = lab.servers()[2]
        .udp_bind_on(SocketAddr::from((server_addrs(2)[0], 5001)))
        .expect("bind");
    let from = lab.servers()[1].udp_bind(0).expect("bind");
    from.send_to(b"node", (server_addrs(2)[0], 5001))
        .expect("send");
    let (_, seen) = recv(&rx, ARRIVES).expect("server 1 reaches server 2");
    assert_eq!(seen.ip(), server_addrs(1)[0]);

    let mut child = redis
        .command("sleep")
        .arg("30")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    drop(lab);
    assert!(names.iter().all(|n| !namespace_exists(n)), "after drop");
    let exit = child.wait().expect("wait");
    assert!(
        !exit.success(),
        "the process on the Redis host was killed: {exit}"
    );
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed_with_their_processes() {
    require_lab!();
    // Above PID_MAX_LIMIT (2^22), so no process can have this pid.
    let name = "gwlab-4194999-0-stale";
    // Labs built by parallel tests remove stale namespaces too, possibly this one
    // right away; the assertions below hold either way.
    let _ = std::process::Command::new("ip")
        .args(["netns", "add", name])
        .status()
        .expect("ip");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", name, "sleep", "30"])
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(100));
    remove_stale_namespaces().expect("remove");
    assert!(!namespace_exists(name));
    let exit = child.wait().expect("wait");
    assert!(!exit.success(), "the process inside was killed");
}

#[test]
fn every_named_preset_builds_in_one_lab() {
    require_lab!();
    let presets = NatPreset::all_named();
    let mut builder = Lab::builder();
    let names: Vec<String> = (0..presets.len()).map(|i| format!("s{i}")).collect();
    for (name, preset) in names.iter().zip(presets.iter()) {
        builder = builder.site(name, preset.clone());
    }
    let start = Instant::now();
    let lab = builder.build().expect("lab");
    eprintln!(
        "{} sites built in {:?}\n{}",
        presets.len(),
        start.elapsed(),
        lab.describe()
    );
    let description = lab.describe();
    for preset in presets {
        assert!(description.contains(preset.name()), "{description}");
    }
    // Every host reaches the server over TCP (udp-blocked and lossy sites included).
    let _listener = lab
        .server()
        .tcp_listen_on(SocketAddr::from((S10, 8000)))
        .expect("listen");
    for site in lab.sites() {
        let host = site.host(0).expect("host");
        let mut ok = false;
        for _ in 0..3 {
            if host
                .tcp_connect(SocketAddr::from((S10, 8000)), Duration::from_secs(1))
                .expect("lab")
                .is_ok()
            {
                ok = true;
                break;
            }
        }
        assert!(ok, "{} cannot reach the server", site.preset().name());
    }
}

#[test]
fn two_site_lab_builds_quickly() {
    require_lab!();
    let start = Instant::now();
    let lab = two_sites(NatPreset::full_cone(), NatPreset::symmetric());
    let elapsed = start.elapsed();
    eprintln!("two-site lab built in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // Hosts of both sites reach each other's public side only via the core.
    let route = site(&lab).router().sh("ip route").expect("sh");
    assert!(route.contains("default via 198.51.100.1"), "{route}");
}
