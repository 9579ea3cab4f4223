//! The `gateway` command line as an operator meets it: help text, configuration file
//! plus overriding flags, and clear errors.
use std::process::Command;

use gateway_tests::daemon::gateway_binary;

fn gateway(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(gateway_binary())
        .args(args)
        .output()
        .expect("run gateway");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_lists_serve_and_is_honest_about_what_is_not_built() {
    let (ok, stdout, _) = gateway(&["--help"]);
    assert!(ok);
    assert!(stdout.contains("serve"), "{stdout}");
    assert!(stdout.contains("Not built yet"), "{stdout}");
    assert!(
        stdout.contains("fall back to TCP and TLS") && !stdout.contains("TURN over TLS."),
        "TURN over TLS is built; the agent's fallback is not: {stdout}"
    );
    let (ok, stdout, _) = gateway(&["serve", "--help"]);
    assert!(ok);
    for flag in [
        "--config",
        "--listen",
        "--metrics-listen",
        "--ebpf-interface",
        "--no-ebpf",
        "--tcp-forge-synack",
    ] {
        assert!(stdout.contains(flag), "{flag} missing from:\n{stdout}");
    }
}

#[test]
fn flags_override_the_config_file() {
    let dir = std::env::temp_dir().join(format!("gw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"192.0.2.10:3478\"\n[metrics]\nlisten = \"127.0.0.1:9999\"\n",
    )
    .expect("write");
    let path = file.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = gateway(&["serve", "--config", &path, "--print-config"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listen = \"192.0.2.10:3478\""), "{stdout}");
    assert!(stdout.contains("listen = \"127.0.0.1:9999\""), "{stdout}");
    let (ok, stdout, stderr) = gateway(&[
        "serve",
        "--config",
        &path,
        "--listen",
        "0.0.0.0:5000",
        "--no-ebpf",
        "--print-config",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listen = \"0.0.0.0:5000\""), "{stdout}");
    assert!(
        stdout.contains("listen = \"127.0.0.1:9999\""),
        "file value kept: {stdout}"
    );
    assert!(stdout.contains("enabled = false"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("gw-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, "[server]\nlisten = \"not an address\"\n").expect("write");
    let (ok, _, stderr) = gateway(&["serve", "--config", &file.to_string_lossy()]);
    assert!(!ok);
    assert!(stderr.contains("invalid config file"), "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
    let (ok, _, stderr) = gateway(&["serve", "--config", "/nonexistent/gateway.toml"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read config file"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").to_string();
    let (ok, _, stderr) = gateway(&["serve", "--listen", &taken, "--no-ebpf", "--no-metrics"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("cannot bind UDP {taken}")),
        "{stderr}"
    );
}

#[test]
fn credentials_are_issued_from_the_secret_file() {
    let dir = std::env::temp_dir().join(format!("gw-cli-cred-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret = dir.join("secret");
    gateway_tests::daemon::write_secret(&secret, "operator-secret\n").expect("write");
    let path = secret.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = gateway(&[
        "credentials",
        "--peer-id",
        "alice",
        "--ttl",
        "600",
        "--secret-file",
        &path,
    ]);
    assert!(ok, "{stderr}");
    let username = stdout
        .lines()
        .find_map(|l| l.strip_prefix("GATEWAY_USERNAME="))
        .expect("username line");
    let password = stdout
        .lines()
        .find_map(|l| l.strip_prefix("GATEWAY_PASSWORD="))
        .expect("password line");
    let (expiry, peer) = username.split_once(':').expect("expiry:peer");
    assert_eq!(peer, "alice");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expiry: u64 = expiry.parse().expect("number");
    assert!(
        (now + 590..=now + 610).contains(&expiry),
        "expiry {expiry} vs now {now}"
    );
    // The password is what the gateway derives from the same secret.
    let derived =
        gateway::proto::credentials::SharedSecret::new(b"operator-secret").password(username);
    assert_eq!(password, derived);

    let (ok, _, stderr) = gateway(&["credentials", "--peer-id", "bad id", "--secret-file", &path]);
    assert!(!ok);
    assert!(stderr.contains("peer id"), "{stderr}");
    // A group goes in front of the peer id (auth.connect = "same-group" uses it).
    let (ok, stdout, stderr) = gateway(&[
        "credentials",
        "--peer-id",
        "alice",
        "--group",
        "red",
        "--secret-file",
        &path,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("GATEWAY_USERNAME=") && l.ends_with(":red/alice")),
        "{stdout}"
    );
    let (ok, _, stderr) = gateway(&[
        "credentials",
        "--peer-id",
        "alice",
        "--group",
        "a/b",
        "--secret-file",
        &path,
    ]);
    assert!(!ok);
    assert!(stderr.contains("--group"), "{stderr}");
    let (ok, _, stderr) = gateway(&["credentials", "--peer-id", "alice"]);
    assert!(!ok);
    assert!(stderr.contains("--secret-file"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn peer_help_explains_tcp_punching_and_bad_techniques_are_refused() {
    let (ok, stdout, _) = gateway(&["peer", "--help"]);
    assert!(ok);
    for word in [
        "--tcp <TECHNIQUE>",
        "simultaneous-open",
        "low-ttl",
        "natblaster",
        "server-assisted",
        "auto",
        "--tcp-forward-listen",
        "--tcp-forward-to",
        "tcp-path-up",
    ] {
        assert!(stdout.contains(word), "{word} missing from:\n{stdout}");
    }
    let (ok, _, stderr) = gateway(&[
        "peer",
        "--server",
        "127.0.0.1:3478",
        "--username",
        "1:a",
        "--password",
        "x",
        "--tcp",
        "teleport",
    ]);
    assert!(!ok);
    assert!(stderr.contains("unknown TCP technique"), "{stderr}");
}

#[test]
fn peer_help_explains_several_servers_and_failover() {
    let (ok, stdout, _) = gateway(&["peer", "--help"]);
    assert!(ok);
    for word in ["--server <HOST:PORT>", "repeatable", "2.5 s", "now using"] {
        assert!(stdout.contains(word), "{word} missing from:\n{stdout}");
    }
    let (ok, _, stderr) = gateway(&[
        "peer",
        "--server",
        "127.0.0.1:3478",
        "--server",
        "localhost:no-port",
        "--username",
        "1:a",
        "--password",
        "x",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot resolve server localhost:no-port"),
        "{stderr}"
    );
}

/// A `gateway serve` on loopback (no eBPF, no metrics, no TCP relay), killed on drop.
struct LoopbackGateway {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl LoopbackGateway {
    /// Starts one on a free loopback port with `secret` and waits until it answers a
    /// STUN Binding.
    fn start(secret: &std::path::Path) -> Self {
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port");
        let child = Command::new(gateway_binary())
            .args(["serve", "--listen", &addr.to_string()])
            .args([
                "--no-ebpf",
                "--no-metrics",
                "--no-relay-tcp",
                "--secret-file",
            ])
            .arg(secret)
            .env("GATEWAY_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn gateway serve");
        let gateway = Self { child, addr };
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while gateway_tests::daemon::stun_binding(
            &socket,
            addr,
            std::time::Duration::from_millis(100),
        )
        .is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{addr} never answered"
            );
        }
        gateway
    }
}

impl Drop for LoopbackGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_peer_moves_to_the_next_gateway_node_when_its_node_dies() {
    use std::time::{Duration, Instant};

    use gateway_tests::daemon::PeerProcess;

    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("secret");
    gateway_tests::daemon::write_secret(&secret_file, "failover-secret\n").expect("write");
    let secret = gateway::proto::credentials::SharedSecret::new(b"failover-secret");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let first = LoopbackGateway::start(&secret_file);
    let second = LoopbackGateway::start(&secret_file);
    let (first_addr, second_addr) = (first.addr.to_string(), second.addr.to_string());

    // Two independent nodes: bob is registered on the second only; alice starts on
    // the first, where bob is unknown, and wants him.
    let bob = secret.issue("bob", expiry).expect("issue");
    let mut bob = PeerProcess::start_here(
        &bob.username,
        &bob.password,
        &["--server", &second_addr, "--bind", "127.0.0.1:0"],
    )
    .expect("bob");
    assert!(
        bob.wait_for("registered public", Duration::from_secs(5))
            .is_some()
    );
    let alice = secret.issue("alice", expiry).expect("issue");
    let mut alice = PeerProcess::start_here(
        &alice.username,
        &alice.password,
        &[
            "--server",
            &first_addr,
            "--server",
            &second_addr,
            "--bind",
            "127.0.0.1:0",
            "--connect",
            "bob",
        ],
    )
    .expect("alice");
    let started = alice
        .wait_for("local ", Duration::from_secs(5))
        .expect("started");
    assert!(
        started.ends_with(&format!("server {first_addr} fallback {second_addr}")),
        "{started}"
    );
    assert!(
        alice
            .wait_for("registered public", Duration::from_secs(5))
            .is_some()
    );

    drop(first);
    let died = Instant::now();
    let changed = alice
        .wait_for("server ", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no failover line: {:?}", alice.seen()));
    assert!(
        changed.starts_with(&format!("server {first_addr} no answer for 2."))
            && changed.ends_with(&format!("s; now using {second_addr}")),
        "{changed}"
    );
    let registered = alice
        .wait_for(
            &format!("registered with {second_addr} public "),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("not registered on the second node: {:?}", alice.seen()));
    assert!(
        died.elapsed() < Duration::from_secs(5),
        "{registered} after {:?}",
        died.elapsed()
    );
    // The wanted peer is connected through the new node.
    assert!(
        alice
            .wait_for("path-up peer bob direct", Duration::from_secs(5))
            .is_some(),
        "{:?}",
        alice.seen()
    );
    // One line per change: nothing more while the second node answers.
    assert!(
        alice
            .wait_for("never printed", Duration::from_secs(3))
            .is_none()
    );
    let changes = alice
        .seen()
        .iter()
        .filter(|l| l.starts_with("server "))
        .count();
    assert_eq!(changes, 1, "{:?}", alice.seen());
}

#[test]
fn man_pages_and_completions_come_from_the_clap_definitions() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("man1");
    let (ok, _, stderr) = gateway(&["generate-man", &out.to_string_lossy()]);
    assert!(ok, "{stderr}");
    let serve = std::fs::read_to_string(out.join("gateway-serve.1")).expect("gateway-serve.1");
    assert!(serve.contains(".TH gateway-serve"), "{serve}");
    // Every serve flag documented, e.g. the newest ones.
    assert!(serve.contains("relay\\-fast\\-path"), "{serve}");
    assert!(out.join("gateway.1").exists() && out.join("gateway-peer.1").exists());
    // The hidden generator documents itself nowhere.
    assert!(!out.join("gateway-generate-man.1").exists());

    let (ok, bash, _) = gateway(&["completions", "bash"]);
    assert!(ok);
    assert!(bash.contains("complete -F _gateway"), "{bash}");
    assert!(bash.contains("--metrics-listen"), "{bash}");
    let (ok, fish, _) = gateway(&["completions", "fish"]);
    assert!(ok && fish.contains("complete -c gateway"), "{fish}");
    let (ok, _, _) = gateway(&["completions", "tcsh"]);
    assert!(!ok, "an unknown shell is refused");
}

#[test]
fn version_says_whether_the_ebpf_programs_are_embedded() {
    let (ok, stdout, _) = gateway(&["--version"]);
    assert!(ok);
    assert!(
        stdout.starts_with(&format!("gateway {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(
        stdout.contains("eBPF programs embedded") || stdout.contains("built without the eBPF"),
        "{stdout}"
    );
}

#[test]
fn the_packaged_config_file_parses_to_the_defaults() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/gateway.toml");
    let (ok, with_file, stderr) = gateway(&["serve", "--config", shipped, "--print-config"]);
    assert!(ok, "{stderr}");
    let (_, defaults, _) = gateway(&["serve", "--print-config"]);
    assert_eq!(with_file, defaults, "everything in it is commented out");
    let text = std::fs::read_to_string(shipped).expect("packaging/gateway.toml");
    // Every key of the effective configuration is documented in it.
    for line in defaults.lines().filter(|l| l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap_or_default();
        assert!(text.contains(&format!("#{key} = ")), "{key} missing");
    }
}

/// Credentials for `peer` from the test secret, valid for an hour.
fn issue(secret: &[u8], peer: &str) -> gateway::proto::credentials::Credentials {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    gateway::proto::credentials::SharedSecret::new(secret)
        .issue(peer, expiry)
        .expect("issue")
}

#[test]
fn a_wrong_password_is_one_clear_line_and_a_failed_exit() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("secret");
    gateway_tests::daemon::write_secret(&secret_file, "right-secret\n").expect("write");
    let gateway = LoopbackGateway::start(&secret_file);
    // Credentials from another secret: the gateway derives another password.
    let wrong = issue(b"wrong-secret", "alice");
    let started = Instant::now();
    let mut alice = gateway_tests::daemon::PeerProcess::start_here(
        &wrong.username,
        &wrong.password,
        &[
            "--server",
            &gateway.addr.to_string(),
            "--bind",
            "127.0.0.1:0",
            "--connect",
            "bob",
        ],
    )
    .expect("alice");
    let status = alice
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running: {:?}", alice.seen()));
    assert!(!status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let refused: Vec<&String> = alice
        .seen()
        .iter()
        .filter(|l| l.starts_with("refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{:?}", alice.seen());
    assert!(
        // Register or the Connect sent with it, whichever was refused second.
        (refused[0].starts_with("refused register code 401: wrong or expired credentials")
            || refused[0].starts_with("refused connect code 401: wrong or expired credentials"))
            && refused[0].contains("GATEWAY_PASSWORD")
            && refused[0].ends_with("; stopping"),
        "{}",
        refused[0]
    );
}

#[test]
fn an_unknown_peer_is_said_with_backoff_never_several_lines_a_second() {
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("secret");
    gateway_tests::daemon::write_secret(&secret_file, "backoff-secret\n").expect("write");
    let gateway = LoopbackGateway::start(&secret_file);
    let alice = issue(b"backoff-secret", "alice");
    let mut alice = gateway_tests::daemon::PeerProcess::start_here(
        &alice.username,
        &alice.password,
        &[
            "--server",
            &gateway.addr.to_string(),
            "--bind",
            "127.0.0.1:0",
            "--connect",
            "nobody",
        ],
    )
    .expect("alice");
    let first = alice
        .wait_for("refused connect code 404", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no refusal: {:?}", alice.seen()));
    assert!(
        first.contains("peer not registered with the gateway")
            && first.ends_with("retrying in 1 s, then less often"),
        "{first}"
    );
    // Ten seconds more: the retries go at 1, 3, 7 s (then every 8 s: the agent's unit
    // tests count them) and the same refusal is said once per 30 s: one line.
    assert!(
        alice
            .wait_for("never printed", Duration::from_secs(10))
            .is_none()
    );
    let refusals = alice
        .seen()
        .iter()
        .filter(|l| l.starts_with("refused"))
        .count();
    assert_eq!(refusals, 1, "{:?}", alice.seen());
}

#[test]
fn a_server_that_does_not_answer_is_reported_after_a_bounded_wait() {
    use std::time::{Duration, Instant};

    // A UDP port that receives and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let alice = issue(b"any-secret", "alice");
    let started = Instant::now();
    // Over UDP only (the transport fallback has its own test below).
    let mut alice = gateway_tests::daemon::PeerProcess::start_here(
        &alice.username,
        &alice.password,
        &[
            "--server",
            &addr.to_string(),
            "--bind",
            "127.0.0.1:0",
            "--udp-only",
        ],
    )
    .expect("alice");
    let line = alice
        .wait_for("no answer from", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("nothing said: {:?}", alice.seen()));
    assert!(
        line.starts_with(&format!("no answer from {addr} over udp for 5 s")),
        "{line}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    // The agent keeps trying (the Registers reach the socket) and says nothing more
    // until the silence doubled.
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    assert!(
        silent.recv_from(&mut buf).is_ok(),
        "no Register after the report"
    );
    assert!(
        alice
            .wait_for("never printed", Duration::from_secs(3))
            .is_none()
    );
    let said = alice
        .seen()
        .iter()
        .filter(|l| l.starts_with("no answer"))
        .count();
    assert_eq!(said, 1, "{:?}", alice.seen());
}

#[test]
fn a_silent_server_makes_the_agent_try_tcp_then_udp_again() {
    use std::time::{Duration, Instant};

    // A UDP port that receives and never answers; nothing listens on its TCP port.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let alice = issue(b"any-secret", "alice");
    let started = Instant::now();
    let mut alice = gateway_tests::daemon::PeerProcess::start_here(
        &alice.username,
        &alice.password,
        &["--server", &addr.to_string(), "--bind", "127.0.0.1:0"],
    )
    .expect("alice");
    let line = alice
        .wait_for("no answer from", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("nothing said: {:?}", alice.seen()));
    assert_eq!(
        line,
        format!("no answer from {addr} over udp for 3 s; trying tcp to {addr}")
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // The TCP connection is refused: back to UDP at once, said in one line.
    let line = alice
        .wait_for("tcp connection", Duration::from_secs(3))
        .unwrap_or_else(|| panic!("nothing said: {:?}", alice.seen()));
    assert_eq!(
        line,
        format!("tcp connection to the gateway failed; trying udp to {addr}")
    );
    // The next round waits twice as long: nothing more for 5 s.
    assert!(
        alice
            .wait_for("never printed", Duration::from_secs(5))
            .is_none()
    );
    assert_eq!(alice.seen().len(), 4, "{:?}", alice.seen());
}

#[test]
fn peers_classify_their_nat_with_the_endpoints_serve_names_by_default() {
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("secret");
    gateway_tests::daemon::write_secret(&secret_file, "discovery-secret\n").expect("write");
    // No discovery flag on either side.
    let gateway = LoopbackGateway::start(&secret_file);
    let server = gateway.addr.to_string();
    let alice = issue(b"discovery-secret", "alice");
    let mut alice = gateway_tests::daemon::PeerProcess::start_here(
        &alice.username,
        &alice.password,
        &["--server", &server, "--bind", "127.0.0.1:0"],
    )
    .expect("alice");
    // Loopback has no NAT: the Register answer named 127.0.0.1:PORT+1, and the
    // Binding there saw the socket's own address.
    let line = alice
        .wait_for("nat mapping ", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("not classified: {:?}", alice.seen()));
    assert!(line.starts_with("nat mapping none "), "{line}");
    // --no-discover: registered, never classified.
    let bob = issue(b"discovery-secret", "bob");
    let mut bob = gateway_tests::daemon::PeerProcess::start_here(
        &bob.username,
        &bob.password,
        &[
            "--server",
            &server,
            "--bind",
            "127.0.0.1:0",
            "--no-discover",
        ],
    )
    .expect("bob");
    assert!(
        bob.wait_for("registered public", Duration::from_secs(5))
            .is_some()
    );
    assert!(
        bob.wait_for("nat mapping ", Duration::from_secs(3))
            .is_none(),
        "{:?}",
        bob.seen()
    );
}

#[test]
fn a_peer_the_relay_refuses_is_said_once_without_a_tight_loop() {
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("secret");
    gateway_tests::daemon::write_secret(&secret_file, "relay-secret\n").expect("write");
    let gateway = LoopbackGateway::start(&secret_file);
    let server = gateway.addr.to_string();
    // No probes at all (no budget, no opener): punching fails after its 5 s window
    // and alice falls back to the relay, whose default peer policy refuses bob's
    // loopback address (the gateway's own).
    let no_punch = ["--probe-budget", "0", "--open-ttl", "0"];
    let bob = issue(b"relay-secret", "bob");
    let mut bob_args = vec!["--server", server.as_str(), "--bind", "127.0.0.1:0"];
    bob_args.extend_from_slice(&no_punch);
    let mut bob =
        gateway_tests::daemon::PeerProcess::start_here(&bob.username, &bob.password, &bob_args)
            .expect("bob");
    assert!(
        bob.wait_for("registered public", Duration::from_secs(5))
            .is_some()
    );
    let alice = issue(b"relay-secret", "alice");
    let mut alice_args = vec![
        "--server",
        server.as_str(),
        "--bind",
        "127.0.0.1:0",
        "--connect",
        "bob",
    ];
    alice_args.extend_from_slice(&no_punch);
    let mut alice = gateway_tests::daemon::PeerProcess::start_here(
        &alice.username,
        &alice.password,
        &alice_args,
    )
    .expect("alice");
    let refused = alice
        .wait_for(
            "refused create-permission code 403",
            Duration::from_secs(12),
        )
        .unwrap_or_else(|| panic!("no refusal: {:?}", alice.seen()));
    assert!(
        refused.contains("the relay's peer policy denies this peer's address")
            && refused.ends_with("next attempt at this peer in 16 s"),
        "{refused}"
    );
    // 15 s more: the next attempt waits 16 s, so nothing loops meanwhile.
    assert!(
        alice
            .wait_for("never printed", Duration::from_secs(15))
            .is_none()
    );
    let seen = alice.seen();
    let count =
        |lines: &[String], prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count(seen, "refused create-permission"), 1, "{seen:?}");
    // No new attempt after the refusal (its 16 s have not passed). Before it, alice
    // may have asked once more: bob never answered her, so she takes the
    // introduction for lost when her 1 s Connect timer fires between the fallback
    // and the refusal (a few ms apart on an idle machine, more under load).
    let refusal = seen
        .iter()
        .position(|l| l.starts_with("refused create-permission"))
        .expect("seen above");
    let introductions = count(seen, "introduced peer bob");
    assert!(
        (1..=2).contains(&introductions) && count(&seen[refusal..], "introduced peer bob") == 0,
        "{seen:?}"
    );
    // Each introduction falls back to the relay once at most: no loop.
    assert!(count(seen, "relay-fallback") <= introductions, "{seen:?}");
}

#[test]
fn peer_tls_fallback_flags_are_explained_and_checked() {
    let (ok, help, _) = gateway(&["peer", "--help"]);
    assert!(ok);
    for words in [
        "--server-tls",
        "--tls-ca",
        "--transport-wait",
        "--udp-retry-interval",
        "--udp-only",
        "trying tcp",
    ] {
        assert!(help.contains(words), "peer --help lacks {words}:\n{help}");
    }
    let base = [
        "peer",
        "--server",
        "127.0.0.1:3478",
        "--username",
        "1900000000:alice",
        "--password",
        "pw",
    ];
    // A CA file that does not exist: refused before anything starts, naming it.
    let missing = [
        &base[..],
        &[
            "--server-tls",
            "127.0.0.1",
            "--tls-ca",
            "/nonexistent/ca.pem",
        ],
    ]
    .concat();
    let (ok, _, err) = gateway(&missing);
    assert!(!ok);
    assert!(
        err.contains("cannot use /nonexistent/ca.pem as a CA certificate"),
        "{err}"
    );
    // A file that holds no certificate.
    let dir = tempfile::tempdir().expect("temporary directory");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let empty_arg = empty.to_string_lossy().into_owned();
    let no_cert = [
        &base[..],
        &["--server-tls", "127.0.0.1", "--tls-ca", &empty_arg],
    ]
    .concat();
    let (ok, _, err) = gateway(&no_cert);
    assert!(!ok);
    assert!(err.contains("no CERTIFICATE in the file"), "{err}");
    // A port that is not a number.
    let bad_port = [&base[..], &["--server-tls", "gateway.test:https"]].concat();
    let (ok, _, err) = gateway(&bad_port);
    assert!(!ok);
    assert!(err.contains("the port is not a number"), "{err}");
    // --tls-ca only means something with --server-tls; --udp-only excludes it.
    let (ok, _, err) = gateway(
        &[
            &base[..],
            &["--tls-ca", "/etc/ssl/certs/ca-certificates.crt"],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("--server-tls"), "{err}");
    let (ok, _, err) = gateway(&[&base[..], &["--udp-only", "--server-tls", "127.0.0.1"]].concat());
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}
