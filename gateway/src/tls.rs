//! TLS for the stream listeners (TURN over TLS, RFC 8656 `turns:`, and the
//! rendezvous over TLS): the certificate and key (PEM files), read again on SIGHUP
//! and when the files change, rustls' server configuration (TLS 1.2 and 1.3, no
//! client certificates), and the handshake of each accepted connection with its
//! deadline and outcome counters. What runs inside the TLS stream is the stream
//! service of [`crate::stream`], the same as on the TCP port.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// The whole TLS handshake (from accept to the first application byte) must be
/// done within this long: a client that connects and stalls gives its slot back.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the certificate and key files are checked for changes (their
/// modification times and sizes): an ACME client's renewal is picked up within this
/// long even without a SIGHUP.
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Why a certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refuses the pair (an unsupported key, or a key that is not the
    /// certificate's).
    #[error("tls.cert_file and tls.key_file: {0}")]
    Key(rustls::Error),
}

/// The crypto provider every TLS listener uses: ring, as the Redis client's (rustls
/// 0.23.48 deprecates it for lacking post-quantum key exchange, which only its
/// aws-lc-rs provider has; that one needs a C toolchain and cmake to build, and TURN
/// relays carry data that is end-to-end protected by the peers anyway).
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain (`cert`, PEM, leaf first) and its private key (`key`,
/// PEM: PKCS#8, PKCS#1 or SEC1) and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let pem_error = |path: &Path, what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(pem_error(cert, "no CERTIFICATE in the file".into()));
    }
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error(key, format!("no usable private key: {e}")))?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(TlsError::Key)
}

/// The certificate in force, handed to every new handshake; replaced whole on a
/// reload (established connections keep the one they started with).
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The TLS counters.
#[derive(Clone)]
pub struct TlsMetrics {
    /// `gateway_tls_handshakes_total{outcome}`: ok, timeout, plaintext, error.
    pub handshakes: IntCounterVec,
    /// `gateway_tls_connections`: TLS connections open now (handshake done).
    pub connections: IntGauge,
    /// `gateway_tls_certificate_reloads_total{outcome}`: success, failed.
    pub reloads: IntCounterVec,
    /// `gateway_tls_certificate_expiry_seconds`: the notAfter of the certificate
    /// in force, Unix seconds (for an alert well before it passes).
    pub expiry: IntGauge,
}

impl TlsMetrics {
    /// Registers the counters in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "gateway_tls_handshakes_total",
                "TLS handshakes on the TLS listeners by outcome: ok, timeout (not done within the deadline), plaintext (the first bytes were not a TLS handshake record), error (refused by TLS, or closed)",
            ),
            &["outcome"],
        )?;
        let connections = IntGauge::new(
            "gateway_tls_connections",
            "TLS connections open now (handshake done)",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "gateway_tls_certificate_reloads_total",
                "Certificate and key re-reads (SIGHUP or a file change) by outcome: success, failed (the certificate in force is kept)",
            ),
            &["outcome"],
        )?;
        let expiry = IntGauge::new(
            "gateway_tls_certificate_expiry_seconds",
            "When the TLS certificate in force expires (its notAfter), Unix seconds; 0 when it cannot be read",
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(expiry.clone()))?;
        for outcome in ["ok", "timeout", "plaintext", "error"] {
            handshakes.with_label_values(&[outcome]);
        }
        for outcome in ["success", "failed"] {
            reloads.with_label_values(&[outcome]);
        }
        Ok(Self {
            handshakes,
            connections,
            reloads,
            expiry,
        })
    }
}

/// A certificate read from the files, with the state of the files it was read
/// from: what [`Tls::install`] puts in force.
pub struct Loaded {
    key: CertifiedKey,
    stamps: (Stamp, Stamp),
}

/// What identifies a version of a file without reading it.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The TLS side of the gateway: the server configuration every TLS listener
/// accepts with, and the certificate files it reloads.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    cert: PathBuf,
    key: PathBuf,
    stamps: Mutex<(Stamp, Stamp)>,
    /// Its counters.
    pub metrics: TlsMetrics,
}

impl Tls {
    /// Reads the certificate and key and builds the server configuration: TLS 1.3
    /// and 1.2 only, no client certificate asked for (a client cannot send one).
    pub fn new(cert: &Path, key: &Path, metrics: TlsMetrics) -> Result<Arc<Self>, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let loaded = load_certified_key(cert, key)?;
        metrics.expiry.set(expiry_of(&loaded));
        let current = Arc::new(Current(RwLock::new(Arc::new(loaded))));
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Key)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        Ok(Arc::new(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
            cert: cert.to_owned(),
            key: key.to_owned(),
            stamps: Mutex::new(stamps),
            metrics,
        }))
    }

    /// What accepts TLS connections with the certificate in force.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again (nothing changes yet: [`Self::install`] puts the
    /// result in force). A failure is counted, and the files' state is recorded so
    /// the file check does not retry the same broken files every tick.
    pub fn read(&self) -> Result<Loaded, TlsError> {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        let read = load_certified_key(&self.cert, &self.key);
        if read.is_err() {
            self.record(stamps);
            self.count(false);
        }
        read.map(|key| Loaded { key, stamps })
    }

    /// Puts a certificate read by [`Self::read`] in force for new handshakes
    /// (established connections keep theirs); counted as a successful reload.
    pub fn install(&self, loaded: Loaded) {
        self.metrics.expiry.set(expiry_of(&loaded.key));
        *self
            .current
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded.key);
        self.record(loaded.stamps);
        self.count(true);
    }

    /// Reads the files again and puts them in force; on failure the certificate in
    /// force stays. Counted either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.read().map(|loaded| self.install(loaded))
    }

    /// The files' state as last read, for [`Self::changed`].
    fn record(&self, stamps: (Stamp, Stamp)) {
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = stamps;
    }

    /// Counts a reload's outcome.
    fn count(&self, success: bool) {
        let outcome = if success { "success" } else { "failed" };
        self.metrics.reloads.with_label_values(&[outcome]).inc();
    }

    /// Whether either file changed (time or size) since it was last read.
    fn changed(&self) -> bool {
        let now = (stamp(&self.cert), stamp(&self.key));
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) != now
    }

    /// Checks the files every [`POLL_INTERVAL`] and reloads them when they changed
    /// (a renewal written by an ACME client). Runs until dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.changed() {
                continue;
            }
            // A renewal may be half written: the stamps are recorded either way, so
            // a failure is retried at the next change (or SIGHUP), not every tick.
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate changed on disk; reloaded")
                }
                Err(e) => tracing::error!(
                    "TLS certificate changed on disk but cannot be used; keeping the one in force: {e}"
                ),
            }
        }
    }
}

/// The first byte of a TLS handshake record (RFC 8446 §5.1, `handshake(22)`):
/// anything else on a TLS port is plaintext (a STUN message starts with 0x00 or
/// 0x01, ChannelData with 0x40-0x7F, HTTP with a letter).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Accepts TLS connections on `listener` under the stream service's limits (the
/// same slots and per-source share as the TCP port), shakes hands within
/// [`HANDSHAKE_TIMEOUT`] and serves each connection as the TCP port does. Serves
/// until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<Tls>,
    service: Arc<crate::stream::StreamService>,
) {
    let mut refused_logged = false;
    let mut errors = crate::limits::AcceptErrors::new("TLS");
    loop {
        let Some((stream, addr, admission)) = service
            .accept(
                &listener,
                crate::proto::Transport::Tls,
                &mut errors,
                &mut refused_logged,
            )
            .await
        else {
            continue;
        };
        let tls = tls.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let local = stream.local_addr().ok().map(|a| a.ip().to_canonical());
            if let Some(stream) = handshake(&tls, stream, addr).await {
                tls.metrics.connections.inc();
                crate::stream::serve_connection(
                    stream,
                    addr,
                    local,
                    crate::proto::Transport::Tls,
                    &service,
                )
                .await;
                tls.metrics.connections.dec();
            }
            drop(admission);
        });
    }
}

/// The TLS handshake of one accepted connection, within [`HANDSHAKE_TIMEOUT`];
/// counts its outcome. `None`: the connection is closed (dropped).
async fn handshake(
    tls: &Tls,
    stream: tokio::net::TcpStream,
    addr: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut first = [0u8; 1];
    let result = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Err(_) => Err("timeout"),
        Ok(Ok(0) | Err(_)) => Err("error"),
        Ok(Ok(_)) if first[0] != TLS_HANDSHAKE_RECORD => Err("plaintext"),
        Ok(Ok(_)) => match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
            Err(_) => Err("timeout"),
            Ok(Err(e)) => {
                tracing::debug!(%addr, "TLS handshake failed: {e}");
                Err("error")
            }
            Ok(Ok(stream)) => Ok(stream),
        },
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(outcome) => {
            tracing::debug!(%addr, outcome, "TLS connection closed before serving");
            outcome
        }
    };
    tls.metrics.handshakes.with_label_values(&[outcome]).inc();
    result.ok()
}

/// The notAfter of `key`'s end-entity certificate in Unix seconds; 0 when it cannot
/// be read.
fn expiry_of(key: &CertifiedKey) -> i64 {
    key.cert.first().and_then(|c| not_after(c)).unwrap_or(0)
}

/// One DER element: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The notAfter of an X.509 certificate (DER), Unix seconds: Certificate →
/// tbsCertificate → (the optional [0] version), serialNumber, signature, issuer,
/// validity → notAfter (RFC 5280 §4.1).
pub fn not_after(cert: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = der_element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der_element(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xA0 {
        rest = after;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2; // serialNumber, signature, issuer
    }
    let (SEQUENCE, validity, _) = der_element(rest)? else {
        return None;
    };
    let (_, _, after_not_before) = der_element(validity)?;
    let (tag, time, _) = der_element(after_not_before)?;
    let time = std::str::from_utf8(time).ok()?;
    let digits = time.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSSZ, years 1950-2049.
        0x17 if digits.len() == 12 => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        0x18 if digits.len() == 14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the civil-from-days
/// arithmetic on 400-year eras).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element of `tag` around `contents` (short or two-byte length).
    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(contents.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    fn certificate(version: bool, not_after: (u8, &str)) -> Vec<u8> {
        let mut tbs = Vec::new();
        if version {
            tbs.extend(der(0xA0, &der(0x02, &[2])));
        }
        tbs.extend(der(0x02, &[0x01, 0x23]));
        tbs.extend(der(0x30, &der(0x06, &[0x2A, 0x86, 0x48])));
        // An issuer long enough for a two-byte length.
        tbs.extend(der(0x30, &[0x31; 200]));
        let mut validity = der(0x17, b"260101000000Z");
        validity.extend(der(not_after.0, not_after.1.as_bytes()));
        tbs.extend(der(0x30, &validity));
        tbs.extend(der(0x30, &[0; 10]));
        let mut cert = der(0x30, &tbs);
        cert.extend(der(0x30, &[0; 4]));
        der(0x30, &cert)
    }

    #[test]
    fn the_expiry_is_read_from_utc_and_generalized_times() {
        // 2027-03-04 05:06:07 UTC.
        let expected = 1_804_136_767;
        assert_eq!(
            not_after(&certificate(true, (0x17, "270304050607Z"))),
            Some(expected)
        );
        assert_eq!(
            not_after(&certificate(false, (0x18, "20270304050607Z"))),
            Some(expected)
        );
        assert_eq!(
            not_after(&certificate(true, (0x18, "20500101000000Z"))),
            Some(2_524_608_000)
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        // Truncated or malformed: none, never a panic.
        let good = certificate(true, (0x17, "270304050607Z"));
        for len in 0..good.len() {
            let _ = not_after(&good[..len]);
        }
        assert_eq!(not_after(&certificate(true, (0x17, "2703040506Z"))), None);
        assert_eq!(not_after(&certificate(true, (0x17, "27030405060+Z"))), None);
        assert_eq!(not_after(&certificate(true, (0x04, "270304050607Z"))), None);
    }
}
