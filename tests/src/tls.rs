//! TLS for the stream tests: a throwaway CA and server certificates made with the
//! `openssl` command (Debian's openssl package; `cargo xtask setup` installs it), a
//! blocking rustls client that trusts that CA, and a rendezvous peer that speaks
//! the STUN-framed rendezvous over any stream (TCP or TLS) with the client
//! builders of `gateway::proto::rendezvous::client`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use gateway::proto::rendezvous::{
    NatClass,
    client::{self, Introduction, PeerCredentials, Response},
};

/// A CA made for one test, in its own directory.
pub struct TestCa {
    dir: PathBuf,
    /// The CA certificate (PEM), what clients trust.
    pub cert: PathBuf,
    key: PathBuf,
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install Debian's openssl package (cargo xtask setup does)"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

impl TestCa {
    /// A new CA (P-256 key) in `dir`.
    pub fn new(dir: &Path) -> Self {
        let cert = dir.join("ca.pem");
        let key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            arg(&key),
            "-out",
            arg(&cert),
            "-days",
            "2",
            "-subj",
            "/CN=gateway test CA",
        ]);
        Self {
            dir: dir.to_owned(),
            cert,
            key,
        }
    }

    /// A server certificate for 127.0.0.1 and `gateway.test` signed by this CA, with
    /// common name `name`, valid for a day: (certificate chain, key) as PEM files
    /// named after it.
    pub fn leaf(&self, name: &str) -> (PathBuf, PathBuf) {
        self.leaf_for_days(name, 1)
    }

    /// [`Self::leaf`] valid for `days` days.
    pub fn leaf_for_days(&self, name: &str, days: u32) -> (PathBuf, PathBuf) {
        self.leaf_with_names(name, days, "IP:127.0.0.1,DNS:gateway.test")
    }

    /// A server certificate for the subject alternative names `sans` (OpenSSL's
    /// syntax: `IP:192.0.2.10,DNS:gateway.test`), valid for `days` days.
    pub fn leaf_with_names(&self, name: &str, days: u32, sans: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("extensions file");
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            arg(&key),
            "-out",
            arg(&csr),
            "-subj",
            &format!("/CN={name}"),
        ]);
        let serial = format!("{}", rand::random::<u32>());
        openssl(&[
            "x509",
            "-req",
            "-in",
            arg(&csr),
            "-CA",
            arg(&self.cert),
            "-CAkey",
            arg(&self.key),
            "-set_serial",
            &serial,
            "-days",
            &days.to_string(),
            "-extfile",
            arg(&ext),
            "-out",
            arg(&cert),
        ]);
        (cert, key)
    }

    /// A rustls client configuration that trusts this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let pem = std::fs::read(&self.cert).expect("CA certificate");
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.expect("PEM")).expect("a CA certificate");
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// The notAfter of the certificate in `cert` (PEM), Unix seconds, as openssl and
/// date(1) read it.
pub fn not_after(cert: &Path) -> i64 {
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in", arg(cert)])
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&output.stdout);
    let date = text.trim().strip_prefix("notAfter=").expect("notAfter=...");
    let output = Command::new("date")
        .args(["-u", "-d", date, "+%s"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("seconds")
}

/// A blocking TLS connection to a gateway's TLS listener.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` and completes the TLS handshake (server name 127.0.0.1)
/// with `config`; the error when the handshake fails.
pub fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let connection = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// The server's end-entity certificate on `stream` (DER).
pub fn peer_certificate(stream: &TlsStream) -> Vec<u8> {
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .expect("a server certificate")
}

/// Reads one frame (a STUN message, or ChannelData padded to four) from a stream.
pub fn read_frame(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let total = if head[0] >> 6 == 1 {
        4 + len.next_multiple_of(4)
    } else {
        20 + len
    };
    let mut frame = vec![0u8; total];
    frame[..4].copy_from_slice(&head);
    stream.read_exact(&mut frame[4..])?;
    Ok(frame)
}

/// A rendezvous peer over one stream (TCP or TLS): signs with its credentials and
/// follows the nonces the gateway hands out.
pub struct StreamPeer<S> {
    /// The connection.
    pub stream: S,
    credentials: PeerCredentials,
    nonce: Option<String>,
    tid: u32,
    /// Introductions read while waiting for a response.
    pub introductions: Vec<Introduction>,
}

impl<S: Read + Write> StreamPeer<S> {
    /// A peer with `username`/`password` (REST credentials) on `stream`.
    pub fn new(stream: S, (username, password): (String, String)) -> Self {
        Self {
            stream,
            credentials: PeerCredentials { username, password },
            nonce: None,
            tid: 0,
            introductions: Vec::new(),
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut tid = [7u8; 12];
        tid[..4].copy_from_slice(&self.tid.to_be_bytes());
        tid
    }

    /// Sends the request `build` makes (with the current nonce) and reads frames
    /// until its response; a 401 or 438 bringing a nonce is retried once with it.
    pub fn request(
        &mut self,
        build: impl Fn([u8; 12], &PeerCredentials, Option<&str>) -> Vec<u8>,
    ) -> Response {
        for _ in 0..2 {
            let tid = self.next_tid();
            let request = build(tid, &self.credentials, self.nonce.as_deref());
            self.stream.write_all(&request).expect("write a request");
            self.stream.flush().expect("flush");
            let response = loop {
                let frame = read_frame(&mut self.stream).expect("a frame from the gateway");
                if let Some(intro) = client::parse_introduction(&frame, &self.credentials.password)
                {
                    self.introductions.push(intro);
                    continue;
                }
                if let Some(response) = client::parse_response(&frame, &self.credentials.password)
                    && response.transaction_id == tid
                {
                    break response;
                }
            };
            if response.nonce.is_some() {
                self.nonce.clone_from(&response.nonce);
            }
            if matches!(response.result, Err(401 | 438)) && response.nonce.is_some() {
                continue;
            }
            return response;
        }
        panic!("no answer but nonce challenges");
    }

    /// Registers (no candidates); the gateway's answer.
    pub fn register(&mut self) -> Response {
        self.request(|tid, c, nonce| client::register(tid, c, nonce, &[], NatClass::Unknown, 0))
    }

    /// Asks to be introduced to `target`; the gateway's answer.
    pub fn connect(&mut self, target: &str) -> Response {
        self.request(|tid, c, nonce| client::connect(tid, c, nonce, target))
    }

    /// The next introduction (one read while waiting for a response first).
    pub fn introduction(&mut self) -> Introduction {
        if !self.introductions.is_empty() {
            return self.introductions.remove(0);
        }
        loop {
            let frame = read_frame(&mut self.stream).expect("an introduction");
            if let Some(intro) = client::parse_introduction(&frame, &self.credentials.password) {
                return intro;
            }
        }
    }
}

/// The sans-IO TURN client (`gateway::proto::turn::client`) driven over one stream
/// (TURN over TCP or TLS): its messages written as frames, the server's frames
/// handed back to it. No retransmissions are needed on a stream, so its timers are
/// left alone.
pub struct StreamTurn<S> {
    /// The state machine.
    pub client: gateway::proto::turn::client::Client,
    /// The connection.
    pub stream: S,
    /// Peer data received while waiting for events: (peer, bytes).
    pub received: Vec<(SocketAddr, Vec<u8>)>,
}

impl<S: Read + Write> StreamTurn<S> {
    /// A client for `server` with REST credentials on `stream`.
    pub fn new(stream: S, server: SocketAddr, (username, password): (String, String)) -> Self {
        let config = gateway::proto::turn::client::ClientConfig::new(server, username, password);
        Self {
            client: gateway::proto::turn::client::Client::new(config, rand::random()),
            stream,
            received: Vec::new(),
        }
    }

    /// Writes what the client queued, then reads frames until it reports an event
    /// `wanted` accepts (others are dropped); peer data is kept in `received`.
    pub fn wait_event(
        &mut self,
        wanted: impl Fn(&gateway::proto::turn::client::TurnClientEvent) -> bool,
    ) -> gateway::proto::turn::client::TurnClientEvent {
        let server = self.client.server();
        loop {
            while let Some(transmit) = self.client.poll_transmit() {
                self.stream.write_all(&transmit.payload).expect("write");
                self.stream.flush().expect("flush");
            }
            while let Some(event) = self.client.poll_event() {
                if wanted(&event) {
                    return event;
                }
            }
            let frame = read_frame(&mut self.stream).expect("a frame from the gateway");
            let now = std::time::Instant::now();
            if let Some(data) = self.client.handle_datagram(now, server, &frame) {
                self.received.push((data.peer, data.data.to_vec()));
            }
        }
    }
}
