//! `gateway serve` as a production service (issue 19): SIGHUP reloads the
//! configuration and the secret files without dropping anything, a broken reload
//! is refused whole, SIGTERM drains (new work sent elsewhere, live allocations
//! served to their end, then exit 0), `/healthz` and `/readyz` answer, and
//! `--log-format json` writes JSON lines.
//!
//! Loopback only, no lab, no eBPF: the daemon runs in the test's own namespace.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::{
    credentials::SharedSecret,
    rendezvous::{
        client::{self, Introduction, PeerCredentials},
        wire::NatClass,
    },
    turn::client::{ClientConfig, Failure, Request, TurnClientEvent},
};
use gateway_tests::{
    daemon::{GatewayProcess, metric_value, write_secret},
    turn::{BlockingClient, channel_round_trip},
};

const WAIT: Duration = Duration::from_secs(5);
const OLD_SECRET: &str = "the secret before the rotation";
const NEW_SECRET: &str = "the secret after the rotation";

fn free_udp() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
}

fn expiry() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600
}

/// A gateway on loopback with a config file the test rewrites between reloads.
struct Service {
    gateway: GatewayProcess,
    dir: tempfile::TempDir,
    config: PathBuf,
    service: SocketAddr,
}

impl Service {
    /// Writes `config` (TOML) and starts `gateway serve --config` with the relay on
    /// loopback (peers on 127/8 allowed, ports of a random range) and `extra` flags.
    fn start(config: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("config");
        let service = free_udp();
        let first = 20_000 + 100 * (rand::random::<u16>() % 150);
        let ports = format!("{first}-{}", first + 99);
        let listen = service.to_string();
        let path_arg = path.to_string_lossy().into_owned();
        let mut args = vec![
            "--config",
            &path_arg,
            "--listen",
            &listen,
            "--no-ebpf",
            "--no-relay-tcp",
            "--relay-address",
            "127.0.0.1",
            "--relay-port-range",
            &ports,
            "--allow-peer",
            "127.0.0.0/8",
        ];
        args.extend_from_slice(extra);
        let gateway = GatewayProcess::start_here(free_tcp(), &args).expect("gateway starts");
        Self {
            gateway,
            dir,
            config: path,
            service,
        }
    }

    fn secret_file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        write_secret(&path, text).expect("secret file");
        path.to_string_lossy().into_owned()
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.gateway.scrape().expect("scrape");
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}} missing"))
    }

    /// Rewrites the config, sends SIGHUP and waits for the reload `outcome` to be
    /// counted once more.
    fn reload(&self, config: &str, outcome: &str) {
        std::fs::write(&self.config, config).expect("config");
        self.hup_and_wait(outcome);
    }

    fn hup_and_wait(&self, outcome: &str) {
        let labels = format!("outcome=\"{outcome}\"");
        let before = self.metric("gateway_config_reloads_total", &labels);
        self.gateway.signal(libc::SIGHUP).expect("SIGHUP");
        let deadline = Instant::now() + WAIT;
        while self.metric("gateway_config_reloads_total", &labels) < before + 1.0 {
            assert!(
                Instant::now() < deadline,
                "no {outcome} reload counted; log:\n{}",
                self.gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn turn_client(&self, secret: &str, peer_id: &str) -> BlockingClient {
        let issued = SharedSecret::new(secret.as_bytes())
            .issue(peer_id, expiry())
            .expect("valid peer id");
        let config = ClientConfig::new(self.service, issued.username, issued.password);
        BlockingClient::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("socket")
    }
}

/// A peer of the rendezvous speaking through its own socket.
struct Peer {
    socket: UdpSocket,
    credentials: PeerCredentials,
    nonce: Option<String>,
    to: SocketAddr,
    tid: u8,
}

impl Peer {
    fn new(to: SocketAddr, secret: &str, peer_id: &str) -> Self {
        let issued = SharedSecret::new(secret.as_bytes())
            .issue(peer_id, expiry())
            .expect("valid peer id");
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        Self {
            socket,
            credentials: PeerCredentials {
                username: issued.username,
                password: issued.password,
            },
            nonce: None,
            to,
            tid: 0,
        }
    }

    /// Sends a request built for the current nonce and returns the signed answer
    /// (learning the next nonce; a first 401 with a nonce is retried with it).
    fn ask(
        &mut self,
        build: impl Fn([u8; 12], &PeerCredentials, Option<&str>) -> Vec<u8>,
    ) -> client::Response {
        for _ in 0..6 {
            self.tid = self.tid.wrapping_add(1);
            let request = build([self.tid; 12], &self.credentials, self.nonce.as_deref());
            self.socket.send_to(&request, self.to).expect("send");
            let mut buf = [0u8; 1500];
            let deadline = Instant::now() + Duration::from_millis(600);
            let response = loop {
                if Instant::now() > deadline {
                    break None;
                }
                let Ok((len, _)) = self.socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(response) =
                    client::parse_response(&buf[..len], &self.credentials.password)
                    && response.transaction_id == [self.tid; 12]
                {
                    break Some(response);
                }
            };
            let Some(response) = response else { continue };
            if let Some(nonce) = &response.nonce {
                self.nonce = Some(nonce.clone());
            }
            if matches!(response.result, Err(401 | 438)) && response.nonce.is_some() {
                continue;
            }
            return response;
        }
        panic!("no signed answer from {}", self.to);
    }

    fn register(&mut self) -> client::Response {
        self.ask(|tid, c, nonce| {
            client::register(tid, c, nonce, &[], NatClass::EndpointIndependent, 1)
        })
    }

    fn connect(&mut self, target: &str) -> client::Response {
        self.ask(|tid, c, nonce| client::connect(tid, c, nonce, target))
    }

    /// Waits for an Introduction signed for this peer.
    fn introduction(&self) -> Option<Introduction> {
        let mut buf = [0u8; 1500];
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok((len, _)) = self.socket.recv_from(&mut buf)
                && let Some(intro) =
                    client::parse_introduction(&buf[..len], &self.credentials.password)
            {
                return Some(intro);
            }
        }
        None
    }
}

fn auth_section(files: &[&str]) -> String {
    let list: Vec<String> = files.iter().map(|f| format!("{f:?}")).collect();
    format!("[auth]\nsecret_files = [{}]\n", list.join(", "))
}

/// Allocates with `client` and binds a channel to a fresh peer socket; returns
/// the peer socket, its address, the relayed address and the channel.
fn relayed_pair(client: &mut BlockingClient) -> (UdpSocket, SocketAddr, SocketAddr, u16) {
    let relayed = client.allocate_now(WAIT);
    let peer_socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer socket");
    peer_socket.set_read_timeout(Some(WAIT)).expect("timeout");
    let peer = peer_socket.local_addr().expect("addr");
    let channel = client.bind_now(peer, WAIT).expect("channel bound");
    (peer_socket, peer, relayed, channel)
}

#[test]
fn a_reload_with_a_secret_rotation_keeps_allocations_relaying_and_peers_introducible() {
    let dir = tempfile::tempdir().expect("dir");
    let old = dir.path().join("old.secret");
    write_secret(&old, OLD_SECRET).expect("secret");
    let old = old.to_string_lossy().into_owned();
    let svc = Service::start(&auth_section(&[&old]), &[]);
    // Before: a relayed allocation with a channel, two registered peers.
    let mut turn = svc.turn_client(OLD_SECRET, "relayed");
    let (peer_socket, peer, relayed, channel) = relayed_pair(&mut turn);
    channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 100, 0);
    let mut alice = Peer::new(svc.service, OLD_SECRET, "alice");
    let mut bob = Peer::new(svc.service, OLD_SECRET, "bob");
    assert_eq!(alice.register().result, Ok(()));
    assert_eq!(bob.register().result, Ok(()));

    // Rotate: a new current secret, the old one still accepted.
    let new = svc.secret_file("new.secret", NEW_SECRET);
    svc.reload(&auth_section(&[&new, &old]), "success");
    assert_eq!(svc.metric("gateway_config_last_reload_successful", ""), 1.0);

    // The allocation and its channel are the same and still relay.
    for round in 1..4 {
        channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 200, round);
    }
    assert_eq!(svc.metric("gateway_turn_allocations", ""), 1.0);
    // The registered peers stay introducible, each signed for with its own secret,
    // and a peer with credentials from the new secret joins.
    assert_eq!(svc.metric("gateway_registered_peers", ""), 2.0);
    let mut carol = Peer::new(svc.service, NEW_SECRET, "carol");
    assert_eq!(carol.register().result, Ok(()), "new credentials accepted");
    let connected = alice.connect("bob");
    assert_eq!(
        connected.result,
        Ok(()),
        "alice (old secret) connects to bob"
    );
    let intro = bob.introduction().expect("bob's introduction verifies");
    assert_eq!(intro.peer_id, "alice");
    assert_eq!(carol.connect("alice").result, Ok(()));
    let intro = alice
        .introduction()
        .expect("alice's introduction (signed with the old secret) verifies");
    assert_eq!(intro.peer_id, "carol");
    assert_eq!(alice.register().result, Ok(()), "old credentials refresh");
    // A new relay user with credentials of the new secret allocates too.
    let mut fresh = svc.turn_client(NEW_SECRET, "fresh");
    let (fresh_socket, fresh_peer, fresh_relayed, fresh_channel) = relayed_pair(&mut fresh);
    channel_round_trip(
        &mut fresh,
        &fresh_socket,
        fresh_peer,
        fresh_relayed,
        fresh_channel,
        64,
        0,
    );
    // `gateway credentials` issues from the first file.
    let output = std::process::Command::new(gateway_tests::daemon::gateway_binary())
        .args(["credentials", "--peer-id", "dave", "--config"])
        .arg(&svc.config)
        .output()
        .expect("gateway credentials");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let username = stdout
        .lines()
        .find_map(|l| l.strip_prefix("GATEWAY_USERNAME="))
        .expect("username");
    let password = stdout
        .lines()
        .find_map(|l| l.strip_prefix("GATEWAY_PASSWORD="))
        .expect("password");
    assert_eq!(
        password,
        SharedSecret::new(NEW_SECRET.as_bytes()).password(username)
    );

    // Dropping the old secret: its users are refused from now on, but what exists
    // stays (the allocation relays until it expires).
    svc.reload(&auth_section(&[&new]), "success");
    assert_eq!(alice.register().result, Err(401));
    channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 50, 9);
    assert_eq!(svc.metric("gateway_turn_allocations", ""), 2.0);
}

#[test]
fn a_broken_reload_is_refused_and_the_old_configuration_keeps_serving() {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("secret");
    write_secret(&secret, OLD_SECRET).expect("secret");
    let secret = secret.to_string_lossy().into_owned();
    let good = format!("{}[relay]\nmax_channels = 64\n", auth_section(&[&secret]));
    let svc = Service::start(&good, &[]);
    let mut turn = svc.turn_client(OLD_SECRET, "relayed");
    let (peer_socket, peer, relayed, channel) = relayed_pair(&mut turn);

    // An unknown key: refused, naming the file, the line and the key.
    svc.reload(&format!("{good}max_chanels = 1\n"), "failed");
    let log = svc.gateway.log_text();
    assert!(log.contains("gateway.toml"), "{log}");
    assert!(log.contains("line 5"), "{log}");
    assert!(log.contains("max_chanels"), "{log}");
    assert_eq!(svc.metric("gateway_config_last_reload_successful", ""), 0.0);
    channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 100, 1);

    // Broken TOML: refused.
    svc.reload(&format!("{good}[relay\n"), "failed");
    // A secret file others can read: refused, with the fix in the message.
    let loose = svc.dir.path().join("loose.secret");
    std::fs::write(&loose, NEW_SECRET).expect("write");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let loose = loose.to_string_lossy().into_owned();
    svc.reload(&auth_section(&[&loose, &secret]), "failed");
    let log = svc.gateway.log_text();
    assert!(log.contains(&format!("chmod 600 {loose}")), "{log}");
    // A missing secret file: refused, naming it.
    let missing = svc.dir.path().join("missing.secret");
    let missing = missing.to_string_lossy().into_owned();
    svc.reload(&auth_section(&[&missing]), "failed");
    assert!(svc.gateway.log_text().contains(&missing));
    assert_eq!(
        svc.metric("gateway_config_reloads_total", "outcome=\"failed\""),
        4.0
    );

    // Through all of it the old configuration served: the old credentials work,
    // the allocation relays, and credentials of the refused secret do not.
    channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 100, 2);
    let mut refused = svc.turn_client(NEW_SECRET, "intruder");
    refused.client.allocate(Instant::now()).expect("idle");
    let event = refused
        .wait_event(WAIT, |e| {
            matches!(
                e,
                TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
            )
        })
        .expect("an answer");
    assert!(
        matches!(event, TurnClientEvent::Failed { ref failure, .. } if failure.code() == Some(401)),
        "{event:?}"
    );

    // A restart-only change is named; the rest applies (partial).
    let moved = format!(
        "{}[server]\nthreads = 2\ndrain_timeout = 3\n",
        auth_section(&[&secret])
    );
    svc.reload(&moved, "partial");
    let log = svc.gateway.log_text();
    assert!(
        log.contains("server.threads changes need a restart"),
        "{log}"
    );
    assert_eq!(svc.metric("gateway_config_last_reload_successful", ""), 1.0);
    channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 100, 3);
}

#[test]
fn a_drain_refuses_new_work_lets_a_live_allocation_finish_and_exits_0() {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("secret");
    write_secret(&secret, OLD_SECRET).expect("secret");
    let secret = secret.to_string_lossy().into_owned();
    let alternate: SocketAddr = "127.0.0.1:3999".parse().expect("addr");
    let config = format!(
        "{}[server]\nalternate = \"{alternate}\"\ndrain_timeout = 60\n",
        auth_section(&[&secret])
    );
    let mut svc = Service::start(&config, &[]);
    assert_eq!(
        svc.gateway.fetch("/readyz").expect("readyz"),
        (200, "ready\n".into())
    );
    let (status, body) = svc.gateway.fetch("/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(svc.metric("gateway_draining", ""), 0.0);
    let mut turn = svc.turn_client(OLD_SECRET, "live");
    let (peer_socket, peer, relayed, channel) = relayed_pair(&mut turn);

    svc.gateway.signal(libc::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + WAIT;
    while svc.metric("gateway_draining", "") != 1.0 {
        assert!(Instant::now() < deadline, "not draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = svc.gateway.fetch("/readyz").expect("readyz");
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    assert_eq!(svc.gateway.fetch("/healthz").expect("healthz").0, 200);
    // A newcomer is sent to the alternate; a new peer id cannot register.
    let mut newcomer = svc.turn_client(OLD_SECRET, "newcomer");
    newcomer.client.allocate(Instant::now()).expect("idle");
    let event = newcomer
        .wait_event(WAIT, |e| {
            matches!(
                e,
                TurnClientEvent::Allocated { .. } | TurnClientEvent::Failed { .. }
            )
        })
        .expect("an answer");
    assert!(
        matches!(
            event,
            TurnClientEvent::Failed {
                request: Request::Allocate,
                failure: Failure::Error { code: 300, .. }
            }
        ),
        "{event:?}"
    );
    let mut late = Peer::new(svc.service, OLD_SECRET, "late");
    assert_eq!(late.register().result, Err(300));
    // The live allocation keeps relaying, and the daemon waits for it.
    for round in 0..3 {
        channel_round_trip(&mut turn, &peer_socket, peer, relayed, channel, 120, round);
    }
    assert_eq!(
        svc.gateway
            .wait_exit(Duration::from_millis(500))
            .expect("wait"),
        None,
        "still serving the live allocation"
    );
    assert_eq!(svc.metric("gateway_turn_allocations", ""), 1.0);
    // It ends (Refresh with lifetime 0): the drain is over, the daemon exits 0.
    turn.client.close(Instant::now());
    turn.wait_event(WAIT, |e| matches!(e, TurnClientEvent::Deallocated))
        .expect("deallocated");
    let status = svc
        .gateway
        .wait_exit(WAIT)
        .expect("wait")
        .unwrap_or_else(|| {
            panic!(
                "did not exit after the drain; log:\n{}",
                svc.gateway.log_text()
            )
        });
    assert!(status.success(), "{status}");
    assert!(svc.gateway.log_text().contains("drained"));
}

#[test]
fn a_second_sigterm_ends_a_drain_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("secret");
    write_secret(&secret, OLD_SECRET).expect("secret");
    let secret = secret.to_string_lossy().into_owned();
    let config = format!(
        "{}[server]\ndrain_timeout = 600\n",
        auth_section(&[&secret])
    );
    let mut svc = Service::start(&config, &[]);
    let mut turn = svc.turn_client(OLD_SECRET, "live");
    let _pair = relayed_pair(&mut turn);
    svc.gateway.signal(libc::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + WAIT;
    while svc.metric("gateway_draining", "") != 1.0 {
        assert!(Instant::now() < deadline, "not draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        svc.gateway
            .wait_exit(Duration::from_millis(500))
            .expect("wait"),
        None,
        "draining, not stopped"
    );
    // Without an alternate a newcomer is told the gateway drains.
    let mut newcomer = svc.turn_client(OLD_SECRET, "newcomer");
    newcomer.client.allocate(Instant::now()).expect("idle");
    let event = newcomer
        .wait_event(WAIT, |e| matches!(e, TurnClientEvent::Failed { .. }))
        .expect("refused");
    assert!(
        matches!(event, TurnClientEvent::Failed { failure: Failure::Error { code: 508, ref reason }, .. } if reason == "Draining"),
        "{event:?}"
    );
    svc.gateway.signal(libc::SIGTERM).expect("second SIGTERM");
    let status = svc
        .gateway
        .wait_exit(WAIT)
        .expect("wait")
        .expect("stopped at once");
    assert!(status.success(), "{status}");
}

#[test]
fn json_logs_are_one_object_per_line_and_the_filter_changes_on_reload() {
    let svc = Service::start("[log]\nfilter = \"info\"\n", &["--log-format", "json"]);
    let lines = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let start = lines(&svc.gateway.log_text());
    assert!(!start.is_empty());
    let listening = start
        .iter()
        .find(|v| v["message"] == "service listening")
        .expect("the listening event");
    assert_eq!(listening["level"], "INFO");
    assert_eq!(
        listening["udp"],
        svc.service.to_string(),
        "fields at top level"
    );
    assert!(listening["timestamp"].is_string());
    // log.filter = "warn" on reload: the next SIGHUP's info line is not written.
    svc.reload("[log]\nfilter = \"warn\"\n", "success");
    svc.hup_and_wait("success");
    let all = lines(&svc.gateway.log_text());
    let hups = all
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("SIGHUP received"))
        })
        .count();
    assert_eq!(
        hups, 1,
        "only the first reload's line, before the filter changed"
    );
}

#[test]
fn a_secret_file_others_can_read_is_refused_at_start_with_the_fix() {
    let dir = tempfile::tempdir().expect("dir");
    let loose = dir.path().join("loose.secret");
    std::fs::write(&loose, OLD_SECRET).expect("write");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let listen = free_udp().to_string();
    for args in [
        vec![
            "serve",
            "--listen",
            &listen,
            "--no-ebpf",
            "--no-metrics",
            "--secret-file",
        ],
        vec!["credentials", "--peer-id", "alice", "--secret-file"],
    ] {
        let output = std::process::Command::new(gateway_tests::daemon::gateway_binary())
            .args(&args)
            .arg(&loose)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must refuse: {stderr}");
        assert!(
            stderr.contains(&format!("chmod 600 {}", loose.display())),
            "{args:?}: {stderr}"
        );
    }
    // The same file at 0600 is fine.
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let output = std::process::Command::new(gateway_tests::daemon::gateway_binary())
        .args(["credentials", "--peer-id", "alice", "--secret-file"])
        .arg(&loose)
        .output()
        .expect("run");
    assert!(output.status.success());
}
