//! A `gateway serve` relay on loopback for the relay's load tests (fairness, smoke):
//! userspace only (no eBPF, no TCP relay), loopback peers allowed, metrics on a free
//! port, a random 100-port relay range; killed on drop.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::{credentials::SharedSecret, turn::client::ClientConfig};

use crate::{
    daemon::{gateway_binary, metric_value},
    turn::BlockingClient,
};

/// The relay's REST secret (a test secret).
pub const SECRET: &str = "relay test secret";
const WAIT: Duration = Duration::from_secs(5);

/// A running `gateway serve` relay.
pub struct RelayGateway {
    child: Child,
    /// Its service address.
    pub service: SocketAddr,
    metrics: SocketAddr,
    /// Its log file.
    pub log: std::path::PathBuf,
}

impl Drop for RelayGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

impl RelayGateway {
    /// Starts it (files in `dir`) and waits for its /metrics; panics on failure.
    pub fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// [`RelayGateway::start`] with further `gateway serve` flags.
    pub fn start_with(dir: &std::path::Path, extra: &[&str]) -> Self {
        let service = free_udp();
        let metrics = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free TCP port");
        let secret = dir.join("secret");
        crate::daemon::write_secret(&secret, SECRET).expect("secret file");
        let log = dir.join("gateway.log");
        let first = 40_000 + 100 * (rand::random::<u16>() % 90);
        let child = Command::new(gateway_binary())
            .args(["serve", "--listen", &service.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--secret-file")
            .arg(&secret)
            .args([
                "--no-ebpf",
                "--no-relay-tcp",
                "--relay-address",
                "127.0.0.1",
            ])
            .args(["--relay-port-range", &format!("{first}-{}", first + 99)])
            .args(["--allow-peer", "127.0.0.0/8"])
            .args(extra)
            .env("GATEWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn the gateway");
        let gateway = Self {
            child,
            service,
            metrics,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while gateway.scrape().is_none() {
            assert!(Instant::now() < deadline, "no /metrics after 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its /metrics text, if it answers.
    pub fn scrape(&self) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(WAIT)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.1 200").then_some(text)
    }

    /// One metric's value; panics when it is missing.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.scrape().expect("scrape");
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}} missing"))
    }

    /// Datagrams relayed in `direction` (`client_to_peer` or `peer_to_client`).
    pub fn relayed(&self, direction: &str) -> f64 {
        self.metric(
            "gateway_relay_packets_total",
            &format!("direction=\"{direction}\""),
        )
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A TURN client with REST credentials for `peer_id`, on a fresh loopback port.
    pub fn client(&self, peer_id: &str) -> BlockingClient {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        let credentials = SharedSecret::new(SECRET.as_bytes())
            .issue(peer_id, expiry)
            .expect("valid peer id");
        let config = ClientConfig::new(self.service, credentials.username, credentials.password);
        BlockingClient::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).expect("socket")
    }
}
