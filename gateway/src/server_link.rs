//! The agent's TCP and TLS connections to its gateway: the I/O half of the
//! transport fallback (`proto::agent`'s `transport` module decides; this opens,
//! frames and closes). One connection per transport at most, opened on the first
//! message the agent sends over it; STUN and ChannelData framed as on the gateway's
//! side (RFC 8656 §3.1; ChannelData padded to four bytes); what the gateway sends
//! comes back as [`LinkNews::Frame`], and a connection that cannot be opened or ends
//! as [`LinkNews::Closed`]. Nothing here blocks the agent's loop: each connection is
//! its own task, fed through a bounded queue (a full queue drops, as UDP would).
use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};

use crate::proto::Transport;

/// How long opening a connection (TCP handshake, then TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A write that does not finish in this time ends the connection (the gateway
/// stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages queued per connection before new ones are dropped.
const QUEUE: usize = 1024;

/// Why the TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    /// `--tls-ca` could not be read or holds no certificate.
    #[error("cannot use {path} as a CA certificate: {why}")]
    Ca {
        /// The file.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// Neither the system store nor `--tls-ca` gave any trusted certificate.
    #[error(
        "no trusted CA certificates: the system store is empty or unreadable and no --tls-ca was given"
    )]
    NoRoots,
    /// The name to verify is neither a DNS name nor an IP address.
    #[error("`{0}` is not a host name or IP address a certificate can be checked against")]
    BadName(String),
}

/// The agent's TLS client toward the gateway's `turns:` endpoint: the name its
/// certificate must carry and the trusted roots.
#[derive(Clone)]
pub struct ServerTls {
    name: ServerName<'static>,
    connector: TlsConnector,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// A client that checks the gateway's certificate for `host` against the
    /// system's roots (Debian's ca-certificates) and the certificates in `ca`, if
    /// given (a private CA, or a self-signed gateway).
    pub fn new(host: &str, ca: Option<&Path>) -> Result<Self, TlsClientError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| TlsClientError::BadName(host.to_owned()))?;
        let mut roots = RootCertStore::empty();
        let system = rustls_native_certs::load_native_certs();
        for cert in system.certs {
            // A certificate the store holds but webpki cannot use is skipped.
            let _ = roots.add(cert);
        }
        if let Some(path) = ca {
            let ca_error = |why: String| TlsClientError::Ca {
                path: path.display().to_string(),
                why,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| ca_error(format!("not PEM: {e}")))?;
            if certs.is_empty() {
                return Err(ca_error("no CERTIFICATE in the file".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ca_error(format!("unusable certificate: {e}")))?;
            }
        }
        if roots.is_empty() {
            return Err(TlsClientError::NoRoots);
        }
        // The listeners' provider (crate::tls says why ring).
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsClientError::BadName(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            name,
            connector: TlsConnector::from(Arc::new(config)),
        })
    }
}

/// What a connection task tells the agent's loop.
#[derive(Debug)]
pub enum LinkNews {
    /// One STUN message or ChannelData frame from the gateway.
    Frame {
        /// TCP or TLS.
        transport: Transport,
        /// The gateway endpoint the connection goes to.
        from: SocketAddr,
        /// The frame.
        frame: Vec<u8>,
    },
    /// The connection could not be opened, or ended.
    Closed {
        /// TCP or TLS.
        transport: Transport,
        /// Which connection (a newer one of the same transport may be open).
        epoch: u64,
        /// Why, for the log.
        why: String,
    },
}

/// One open (or opening) connection.
struct Link {
    to: SocketAddr,
    epoch: u64,
    frames: mpsc::Sender<Vec<u8>>,
}

/// The agent's connections to its gateway, by transport.
pub struct ServerLinks {
    links: HashMap<Transport, Link>,
    tls: Option<ServerTls>,
    next_epoch: u64,
    news_tx: mpsc::Sender<LinkNews>,
    /// What the connections report; the agent's loop reads it.
    pub news: mpsc::Receiver<LinkNews>,
}

impl ServerLinks {
    /// No connection yet; `tls` checks the gateway's certificate on a TLS one.
    pub fn new(tls: Option<ServerTls>) -> Self {
        let (news_tx, news) = mpsc::channel(QUEUE);
        Self {
            links: HashMap::new(),
            tls,
            next_epoch: 0,
            news_tx,
            news,
        }
    }

    /// Sends `payload` to `to` over `transport` (TCP or TLS), opening the connection
    /// first if there is none to `to` (a connection to another endpoint of the same
    /// transport is dropped).
    pub fn send(&mut self, to: SocketAddr, transport: Transport, mut payload: Vec<u8>) {
        if crate::proto::turn::is_channel_data(&payload) {
            // RFC 8656 §12.5: padded to a multiple of four on a stream.
            payload.resize(payload.len().next_multiple_of(4), 0);
        }
        let fresh = self
            .links
            .get(&transport)
            .is_none_or(|l| l.to != to || l.frames.is_closed());
        if fresh {
            let Some(link) = self.open(to, transport) else {
                return;
            };
            self.links.insert(transport, link);
        }
        if let Some(link) = self.links.get(&transport)
            && link.frames.try_send(payload).is_err()
        {
            tracing::debug!(%to, transport = transport.as_str(), "stream queue full; message dropped");
        }
    }

    /// Closes the connections `keep` says are no longer needed (their tasks end
    /// when their queues are dropped; the closures they report are stale).
    pub fn retain(&mut self, mut keep: impl FnMut(Transport) -> bool) {
        self.links.retain(|&transport, _| keep(transport));
    }

    /// A connection reported closed: forget it if it is still the current one of
    /// its transport (then true: the agent must hear of it).
    pub fn closed(&mut self, transport: Transport, epoch: u64) -> bool {
        if self.links.get(&transport).is_some_and(|l| l.epoch == epoch) {
            self.links.remove(&transport);
            true
        } else {
            false
        }
    }

    fn open(&mut self, to: SocketAddr, transport: Transport) -> Option<Link> {
        let tls = match transport {
            Transport::Tls => match &self.tls {
                Some(tls) => Some(tls.clone()),
                None => {
                    tracing::warn!(%to, "a TLS message without a TLS client configured; dropped");
                    return None;
                }
            },
            Transport::Tcp => None,
            Transport::Udp => return None,
        };
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let (frames, queue) = mpsc::channel(QUEUE);
        let news = self.news_tx.clone();
        tokio::spawn(async move {
            let why = match connect_and_pump(to, transport, tls, queue, &news).await {
                Ok(()) => "closed".to_owned(),
                Err(why) => why,
            };
            tracing::info!(%to, transport = transport.as_str(), %why, "connection to the gateway ended");
            let _ = news
                .send(LinkNews::Closed {
                    transport,
                    epoch,
                    why,
                })
                .await;
        });
        Some(Link { to, epoch, frames })
    }
}

/// Opens the connection (TCP, then TLS when `tls`), then carries frames both ways
/// until either side ends. `Ok` when the agent dropped the queue or the gateway
/// closed cleanly.
async fn connect_and_pump(
    to: SocketAddr,
    transport: Transport,
    tls: Option<ServerTls>,
    queue: mpsc::Receiver<Vec<u8>>,
    news: &mpsc::Sender<LinkNews>,
) -> Result<(), String> {
    // A connection that cannot be opened is worth a warning (a certificate that
    // does not verify, a port that refuses): the status line only says it failed.
    let failed = |why: String| {
        tracing::warn!(%to, transport = transport.as_str(), %why, "cannot open a connection to the gateway");
        why
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| {
            failed(format!(
                "no TCP connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| failed(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => pump(tcp, to, transport, queue, news).await,
        Some(tls) => {
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, tls.connector.connect(tls.name, tcp))
                    .await
                    .map_err(|_| {
                        failed(format!(
                            "no TLS handshake within {} s",
                            CONNECT_TIMEOUT.as_secs()
                        ))
                    })?
                    .map_err(|e| failed(format!("TLS handshake failed: {e}")))?;
            pump(stream, to, transport, queue, news).await
        }
    }
}

/// Carries frames both ways on an open connection.
async fn pump<S>(
    stream: S,
    from: SocketAddr,
    transport: Transport,
    mut queue: mpsc::Receiver<Vec<u8>>,
    news: &mpsc::Sender<LinkNews>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        while let Some(frame) = queue.recv().await {
            match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err("the gateway stopped reading".to_owned()),
            }
        }
        let _ = writer.shutdown().await;
        Ok(())
    };
    let read = async {
        loop {
            let mut head = [0u8; 4];
            match reader.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("read failed: {e}")),
            }
            let len = crate::stream::frame_len(head)
                .map_err(|why| format!("bad frame from the gateway: {}", why.as_str()))?;
            let mut frame = vec![0u8; len];
            frame[..4].copy_from_slice(&head);
            reader
                .read_exact(&mut frame[4..])
                .await
                .map_err(|e| format!("read failed: {e}"))?;
            if news
                .send(LinkNews::Frame {
                    transport,
                    from,
                    frame,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    };
    tokio::select! {
        result = write => result,
        result = read => result,
    }
}
