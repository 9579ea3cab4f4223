//! The gateway's configuration: a TOML file whose every field has a default, so
//! `gateway serve` runs with no file at all. Command-line flags override the file.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use crate::proto::peer_policy::{IpRange, PeerPolicy, PeerRange, RangeError};

/// The operator's parts of the relay's peer policy (see [`RelayConfig::peer_policy_parts`]).
#[derive(Clone, Debug)]
pub struct PeerPolicyParts {
    /// Ranges (with optional ports) the relay may reach although the defaults deny them.
    pub allowed: Vec<PeerRange>,
    /// Further ranges to deny.
    pub denied: Vec<IpRange>,
    /// The operator's NAT64 prefixes.
    pub nat64: Vec<IpRange>,
}

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys are errors too).
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file's path.
        path: String,
        /// The parser's message, with line and column.
        source: toml::de::Error,
    },
    /// A value is syntactically fine but unusable.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration of `gateway serve`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The UDP service (STUN framing on one port).
    pub server: ServerConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The kernel programs.
    pub ebpf: EbpfConfig,
    /// Authentication of peers and relay users.
    pub auth: AuthConfig,
    /// The TURN relay.
    pub relay: RelayConfig,
    /// Several nodes as one service, sharing the rendezvous through Redis.
    pub cluster: ClusterConfig,
    /// Logging: the filter (changeable on reload) and the format.
    pub log: LogConfig,
    /// TURN and the rendezvous over TLS.
    pub tls: TlsConfig,
}

/// TURN over TLS (RFC 8656 `turns:`) and the rendezvous over TLS: listeners that
/// serve, inside TLS 1.2 or 1.3, what the TCP service port serves. The certificate
/// and key are read again on SIGHUP and when the files change (checked every 10 s);
/// established connections keep theirs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Addresses to accept TLS on (typically `0.0.0.0:443` and `0.0.0.0:5349`);
    /// empty: no TLS. Needs a restart to change.
    pub listen: Vec<SocketAddr>,
    /// The certificate chain, PEM, leaf first (e.g. an ACME client's
    /// `fullchain.pem`).
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1), e.g. `privkey.pem`.
    pub key_file: Option<std::path::PathBuf>,
}

impl TlsConfig {
    fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Ok(());
        }
        if self.cert_file.is_none() || self.key_file.is_none() {
            return Err(ConfigError::Invalid(
                "tls.listen needs tls.cert_file and tls.key_file (--tls-cert, --tls-key)".into(),
            ));
        }
        for (i, addr) in self.listen.iter().enumerate() {
            if *addr == server.listen || self.listen[..i].contains(addr) {
                return Err(ConfigError::Invalid(format!(
                    "tls.listen: {addr} is listed twice or is server.listen (whose TCP port serves TCP)"
                )));
            }
        }
        Ok(())
    }
}

/// Logging. `--log-level` (or `GATEWAY_LOG`, `RUST_LOG`) and `--log-format` given
/// at start override these.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `info,gateway::turn=debug` (default:
    /// `info`). Changes apply on reload (SIGHUP).
    pub filter: Option<String>,
    /// `text` (one human-readable line per event, the default) or `json` (one JSON
    /// object per line with the event's fields); needs a restart to change.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message, the event's fields and
    /// its spans.
    Json,
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(filter) = &self.filter {
            tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
                ConfigError::Invalid(format!("log.filter {filter:?} is not a valid filter: {e}"))
            })?;
        }
        Ok(())
    }
}

/// Several gateway nodes as one service: each node writes the peers registered
/// with it to Redis and routes introductions to other nodes' peers through it.
/// Without `redis` the gateway runs alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Redis URLs (`redis://HOST:PORT`, or `rediss://` for TLS): one for a single
    /// Redis, or seed nodes of a Redis Cluster. Empty: no cluster.
    #[serde(deserialize_with = "one_or_many")]
    pub redis: Vec<String>,
    /// `single` (one Redis) or `cluster` (Redis Cluster, hash-slot sharding);
    /// `auto`: `cluster` with several URLs, else `single`.
    pub mode: ClusterMode,
    /// File holding the Redis password (AUTH), read at start; keep it readable by
    /// the gateway only. A password in the URL works too.
    pub password_file: Option<std::path::PathBuf>,
    /// This node's name in the cluster (default: the host name); unique per node.
    pub node_id: Option<String>,
    /// PEM file of the CA that signed Redis's certificate, for `rediss://` URLs
    /// (default: the system's trusted roots).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// How the Redis URLs are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// `cluster` with several URLs, `single` with one.
    #[default]
    Auto,
    /// One Redis server.
    Single,
    /// A Redis Cluster: the URLs are seed nodes.
    Cluster,
}

impl std::str::FromStr for ClusterMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "single" => Ok(Self::Single),
            "cluster" => Ok(Self::Cluster),
            other => Err(format!("{other:?}: expected auto, single or cluster")),
        }
    }
}

impl ClusterConfig {
    /// Whether the node is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }

    /// Whether the URLs name a Redis Cluster's seeds.
    pub fn is_redis_cluster(&self) -> bool {
        match self.mode {
            ClusterMode::Auto => self.redis.len() > 1,
            ClusterMode::Single => false,
            ClusterMode::Cluster => true,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for url in &self.redis {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::Invalid(format!(
                    "cluster.redis: {url:?} is not a redis:// or rediss:// URL"
                )));
            }
        }
        if self.mode == ClusterMode::Single && self.redis.len() > 1 {
            return Err(ConfigError::Invalid(
                "cluster.mode = \"single\" takes one cluster.redis URL (several are a Redis Cluster's seeds: mode = \"cluster\")".into(),
            ));
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return Err(ConfigError::Invalid(
                "cluster.node_id must be 1..=64 characters of A-Z a-z 0-9 - _ .".into(),
            ));
        }
        if !self.enabled()
            && (self.node_id.is_some()
                || self.password_file.is_some()
                || self.tls_ca_file.is_some())
        {
            return Err(ConfigError::Invalid(
                "cluster.node_id, cluster.password_file and cluster.tls_ca_file need cluster.redis"
                    .into(),
            ));
        }
        if self.tls_ca_file.is_some() && !self.redis.iter().all(|u| u.starts_with("rediss://")) {
            return Err(ConfigError::Invalid(
                "cluster.tls_ca_file is for rediss:// URLs: every cluster.redis URL must use TLS then"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Accepts `key = "one"` as well as `key = ["one", "two"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// The TURN relay (RFC 8656 over UDP on `server.listen`). It needs
/// `auth.secret_file`: relay users authenticate with the same REST credentials.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Serve TURN (when a secret is configured).
    pub enabled: bool,
    /// Also serve TCP on `server.listen`'s address and port, for clients whose
    /// networks block UDP: TURN over TCP (RFC 8656 §3.1; the relayed side stays UDP)
    /// and the rendezvous over TCP (the same STUN-framed messages).
    pub tcp: bool,
    /// The REALM of long-term credentials.
    pub realm: String,
    /// Relay addresses, at most one IPv4 and one IPv6. Empty: relay sockets open on
    /// the gateway address the client reached (right for a host with public
    /// addresses on its interfaces; set this behind 1:1 NAT or on multi-homed hosts).
    pub addresses: Vec<IpAddr>,
    /// Ports for relay sockets, `FIRST-LAST` (RFC 8656 suggests 49152-65535).
    pub port_range: String,
    /// Allocations in total (486 beyond).
    pub max_allocations: usize,
    /// Allocations per peer id (486 beyond).
    pub max_allocations_per_user: usize,
    /// Permissions per allocation (508 beyond).
    pub max_permissions: usize,
    /// Channels per allocation (508 beyond).
    pub max_channels: usize,
    /// Longest allocation lifetime granted, in seconds (at most 3600).
    pub max_lifetime_seconds: u64,
    /// Relayed bytes per second per allocation; 0 means no cap.
    pub bandwidth_bytes_per_second: u64,
    /// Peer ranges the relay may reach even though the default policy denies them
    /// (CIDR, e.g. "10.20.0.0/16", optionally with ports: "127.0.0.1:49152-65535",
    /// "[::1]:5000"); they also override the gateway's own addresses, except its
    /// service ports (STUN/TURN, discovery, metrics), which stay closed to peers.
    pub allowed_peer_ranges: Vec<String>,
    /// Further peer ranges to deny.
    pub denied_peer_ranges: Vec<String>,
    /// NAT64 prefixes of the operator's network (RFC 6052 lengths: /32, /40, /48,
    /// /56, /64, /96): a peer inside one is judged as the IPv4 address it embeds.
    /// `64:ff9b::/96` and the local-use `64:ff9b:1::/48` are always decoded.
    pub nat64_prefixes: Vec<String>,
    /// The kernel fast path for bound channels: "off" (default) or "ebpf" (start-up
    /// fails when it cannot be loaded).
    pub fast_path: FastPathMode,
    /// Interfaces the fast path attaches to (ingress). Empty: those carrying the
    /// listen and relay addresses (every interface that is up for an unspecified
    /// listen address).
    pub fast_path_interfaces: Vec<String>,
}

/// Whether the relay forwards bound channels in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// Every relayed datagram goes through the userspace relay.
    #[default]
    Off,
    /// An eBPF tc program relays bound channels between this gateway's clients.
    Ebpf,
}

impl std::str::FromStr for FastPathMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "ebpf" => Ok(Self::Ebpf),
            other => Err(format!("{other:?}: expected ebpf or off")),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tcp: true,
            realm: "gateway".into(),
            addresses: Vec::new(),
            port_range: "49152-65535".into(),
            max_allocations: 100_000,
            max_allocations_per_user: 32,
            max_permissions: 64,
            max_channels: 64,
            max_lifetime_seconds: 3600,
            bandwidth_bytes_per_second: 0,
            allowed_peer_ranges: Vec::new(),
            denied_peer_ranges: Vec::new(),
            nat64_prefixes: Vec::new(),
            fast_path: FastPathMode::Off,
            fast_path_interfaces: Vec::new(),
        }
    }
}

impl RelayConfig {
    /// The relay port range, parsed.
    pub fn ports(&self) -> Result<std::ops::RangeInclusive<u16>, ConfigError> {
        let bad = || {
            ConfigError::Invalid(format!(
                "relay.port_range {:?} is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
                self.port_range
            ))
        };
        let (first, last) = self.port_range.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(first..=last)
    }

    /// The operator's peer policy: allowed ranges (with ports), denied ranges and
    /// NAT64 prefixes, parsed and checked.
    pub fn peer_policy_parts(&self) -> Result<PeerPolicyParts, ConfigError> {
        fn parse<T: std::str::FromStr<Err = RangeError>>(
            key: &str,
            list: &[String],
        ) -> Result<Vec<T>, ConfigError> {
            list.iter()
                .map(|text| {
                    text.parse::<T>()
                        .map_err(|e| ConfigError::Invalid(format!("relay.{key}: {e}")))
                })
                .collect()
        }
        let nat64: Vec<IpRange> = parse("nat64_prefixes", &self.nat64_prefixes)?;
        // The same check the policy makes, so a bad prefix stops start-up here.
        PeerPolicy::default()
            .set_nat64_prefixes(nat64.clone())
            .map_err(|e| ConfigError::Invalid(format!("relay.nat64_prefixes: {e}")))?;
        Ok(PeerPolicyParts {
            allowed: parse("allowed_peer_ranges", &self.allowed_peer_ranges)?,
            denied: parse("denied_peer_ranges", &self.denied_peer_ranges)?,
            nat64,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.ports()?;
        self.peer_policy_parts()?;
        if self.realm.is_empty() || self.realm.len() > 127 || !self.realm.is_ascii() {
            return Err(ConfigError::Invalid(
                "relay.realm must be 1..=127 ASCII characters".into(),
            ));
        }
        let v4 = self.addresses.iter().filter(|a| a.is_ipv4()).count();
        let v6 = self.addresses.len() - v4;
        if v4 > 1 || v6 > 1 || self.addresses.iter().any(IpAddr::is_unspecified) {
            return Err(ConfigError::Invalid(
                "relay.addresses takes at most one IPv4 and one IPv6 address, not unspecified ones"
                    .into(),
            ));
        }
        if !(600..=3600).contains(&self.max_lifetime_seconds) {
            return Err(ConfigError::Invalid(
                "relay.max_lifetime_seconds must be 600..=3600 (RFC 8656's default and maximum)"
                    .into(),
            ));
        }
        if self.max_allocations == 0 || self.max_allocations_per_user == 0 {
            return Err(ConfigError::Invalid(
                "relay.max_allocations and max_allocations_per_user must be at least 1 (set relay.enabled = false to turn the relay off)".into(),
            ));
        }
        Ok(())
    }
}

/// Authentication of peers and relay users.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the shared secret from which REST-style credentials are derived
    /// (`gateway credentials` issues them). It must be readable by the gateway's
    /// user only (`chmod 600`): looser permissions are refused.
    pub secret_file: Option<std::path::PathBuf>,
    /// Several secret files, for rotation: `[new, old, ...]`. Credentials derived
    /// from any of them are accepted; new ones (`gateway credentials`) come from the
    /// first. Instead of `secret_file`, not with it.
    pub secret_files: Vec<std::path::PathBuf>,
    /// Whom a peer may Connect to: "any" registered peer (default: one trust
    /// domain), or "same-group": only peers whose credentials name the same group
    /// (`gateway credentials --group G` issues `expiry:G/peer`).
    pub connect: ConnectMode,
}

/// Most secret files accepted at once (each costs an HMAC per failed request).
pub const MAX_SECRET_FILES: usize = 8;

impl AuthConfig {
    /// The secret files, the current one first (empty: no rendezvous, no relay).
    pub fn secret_paths(&self) -> Vec<std::path::PathBuf> {
        match &self.secret_file {
            Some(path) => vec![path.clone()],
            None => self.secret_files.clone(),
        }
    }

    /// Whether a shared secret is configured.
    pub fn has_secret(&self) -> bool {
        self.secret_file.is_some() || !self.secret_files.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.secret_file.is_some() && !self.secret_files.is_empty() {
            return Err(ConfigError::Invalid(
                "auth.secret_file and auth.secret_files: set one (secret_files = [\"new\", \"old\"] to rotate)".into(),
            ));
        }
        if self.secret_files.len() > MAX_SECRET_FILES {
            return Err(ConfigError::Invalid(format!(
                "auth.secret_files takes at most {MAX_SECRET_FILES} files"
            )));
        }
        Ok(())
    }
}

/// `auth.connect`: whom a registered peer may be introduced to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectMode {
    /// Any registered peer.
    #[default]
    Any,
    /// Only peers of the same group.
    SameGroup,
}

impl ConnectMode {
    /// The rendezvous core's policy.
    pub fn policy(self) -> crate::proto::rendezvous::ConnectPolicy {
        match self {
            Self::Any => crate::proto::rendezvous::ConnectPolicy::Any,
            Self::SameGroup => crate::proto::rendezvous::ConnectPolicy::SameGroup,
        }
    }
}

/// The UDP service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port of the UDP socket (3478 is STUN's registered port).
    pub listen: SocketAddr,
    /// Up to three more UDP sockets answering STUN Binding only, for NAT behaviour
    /// discovery: typically one on `listen`'s address and another port, one on
    /// another address (and port) of the host. They also send the answers to
    /// CHANGE-REQUEST (RFC 5780) that arrive on `listen`. One address or a list.
    /// Empty (the default): with `discovery` on, one on `listen`'s address at
    /// `listen`'s port + 1 (3479).
    #[serde(deserialize_with = "one_or_more")]
    pub discovery_listen: Vec<SocketAddr>,
    /// NAT discovery without flags: bind the default discovery socket (see
    /// `discovery_listen`; a default port already taken is a warning, not an error)
    /// and name the discovery endpoints in every Register answer, so agents classify
    /// their NAT (and predict ports, punch birthday-style) by default. On by
    /// default; false binds no default socket and names nothing.
    pub discovery: bool,
    /// The second address named to peers for the address-dependence test, where
    /// the service port and the wildcard discovery sockets also answer (so only
    /// with a wildcard `listen`): "auto" (the default) picks another address of
    /// this host of the request's family and scope (public or private), none when
    /// the host has one address or the peer came through a NAT into another scope;
    /// "none" names none; or an IP address of this host.
    pub discovery_second_address: String,
    /// Answer CHANGE-REQUEST from requests without valid peer credentials too. Off by
    /// default: an answer from another endpoint is a reflection and amplification
    /// tool, so only authenticated peers get one.
    pub discovery_unauthenticated: bool,
    /// LAB ONLY. Forge TCP SYN-ACKs for server-assisted TCP splicing (technique 4 of
    /// docs/tcp-splicing.md): when both sides of an introduction send their initial
    /// sequence number with TCP-FORGE, the gateway sends each side's NAT a raw TCP
    /// SYN-ACK whose source address is SPOOFED as the other side's. That needs
    /// CAP_NET_RAW, is dropped by any network that filters spoofed sources (BCP 38),
    /// and lets the gateway inject packets into third parties' TCP flows. Off by
    /// default: such requests then get error 501.
    pub tcp_forge_synack: bool,
    /// Driver loops serving `listen` at once (each a task on its own runtime thread,
    /// sharing the socket and the rendezvous core); 0 means one per CPU, at most 4.
    /// One by default: more loops help only where cores are idle, and cost CPU per
    /// request (see docs/benchmarks.md).
    pub threads: usize,
    /// Another node's service address. While draining (SIGTERM), new registrations
    /// and allocations are answered 300 Try Alternate with this ALTERNATE-SERVER;
    /// without it they get an error saying the gateway is draining.
    pub alternate: Option<SocketAddr>,
    /// Longest drain, in seconds: after SIGTERM the gateway serves existing
    /// allocations and registrations until they end or this passes, then exits.
    /// 0 exits at once.
    pub drain_timeout: u64,
    /// Replies per second the gateway sends one source address (IPv4 address, IPv6
    /// /64) before it authenticates: Binding answers, 401 challenges and other
    /// errors; bursts of twice that. Bounds what a spoofed flood reflects at one
    /// victim. 0 lifts the budgets altogether (per source and in total): for
    /// benchmarks, whose whole load comes from one address.
    pub replies_per_source: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3478)),
            discovery_listen: Vec::new(),
            discovery: true,
            discovery_second_address: "auto".into(),
            discovery_unauthenticated: false,
            tcp_forge_synack: false,
            threads: 1,
            alternate: None,
            drain_timeout: 30,
            replies_per_source: crate::proto::budget::DEFAULT_PER_SOURCE,
        }
    }
}

/// Most driver loops `server.threads = 0` picks.
const MAX_AUTO_THREADS: usize = 4;
/// Most driver loops `server.threads` may ask for.
pub const MAX_THREADS: usize = 64;

/// Which second address Register answers name (`server.discovery_second_address`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondAddress {
    /// Another address of this host, of the request's family and scope.
    Auto,
    /// None.
    Off,
    /// This one.
    Fixed(std::net::IpAddr),
}

impl ServerConfig {
    /// The discovery sockets to bind, and whether the operator configured them
    /// (a default one that cannot be bound is only a warning).
    pub fn discovery_sockets(&self) -> (Vec<SocketAddr>, bool) {
        if !self.discovery_listen.is_empty() {
            return (self.discovery_listen.clone(), true);
        }
        match self.listen.port().checked_add(1) {
            Some(port) if self.discovery && self.listen.port() != 0 => {
                (vec![SocketAddr::new(self.listen.ip(), port)], false)
            }
            _ => (Vec::new(), false),
        }
    }

    /// `discovery_second_address` read.
    pub fn second_address(&self) -> Result<SecondAddress, ConfigError> {
        match self.discovery_second_address.trim() {
            "auto" => Ok(SecondAddress::Auto),
            "none" | "" => Ok(SecondAddress::Off),
            ip => ip.parse().map(SecondAddress::Fixed).map_err(|_| {
                ConfigError::Invalid(format!(
                    "server.discovery_second_address must be \"auto\", \"none\" or an IP address, not {ip:?}"
                ))
            }),
        }
    }

    /// Driver loops to run: `threads`, or with 0 one per CPU, at most 4.
    pub fn effective_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_AUTO_THREADS),
            n => n,
        }
    }
}

/// The most discovery sockets.
pub const MAX_DISCOVERY_LISTEN: usize = 3;

/// Reads one address or a list of them.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(SocketAddr),
        More(Vec<SocketAddr>),
    }
    Ok(match OneOrMore::deserialize(d)? {
        OneOrMore::One(addr) => vec![addr],
        OneOrMore::More(addrs) => addrs,
    })
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving `GET /metrics`; loopback by default so
    /// nothing is exposed until the operator decides to.
    pub listen: SocketAddr,
    /// Set to false to run without the HTTP endpoint.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9478)),
            enabled: true,
        }
    }
}

/// The kernel programs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// Try to load and attach the programs. Failing is logged and exported as
    /// `gateway_ebpf_loaded 0` unless `required` is set.
    pub enabled: bool,
    /// Refuse to start when the programs cannot be loaded and attached.
    pub required: bool,
    /// Interfaces to attach to; empty means every interface that is up.
    pub interfaces: Vec<String>,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            required: false,
            interfaces: Vec::new(),
        }
    }
}

impl Config {
    /// Parses a configuration from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Checks the values that the type system cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen.port() == 0 {
            return Err(ConfigError::Invalid(
                "server.listen needs a fixed port: peers must know where to reach the gateway"
                    .into(),
            ));
        }
        let discovery = &self.server.discovery_listen;
        if discovery.len() > MAX_DISCOVERY_LISTEN {
            return Err(ConfigError::Invalid(format!(
                "server.discovery_listen takes at most {MAX_DISCOVERY_LISTEN} addresses"
            )));
        }
        for (i, addr) in discovery.iter().enumerate() {
            if addr.port() == 0 || *addr == self.server.listen || discovery[..i].contains(addr) {
                return Err(ConfigError::Invalid(
                    "server.discovery_listen needs fixed ports, other than server.listen and each other's"
                        .into(),
                ));
            }
        }
        self.server.second_address()?;
        self.auth.validate()?;
        if let Some(alternate) = self.server.alternate
            && (alternate.port() == 0 || alternate.ip().is_unspecified())
        {
            return Err(ConfigError::Invalid(
                "server.alternate must be another node's address and port, e.g. \"203.0.113.8:3478\"".into(),
            ));
        }
        if self.server.discovery_unauthenticated && !self.auth.has_secret() {
            return Err(ConfigError::Invalid(
                "server.discovery_unauthenticated needs auth.secret_file: CHANGE-REQUEST is served by the rendezvous"
                    .into(),
            ));
        }
        if self.server.tcp_forge_synack && !self.auth.has_secret() {
            return Err(ConfigError::Invalid(
                "server.tcp_forge_synack needs auth.secret_file: TCP-Seq is served by the rendezvous"
                    .into(),
            ));
        }
        if self.server.threads > MAX_THREADS {
            return Err(ConfigError::Invalid(format!(
                "server.threads = {} is more than {MAX_THREADS}",
                self.server.threads
            )));
        }
        if self.ebpf.required && !self.ebpf.enabled {
            return Err(ConfigError::Invalid(
                "ebpf.required = true contradicts ebpf.enabled = false".into(),
            ));
        }
        self.relay.validate()?;
        self.tls.validate(&self.server)?;
        self.cluster.validate()?;
        self.log.validate()?;
        for name in &self.ebpf.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains('/') {
                return Err(ConfigError::Invalid(format!(
                    "ebpf.interfaces: {name:?} is not a valid interface name"
                )));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (what `gateway serve --print-config` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("", "test").expect("valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.server.listen.port(), 3478);
        assert!(config.metrics.listen.ip().is_loopback());
    }

    #[test]
    fn file_values_override_defaults() {
        let config = Config::from_toml(
            "[server]\nlisten = \"192.0.2.10:3479\"\n[ebpf]\ninterfaces = [\"eth0\"]\n",
            "test",
        )
        .expect("valid");
        assert_eq!(
            config.server.listen,
            "192.0.2.10:3479".parse().expect("addr")
        );
        assert_eq!(config.ebpf.interfaces, vec!["eth0".to_owned()]);
        assert!(config.metrics.enabled);
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        let err = Config::from_toml("[server]\nlisen = \"0.0.0.0:1\"\n", "gw.toml")
            .expect_err("typo must be refused");
        let text = err.to_string();
        assert!(text.contains("gw.toml"), "{text}");
        assert!(text.contains("lisen"), "{text}");
    }

    #[test]
    fn contradictions_are_refused() {
        assert!(Config::from_toml("[ebpf]\nenabled = false\nrequired = true\n", "t").is_err());
        assert!(Config::from_toml("[server]\nlisten = \"0.0.0.0:0\"\n", "t").is_err());
        assert!(Config::from_toml("[ebpf]\ninterfaces = [\"a/b\"]\n", "t").is_err());
        assert!(Config::from_toml("[server]\nthreads = 65\n", "t").is_err());
    }

    #[test]
    fn threads_default_to_one_and_zero_means_the_cpus_at_most_four() {
        assert_eq!(Config::default().server.effective_threads(), 1);
        let auto = Config::from_toml("[server]\nthreads = 0\n", "t").expect("valid");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(auto.server.effective_threads(), cpus.clamp(1, 4));
        let config = Config::from_toml("[server]\nthreads = 3\n", "t").expect("valid");
        assert_eq!(config.server.effective_threads(), 3);
    }

    #[test]
    fn relay_values_are_checked() {
        let config = Config::from_toml(
            "[relay]\nport_range = \"50000-50100\"\nallowed_peer_ranges = [\"10.1.0.0/16\"]\n",
            "t",
        )
        .expect("valid");
        assert_eq!(config.relay.ports().expect("range"), 50000..=50100);
        let config = Config::from_toml(
            "[relay]\nallowed_peer_ranges = [\"127.0.0.1:49152-65535\", \"[::1]:5000\"]\nnat64_prefixes = [\"2a00:1::/64\"]\n",
            "t",
        )
        .expect("ports and NAT64 prefixes");
        let parts = config.relay.peer_policy_parts().expect("parts");
        assert_eq!((parts.allowed.len(), parts.nat64.len()), (2, 1));
        for bad in [
            "[relay]\nport_range = \"5-1\"\n",
            "[relay]\nport_range = \"0-10\"\n",
            "[relay]\nport_range = \"49152\"\n",
            "[relay]\nallowed_peer_ranges = [\"10.1.0.1/16\"]\n",
            "[relay]\nallowed_peer_ranges = [\"127.0.0.1:0-10\"]\n",
            "[relay]\nnat64_prefixes = [\"2a00::/60\"]\n",
            "[relay]\nnat64_prefixes = [\"10.0.0.0/8\"]\n",
            "[relay]\ndenied_peer_ranges = [\"nonsense\"]\n",
            "[relay]\naddresses = [\"192.0.2.1\", \"192.0.2.2\"]\n",
            "[relay]\naddresses = [\"0.0.0.0\"]\n",
            "[relay]\nmax_lifetime_seconds = 7200\n",
            "[relay]\nrealm = \"\"\n",
        ] {
            let err = Config::from_toml(bad, "t").expect_err(bad);
            assert!(err.to_string().contains("relay."), "{bad}: {err}");
        }
    }

    #[test]
    fn discovery_is_on_by_default_at_the_next_port_and_can_be_turned_off() {
        let default = Config::default();
        assert_eq!(
            default.server.discovery_sockets(),
            (
                vec!["0.0.0.0:3479".parse::<SocketAddr>().expect("addr")],
                false
            )
        );
        assert_eq!(
            default.server.second_address().ok(),
            Some(SecondAddress::Auto)
        );
        let off = Config::from_toml(
            "[server]\ndiscovery = false\ndiscovery_second_address = \"none\"\n",
            "t",
        )
        .expect("off");
        assert_eq!(off.server.discovery_sockets(), (Vec::new(), false));
        assert_eq!(off.server.second_address().ok(), Some(SecondAddress::Off));
        // Configured sockets win, and are the operator's (a failure to bind is fatal).
        let set = Config::from_toml("[server]\ndiscovery_listen = \"192.0.2.10:4000\"\n", "t")
            .expect("set");
        assert_eq!(
            set.server.discovery_sockets(),
            (
                vec!["192.0.2.10:4000".parse::<SocketAddr>().expect("addr")],
                true
            )
        );
        let fixed = Config::from_toml("[server]\ndiscovery_second_address = \"192.0.2.11\"\n", "t")
            .expect("fixed");
        assert_eq!(
            fixed.server.second_address().ok(),
            Some(SecondAddress::Fixed("192.0.2.11".parse().expect("ip")))
        );
        let err = Config::from_toml("[server]\ndiscovery_second_address = \"yes\"\n", "t")
            .expect_err("not an address");
        assert!(
            err.to_string().contains("server.discovery_second_address"),
            "{err}"
        );
    }

    #[test]
    fn discovery_listen_takes_one_or_two_addresses() {
        let one = Config::from_toml("[server]\ndiscovery_listen = \"192.0.2.10:3479\"\n", "t")
            .expect("one address");
        assert_eq!(
            one.server.discovery_listen,
            vec!["192.0.2.10:3479".parse::<SocketAddr>().expect("addr")]
        );
        let two = Config::from_toml(
            "[server]\ndiscovery_listen = [\"192.0.2.10:3479\", \"192.0.2.11:3479\"]\n",
            "t",
        )
        .expect("two addresses");
        assert_eq!(two.server.discovery_listen.len(), 2);
        assert!(!two.server.discovery_unauthenticated, "off by default");
        for bad in [
            "[server]\ndiscovery_listen = [\"192.0.2.10:1\", \"192.0.2.10:2\", \"192.0.2.10:3\", \"192.0.2.10:4\"]\n",
            "[server]\ndiscovery_listen = [\"192.0.2.10:1\", \"192.0.2.10:1\"]\n",
            "[server]\ndiscovery_listen = \"0.0.0.0:3478\"\n",
            "[server]\ndiscovery_listen = \"0.0.0.0:0\"\n",
            "[server]\ndiscovery_unauthenticated = true\n",
        ] {
            let err = Config::from_toml(bad, "t").expect_err(bad);
            assert!(err.to_string().contains("server.discovery"), "{bad}: {err}");
        }
        Config::from_toml(
            "[server]\ndiscovery_unauthenticated = true\n[auth]\nsecret_file = \"/s\"\n",
            "t",
        )
        .expect("with a secret");
    }

    #[test]
    fn tcp_forging_is_off_by_default_and_needs_the_rendezvous() {
        assert!(!Config::default().server.tcp_forge_synack);
        let err =
            Config::from_toml("[server]\ntcp_forge_synack = true\n", "t").expect_err("no secret");
        assert!(err.to_string().contains("tcp_forge_synack"), "{err}");
        let on = Config::from_toml(
            "[server]\ntcp_forge_synack = true\n[auth]\nsecret_file = \"/s\"\n",
            "t",
        )
        .expect("with a secret");
        assert!(on.server.tcp_forge_synack);
    }

    #[test]
    fn tls_listeners_need_a_certificate_and_addresses_of_their_own() {
        assert!(Config::default().tls.listen.is_empty(), "no TLS by default");
        let ok = Config::from_toml(
            "[tls]\nlisten = [\"0.0.0.0:443\", \"0.0.0.0:5349\"]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
            "t",
        )
        .expect("valid");
        assert_eq!(ok.tls.listen.len(), 2);
        for bad in [
            "[tls]\nlisten = [\"0.0.0.0:443\"]\n",
            "[tls]\nlisten = [\"0.0.0.0:443\"]\ncert_file = \"/c.pem\"\n",
            "[tls]\nlisten = [\"0.0.0.0:443\", \"0.0.0.0:443\"]\ncert_file = \"/c\"\nkey_file = \"/k\"\n",
            "[tls]\nlisten = [\"0.0.0.0:3478\"]\ncert_file = \"/c\"\nkey_file = \"/k\"\n",
        ] {
            let err = Config::from_toml(bad, "t").expect_err(bad);
            assert!(err.to_string().contains("tls."), "{bad}: {err}");
        }
    }

    #[test]
    fn cluster_takes_one_url_or_seeds_and_checks_them() {
        let one = Config::from_toml("[cluster]\nredis = \"redis://10.0.0.5:6379\"\n", "t")
            .expect("one URL");
        assert!(one.cluster.enabled() && !one.cluster.is_redis_cluster());
        let seeds = Config::from_toml(
            "[cluster]\nredis = [\"redis://a:7000\", \"rediss://b:7000\"]\nnode_id = \"gw-1\"\n",
            "t",
        )
        .expect("seeds");
        assert!(seeds.cluster.is_redis_cluster());
        assert!(!Config::default().cluster.enabled());
        for bad in [
            "[cluster]\nredis = \"http://a:1\"\n",
            "[cluster]\nredis = [\"redis://a:1\", \"redis://b:1\"]\nmode = \"single\"\n",
            "[cluster]\nredis = \"redis://a:1\"\nnode_id = \"has space\"\n",
            "[cluster]\nnode_id = \"lonely\"\n",
            "[cluster]\nredis = \"redis://a:1\"\ntls_ca_file = \"/ca.pem\"\n",
        ] {
            assert!(
                matches!(Config::from_toml(bad, "t"), Err(ConfigError::Invalid(_))),
                "{bad}"
            );
        }
        let mut printed = Config::default();
        printed.cluster.redis = vec!["redis://a:1".into()];
        printed.cluster.node_id = Some("n1".into());
        let again = Config::from_toml(&printed.to_toml(), "printed").expect("round trip");
        assert_eq!(again, printed);
    }

    #[test]
    fn secret_files_alternate_drain_and_log_settings() {
        let config = Config::from_toml(
            "[auth]\nsecret_files = [\"/new\", \"/old\"]\n[server]\nalternate = \"203.0.113.8:3478\"\ndrain_timeout = 5\n[log]\nfilter = \"info,gateway=debug\"\nformat = \"json\"\n",
            "t",
        )
        .expect("valid");
        assert_eq!(
            config.auth.secret_paths(),
            vec![std::path::PathBuf::from("/new"), "/old".into()]
        );
        assert!(config.auth.has_secret());
        assert_eq!(config.server.drain_timeout, 5);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(Config::default().server.drain_timeout, 30);
        for (bad, key) in [
            (
                "[auth]\nsecret_file = \"/a\"\nsecret_files = [\"/b\"]\n",
                "auth.secret_file",
            ),
            (
                "[server]\nalternate = \"0.0.0.0:3478\"\n",
                "server.alternate",
            ),
            ("[log]\nfilter = \"gateway=[\"\n", "log.filter"),
        ] {
            let err = Config::from_toml(bad, "t").expect_err(bad);
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
        let err = Config::from_toml("[log]\nformat = \"xml\"\n", "gw.toml").expect_err("format");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn printed_config_parses_back() {
        let mut config = Config::default();
        config.ebpf.interfaces = vec!["lo".into()];
        config.server.discovery_listen = vec!["192.0.2.10:3479".parse().expect("addr")];
        let again = Config::from_toml(&config.to_toml(), "printed").expect("round trip");
        assert_eq!(again, config);
    }
}
