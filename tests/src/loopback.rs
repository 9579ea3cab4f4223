//! `gateway serve` on loopback, for tests that need the real daemon but no lab: a
//! fresh secret, free ports, a log file, and /metrics to read.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway::proto::credentials::SharedSecret;

use crate::daemon::{gateway_binary, metric_value};

/// The shared secret every loopback gateway uses.
pub const SECRET: &str = "loopback test secret";

/// A `gateway serve` on 127.0.0.1; killed on drop.
#[derive(Debug)]
pub struct LoopbackGateway {
    child: Child,
    /// Its UDP (and TCP) service address.
    pub service: SocketAddr,
    /// Its metrics listener.
    pub metrics: SocketAddr,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Drop for LoopbackGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP port free a moment ago on 127.0.0.1.
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
}

/// A port free a moment ago on 127.0.0.1 for both UDP and TCP, with the next UDP
/// port free too (the service port: the gateway serves TCP on its UDP port's number
/// and binds its default discovery socket one above).
pub fn free_udp_and_tcp() -> SocketAddr {
    loop {
        let udp = free_udp();
        let next = SocketAddr::new(udp.ip(), udp.port().wrapping_add(1));
        if udp.port() < u16::MAX
            && std::net::TcpListener::bind(udp).is_ok()
            && UdpSocket::bind(next).is_ok()
        {
            return udp;
        }
    }
}

/// A TCP port free a moment ago on 127.0.0.1.
pub fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
}

impl LoopbackGateway {
    /// Starts `gateway serve` on loopback with the secret in `dir`, no eBPF, a relay
    /// on 127.0.0.1 with 100 ports, `extra` arguments added, and waits until /metrics
    /// answers (10 s at most).
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let service = free_udp_and_tcp();
        let metrics = free_tcp();
        let secret = dir.join("secret");
        crate::daemon::write_secret(&secret, SECRET).expect("secret file");
        let log = dir.join("gateway.log");
        let first = 40_000 + 100 * (rand::random::<u16>() % 90);
        let child = Command::new(gateway_binary())
            .args(["serve", "--listen", &service.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--secret-file")
            .arg(&secret)
            .args(["--no-ebpf", "--relay-address", "127.0.0.1"])
            .args(["--relay-port-range", &format!("{first}-{}", first + 99)])
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
        // /readyz answers 200 once every listener is bound and every loop runs
        // (/metrics answers earlier, while the TCP and TLS listeners may still be
        // coming up).
        while !gateway.ready() {
            assert!(
                Instant::now() < deadline,
                "not ready after 10 s; log:\n{}",
                gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1))
        else {
            return false;
        };
        let mut text = String::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .is_ok()
            && stream
                .write_all(b"GET /readyz HTTP/1.0\r\nHost: gateway\r\n\r\n")
                .is_ok()
            && stream.read_to_string(&mut text).is_ok()
            && text.starts_with("HTTP/1.1 200")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One scrape of /metrics, if it answers 200.
    pub fn scrape(&self) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.1 200").then_some(text)
    }

    /// The value of one series (panics when it is missing).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.scrape().expect("scrape");
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}} missing"))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// REST credentials for `peer_id`, valid for an hour.
    pub fn credentials(&self, peer_id: &str) -> (String, String) {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        let issued = SharedSecret::new(SECRET.as_bytes())
            .issue(peer_id, expiry)
            .expect("valid peer id");
        (issued.username, issued.password)
    }
}

/// Waits for the peer to close `stream` (EOF or reset); the time it took, or `None`
/// when it is still open after `limit`.
pub fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}
