//! Root tests of the raw TCP toolkit (`gateway::tcp_raw`, technique 3 building blocks
//! of `docs/tcp-splicing.md`) in a small dual-stack topology of their own:
//!
//! ```text
//! host a (10.98.1.2, fd98:1::2) — router r — host b (10.98.2.2, fd98:2::2)
//! ```
//!
//! The namespaces are named like the lab's (`gwlab-<pid>-…`) so the lab's stale
//! clean-up also removes them if a run is killed; a guard deletes them otherwise.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    process::Command,
    sync::{
        Arc, Barrier,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use gateway::tcp_raw::{
    Injector, RawError, Segment, SuppressionRules, SynCapture, TcpState, set_socket_ttl, tcp_state,
    wait_for_state,
};
use gateway_tests::lab::lab_available;
use socket2::{Domain, Protocol, Socket, Type};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Host a, router r, host b; deleted on drop (also while unwinding).
struct Topology {
    a: String,
    r: String,
    b: String,
}

const A4: &str = "10.98.1.2";
const B4: &str = "10.98.2.2";
const A6: &str = "fd98:1::2";
const B6: &str = "fd98:2::2";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(ns: &str, line: &str) {
    let mut args = vec!["-n", ns];
    args.extend(line.split_whitespace());
    run("ip", &args);
}

fn sysctl(ns: &str, key: &str, value: &str) {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    );
}

impl Topology {
    fn build() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = |role: &str| format!("gwlab-{}-raw{n}-{role}", std::process::id());
        let topo = Self {
            a: name("a"),
            r: name("r"),
            b: name("b"),
        };
        for ns in [&topo.a, &topo.r, &topo.b] {
            run("ip", &["netns", "add", ns]);
            // No duplicate address detection: addresses are usable at once.
            sysctl(ns, "net.ipv6.conf.all.accept_dad", "0");
            sysctl(ns, "net.ipv6.conf.default.accept_dad", "0");
            ip(ns, "link set lo up");
        }
        let (a, r, b) = (&topo.a, &topo.r, &topo.b);
        ip(
            r,
            &format!("link add ra type veth peer name eth0 netns {a}"),
        );
        ip(
            r,
            &format!("link add rb type veth peer name eth0 netns {b}"),
        );
        for (dev, net) in [("ra", 1), ("rb", 2)] {
            ip(r, &format!("addr add 10.98.{net}.1/24 dev {dev}"));
            ip(r, &format!("addr add fd98:{net}::1/64 dev {dev} nodad"));
            ip(r, &format!("link set {dev} up"));
        }
        sysctl(r, "net.ipv4.ip_forward", "1");
        sysctl(r, "net.ipv6.conf.all.forwarding", "1");
        for (ns, net) in [(a, 1), (b, 2)] {
            ip(ns, &format!("addr add 10.98.{net}.2/24 dev eth0"));
            ip(ns, &format!("addr add fd98:{net}::2/64 dev eth0 nodad"));
            ip(ns, "link set eth0 up");
            ip(ns, &format!("route add default via 10.98.{net}.1"));
            ip(ns, &format!("-6 route add default via fd98:{net}::1"));
        }
        topo
    }

    /// nft tables in `ns`.
    fn tables(ns: &str) -> String {
        run("ip", &["netns", "exec", ns, "nft", "list", "tables"])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.a, &self.r, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`, returning its result.
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: setns(2) on an open namespace file; it affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        drop(file);
        f()
    })
}

fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in(ns, f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A non-blocking kernel TCP socket bound to `local` whose SYN toward `peer` leaves
/// with TTL (hop limit) 1, so the router between the hosts drops it.
fn low_ttl_connect(local: SocketAddr, peer: SocketAddr) -> Socket {
    let domain = if local.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("tcp socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&local.into()).expect("bind");
    set_socket_ttl(&socket, local.is_ipv6(), 1).expect("low TTL");
    socket.set_nonblocking(true).expect("nonblocking");
    match socket.connect(&peer.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        other => panic!("connect() toward {peer} should be in progress: {other:?}"),
    }
    socket
}

/// What one side of the splice saw.
#[derive(Debug)]
struct SideReport {
    captured: Segment,
    state_before_injection: TcpState,
    sends: Option<u32>,
    state_after: TcpState,
    received: Vec<u8>,
    table: String,
}

/// One host's half of a two-sided sequence-number-exchange splice: a low-TTL
/// connect(), its ISN captured and swapped with the peer's through channels (the
/// test's stand-in for the gateway), a crafted SYN-ACK injected toward the peer,
/// then ordinary kernel-socket I/O.
fn splice_side(
    local: SocketAddr,
    peer: SocketAddr,
    my_isn: mpsc::Sender<u32>,
    peer_isn: mpsc::Receiver<u32>,
    message: &'static [u8],
    both_checked: Arc<Barrier>,
) -> Result<SideReport, RawError> {
    let Injected {
        socket,
        rules,
        captured,
        state_before_injection,
        sends,
        table,
    } = inject_side(local, peer, my_isn, peer_isn, both_checked, 0)?;
    let state_after =
        wait_for_state(&socket, Duration::from_secs(2), TcpState::is_synchronized).expect("state");
    // Established: an ordinary kernel socket from here on.
    set_socket_ttl(&socket, local.is_ipv6(), 64).expect("normal TTL");
    socket.set_nonblocking(false).expect("blocking");
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    stream
        .write_all(message)
        .expect("write over the spliced socket");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("FIN over the spliced socket");
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .expect("read over the spliced socket");
    rules.remove()?;
    Ok(SideReport {
        captured,
        state_before_injection,
        sends,
        state_after,
        received,
        table,
    })
}

/// The first half of a side: everything up to the crafted SYN-ACK's injection.
struct Injected {
    socket: Socket,
    rules: gateway::tcp_raw::NftGuard,
    captured: Segment,
    state_before_injection: TcpState,
    sends: Option<u32>,
    table: String,
}

/// Low-TTL connect(), capture, ISN swap (our ISN plus `lie` is what the other side
/// gets: a lying peer or gateway when non-zero), then the crafted SYN-ACK injected.
fn inject_side(
    local: SocketAddr,
    peer: SocketAddr,
    my_isn: mpsc::Sender<u32>,
    peer_isn: mpsc::Receiver<u32>,
    both_checked: Arc<Barrier>,
    lie: u32,
) -> Result<Injected, RawError> {
    // Linux aborts a SYN_SENT connect() on the ICMP time-exceeded the low-TTL SYN
    // provokes, so that is suppressed while the attempt runs.
    let rules = SuppressionRules {
        rst_to: vec![peer],
        icmp_time_exceeded: true,
    }
    .install()?;
    let table = rules.table().to_owned();
    let mut capture = SynCapture::for_local(local, Some(peer))?;
    let socket = low_ttl_connect(local, peer);
    let captured = capture.wait(Duration::from_secs(2))?;
    drop(capture);
    my_isn
        .send(captured.seq.wrapping_add(lie))
        .expect("peer side gone");
    let their_isn = peer_isn
        .recv_timeout(Duration::from_secs(5))
        .expect("no ISN from the peer side");
    // Both SYNs are out now. Had ours crossed the router, the peer would be in
    // SYN_RECV and answer with a SYN-ACK that moves us on: give that time to happen.
    std::thread::sleep(Duration::from_millis(300));
    let state_before_injection = tcp_state(socket.as_fd()).expect("state");
    both_checked.wait();

    let syn_ack = Segment::syn_ack(local, peer, captured.seq, their_isn.wrapping_add(1));
    let mut injector = Injector::new();
    let sends = injector.send_until(&syn_ack, 5, Duration::from_millis(200), || {
        tcp_state(socket.as_fd()).is_ok_and(TcpState::is_synchronized)
    })?;
    Ok(Injected {
        socket,
        rules,
        captured,
        state_before_injection,
        sends,
        table,
    })
}

/// Both sides are told wrong ISNs (a gateway that lies, or two lying peers): each
/// crafted SYN-ACK acknowledges a sequence number the other kernel never sent, so
/// neither kernel synchronizes; the attempt ends with its socket and rules gone.
fn wrong_isns_connect_nothing(v6: bool) {
    let topo = Topology::build();
    let (a_ip, b_ip): (IpAddr, IpAddr) = if v6 {
        (A6.parse().unwrap(), B6.parse().unwrap())
    } else {
        (A4.parse().unwrap(), B4.parse().unwrap())
    };
    let a = SocketAddr::new(a_ip, 40011);
    let b = SocketAddr::new(b_ip, 40012);
    let (a_tx, b_rx) = mpsc::channel();
    let (b_tx, a_rx) = mpsc::channel();
    let barrier = Arc::new(Barrier::new(2));
    let side = |local, peer, tx, rx, barrier| {
        move || -> Result<(TcpState, Option<u32>, String), RawError> {
            let injected = inject_side(local, peer, tx, rx, barrier, 0x4000_0000)?;
            // Well past the injections: still not synchronized.
            let state = wait_for_state(
                &injected.socket,
                Duration::from_secs(1),
                TcpState::is_synchronized,
            )
            .expect("state");
            drop(injected.socket);
            injected.rules.remove()?;
            Ok((state, injected.sends, injected.table))
        }
    };
    let side_a = spawn_in(&topo.a, side(a, b, a_tx, a_rx, Arc::clone(&barrier)));
    let side_b = spawn_in(&topo.b, side(b, a, b_tx, b_rx, barrier));
    for (ns, result) in [
        (&topo.a, side_a.join().expect("side a panicked")),
        (&topo.b, side_b.join().expect("side b panicked")),
    ] {
        let (state, sends, table) = result.unwrap_or_else(|e| panic!("{ns}: {e}"));
        assert_eq!(
            state,
            TcpState::SynSent,
            "{ns}: a wrong ISN synchronized a kernel"
        );
        assert_eq!(sends, None, "{ns}: every injection went unanswered");
        assert!(
            !Topology::tables(ns).contains(&table),
            "rules left behind in {ns}"
        );
    }
}

#[test]
fn wrong_isns_connect_nothing_ipv4() {
    if !lab_available() {
        return;
    }
    wrong_isns_connect_nothing(false);
}

#[test]
fn wrong_isns_connect_nothing_ipv6() {
    if !lab_available() {
        return;
    }
    wrong_isns_connect_nothing(true);
}

fn two_sided_splice(v6: bool) {
    let topo = Topology::build();
    let (a_ip, b_ip): (IpAddr, IpAddr) = if v6 {
        (A6.parse().unwrap(), B6.parse().unwrap())
    } else {
        (A4.parse().unwrap(), B4.parse().unwrap())
    };
    let a = SocketAddr::new(a_ip, 40001);
    let b = SocketAddr::new(b_ip, 40002);
    let (a_tx, b_rx) = mpsc::channel();
    let (b_tx, a_rx) = mpsc::channel();
    let barrier = Arc::new(Barrier::new(2));
    let side_a = spawn_in(&topo.a, {
        let barrier = Arc::clone(&barrier);
        move || splice_side(a, b, a_tx, a_rx, b"hello from a", barrier)
    });
    let side_b = spawn_in(&topo.b, move || {
        splice_side(b, a, b_tx, b_rx, b"hello from b!", barrier)
    });
    let a_report = side_a.join().expect("side a panicked");
    let b_report = side_b.join().expect("side b panicked");
    let (a_report, b_report) = match (a_report, b_report) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("splice failed: a {a:?}, b {b:?}"),
    };
    eprintln!("a: {a_report:?}\nb: {b_report:?}");
    for (report, local, peer) in [(&a_report, a, b), (&b_report, b, a)] {
        assert!(report.captured.is_syn());
        assert_eq!((report.captured.src, report.captured.dst), (local, peer));
        assert_eq!(
            report.captured.ttl, 1,
            "the kernel's SYN carried the low TTL"
        );
        assert_eq!(
            report.state_before_injection,
            TcpState::SynSent,
            "the kernel's SYN must not have crossed the router"
        );
        assert!(report.sends.is_some(), "never ESTABLISHED: {report:?}");
        assert!(report.state_after.is_synchronized(), "{report:?}");
    }
    assert_eq!(a_report.received, b"hello from b!");
    assert_eq!(b_report.received, b"hello from a");
    for (ns, report) in [(&topo.a, &a_report), (&topo.b, &b_report)] {
        assert!(
            !Topology::tables(ns).contains(&report.table),
            "rules left behind in {ns}"
        );
    }
}

#[test]
fn two_sided_splice_ipv4() {
    if !lab_available() {
        return;
    }
    two_sided_splice(false);
}

#[test]
fn two_sided_splice_ipv6() {
    if !lab_available() {
        return;
    }
    two_sided_splice(true);
}

/// The control for the ICMP rule: without it, the time-exceeded answer to the low-TTL
/// SYN aborts the kernel's connect().
#[test]
fn low_ttl_syn_without_suppression_is_aborted() {
    if !lab_available() {
        return;
    }
    let topo = Topology::build();
    let (state, error) = run_in(&topo.a, || {
        let socket = low_ttl_connect(
            SocketAddr::new(A4.parse().unwrap(), 40003),
            SocketAddr::new(B4.parse().unwrap(), 40004),
        );
        let state = wait_for_state(&socket, Duration::from_secs(2), |s| s == TcpState::Close);
        (
            state.expect("state"),
            socket.take_error().expect("SO_ERROR"),
        )
    });
    assert_eq!(state, TcpState::Close);
    assert_eq!(
        error.and_then(|e| e.raw_os_error()),
        Some(libc::EHOSTUNREACH)
    );
}

/// The suppression rules' guard removes its table when the run fails with an error,
/// when it panics, and when the guard is dropped on a thread in another namespace.
#[test]
fn suppression_rules_are_removed_after_failing_runs() {
    if !lab_available() {
        return;
    }
    let topo = Topology::build();
    let rules = SuppressionRules {
        rst_to: vec![SocketAddr::new(B4.parse().unwrap(), 40005)],
        icmp_time_exceeded: true,
    };

    // 1. An error path: the awaited SYN never comes, `?` returns early.
    let a_ns = topo.a.clone();
    let (table, result) = run_in(&topo.a, {
        let rules = rules.clone();
        move || {
            let mut table = String::new();
            let result = (|| -> Result<(), RawError> {
                let guard = rules.install()?;
                table = guard.table().to_owned();
                let listed = Topology::tables(&a_ns);
                assert!(listed.contains(&table), "rules not installed: {listed}");
                let mut capture =
                    SynCapture::for_local(SocketAddr::new(A4.parse().unwrap(), 40006), None)?;
                capture.wait(Duration::from_millis(200))?;
                Ok(())
            })();
            (table, result)
        }
    });
    assert!(
        matches!(result, Err(RawError::CaptureTimeout { .. })),
        "{result:?}"
    );
    assert!(!table.is_empty());
    assert!(!Topology::tables(&topo.a).contains(&table));

    // 2. A panic while the rules stand.
    let a_ns = topo.a.clone();
    let (tx, rx) = mpsc::channel();
    let panicked = spawn_in(&topo.a, {
        let rules = rules.clone();
        move || {
            let guard = rules.install().expect("install");
            tx.send(guard.table().to_owned()).expect("send");
            assert!(Topology::tables(&a_ns).contains(guard.table()));
            panic!("deliberate panic with the rules installed");
        }
    })
    .join();
    assert!(panicked.is_err());
    let table = rx.recv().expect("table name");
    assert!(!Topology::tables(&topo.a).contains(&table));

    // 3. Made in a, dropped on this thread (another namespace): removed from a.
    let guard = run_in(&topo.a, move || rules.install().expect("install"));
    let table = guard.table().to_owned();
    assert!(Topology::tables(&topo.a).contains(&table));
    drop(guard);
    assert!(!Topology::tables(&topo.a).contains(&table));
}

/// The RST rule drops the reset a kernel sends for a stray SYN-ACK (as one arriving
/// before its socket is ready would be): its counter shows the drop, and a reset to a
/// port the rules do not name is not counted.
#[test]
fn rst_rule_drops_the_kernels_reset() {
    if !lab_available() {
        return;
    }
    let topo = Topology::build();
    let a = SocketAddr::new(A4.parse().unwrap(), 40007);
    let b = SocketAddr::new(B4.parse().unwrap(), 40008);
    let other = SocketAddr::new(B4.parse().unwrap(), 40009);
    let guard = run_in(&topo.a, move || {
        SuppressionRules {
            rst_to: vec![b],
            icmp_time_exceeded: false,
        }
        .install()
        .expect("install")
    });
    let counted = |topo: &Topology, table: &str| {
        let listing = run(
            "ip",
            &[
                "netns", "exec", &topo.a, "nft", "list", "table", "inet", table,
            ],
        );
        listing
            .lines()
            .find(|l| l.contains("rst"))
            .and_then(|l| l.split("counter packets ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no RST counter in {listing}"))
    };
    assert_eq!(counted(&topo, guard.table()), 0);
    // No socket on a:40007, so a's kernel answers each stray SYN-ACK with a RST.
    run_in(&topo.b, move || {
        let mut injector = Injector::new();
        injector
            .send(&Segment::syn_ack(b, a, 1000, 2000))
            .expect("inject");
        injector
            .send(&Segment::syn_ack(other, a, 1000, 2000))
            .expect("inject");
    });
    let mut dropped = 0;
    for _ in 0..100 {
        dropped = counted(&topo, guard.table());
        if dropped > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dropped, 1, "exactly the RST to {b} is dropped");
    let table = guard.table().to_owned();
    guard.remove().expect("remove");
    assert!(!Topology::tables(&topo.a).contains(&table));
}
