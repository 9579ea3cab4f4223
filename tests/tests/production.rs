//! `gateway serve` as a production service (issue 19): systemd's notification
//! protocol (READY=1, WATCHDOG=1, STOPPING=1), the eBPF programs loaded by an
//! unprivileged user given capabilities (as the shipped unit runs it), the open-files
//! limit raised at start, and a relay full up to its descriptor budget that still
//! answers /metrics and logs the exhaustion once.
use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::PathBuf,
    time::{Duration, Instant},
};

use gateway::proto::turn::client::{ClientConfig, TurnClientEvent};
use gateway_tests::{
    daemon::{GatewayProcess, Launch, gateway_binary, metric_value, stun_binding},
    lab::{Lab, NatPreset, require_root},
    punch::{SECRET, SERVICE, credentials},
    turn::BlockingClient,
};

const WAIT: Duration = Duration::from_secs(5);

/// A directory everyone may read (the unprivileged gateway reads its binary and
/// secret from it), removed on drop.
struct OpenDir(tempfile::TempDir);

impl OpenDir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gw-production-")
            .tempdir()
            .expect("temporary directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755");
        Self(dir)
    }

    /// Writes `bytes` to `name` with `mode`.
    fn file(&self, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    /// A copy of the gateway binary that any user may run.
    fn binary(&self) -> PathBuf {
        let bytes = std::fs::read(gateway_binary()).expect("read the gateway binary");
        self.file("gateway", &bytes, 0o755)
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn metric(text: &str, name: &str) -> f64 {
    metric_value(text, name, "").unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

/// The `Max open files` soft and hard limits of process `pid`.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let mut numbers = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (numbers.next().expect("soft"), numbers.next().expect("hard"))
}

/// A `/proc/PID/status` field, e.g. `Uid:`.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
        .to_owned()
}

/// The daemon's log once it contains `needle` (panics after 5 s).
fn wait_for_log(gateway: &GatewayProcess, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = gateway.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// setpriv: uid/gid 65534 (nobody), no supplementary groups, and `caps` inheritable
/// and ambient (what systemd's `User=` with `AmbientCapabilities=` gives).
fn as_nobody_with(caps: &str) -> Vec<String> {
    strings(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
    ])
}

#[test]
fn ebpf_programs_load_as_an_unprivileged_user_given_capabilities() {
    require_root();
    let lab = Lab::builder()
        .site("a", NatPreset::no_nat())
        .build()
        .expect("lab");
    let dir = OpenDir::new();
    let binary = dir.binary();
    // The gateway refuses a secret others may read: 0600, owned by the user it runs as.
    let secret = dir.file("secret", SECRET, 0o600);
    std::os::unix::fs::chown(&secret, Some(65534), Some(65534)).expect("chown to nobody");
    let secret_arg = secret.to_string_lossy().into_owned();
    let metrics = SocketAddr::from((SERVICE.ip(), 9478));
    // Port 478: below 1024, so CAP_NET_BIND_SERVICE is exercised too.
    let args = [
        "--listen",
        "0.0.0.0:478",
        "--require-ebpf",
        "--secret-file",
        &secret_arg,
        "--no-relay-tcp",
        "--relay-fast-path",
        "ebpf",
        "--relay-fast-path-interface",
        "eth0",
    ];
    let launch = Launch {
        wrapper: as_nobody_with("+bpf,+net_admin,+perfmon,+net_bind_service"),
        binary: Some(binary.clone()),
        env: Vec::new(),
    };
    let gateway = GatewayProcess::start_with(lab.server(), metrics, &launch, &args)
        .expect("the gateway starts as nobody with the unit's capabilities and loads eBPF");
    let pid = gateway.pid().expect("pid");
    assert_eq!(
        status_field(pid, "Uid:"),
        "65534\t65534\t65534\t65534",
        "runs as nobody"
    );
    // /metrics answers before the relay has started: wait for its line.
    let log = wait_for_log(&gateway, "UDP driver loops");
    assert!(log.contains("eBPF counters attached"), "{log}");
    assert!(log.contains("relay fast path (eBPF) attached"), "{log}");

    // The counters run: a Binding to the privileged port is answered and counted.
    let host = lab.site("a").and_then(|s| s.host(0)).expect("host");
    let socket: UdpSocket = host.udp_bind(0).expect("socket");
    let to = SocketAddr::from((SERVICE.ip(), 478));
    assert!(
        stun_binding(&socket, to, Duration::from_secs(1)).is_some(),
        "Binding on port 478 answered"
    );
    let text = gateway.scrape().expect("scrape");
    assert_eq!(metric(&text, "gateway_ebpf_loaded"), 1.0);
    let ingress = metric_value(
        &text,
        "gateway_ebpf_udp_packets_total",
        "direction=\"ingress\"",
    )
    .unwrap_or(0.0);
    assert!(ingress >= 1.0, "the kernel counted the Binding:\n{text}");
    gateway.stop().expect("stops on SIGTERM");

    // Without CAP_PERFMON the loader refuses, naming what is missing.
    let launch = Launch {
        wrapper: as_nobody_with("+bpf,+net_admin,+net_bind_service"),
        binary: Some(binary),
        env: Vec::new(),
    };
    let refused = GatewayProcess::start_with(lab.server(), metrics, &launch, &args)
        .expect_err("--require-ebpf without CAP_PERFMON must not start");
    let message = refused.to_string();
    assert!(
        message.contains("missing: CAP_PERFMON"),
        "names the capability: {message}"
    );
}

/// Writes `datagram`s received on `socket` into a list until `deadline`.
fn notifications(socket: &UnixDatagram, until: Instant) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        if let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn systemd_is_told_ready_watchdog_and_stopping_and_the_soft_limit_is_raised() {
    require_root();
    let lab = Lab::builder()
        .site("a", NatPreset::no_nat())
        .build()
        .expect("lab");
    let dir = OpenDir::new();
    let notify_path = dir.0.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).expect("notify socket");
    let launch = Launch {
        // A shell's soft limit under a higher hard one.
        wrapper: strings(&["prlimit", "--nofile=256:4096"]),
        binary: None,
        env: vec![
            (
                "NOTIFY_SOCKET".into(),
                notify_path.to_string_lossy().into_owned(),
            ),
            // WatchdogSec=0.4s: pings every 200 ms.
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
    };
    let gateway = GatewayProcess::start_with(
        lab.server(),
        SocketAddr::from((SERVICE.ip(), 9478)),
        &launch,
        &["--listen", "0.0.0.0:3478", "--no-ebpf"],
    )
    .expect("gateway");
    let pid = gateway.pid().expect("pid");
    assert_eq!(open_files_limits(pid), (4096, 4096), "soft raised to hard");
    let text = gateway.scrape().expect("scrape");
    assert_eq!(metric(&text, "gateway_open_files_limit"), 4096.0);

    let seen = notifications(&socket, Instant::now() + Duration::from_millis(1200));
    let first = seen.first().map(String::as_str).unwrap_or_default();
    assert!(
        first.starts_with("READY=1\nSTATUS=serving on "),
        "READY=1 first: {seen:?}"
    );
    let pings = seen.iter().filter(|n| *n == "WATCHDOG=1").count();
    // About 7 (one at once, then every 200 ms, from start-up to the window's end);
    // the bounds leave room for a loaded machine, not for another interval.
    assert!(
        (4..=12).contains(&pings),
        "a ping every 200 ms over about 1.2 s: {seen:?}"
    );
    let log_before_stop = gateway.log_text();
    gateway.stop().expect("stops on SIGTERM");
    let after = notifications(&socket, Instant::now() + Duration::from_millis(200));
    assert!(
        after.iter().any(|n| n.starts_with("STOPPING=1")),
        "STOPPING=1 on SIGTERM: {after:?}\n{log_before_stop}"
    );
    assert!(
        log_before_stop.contains("raised the open-files soft limit"),
        "{log_before_stop}"
    );
}

/// Allocates from `bind` with fresh credentials; the allocation, or the error code.
fn allocate(n: usize) -> Result<BlockingClient, Option<u16>> {
    let creds = credentials(&format!("fd-{n}"));
    let config = ClientConfig::new(SERVICE, creds.username, creds.password);
    let mut client =
        BlockingClient::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), config).expect("socket");
    client.client.allocate(Instant::now()).expect("idle");
    match client.wait_event(WAIT, |e| {
        matches!(
            e,
            TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
        )
    }) {
        Ok(TurnClientEvent::Allocated { .. }) => Ok(client),
        Ok(TurnClientEvent::Failed { failure, .. }) => Err(failure.code()),
        other => panic!("allocation {n}: {other:?}"),
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn a_relay_full_to_its_descriptor_budget_still_serves_metrics_and_tcp() {
    require_root();
    let lab = Lab::builder()
        .site("a", NatPreset::no_nat())
        .build()
        .expect("lab");
    let dir = OpenDir::new();
    let secret = dir.file("secret", SECRET, 0o600);
    let secret_arg = secret.to_string_lossy().into_owned();
    let launch = Launch {
        // Soft and hard 256: nothing to raise, the budget must hold.
        wrapper: strings(&["prlimit", "--nofile=256:256"]),
        ..Launch::default()
    };
    let gateway = GatewayProcess::start_with(
        lab.server(),
        SocketAddr::from((SERVICE.ip(), 9478)),
        &launch,
        &[
            "--listen",
            "0.0.0.0:3478",
            "--no-ebpf",
            "--secret-file",
            &secret_arg,
        ],
    )
    .expect("gateway");
    let pid = gateway.pid().expect("pid");
    assert_eq!(open_files_limits(pid), (256, 256));
    let text = gateway.scrape().expect("scrape");
    let budget = metric(&text, "gateway_relay_fd_budget");
    assert!(
        (100.0..=192.0).contains(&budget),
        "256 less what is open less 64 reserved: {budget}"
    );
    let log = gateway.log_text();
    assert!(
        log.contains("fewer than relay.max_allocations = 100000"),
        "warns that the limit is short of relay.max_allocations:\n{log}"
    );

    // Fill the relay from the public side until it answers 508, then try 5 more.
    let client_host = lab.site("a").and_then(|s| s.host(0)).expect("host").clone();
    let (clients, refusals) = client_host
        .run(move || {
            let mut clients = Vec::new();
            let mut refusals = Vec::new();
            for n in 0..400 {
                match allocate(n) {
                    Ok(client) => clients.push(client),
                    Err(code) => {
                        refusals.push(code);
                        if refusals.len() == 6 {
                            break;
                        }
                    }
                }
            }
            (clients, refusals)
        })
        .expect("enter the client host");
    assert_eq!(
        refusals,
        vec![Some(508); 6],
        "refused with 508 after {} allocations",
        clients.len()
    );
    assert_eq!(
        clients.len() as f64,
        budget,
        "as many allocations as the budget"
    );

    // /metrics still answers, more than once, and says what happened.
    for _ in 0..5 {
        let text = gateway
            .scrape()
            .expect("a full relay still serves /metrics");
        assert_eq!(metric(&text, "gateway_relay_fd_budget_used"), budget);
        assert_eq!(metric(&text, "gateway_relay_fd_budget_refused_total"), 6.0);
    }
    // The TURN TCP listener still accepts, and closes a client it has no room for.
    let to = SERVICE;
    let closed = client_host
        .run(move || {
            let mut stream = TcpStream::connect_timeout(&to, WAIT)?;
            stream.set_read_timeout(Some(WAIT))?;
            let mut buf = [0u8; 16];
            stream.read(&mut buf)
        })
        .expect("enter the client host");
    assert!(
        matches!(closed, Ok(0)),
        "accepted and closed at once: {closed:?}"
    );

    // Room again after one deallocation.
    let freed = client_host
        .run(move || {
            let mut clients = clients;
            let mut first = clients.swap_remove(0);
            first.client.close(Instant::now());
            let released = first.wait_event(WAIT, |e| matches!(e, TurnClientEvent::Deallocated));
            (released.is_ok(), allocate(1000).is_ok(), clients)
        })
        .expect("enter the client host");
    assert!(freed.0, "deallocated");
    assert!(freed.1, "an allocation fits again once one is released");

    let log = gateway.log_text();
    assert_eq!(
        count(&log, "budget for relay sockets and TURN TCP clients spent"),
        1,
        "the exhaustion is logged once, not per refusal:\n{log}"
    );
    assert_eq!(count(&log, "TURN TCP clients available again"), 1, "{log}");
    assert_eq!(count(&log, "accept failed"), 0, "{log}");
    assert_eq!(open_files_limits(pid), (256, 256));
    drop(freed);
}
