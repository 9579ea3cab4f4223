//! The `gateway` command line: the daemon and its tools.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gateway::config::LogFormat;
use gateway::{
    config::Config,
    ebpf::{AttachMode, EbpfError, EbpfProbe, WatchSpec},
    health::Health,
    lifecycle::{self, Services, Signals, Stop},
    logging,
    metrics::{self, Metrics},
    observe::{ObserveOptions, Observer},
    proto::{
        binding::Alternates,
        credentials::SharedSecret,
        rendezvous::{RendezvousConfig, RendezvousServer},
    },
    reload::Reloader,
    service, udp,
};

mod cli_assets;

/// `gateway --version`: the version, and whether the eBPF programs are inside.
#[cfg(gateway_ebpf_embedded)]
const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (eBPF programs embedded)");
#[cfg(not(gateway_ebpf_embedded))]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (built without the eBPF programs: run `cargo xtask build-ebpf`, then rebuild)"
);

/// Rendezvous and relay gateway for peer-to-peer NAT traversal.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    long_version = LONG_VERSION,
    about,
    long_about = "Rendezvous and relay gateway for peer-to-peer NAT traversal.\n\n\
        `gateway serve` runs on a public Linux host: it answers STUN Binding requests, \
        registers peers and introduces them so both punch a hole at the same instant, \
        relays for those who cannot (standard TURN over UDP and TCP), exports Prometheus \
        metrics, and counts its UDP traffic in the kernel with eBPF. `gateway peer` is \
        the agent on each NATed host: it punches (with port prediction, and birthday \
        punching toward random-port symmetric NATs), falls back to the relay when punching \
        fails, punches TCP too with --tcp (simultaneous open, low-TTL SYN first, \
        NATBlaster, and lab-only server-assisted splicing), and \
        with --ebpf-interface watches its punches in the kernel. `gateway \
        watch` does that watching alone, for hosts that run no agent, such as a Linux NAT \
        router.",
    after_help = "Not built yet (planned, see the project's issues): agents that fall back to \
        TCP and TLS by themselves (the gateway serves TURN and the rendezvous over both; \
        `gateway peer` speaks UDP)."
)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `gateway=trace`; RUST_LOG also works. Given
    /// at start it wins over the config's log.filter, also on reload [default: info].
    #[arg(long, global = true, env = "GATEWAY_LOG")]
    log_level: Option<String>,
    /// Log line format: `text`, or `json` (one JSON object per line with the event's
    /// fields: timestamp, level, message, target, spans) [default: text]
    /// [config: log.format].
    #[arg(long, global = true, env = "GATEWAY_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway daemon: the UDP service (STUN Binding; with --secret-file also
    /// the rendezvous and the TURN relay, UDP and TCP), /metrics, /healthz and
    /// /readyz over HTTP, and the eBPF traffic counters when it can load them.
    /// SIGHUP reloads the configuration and secret files (nothing established is
    /// dropped); SIGTERM drains (new registrations and allocations refused, existing
    /// ones served until they end or server.drain_timeout) and exits 0, a second
    /// SIGTERM stops at once; SIGINT stops at once. See docs/operations.md.
    Serve(ServeArgs),
    /// Issue credentials for a peer (TURN REST convention: username `expiry:peer-id`,
    /// password = base64 HMAC-SHA1 of it under the shared secret). Prints shell
    /// assignments GATEWAY_USERNAME=... and GATEWAY_PASSWORD=....
    Credentials(CredentialsArgs),
    /// Run the peer agent: register with a gateway, get introduced to another peer,
    /// punch a direct UDP path through both NATs, keep it alive and re-punch when it
    /// dies, and optionally carry a local UDP port over it. Prints one status line per
    /// event (registered, introduced, path-up direct|relayed, punch-failed,
    /// relay-fallback, path-down, and with several --server nodes one `server ...
    /// now using ...` line per failover). Pairs that cannot punch are relayed through
    /// the gateway's TURN relay and upgraded to direct when a later attempt works.
    Peer(PeerArgs),
    /// Watch punch flows in the kernel on a host that runs no agent, typically a
    /// Linux NAT router's WAN interface, and serve the counts on /metrics. Punch
    /// flows are those on the given local ports and, with --stun-cookie, any UDP flow
    /// carrying STUN (magic cookie 0x2112A442 at payload offset 4). Needs root or
    /// CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; stops on SIGINT/SIGTERM and detaches.
    Watch(WatchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to
    /// standard output, e.g. `gateway completions bash > /etc/bash_completion.d/gateway`
    /// (the Debian package installs them).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (gateway.1, gateway-serve.1, ...) into DIR (used to build
    /// the Debian package).
    #[command(hide = true)]
    GenerateMan {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "On a NAT router, attach to the WAN interface with --stun-cookie: \
    the programs run after SNAT on egress and before conntrack on ingress, so flows are \
    keyed by the router's external address and mapped port, and a peer's probe that \
    reaches the WAN before the inside host's first packet counts as a bounce \
    (before_egress). Add --ignore-remote for the rendezvous server's endpoints so \
    registrations are not counted as punches. See docs/operations.md."
)]
struct WatchArgs {
    /// Interface to attach to (repeatable).
    #[arg(long = "interface", value_name = "IFACE", required = true)]
    interfaces: Vec<String>,
    /// HTTP address of the Prometheus endpoint.
    #[arg(long, default_value = "127.0.0.1:9479")]
    metrics_listen: SocketAddr,
    /// Local UDP port whose flows are punch flows (repeatable); its datagrams are also
    /// counted in gateway_ebpf_udp_*.
    #[arg(long = "udp-port", value_name = "PORT")]
    udp_ports: Vec<u16>,
    /// Local TCP port whose flows are punch flows (repeatable): SYNs answered by a RST
    /// count as bounces (tcp_rst).
    #[arg(long = "tcp-port", value_name = "PORT")]
    tcp_ports: Vec<u16>,
    /// Any UDP datagram carrying the STUN magic cookie is a punch packet, on any port.
    #[arg(long)]
    stun_cookie: bool,
    /// Remote endpoint whose flows are never punch flows (repeatable): the rendezvous
    /// server and its discovery endpoints. Port 0 means every port of that address
    /// (e.g. GW:0 for the gateway's TURN relay ports).
    #[arg(long = "ignore-remote", value_name = "ADDR")]
    ignored_remotes: Vec<SocketAddr>,
    /// Seconds without an outbound packet after which a flow leaves the flow table
    /// (and is judged afresh if it comes back), as a NAT mapping would expire.
    #[arg(long, default_value_t = 120)]
    flow_idle_timeout: u64,
    /// How to attach: tcx (kernel >= 6.6), netlink (clsact qdisc + filter), or auto
    /// (TCX, falling back to netlink).
    #[arg(long, default_value = "auto")]
    attach: AttachMode,
}

#[derive(Debug, clap::Args)]
struct PeerArgs {
    /// The gateway's UDP address, `IP:PORT` or `HOST:PORT` (repeatable: the nodes of
    /// one gateway, in failover order; a HOST resolving to several addresses gives
    /// one node per address, in order). The agent registers with the first. With two
    /// or more nodes it sends its current node a STUN Binding every second and, when
    /// that node has answered nothing for 2.5 s, moves to the next (round-robin) and
    /// registers there at once (prints `server A no answer for 2.5 s; now using B`,
    /// then `registered with B public ADDR`): registered on the new node within 5 s
    /// of the old one's death. Direct paths stay up; relayed ones are set up again
    /// through the new node's relay; --discover endpoints belong to the first node
    /// and are not measured again. With one node: no heartbeat at all.
    #[arg(long, value_name = "HOST:PORT", required = true, action = clap::ArgAction::Append)]
    server: Vec<String>,
    /// Username from `gateway credentials` (`expiry:peer-id`).
    #[arg(long, env = "GATEWAY_USERNAME")]
    username: String,
    /// Password from `gateway credentials`.
    #[arg(long, env = "GATEWAY_PASSWORD", hide_env_values = true)]
    password: String,
    /// Local address of the agent's socket (0.0.0.0:0 picks a free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Peer id to connect to (the other side just waits to be introduced).
    #[arg(long)]
    connect: Option<String>,
    /// Carry a local UDP port: listen here, send what arrives to the peer, return the
    /// peer's data to the last local sender.
    #[arg(long, conflicts_with = "forward_to")]
    forward_listen: Option<SocketAddr>,
    /// Carry a local UDP port: deliver the peer's data to this address, and its
    /// replies back to the peer.
    #[arg(long)]
    forward_to: Option<SocketAddr>,
    /// Host candidate to announce (repeatable) [default: the bound address when it is
    /// not a wildcard].
    #[arg(long = "host-candidate")]
    host_candidates: Vec<SocketAddr>,
    /// Another endpoint of the gateway that answers Binding (its discovery port, its
    /// second address; repeatable): used to classify this host's NAT mapping; prints
    /// `nat mapping M filtering F port_preserved B` (filtering with
    /// --discover-filtering, else unknown). Without it, the endpoints the gateway
    /// names in its Register answer are used (a gateway names them by default).
    #[arg(long = "discover", value_name = "ADDR", conflicts_with = "no_discover")]
    discover: Vec<SocketAddr>,
    /// Do not classify this host's NAT with the endpoints the gateway names: no
    /// discovery Bindings, no port prediction (the class stays unknown).
    #[arg(long)]
    no_discover: bool,
    /// Also measure the NAT's filtering (signed RFC 5780 CHANGE-REQUEST tests to the
    /// --server port, before the mapping tests; needs --discover). Give the gateway
    /// discovery sockets that are not among the --discover endpoints: a router that
    /// accepts unsolicited packets itself can otherwise make the mapping look
    /// address-and-port-dependent.
    #[arg(long, requires = "discover")]
    discover_filtering: bool,
    /// Ports to predict (and announce) when discovery finds sequential port allocation
    /// behind an endpoint-dependent NAT; 0 turns prediction off.
    #[arg(long, default_value_t = 6)]
    prediction_window: u16,
    /// Seconds between registration refreshes; keep it below the NAT's UDP mapping
    /// timeout (RFC 4787 requires at least 120 s, some NATs use far less).
    #[arg(long, default_value_t = 15)]
    keepalive: u64,
    /// TTL of the opener probes sent when punching starts: enough hops to pass this
    /// host's own NAT(s), too few to reach the other side's; 0 disables the opener.
    #[arg(long, default_value_t = 2)]
    open_ttl: u8,
    /// Most probes one punch attempt may send (birthday punching has its own budget).
    #[arg(long, default_value_t = 200)]
    probe_budget: u32,
    /// Birthday punching when this host's NAT maps each destination to a random
    /// port and the other side's maps endpoint-independently: extra sockets to open
    /// toward the other side (each a new random mapping, held only during the
    /// attempt; 0 turns it off on this side; at most 512).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(0..=512))]
    birthday_sockets: u16,
    /// Birthday punching when the other side is the random-port one: probes to
    /// random ports of its public address per pass (0 turns it off on this side; at
    /// most 8192), and a second pass to other ports if nothing answered. With 256
    /// sockets on the other side, a pass of 2048 misses with probability about e^-8,
    /// both about e^-16.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(0..=8192))]
    birthday_probes: u32,
    /// Birthday probes per second at most.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    birthday_rate: u32,
    /// Do not ask the default router for a port mapping. By default the agent asks
    /// it, at start and in parallel, for a UDP mapping of its socket's port by PCP,
    /// NAT-PMP and UPnP-IGD, announces the first granted endpoint as a candidate (a
    /// peer then reaches this one directly even behind a random-port NAT), refreshes
    /// it, and deletes it on exit. Prints `port-mapping protocol P external ADDR
    /// lifetime S` or `port-mapping none: WHY`.
    #[arg(long)]
    no_port_mapping: bool,
    /// The gateway's TURN-over-TLS endpoint (`HOST` or `HOST:PORT`, port 443 by
    /// default; see `gateway serve --tls-listen`): the last transport the agent falls
    /// back to. When the gateway answers nothing over UDP for --transport-wait
    /// seconds the agent tries TCP to the --server address, then TLS here (the
    /// certificate must name HOST; the system's CAs and --tls-ca are trusted), then
    /// UDP again, waiting longer after each silent round. On TCP or TLS the relay
    /// leg is a TURN allocation over that connection. Prints `no answer from ADDR
    /// over udp for N s; trying tcp to ADDR`, then `registered public ADDR over tcp`.
    #[arg(long, value_name = "HOST[:PORT]")]
    server_tls: Option<String>,
    /// A PEM file of CA certificates to trust for --server-tls besides the
    /// system's (a private CA, or the gateway's self-signed certificate).
    #[arg(long, value_name = "PEM", requires = "server_tls")]
    tls_ca: Option<std::path::PathBuf>,
    /// Seconds without an answer from the gateway before the next transport (UDP,
    /// TCP, TLS) is tried.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=300))]
    transport_wait: u64,
    /// While on TCP or TLS, seconds between background tries of UDP (UDP is
    /// preferred again as soon as the gateway answers over it: punching needs it).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    udp_retry_interval: u64,
    /// Speak to the gateway over UDP only: no TCP or TLS fallback.
    #[arg(long, conflicts_with = "server_tls")]
    udp_only: bool,
    /// Never fall back to the gateway's TURN relay (by default a peer pair that
    /// cannot punch is relayed, and upgraded to direct when a later attempt works).
    #[arg(long)]
    no_relay: bool,
    /// Seconds between attempts to upgrade a relayed path to a direct one.
    #[arg(long, default_value_t = 30)]
    upgrade_interval: u64,
    /// Attach the eBPF punch observers to this interface (repeatable): the kernel
    /// then counts this agent's punched flows and bounced packets (its socket's port
    /// is watched, the gateway's endpoints are not). Needs root or CAP_BPF, CAP_PERFMON
    /// and CAP_NET_ADMIN; without them the agent runs on and says so.
    #[arg(long = "ebpf-interface", value_name = "IFACE")]
    ebpf_interfaces: Vec<String>,
    /// Serve this agent's Prometheus metrics (the eBPF counts) on this HTTP address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Refuse to start when the eBPF programs cannot be loaded and attached.
    #[arg(long, requires = "ebpf_interfaces")]
    require_ebpf: bool,
    /// TCP hole punching on every introduction, besides the UDP path (both sides
    /// must give the same value): `simultaneous-open` (both connect() to each
    /// other's TCP reflexive endpoint from the port the gateway saw, at the
    /// introduction's start, retried within RFC 5382's 6 s window), `low-ttl` (first
    /// a SYN with --open-ttl that opens our own NAT's mapping and dies before the
    /// other's, then the real connect()), `natblaster` (a low-TTL connect() whose
    /// SYN's sequence number is captured and swapped through the gateway, then
    /// crafted SYN-ACK / SYN packets; needs root: raw sockets and nftables),
    /// `server-assisted` (LAB ONLY: the same low-TTL SYN, but the gateway forges the
    /// SYN-ACKs into both NATs with SPOOFED source addresses; needs root here and a
    /// gateway run with --tcp-forge-synack, otherwise refused with error 501), or
    /// `auto` (the first three in turn, cheapest first, 6 s each; never
    /// server-assisted). The agent learns its TCP mapping with a STUN Binding over TCP to
    /// --server's TCP port at start. Prints `tcp-path-up peer P technique T remote A
    /// elapsed_ms N` or `tcp-punch-failed peer P technique T`. Measured per NAT type in
    /// docs/tcp-splicing.md: simultaneous open works through NATs that silently drop
    /// unsolicited SYNs; NATs that track sequence numbers (Linux) defeat low-ttl with
    /// kernel sockets.
    #[arg(long, value_name = "TECHNIQUE", value_parser = parse_tcp_mode)]
    tcp: Option<gateway::proto::tcp_punch::TcpMode>,
    /// Carry a local TCP port over the punched connection: accept one local
    /// connection here and splice it both ways.
    #[arg(long, requires = "tcp", conflicts_with = "tcp_forward_to")]
    tcp_forward_listen: Option<SocketAddr>,
    /// Carry a local TCP port over the punched connection: connect here once it is
    /// up and splice the two both ways.
    #[arg(long, requires = "tcp")]
    tcp_forward_to: Option<SocketAddr>,
}

fn parse_tcp_mode(s: &str) -> Result<gateway::proto::tcp_punch::TcpMode, String> {
    s.parse()
}

#[derive(Debug, clap::Args)]
struct CredentialsArgs {
    /// The peer's id: 1 to 64 characters of A-Z a-z 0-9 . _ -
    #[arg(long)]
    peer_id: String,
    /// The peer's group: the id becomes GROUP/PEER-ID. With auth.connect =
    /// "same-group", peers are introduced only within their group.
    #[arg(long)]
    group: Option<String>,
    /// How long the credentials stay valid, in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
    /// File holding the shared secret (mode 0600) [default: auth.secret_file, or the
    /// first of auth.secret_files, of --config].
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Configuration file to take auth.secret_file(s) from.
    #[arg(short, long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Clone, Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file; every key is optional (see docs/operations.md).
    /// Flags below override it.
    #[arg(short, long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// UDP address of the service [default: 0.0.0.0:3478].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP address of the Prometheus endpoint /metrics, and of /healthz (200 while
    /// every driver loop runs) and /readyz (200 when ready for new work; 503 while
    /// starting, draining, or with Redis unreachable) [default: 127.0.0.1:9478].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Do not serve /metrics (nor /healthz and /readyz).
    #[arg(long)]
    no_metrics: bool,
    /// Attach the eBPF programs to this interface (repeatable) [default: every
    /// interface that is up].
    #[arg(long = "ebpf-interface", value_name = "IFACE")]
    ebpf_interfaces: Vec<String>,
    /// Run without the eBPF programs.
    #[arg(long, conflicts_with = "require_ebpf")]
    no_ebpf: bool,
    /// Refuse to start when the eBPF programs cannot be loaded and attached.
    #[arg(long)]
    require_ebpf: bool,
    /// Another UDP address answering STUN Binding only, so peers can classify their
    /// NAT (repeatable, at most three times: another port of --listen's address, and another
    /// address and port of this host). With --secret-file these sockets also send the
    /// answers to RFC 5780 CHANGE-REQUEST (filtering discovery) that arrive on
    /// --listen: "change port" from the first kind, "change IP and port" from the
    /// second.
    #[arg(long = "discovery-listen", value_name = "ADDR")]
    discovery_listen: Vec<SocketAddr>,
    /// No default discovery socket (--listen's port + 1) and no discovery endpoints
    /// named in Register answers (server.discovery = false): agents then classify
    /// their NAT only with --discover.
    #[arg(long)]
    no_discovery: bool,
    /// Answer CHANGE-REQUEST without peer credentials too. AMPLIFIES: anyone can then
    /// make the gateway send from another endpoint to a spoofed address (answers
    /// share the 1000/s budget of unauthenticated errors). Off by default: requests
    /// without valid credentials get 401.
    #[arg(long)]
    discovery_unauthenticated: bool,
    /// LAB ONLY, SPOOFS SOURCE ADDRESSES. Forge TCP SYN-ACKs for server-assisted TCP
    /// splicing (`gateway peer --tcp server-assisted`): once both sides of an
    /// introduction gave their SYN's sequence number, send each side's NAT the SYN-ACK
    /// it expects, with the OTHER side's address as source (raw socket, needs
    /// CAP_NET_RAW). Networks that filter spoofed sources (BCP 38) drop it, and it lets
    /// the gateway inject packets into third parties' TCP flows: never on a shared
    /// network. Off by default (requests get error 501) [config: server.tcp_forge_synack].
    #[arg(long)]
    tcp_forge_synack: bool,
    /// Replies per second to one source address before it authenticates (Binding
    /// answers, challenges, errors; bursts of twice that); 0 lifts the budgets
    /// altogether, for benchmarks from one address [default: 50; config:
    /// server.replies_per_source].
    #[arg(long, value_name = "N")]
    replies_per_source: Option<u32>,
    /// Driver loops serving the UDP socket at once, sharing it and the rendezvous
    /// core; 0: one per CPU, at most 4 [default: 1].
    #[arg(long)]
    threads: Option<usize>,
    /// Shared-secret file for peer credentials; enables the rendezvous. Must be
    /// readable by the gateway's user only (chmod 600). Replaces auth.secret_file(s)
    /// of --config, also on reload; rotate with auth.secret_files instead.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Join a cluster of gateway nodes sharing the rendezvous through Redis
    /// (`redis://HOST:PORT`, `rediss://` for TLS). Repeatable: several URLs are the
    /// seed nodes of a Redis Cluster. Peers registered on any node can then be
    /// introduced to peers on any other; relays stay node-local. Needs the same
    /// --secret-file on every node. See docs/cluster.md [config: cluster.redis].
    #[arg(long = "cluster-redis", value_name = "URL")]
    cluster_redis: Vec<String>,
    /// This node's unique name in the cluster [default: the host name]
    /// [config: cluster.node_id].
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// How --cluster-redis URLs are used: single (one Redis), cluster (Redis Cluster
    /// seeds), auto (cluster with several URLs) [default: auto] [config: cluster.mode].
    #[arg(long, value_name = "MODE")]
    cluster_mode: Option<gateway::config::ClusterMode>,
    /// Do not serve TURN (the relay runs by default when a secret is configured).
    #[arg(long)]
    no_relay: bool,
    /// Serve UDP only on the service port (by default also TCP on the same port:
    /// TURN and the rendezvous over TCP).
    #[arg(long)]
    no_relay_tcp: bool,
    /// Serve TURN over TLS (`turns:`) and the rendezvous over TLS on this address
    /// too (repeatable; typically 0.0.0.0:443 and 0.0.0.0:5349); needs --tls-cert
    /// and --tls-key [config: tls.listen].
    #[arg(long = "tls-listen", value_name = "ADDR")]
    tls_listen: Vec<SocketAddr>,
    /// The TLS certificate chain, PEM, leaf first (e.g. an ACME client's
    /// fullchain.pem); read again on SIGHUP and when the file changes [config:
    /// tls.cert_file].
    #[arg(long = "tls-cert", value_name = "PEM")]
    tls_cert: Option<std::path::PathBuf>,
    /// The TLS private key, PEM [config: tls.key_file].
    #[arg(long = "tls-key", value_name = "PEM")]
    tls_key: Option<std::path::PathBuf>,
    /// REALM of the relay's long-term credentials [default: gateway].
    #[arg(long)]
    realm: Option<String>,
    /// Relay address (repeatable: one IPv4, one IPv6) [default: the gateway address
    /// each client reached].
    #[arg(long = "relay-address", value_name = "IP")]
    relay_addresses: Vec<std::net::IpAddr>,
    /// Ports for relay sockets, FIRST-LAST [default: 49152-65535].
    #[arg(long, value_name = "FIRST-LAST")]
    relay_port_range: Option<String>,
    /// Peer range the relay may reach although the default policy denies it, in CIDR
    /// with optional ports (repeatable), e.g. 10.20.0.0/16 or 127.0.0.1:49152-65535.
    /// Private, loopback, link-local, reserved and the gateway's own addresses are
    /// denied otherwise; the gateway's service ports stay closed even when allowed.
    #[arg(long = "allow-peer", value_name = "CIDR[:PORTS]")]
    allowed_peer_ranges: Vec<String>,
    /// Relay bound channels between this gateway's clients in the kernel (an eBPF tc
    /// program; IPv4; needs the eBPF object and root or CAP_BPF, CAP_PERFMON and
    /// CAP_NET_ADMIN): ebpf or off [default: off].
    /// With ebpf, start-up fails if the program cannot be loaded and attached.
    #[arg(long, value_name = "ebpf|off")]
    relay_fast_path: Option<gateway::config::FastPathMode>,
    /// Interface for the relay fast path (repeatable) [default: the interfaces of the
    /// listen and relay addresses].
    #[arg(long = "relay-fast-path-interface", value_name = "IFACE")]
    relay_fast_path_interfaces: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // RUST_LOG, then --log-level / GATEWAY_LOG: given at start, they pin the filter.
    let pinned = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .or(cli.log_level);
    let format = cli.log_format;
    let plain = {
        let pinned = pinned.clone();
        move || logging::init(format.unwrap_or_default(), pinned, None)
    };
    let result = match cli.command {
        // The daemon logs as its configuration says (log.format, log.filter).
        Command::Serve(args) => serve(args, format, pinned),
        Command::Credentials(args) => {
            plain();
            credentials(args)
        }
        Command::Peer(args) => {
            plain();
            peer(args)
        }
        Command::Watch(args) => {
            plain();
            watch(args)
        }
        Command::Completions { shell } => {
            plain();
            cli_assets::print_completions::<Cli>(shell)
        }
        Command::GenerateMan { dir } => {
            plain();
            cli_assets::write_man_pages::<Cli>(&dir)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn peer(args: PeerArgs) -> Result<()> {
    use gateway::{
        peer::{Forward, PeerOptions, TcpForward, TcpOptions},
        proto::{agent::AgentConfig, rendezvous::client::PeerCredentials},
    };
    let credentials = PeerCredentials {
        username: args.username,
        password: args.password,
    };
    let servers = gateway::peer::resolve_servers(&args.server)?;
    let Some(&first) = servers.first() else {
        anyhow::bail!("--server is required");
    };
    let mut agent = AgentConfig::new(first, credentials).with_servers(servers);
    agent.host_candidates = args.host_candidates;
    agent.probe_budget = args.probe_budget;
    agent.discovery = args.discover;
    agent.discover = !args.no_discover;
    agent.filtering = args.discover_filtering;
    agent.prediction_window = args.prediction_window;
    agent.open_ttl = args.open_ttl;
    agent.birthday_sockets = args.birthday_sockets;
    agent.birthday_probes = args.birthday_probes;
    agent.birthday_rate = args.birthday_rate;
    agent.relay = !args.no_relay;
    if args.upgrade_interval == 0 {
        anyhow::bail!("--upgrade-interval must be at least 1 second");
    }
    agent.upgrade_interval = std::time::Duration::from_secs(args.upgrade_interval);
    if args.keepalive == 0 {
        anyhow::bail!("--keepalive must be at least 1 second");
    }
    agent.keepalive = std::time::Duration::from_secs(args.keepalive);
    agent.transport_fallback = !args.udp_only;
    agent.transport_wait = std::time::Duration::from_secs(args.transport_wait);
    agent.udp_retry_interval = std::time::Duration::from_secs(args.udp_retry_interval);
    let tls = match &args.server_tls {
        Some(spec) => {
            let (host, addr) = gateway::peer::resolve_tls_endpoint(spec)?;
            agent.server_tls = Some(addr);
            Some(
                gateway::server_link::ServerTls::new(&host, args.tls_ca.as_deref())
                    .with_context(|| format!("--server-tls {spec}"))?,
            )
        }
        None => None,
    };
    let forward = match (args.forward_listen, args.forward_to) {
        (Some(addr), _) => Some(Forward::Listen(addr)),
        (None, Some(addr)) => Some(Forward::To(addr)),
        (None, None) => None,
    };
    let observe = (!args.ebpf_interfaces.is_empty() || args.metrics_listen.is_some()).then(|| {
        ObserveOptions {
            interfaces: args.ebpf_interfaces,
            metrics_listen: args.metrics_listen,
            require_ebpf: args.require_ebpf,
            ..ObserveOptions::default()
        }
    });
    let tcp = args.tcp.map(|mode| TcpOptions {
        mode,
        config: gateway::proto::tcp_punch::TcpPunchConfig {
            open_ttl: args.open_ttl,
            ..Default::default()
        },
        forward: match (args.tcp_forward_listen, args.tcp_forward_to) {
            (Some(addr), _) => Some(TcpForward::Listen(addr)),
            (None, Some(addr)) => Some(TcpForward::To(addr)),
            (None, None) => None,
        },
    });
    let options = PeerOptions {
        bind: args.bind,
        agent,
        connect: args.connect,
        forward,
        observe,
        tcp,
        port_mapping: !args.no_port_mapping,
        tls,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(gateway::peer::run(options, shutdown_signal()))?;
    Ok(())
}

fn watch(args: WatchArgs) -> Result<()> {
    if args.udp_ports.is_empty() && args.tcp_ports.is_empty() && !args.stun_cookie {
        anyhow::bail!(
            "nothing to watch: give --udp-port, --tcp-port or --stun-cookie (see --help)"
        );
    }
    if args.flow_idle_timeout == 0 {
        anyhow::bail!("--flow-idle-timeout must be at least 1 second");
    }
    let options = ObserveOptions {
        interfaces: args.interfaces,
        attach: args.attach,
        watch: WatchSpec {
            punch_udp_ports: args.udp_ports,
            punch_tcp_ports: args.tcp_ports,
            stun_cookie: args.stun_cookie,
            ignored_remotes: args.ignored_remotes,
            ..WatchSpec::default()
        },
        metrics_listen: Some(args.metrics_listen),
        require_ebpf: true,
        flow_idle_timeout: std::time::Duration::from_secs(args.flow_idle_timeout),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let observer = Observer::start(options).await?;
        shutdown_signal().await;
        drop(observer);
        tracing::info!("stopped");
        Ok(())
    })
}

fn credentials(args: CredentialsArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // New credentials come from the current secret: the first of auth.secret_files.
    let path = args
        .secret_file
        .or_else(|| config.auth.secret_paths().into_iter().next())
        .context("no shared secret: pass --secret-file FILE or set auth.secret_file in --config")?;
    let secret = gateway::secrets::read_secret_file(&path)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let expiry = now.checked_add(args.ttl).context("--ttl is too large")?;
    let peer_id = match &args.group {
        Some(group) if group.contains('/') => {
            anyhow::bail!("--group must not contain '/': it separates the group from the peer id")
        }
        Some(group) => format!("{group}/{}", args.peer_id),
        None => args.peer_id.clone(),
    };
    let issued = SharedSecret::new(&secret)
        .issue(&peer_id, expiry)
        .with_context(|| format!("cannot issue credentials for {peer_id:?}"))?;
    println!("GATEWAY_USERNAME={}", issued.username);
    println!("GATEWAY_PASSWORD={}", issued.password);
    Ok(())
}

fn effective_config(args: &ServeArgs, log_format: Option<LogFormat>) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    apply_flags(args, log_format, &mut config);
    config.validate()?;
    Ok(config)
}

/// Applies the flags over the file's configuration (at start, and again on every
/// reload: flags given at start keep overriding the file).
fn apply_flags(args: &ServeArgs, log_format: Option<LogFormat>, config: &mut Config) {
    if let Some(format) = log_format {
        config.log.format = format;
    }
    if let Some(per_source) = args.replies_per_source {
        config.server.replies_per_source = per_source;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    if args.no_discovery {
        config.server.discovery = false;
    }
    if !args.discovery_listen.is_empty() {
        config.server.discovery_listen = args.discovery_listen.clone();
    }
    if args.discovery_unauthenticated {
        config.server.discovery_unauthenticated = true;
    }
    if args.tcp_forge_synack {
        config.server.tcp_forge_synack = true;
    }
    if let Some(threads) = args.threads {
        config.server.threads = threads;
    }
    if let Some(path) = &args.secret_file {
        config.auth.secret_file = Some(path.clone());
        config.auth.secret_files.clear();
    }
    if args.no_metrics {
        config.metrics.enabled = false;
    }
    if args.no_relay {
        config.relay.enabled = false;
    }
    if args.no_relay_tcp {
        config.relay.tcp = false;
    }
    if !args.tls_listen.is_empty() {
        config.tls.listen = args.tls_listen.clone();
    }
    if let Some(path) = &args.tls_cert {
        config.tls.cert_file = Some(path.clone());
    }
    if let Some(path) = &args.tls_key {
        config.tls.key_file = Some(path.clone());
    }
    if !args.relay_addresses.is_empty() {
        config.relay.addresses = args.relay_addresses.clone();
    }
    if let Some(realm) = &args.realm {
        config.relay.realm = realm.clone();
    }
    if let Some(range) = &args.relay_port_range {
        config.relay.port_range = range.clone();
    }
    if let Some(mode) = args.relay_fast_path {
        config.relay.fast_path = mode;
    }
    if !args.relay_fast_path_interfaces.is_empty() {
        config.relay.fast_path_interfaces = args.relay_fast_path_interfaces.clone();
    }
    config
        .relay
        .allowed_peer_ranges
        .extend(args.allowed_peer_ranges.iter().cloned());
    if !args.ebpf_interfaces.is_empty() {
        config.ebpf.interfaces = args.ebpf_interfaces.clone();
    }
    if args.no_ebpf {
        config.ebpf.enabled = false;
        config.ebpf.required = false;
    }
    if args.require_ebpf {
        config.ebpf.enabled = true;
        config.ebpf.required = true;
    }
    if !args.cluster_redis.is_empty() {
        config.cluster.redis = args.cluster_redis.clone();
    }
    if let Some(id) = &args.node_id {
        config.cluster.node_id = Some(id.clone());
    }
    if let Some(mode) = args.cluster_mode {
        config.cluster.mode = mode;
    }
}

fn serve(args: ServeArgs, log_format: Option<LogFormat>, pinned: Option<String>) -> Result<()> {
    let config = effective_config(&args, log_format)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let log = logging::init(config.log.format, pinned, config.log.filter.as_deref());
    // Each allocation holds a socket: take every descriptor the hard limit allows.
    if let Err(e) = gateway::limits::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open-files limit (RLIMIT_NOFILE)");
    }
    let reload = ReloadSource {
        path: args.config.clone(),
        flags: Box::new(move |config: &mut Config| apply_flags(&args, log_format, config)),
        log,
    };
    // One runtime thread per driver loop at least, so the loops run in parallel.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.max(config.server.effective_threads()))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve_async(config, reload))
}

/// What Register answers name for NAT discovery: the bound discovery sockets, and
/// (with a wildcard service address) the second address `server.discovery_second_address`
/// picks among this host's addresses.
fn discovery_endpoints(
    config: &Config,
    local: SocketAddr,
    bound: &[SocketAddr],
) -> Result<gateway::proto::rendezvous::DiscoveryEndpoints> {
    use gateway::config::SecondAddress;
    let wildcard = local.ip().is_unspecified();
    let other_addresses = match config.server.second_address()? {
        SecondAddress::Off => Vec::new(),
        SecondAddress::Fixed(ip) => vec![ip],
        SecondAddress::Auto if wildcard => gateway::turn::host_addresses()
            .into_iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| {
                // Reachable by peers: not loopback, link-local, multicast or
                // unspecified; of the service socket's family (an IPv6 wildcard is
                // dual-stack).
                let link_local = match ip {
                    std::net::IpAddr::V4(v4) => v4.is_link_local(),
                    std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
                };
                !ip.is_loopback()
                    && !ip.is_multicast()
                    && !ip.is_unspecified()
                    && !link_local
                    && (local.is_ipv6() || ip.is_ipv4())
            })
            .collect(),
        SecondAddress::Auto => Vec::new(),
    };
    Ok(gateway::proto::rendezvous::DiscoveryEndpoints {
        service_port: local.port(),
        service_wildcard: wildcard,
        sockets: bound.to_vec(),
        other_addresses,
    })
}

/// Where a reload reads the configuration from, and how it applies the flags.
struct ReloadSource {
    path: Option<PathBuf>,
    flags: gateway::reload::ApplyFlags,
    log: logging::LogHandle,
}

async fn serve_async(config: Config, reload: ReloadSource) -> Result<()> {
    // First of all, so a SIGHUP during start-up does not kill the process.
    let mut signals = Signals::install().context("cannot install signal handlers")?;
    let health = Health::new();
    let metrics = Metrics::new()?;
    metrics
        .registry
        .register(Box::new(gateway::limits::FdCollector::new()?))?;
    let socket = udp::bind(config.server.listen)?;
    let local = socket.local_addr().context("service socket address")?;
    tracing::info!(udp = %local, "service listening");
    let mut discovery_sockets = Vec::new();
    let mut discovery_bound = Vec::new();
    let (discovery_addrs, configured) = config.server.discovery_sockets();
    for addr in discovery_addrs {
        match udp::bind(addr) {
            Ok(socket) => {
                discovery_sockets.push(socket);
                discovery_bound.push(addr);
                tracing::info!(udp = %addr, "discovery listening (STUN Binding only)");
            }
            // The default socket is a convenience: a port already taken costs the
            // agents their default classification, not the gateway its start.
            Err(e) if !configured => tracing::warn!(
                "default discovery socket unavailable ({e}); agents classify their NAT only with --discover (set server.discovery_listen, or server.discovery = false)"
            ),
            Err(e) => return Err(e.into()),
        }
    }

    // Bind now so a taken port stops start-up; serve only once everything else is
    // up, so a successful scrape means the daemon is ready.
    let metrics_listener = if config.metrics.enabled {
        Some(metrics::bind(config.metrics.listen).await?)
    } else {
        None
    };

    let probe = if config.ebpf.enabled {
        let mut ports = vec![local.port()];
        ports.extend(discovery_bound.iter().map(SocketAddr::port));
        let interfaces = if config.ebpf.interfaces.is_empty() {
            gateway::ebpf::interfaces_up()
        } else {
            config.ebpf.interfaces.clone()
        };
        // The server counts its own ports; its flows start with the peer's packet, so
        // they are not punch flows (every one would read as a bounce).
        let watch = WatchSpec {
            counted_udp_ports: ports,
            ..WatchSpec::default()
        };
        let loaded = if interfaces.is_empty() {
            Err(EbpfError::Aya {
                what: "no interface is up".into(),
                cause: "nothing to attach to".into(),
            })
        } else {
            EbpfProbe::load(&watch, &interfaces, AttachMode::Auto)
        };
        match loaded {
            Ok(probe) => {
                metrics.registry.register(Box::new(probe.collector()?))?;
                if config.ebpf.required {
                    let loaded = metrics.ebpf_loaded.clone();
                    health.add_check("eBPF programs required but not loaded", move || {
                        loaded.get() == 1
                    });
                }
                metrics.ebpf_loaded.set(1);
                metrics
                    .ebpf_attached_interfaces
                    .set(probe.interfaces().len() as i64);
                tracing::info!(interfaces = ?probe.interfaces(), port = local.port(), "eBPF counters attached");
                Some(probe)
            }
            Err(e) if config.ebpf.required => {
                return Err(e).context("eBPF is required (--require-ebpf / ebpf.required)");
            }
            Err(e) => {
                let hint = match e {
                    EbpfError::NotEmbedded | EbpfError::NotPermitted { .. } => "",
                    _ => " (use --no-ebpf to silence, --require-ebpf to make this fatal)",
                };
                tracing::warn!("eBPF counters unavailable, running without them: {e}{hint}");
                None
            }
        }
    } else {
        tracing::info!("eBPF disabled by configuration");
        None
    };

    let metrics_task = metrics_listener.map(|listener| {
        tracing::info!(url = %format!("http://{}/metrics", config.metrics.listen), "metrics listening (also /healthz, /readyz)");
        tokio::spawn(health.watch(
            "metrics-http",
            metrics::serve_with_health(listener, metrics.registry.clone(), Some(health.clone())),
        ))
    });
    let secret = if config.auth.has_secret() {
        let paths = config.auth.secret_paths();
        let secret = gateway::secrets::load(&paths).context("auth.secret_file(s)")?;
        tracing::info!(files = paths.len(), "shared secrets loaded");
        Some(secret)
    } else {
        None
    };
    let rendezvous = match &secret {
        Some(secret) => {
            tracing::info!("rendezvous enabled (register, connect, introductions)");
            let rendezvous_config = RendezvousConfig {
                connect_policy: config.auth.connect.policy(),
                replies_per_source: config.server.replies_per_source,
                ..RendezvousConfig::default()
            };
            let mut server =
                RendezvousServer::new(secret.clone(), rendezvous_config, rand::random());
            server.set_alternates(
                Alternates::new(local, discovery_bound.clone()),
                config.server.discovery_unauthenticated,
            );
            if config.server.discovery {
                let endpoints = discovery_endpoints(&config, local, &discovery_bound)?;
                tracing::info!(
                    sockets = ?endpoints.sockets,
                    second_addresses = ?endpoints.other_addresses,
                    "Register answers name the discovery endpoints"
                );
                server.set_discovery_endpoints(endpoints);
            }
            server.set_tcp_forge(config.server.tcp_forge_synack);
            if config.server.tcp_forge_synack {
                tracing::warn!(
                    "server.tcp_forge_synack is on: the gateway forges TCP SYN-ACKs with spoofed source addresses into peers' NATs (server-assisted splicing). LAB ONLY: BCP 38 networks drop them, and it lets the gateway inject packets into third parties' TCP flows"
                );
            }
            if config.server.discovery_unauthenticated {
                tracing::warn!(
                    "CHANGE-REQUEST is answered without credentials (server.discovery_unauthenticated): the gateway can be used for reflection"
                );
            }
            Some(Arc::new(Mutex::new(server)))
        }
        None => {
            tracing::info!(
                "rendezvous and relay disabled: no auth.secret_file (--secret-file); answering STUN Binding only"
            );
            None
        }
    };
    let client_socket = udp::service_socket(socket).context("cannot configure the UDP socket")?;
    let cluster = match (&rendezvous, config.cluster.enabled()) {
        (Some(core), true) => {
            let node = gateway::cluster::node_id(&config.cluster)?;
            gateway::rendezvous::lock(core).enable_cluster(node.clone());
            let link = gateway::cluster::start(
                &config.cluster,
                node.clone(),
                RendezvousConfig::default().lifetime,
                core.clone(),
                client_socket.clone(),
                metrics.clone(),
                Some(&health),
            )
            .context("cannot start the cluster driver")?;
            let link_state = link.clone();
            health.add_check("cluster: Redis unreachable", move || link_state.is_up());
            tracing::info!(node = %node, redis = ?config.cluster.redis, redis_cluster = config.cluster.is_redis_cluster(), "cluster enabled: sharing the rendezvous through Redis");
            Some(link)
        }
        (None, true) => {
            anyhow::bail!(
                "cluster.redis needs the rendezvous: set auth.secret_file (--secret-file)"
            )
        }
        (_, false) => None,
    };
    let relay = match &secret {
        Some(secret) if config.relay.enabled => Some(
            gateway::turn::start(
                &config,
                local,
                secret.clone(),
                client_socket.clone(),
                &metrics,
            )
            .context("cannot start the TURN relay")?,
        ),
        Some(_) => {
            tracing::info!("relay disabled by configuration");
            None
        }
        None => None,
    };
    if let (Some(core), Some(_)) = (&rendezvous, &relay) {
        // Relay-Offers must name an allocation of this relay (none without one).
        let endpoints = gateway::turn::relay_endpoints(&config, local)?;
        gateway::rendezvous::lock(core).set_relay_endpoints(Some(endpoints));
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut alternates = Vec::new();
    let mut discovery_tasks = Vec::new();
    for (i, socket) in discovery_sockets.into_iter().enumerate() {
        let socket =
            udp::service_socket(socket).context("cannot configure the discovery socket")?;
        alternates.push(socket.clone());
        discovery_tasks.push(tokio::spawn(health.watch(
            format!("udp-discovery-{i}"),
            service::run(
                socket,
                metrics.clone(),
                None,
                None,
                config.server.replies_per_source,
                wait(stopped.clone()),
            ),
        )));
    }
    // TCP on the service port and the TLS listeners: TURN and the rendezvous over
    // streams, sharing one set of connection limits.
    let mut stream_tasks = Vec::new();
    let mut tls = None;
    if relay.is_some() || rendezvous.is_some() {
        let streams = gateway::stream::StreamService::new(
            relay.clone(),
            rendezvous.clone(),
            client_socket.clone(),
            metrics.clone(),
            cluster.clone(),
        )?;
        if config.relay.tcp {
            let listener = tokio::net::TcpListener::bind(local)
                .await
                .with_context(|| format!("cannot listen for TCP on {local}"))?;
            tracing::info!(tcp = %local, "TURN and the rendezvous over TCP listening");
            stream_tasks.push(tokio::spawn(health.watch(
                "stream-tcp",
                gateway::stream::serve_tcp(listener, streams.clone()),
            )));
        }
        if let (false, Some(cert), Some(key)) = (
            config.tls.listen.is_empty(),
            &config.tls.cert_file,
            &config.tls.key_file,
        ) {
            let tls_metrics = gateway::tls::TlsMetrics::new(&metrics.registry)?;
            let loaded = gateway::tls::Tls::new(cert, key, tls_metrics)
                .context("tls.cert_file / tls.key_file (--tls-cert, --tls-key)")?;
            for &addr in &config.tls.listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for TLS on {addr}"))?;
                tracing::info!(tls = %addr, "TURN and the rendezvous over TLS listening");
                stream_tasks.push(tokio::spawn(health.watch(
                    format!("stream-tls-{addr}"),
                    gateway::tls::serve(listener, loaded.clone(), streams.clone()),
                )));
            }
            stream_tasks.push(tokio::spawn(loaded.clone().watch()));
            tls = Some(loaded);
        }
    } else if !config.tls.listen.is_empty() {
        tracing::warn!(
            "tls.listen is set but neither the relay nor the rendezvous runs (no auth.secret_file): nothing to serve over TLS"
        );
    }
    let threads = config.server.effective_threads();
    tracing::info!(threads, "UDP driver loops");
    let main_loops: Vec<_> = (0..threads)
        .map(|i| {
            tokio::spawn(health.watch(
                format!("udp-service-{i}"),
                service::run_with_alternates(
                    client_socket.clone(),
                    alternates.clone(),
                    metrics.clone(),
                    rendezvous.clone(),
                    relay.clone(),
                    cluster.clone(),
                    config.server.replies_per_source,
                    wait(stopped.clone()),
                ),
            ))
        })
        .collect();
    let services = Services {
        rendezvous: rendezvous.clone(),
        relay: relay.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        tls,
    };
    let mut reloader = Reloader::new(
        reload.path,
        reload.flags,
        config.clone(),
        local,
        services.clone(),
        Some(reload.log),
    );
    // Every listener, eBPF program and loop is up: the descriptor budget counts
    // what is open now, then READY=1 and the watchdog.
    let _watchdog = ready(&config, local, &main_loops, &rendezvous, &relay);
    health.set_started();
    tracing::info!("ready (SIGHUP reloads, SIGTERM drains, SIGINT stops)");
    let stop_reason = lifecycle::run(&mut signals, &mut reloader, &services).await;
    let _ = stop.send(true);
    for main_loop in main_loops {
        let _ = main_loop.await;
    }
    for task in discovery_tasks {
        let _ = task.await;
    }
    tracing::info!("shutting down");
    if let Some(task) = metrics_task {
        task.abort();
    }
    for task in stream_tasks {
        task.abort();
    }
    if let Some(probe) = probe {
        probe.detach();
    }
    if let Some(relay) = &relay {
        relay.stop_fast_path();
    }
    if let Stop::LoopEnded(name) = &stop_reason {
        anyhow::bail!(
            "driver loop {name} ended unexpectedly; exiting so the supervisor restarts the gateway"
        );
    }
    tracing::info!(reason = ?stop_reason, "stopped");
    Ok(())
}

/// Everything is bound and attached: budgets the descriptors left for relay
/// sockets, starts the systemd watchdog (with `WatchdogSec=`) over the driver loops
/// and the cores' locks, and tells systemd `READY=1` (with `Type=notify`).
fn ready(
    config: &Config,
    local: SocketAddr,
    main_loops: &[tokio::task::JoinHandle<()>],
    rendezvous: &Option<gateway::rendezvous::SharedRendezvous>,
    relay: &Option<Arc<gateway::turn::RelayShared>>,
) -> Option<tokio::task::JoinHandle<()>> {
    gateway::limits::seal_fd_budget(relay.as_ref().map(|_| config.relay.max_allocations));
    let mut probes: Vec<gateway::systemd::Probe> = Vec::new();
    if let Some(core) = rendezvous.clone() {
        probes.push(Box::new(move || drop(gateway::rendezvous::lock(&core))));
    }
    if let Some(relay) = relay.clone() {
        probes.push(Box::new(move || relay.probe_locks()));
    }
    gateway::systemd::notify_ready(&format!("serving on {local}"));
    gateway::systemd::spawn_watchdog(gateway::systemd::Liveness {
        tasks: main_loops
            .iter()
            .map(tokio::task::JoinHandle::abort_handle)
            .collect(),
        probes,
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
