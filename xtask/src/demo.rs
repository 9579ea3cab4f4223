//! `cargo xtask demo` and `cargo xtask lab`: the NAT lab for humans.
use std::{
    net::{SocketAddr, UdpSocket},
    str::FromStr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use gateway_tests::{
    cluster_lab,
    daemon::{GatewayProcess, PeerProcess, http_get, metric_value, stun_binding},
    lab::{self, Lab, LabAvailability, MAX_SERVERS, NatPreset},
    redis::RedisServer,
};

use crate::toolchain;

/// Where the demo's agents serve /metrics inside their namespaces.
const AGENT_METRICS: &str = "127.0.0.1:9479";

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// NAT preset of the first peer's site (see `cargo xtask lab presets`).
    #[arg(long, default_value = "restricted-cone")]
    site_a: String,
    /// NAT preset of the second peer's site.
    #[arg(long, default_value = "symmetric")]
    site_b: String,
    /// Keep the lab and the gateway running until Ctrl-C, to explore by hand.
    #[arg(long)]
    hold: bool,
    /// Skip `setup` and `build-ebpf` (when they were just run).
    #[arg(long)]
    no_setup: bool,
    /// Skip the TCP splice (two more hosts behind port-restricted cones, punched with
    /// `gateway peer --tcp auto`, a TCP connection forwarded over it).
    #[arg(long)]
    no_tcp: bool,
    /// Gateway nodes (1..=8). With 2 or more: Redis on the lab's public side and one
    /// `gateway serve --cluster-redis` per public server, sharing the rendezvous; the
    /// two peers of each pair register with different nodes, and each node's cluster
    /// metrics are printed.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Run Debian's miniupnpd (PCP, NAT-PMP and UPnP-IGD) on both peers' routers:
    /// each agent gets a port mapping (`port-mapping protocol pcp external ...`), the
    /// gateway checks it, and the pair punches directly through the mappings even
    /// behind two random-port NATs (`--site-a symmetric --site-b symmetric`).
    #[arg(long)]
    port_mapping: bool,
}

/// `cargo xtask lab ...`.
#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build a topology and keep it up until Ctrl-C, printing how to enter each host.
    Up {
        /// A site as NAME=PRESET (repeatable), e.g. `--site a=full-cone --site b=symmetric`.
        #[arg(long = "site", value_name = "NAME=PRESET", required = true)]
        sites: Vec<String>,
        /// WAN conditions on the core's links (see `cargo xtask lab profiles`).
        #[arg(long, default_value = "lan")]
        profile: String,
        /// Override one link's one-way delays (on top of the profile, which keeps its
        /// jitter, loss and reordering): `SITE=UP_MS/DOWN_MS`, or `gateway=UP_MS/DOWN_MS`
        /// for the public segment's link; up is toward the core (repeatable).
        #[arg(long = "link", value_name = "NAME=UP/DOWN")]
        links: Vec<String>,
    },
    /// List the NAT presets.
    Presets,
    /// List the WAN profiles (`lab up --profile NAME`).
    Profiles,
    /// Remove every namespace the lab ever made (also those of running tests).
    Clean,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Blocks until SIGINT or SIGTERM, so Drop guards tear the lab down afterwards.
fn wait_for_ctrl_c() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn require_lab() -> Result<()> {
    match lab::require_root() {
        LabAvailability::Available => Ok(()),
        LabAvailability::OptedOut => bail!("the lab needs root (GATEWAY_LAB_OPT_OUT is set)"),
    }
}

fn parse_preset(name: &str) -> Result<NatPreset> {
    NatPreset::from_str(name).map_err(|e| {
        let presets = NatPreset::all_named();
        let names: Vec<&str> = presets.iter().map(|p| p.name()).collect();
        anyhow!("{e}; presets: {}", names.join(", "))
    })
}

/// `cargo xtask lab ...`.
pub fn lab(command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Presets => {
            for preset in NatPreset::all_named() {
                println!("{:28} {}", preset.name(), preset.summary());
            }
            Ok(())
        }
        LabCommand::Clean => {
            let removed = lab::remove_all_namespaces()?;
            println!("removed {removed} lab namespaces");
            Ok(())
        }
        LabCommand::Profiles => {
            for profile in lab::WanProfile::ALL {
                println!("{:18} {}", profile.name(), profile.summary());
            }
            Ok(())
        }
        LabCommand::Up {
            sites,
            profile,
            links,
        } => {
            require_lab()?;
            let profile: lab::WanProfile = profile.parse()?;
            let mut wan = profile.conditions();
            for link in &links {
                let (name, delays) = link
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--link wants NAME=UP_MS/DOWN_MS, got {link:?}"))?;
                let (up, down) = delays
                    .split_once('/')
                    .and_then(|(u, d)| Some((u.parse::<u64>().ok()?, d.parse::<u64>().ok()?)))
                    .ok_or_else(|| anyhow!("--link wants NAME=UP_MS/DOWN_MS, got {link:?}"))?;
                let mut conditions = if name == "gateway" {
                    wan.gateway.clone()
                } else {
                    wan.site(name).clone()
                };
                conditions.up.delay = Duration::from_millis(up);
                conditions.down.delay = Duration::from_millis(down);
                wan = if name == "gateway" {
                    lab::WanConditions {
                        gateway: conditions,
                        ..wan
                    }
                } else {
                    wan.with_site(name, conditions)
                };
            }
            let mut builder = Lab::builder().wan(wan);
            for site in &sites {
                let (name, preset) = site
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--site wants NAME=PRESET, got {site:?}"))?;
                builder = builder.site(name, parse_preset(preset)?);
            }
            let lab = builder.build()?;
            println!("{}", lab.describe());
            println!("The lab is up. Press Ctrl-C to tear it down.");
            wait_for_ctrl_c();
            drop(lab);
            println!("lab removed");
            Ok(())
        }
    }
}

/// The demo's TCP splice: carol (site c) and dave (site d) punch a TCP connection with
/// `gateway peer --tcp auto`, and a TCP "application" on each side talks through it.
/// Returns the agents (they stop when dropped).
fn tcp_splice(
    lab: &Lab,
    [carol_node, dave_node]: [&Node; 2],
    secret: &gateway::proto::credentials::SharedSecret,
    expiry: u64,
) -> Result<(PeerProcess, PeerProcess)> {
    use std::io::{Read, Write};
    println!(
        "== TCP splice: `gateway peer --tcp auto` on two hosts behind port-restricted cones (sites c and d), carol connects to dave{}",
        if carol_node.service == dave_node.service {
            String::new()
        } else {
            format!(
                " (carol registers with {}, dave with {})",
                carol_node.name, dave_node.name
            )
        }
    );
    let host = |name: &str| {
        lab.site(name)
            .and_then(|s| s.host(0))
            .cloned()
            .ok_or_else(|| anyhow!("no host in site {name}"))
    };
    let (host_c, host_d) = (host("c")?, host("d")?);
    let carol_creds = secret.issue("carol", expiry)?;
    let dave_creds = secret.issue("dave", expiry)?;
    let mut dave = PeerProcess::start(
        &host_d,
        dave_node.service,
        &dave_creds.username,
        &dave_creds.password,
        &[
            "--tcp",
            "auto",
            "--tcp-forward-to",
            "127.0.0.1:6100",
            "--discover",
            &dave_node.discover[0],
            "--discover",
            &dave_node.discover[1],
        ],
    )?;
    dave.wait_for("tcp-mapped", Duration::from_secs(5));
    // Dave's application listens where his forwarder delivers.
    let app_d = host_d.tcp_listen_on("127.0.0.1:6100".parse()?)?;
    let mut carol = PeerProcess::start(
        &host_c,
        carol_node.service,
        &carol_creds.username,
        &carol_creds.password,
        &[
            "--connect",
            "dave",
            "--tcp",
            "auto",
            "--tcp-forward-listen",
            "127.0.0.1:5100",
            "--discover",
            &carol_node.discover[0],
            "--discover",
            &carol_node.discover[1],
        ],
    )?;
    let carol_verdict = carol.wait_for("tcp-p", Duration::from_secs(12));
    let dave_verdict = dave.wait_for("tcp-p", Duration::from_secs(3));
    for line in carol.seen().iter().filter(|l| l.starts_with("tcp")) {
        println!("   carol: {line}");
    }
    for line in dave.seen().iter().filter(|l| l.starts_with("tcp")) {
        println!("   dave:  {line}");
    }
    let up = |v: &Option<String>| v.as_deref().is_some_and(|l| l.starts_with("tcp-path-up"));
    if !(up(&carol_verdict) && up(&dave_verdict)) {
        println!(
            "   => no TCP path this time (docs/tcp-splicing.md lists what each NAT pair allows)"
        );
        return Ok((carol, dave));
    }
    let exchange = || -> Result<String> {
        let mut app_c = host_c.tcp_connect("127.0.0.1:5100".parse()?, Duration::from_secs(2))??;
        app_c.set_read_timeout(Some(Duration::from_secs(5)))?;
        app_c.write_all(b"hello dave, over punched TCP")?;
        app_d.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut conn = loop {
            match app_d.accept() {
                Ok((conn, _)) => break conn,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("dave's application got no connection: {e}"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut got = [0u8; 28];
        conn.read_exact(&mut got)?;
        conn.write_all(b"hello carol")?;
        let mut back = [0u8; 11];
        app_c.read_exact(&mut back)?;
        Ok(format!(
            "carol's app -> 127.0.0.1:5100 ~~ punched TCP ~~> dave's app got {:?}, and answered {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&back)
        ))
    };
    match exchange() {
        Ok(line) => println!("   forwarded: {line}"),
        Err(e) => println!("   forwarded: failed ({e:#})"),
    }
    Ok((carol, dave))
}

/// One gateway node of the demo (a one-node demo has one: the lab's server).
struct Node {
    /// `node-K` (its `--node-id`) in a cluster, `the gateway` alone.
    name: String,
    primary: std::net::Ipv4Addr,
    secondary: std::net::Ipv4Addr,
    /// Where peers register (primary address, port 3478).
    service: SocketAddr,
    /// Its other Binding endpoints, for `gateway peer --discover`.
    discover: [String; 2],
    metrics: SocketAddr,
    netns: String,
}

impl Node {
    fn new(k: usize, server: &lab::Host, cluster: bool) -> Self {
        let (primary, secondary) = (server.addrs()[0], server.addrs()[1]);
        Self {
            name: if cluster {
                cluster_lab::node_id(k)
            } else {
                "the gateway".to_owned()
            },
            primary,
            secondary,
            service: SocketAddr::from((primary, 3478)),
            discover: [
                SocketAddr::from((primary, 3479)).to_string(),
                SocketAddr::from((secondary, 3478)).to_string(),
            ],
            metrics: SocketAddr::from((primary, 9478)),
            netns: server.netns().to_owned(),
        }
    }
}

/// `cargo xtask demo`.
pub fn demo(args: DemoArgs) -> Result<()> {
    if !(1..=MAX_SERVERS).contains(&args.nodes) {
        bail!(
            "--nodes {}: the lab has room for 1 to {MAX_SERVERS}",
            args.nodes
        );
    }
    let cluster = args.nodes > 1;
    if !args.no_setup {
        toolchain::setup()?;
        toolchain::build_ebpf()?;
    }
    toolchain::build_host()?;
    require_lab()?;
    let preset_a = parse_preset(&args.site_a)?;
    let preset_b = parse_preset(&args.site_b)?;
    println!(
        "== building the NAT lab: site a = {}, site b = {}{}",
        preset_a.name(),
        preset_b.name(),
        if cluster {
            format!(
                "; {} public servers and a Redis host beside them",
                args.nodes
            )
        } else {
            String::new()
        }
    );
    let mut builder = Lab::builder().site("a", preset_a).site("b", preset_b);
    if !args.no_tcp {
        // The TCP splice's pair: NATs that drop unsolicited SYNs silently, through which
        // simultaneous open works (docs/tcp-splicing.md).
        builder = builder
            .site("c", NatPreset::port_restricted_cone())
            .site("d", NatPreset::port_restricted_cone());
    }
    if cluster {
        builder = builder.servers(args.nodes).redis_host();
    }
    let lab = builder.build()?;
    let nodes: Vec<Node> = lab
        .servers()
        .iter()
        .enumerate()
        .map(|(k, server)| Node::new(k, server, cluster))
        .collect();
    let secret_path =
        std::env::temp_dir().join(format!("gateway-demo-secret-{}", std::process::id()));
    std::fs::write(&secret_path, "demo shared secret")?;
    // The gateway refuses a secret file others may read.
    std::fs::set_permissions(
        &secret_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let secret_arg = secret_path.to_string_lossy().into_owned();
    let redis_dir = std::env::temp_dir().join(format!("gateway-demo-redis-{}", std::process::id()));
    let redis = if cluster {
        let host = lab
            .redis_host()
            .ok_or_else(|| anyhow!("the lab has no Redis host"))?;
        std::fs::create_dir_all(&redis_dir)?;
        let redis = RedisServer::start_in(host, &redis_dir).context("starting Redis in the lab")?;
        println!(
            "== starting Redis (redis-server) on the lab's Redis host {}: the nodes share the rendezvous through it",
            redis.addr()
        );
        Some(redis)
    } else {
        None
    };
    let mut gateways = Vec::new();
    for (node, server) in nodes.iter().zip(lab.servers()) {
        let (primary, secondary) = (node.primary, node.secondary);
        let mut serve_args: Vec<String> = [
            "--listen",
            "0.0.0.0:3478",
            "--discovery-listen",
            "0.0.0.0:3479",
            "--require-ebpf",
            "--secret-file",
            &secret_arg,
            // The lab's "public" addresses are RFC 5737 ranges, which the relay's
            // default peer policy denies as reserved.
            "--allow-peer",
            "198.51.100.0/24",
            "--allow-peer",
            "203.0.113.0/24",
            "--allow-peer",
            "192.0.2.0/24",
        ]
        .map(str::to_owned)
        .to_vec();
        if args.port_mapping {
            // miniupnpd's STUN self-check asks for answers from another address and
            // port (RFC 3489 CHANGE-REQUEST, unauthenticated): every discovery socket
            // on its own address, and such answers allowed.
            serve_args.splice(
                0..4,
                [
                    "--listen".to_owned(),
                    format!("{primary}:3478"),
                    "--discovery-listen".to_owned(),
                    format!("{primary}:3479"),
                    "--discovery-listen".to_owned(),
                    format!("{secondary}:3478"),
                    "--discovery-listen".to_owned(),
                    format!("{secondary}:3479"),
                    "--discovery-unauthenticated".to_owned(),
                ],
            );
        }
        if let Some(redis) = &redis {
            let k = gateways.len();
            println!(
                "== starting `gateway serve --cluster-redis {} --node-id {}` on public server {k} {primary} (and {secondary})",
                redis.url(),
                node.name
            );
            serve_args.extend(cluster_lab::cluster_args(redis, k));
        } else {
            println!(
                "== starting `gateway serve` on the lab's public server {primary} (and {secondary})"
            );
        }
        let serve_args: Vec<&str> = serve_args.iter().map(String::as_str).collect();
        gateways.push(
            GatewayProcess::start(server, node.metrics, &serve_args)
                .with_context(|| format!("starting {} in the lab", node.name))?,
        );
    }
    if cluster {
        cluster_lab::wait_cluster(&gateways, Duration::from_secs(10))?;
        println!(
            "   every node reaches Redis and sees {} nodes (their heartbeats in gw:nodes)",
            nodes.len()
        );
    }
    // Port mapping: the routers grant mappings (their STUN self-check asks the first
    // node); the daemons stop when the demo ends.
    let mut _routers = Vec::new();
    if args.port_mapping {
        let stun = SocketAddr::from((nodes[0].primary, 3478));
        for name in ["a", "b"] {
            let site = lab.site(name).ok_or_else(|| anyhow!("no site {name}"))?;
            println!(
                "== starting miniupnpd (PCP, NAT-PMP, UPnP-IGD) on site {name}'s router ({})",
                site.preset().name()
            );
            _routers.push(
                site.start_port_mapping(stun)
                    .with_context(|| format!("starting miniupnpd on site {name}'s router"))?,
            );
        }
    }
    // The two peers of a pair register with different nodes when there are several.
    let alice_node = &nodes[0];
    let bob_node = &nodes[1 % nodes.len()];

    if cluster {
        println!(
            "== each peer asks both addresses of its own node for its public (reflexive) address"
        );
    } else {
        println!("== each peer asks both server addresses for its public (reflexive) address");
    }
    for (site_name, node) in [("a", alice_node), ("b", bob_node)] {
        let site = lab
            .site(site_name)
            .ok_or_else(|| anyhow!("no site {site_name}"))?;
        let host = site
            .host(0)
            .ok_or_else(|| anyhow!("site {site_name} has no host"))?;
        let socket: UdpSocket = host.udp_bind(0)?;
        let local = socket.local_addr()?;
        let mut seen = Vec::new();
        for server_ip in [node.primary, node.secondary] {
            let to = SocketAddr::from((server_ip, 3478));
            let mapped = stun_binding(&socket, to, Duration::from_millis(500));
            seen.push(mapped);
            match mapped {
                Some(m) => println!(
                    "   peer {site_name} ({}) {local} -> {to}: seen as {m}",
                    site.preset().name()
                ),
                None => println!(
                    "   peer {site_name} ({}) {local} -> {to}: no answer",
                    site.preset().name()
                ),
            }
        }
        let verdict = match (seen[0], seen[1]) {
            (Some(x), Some(y)) if x == y => {
                "same public endpoint for both: endpoint-independent mapping, hole punching will work"
            }
            (Some(_), Some(_)) => {
                "a new public port per destination: endpoint-dependent (\"symmetric\") mapping, punching needs port prediction, birthday punching (against an endpoint-independent peer) or a relay"
            }
            _ => "no answer: UDP blocked or lost",
        };
        println!("   => {verdict}");
    }

    println!(
        "== hole punching: `gateway peer` on both hosts, alice (site a) connects to bob (site b){}",
        if cluster {
            format!(
                "; alice registers with {} ({}), bob with {} ({})",
                alice_node.name, alice_node.service, bob_node.name, bob_node.service
            )
        } else {
            String::new()
        }
    );
    let secret = gateway::proto::credentials::SharedSecret::new(b"demo shared secret");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let alice_creds = secret.issue("alice", expiry)?;
    let bob_creds = secret.issue("bob", expiry)?;
    let site_a = lab.site("a").ok_or_else(|| anyhow!("no site a"))?;
    let site_b = lab.site("b").ok_or_else(|| anyhow!("no site b"))?;
    let host_a = site_a.host(0).ok_or_else(|| anyhow!("no host"))?;
    let host_b = site_b.host(0).ok_or_else(|| anyhow!("no host"))?;
    let mut bob = PeerProcess::start(
        host_b,
        bob_node.service,
        &bob_creds.username,
        &bob_creds.password,
        &[
            "--forward-to",
            "127.0.0.1:6000",
            "--discover",
            &bob_node.discover[0],
            "--discover",
            &bob_node.discover[1],
            "--metrics-listen",
            AGENT_METRICS,
            "--ebpf-interface",
            "eth0",
        ],
    )?;
    bob.wait_for("nat mapping", Duration::from_secs(5));
    let mut alice = PeerProcess::start(
        host_a,
        alice_node.service,
        &alice_creds.username,
        &alice_creds.password,
        &[
            "--connect",
            "bob",
            "--forward-listen",
            "127.0.0.1:5000",
            "--discover",
            &alice_node.discover[0],
            "--discover",
            &alice_node.discover[1],
            "--metrics-listen",
            AGENT_METRICS,
            "--ebpf-interface",
            "eth0",
        ],
    )?;
    // Direct within a few round trips (birthday punching: about a second); a pair
    // that cannot punch is relayed after the 5 s punch window.
    let alice_up = alice.wait_for("path-up", Duration::from_secs(14));
    let bob_up = bob.wait_for("path-up", Duration::from_secs(3)).is_some();
    let relayed = alice_up.as_deref().is_some_and(|l| l.contains(" relayed "));
    let alice_up = alice_up.is_some();
    for line in alice.seen() {
        println!("   alice: {line}");
    }
    for line in bob.seen() {
        println!("   bob:   {line}");
    }
    if alice_up && bob_up {
        let app_a: UdpSocket = host_a.run(|| UdpSocket::bind("127.0.0.1:0"))??;
        let app_b: UdpSocket = host_b.run(|| UdpSocket::bind("127.0.0.1:6000"))??;
        app_b.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 1500];
        let mut delivered = false;
        for _ in 0..5 {
            app_a.send_to(b"hello bob", "127.0.0.1:5000")?;
            if let Ok((len, _)) = app_b.recv_from(&mut buf) {
                println!(
                    "   forwarded: alice's app -> 127.0.0.1:5000 ~~ {} ~~> bob's app got {:?}",
                    if relayed {
                        "through the gateway's TURN relay"
                    } else {
                        "direct path"
                    },
                    String::from_utf8_lossy(&buf[..len])
                );
                delivered = true;
                break;
            }
        }
        if !delivered {
            println!("   forwarded: nothing arrived");
        }
    } else {
        println!(
            "   => no path for this NAT pair (see docs/nat-matrix.md: UDP blocked on a side?)"
        );
    }
    let tcp_agents = if args.no_tcp {
        None
    } else {
        Some(tcp_splice(&lab, [alice_node, bob_node], &secret, expiry)?)
    };
    std::thread::sleep(Duration::from_millis(300));

    for (node, gateway) in nodes.iter().zip(&gateways) {
        print_gateway_metrics(node, gateway, cluster)?;
    }
    for (name, host) in [("alice", host_a), ("bob", host_b)] {
        println!("== {name}'s kernel view of the punch (eBPF, from the agent's /metrics)");
        let agent_addr: SocketAddr = AGENT_METRICS.parse()?;
        match http_get(host, agent_addr, "/metrics") {
            Ok(text) => {
                for line in text.lines().filter(|l| {
                    (l.starts_with("gateway_punched_flows_total")
                        || l.starts_with("gateway_bounced_packets_total")
                        || l.starts_with("gateway_ebpf_punch_time_seconds_count")
                        || l.starts_with("gateway_ebpf_punch_time_seconds_sum")
                        || l.starts_with("gateway_ebpf_flow_table_entries")
                        || l.starts_with("gateway_ebpf_loaded")
                        || l.starts_with("gateway_peer_sessions_total"))
                        && !l.ends_with(" 0")
                }) {
                    println!("   {line}");
                }
            }
            Err(e) => println!("   (no agent metrics: {e})"),
        }
    }
    for node in &nodes {
        println!(
            "== {}metrics URL (inside the lab): ip netns exec {} curl -s http://{}/metrics",
            if cluster {
                format!("{}'s ", node.name)
            } else {
                String::new()
            },
            node.netns,
            node.metrics
        );
    }
    if args.hold {
        println!("{}", lab.describe());
        if cluster {
            println!("Holding the lab, Redis and the gateway nodes up; press Ctrl-C to stop.");
        } else {
            println!("Holding the lab and the gateway up; press Ctrl-C to stop.");
        }
        wait_for_ctrl_c();
    }
    for (node, gateway) in nodes.iter().zip(gateways) {
        let status = gateway.stop()?;
        if cluster {
            println!(
                "== {} stopped ({status}); its eBPF programs detached",
                node.name
            );
        } else {
            println!("== gateway stopped ({status}); eBPF programs detached; removing the lab");
        }
    }
    if cluster {
        println!("== stopping Redis; removing the lab");
    }
    drop(alice);
    drop(bob);
    drop(tcp_agents);
    drop(redis);
    drop(lab);
    std::fs::remove_file(&secret_path).ok();
    std::fs::remove_dir_all(&redis_dir).ok();
    Ok(())
}

/// Prints a node's counters from its /metrics (and, in a cluster, its view of the
/// cluster).
fn print_gateway_metrics(node: &Node, gateway: &GatewayProcess, cluster: bool) -> Result<()> {
    let text = gateway.scrape()?;
    if cluster {
        println!("== {}'s counters (from /metrics)", node.name);
    } else {
        println!("== the gateway's counters (from /metrics)");
    }
    let mut series = vec![
        ("gateway_ebpf_loaded", ""),
        ("gateway_ebpf_udp_packets_total", "direction=\"ingress\""),
        ("gateway_ebpf_udp_packets_total", "direction=\"egress\""),
        ("gateway_ebpf_udp_bytes_total", "direction=\"ingress\""),
        ("gateway_ebpf_udp_bytes_total", "direction=\"egress\""),
        ("gateway_udp_received_datagrams_total", ""),
        (
            "gateway_stun_datagrams_total",
            "outcome=\"binding_success\"",
        ),
        ("gateway_registered_peers", ""),
    ];
    if cluster {
        // Whether it reaches Redis, how many nodes it sees, and the Connects to a
        // peer of another node it handled (counted on the initiator's node only).
        series.extend([
            ("gateway_cluster_up", ""),
            ("gateway_cluster_nodes", ""),
            (
                "gateway_cluster_introductions_total",
                "outcome=\"introduced\"",
            ),
        ]);
    }
    for (name, labels) in series {
        let value = metric_value(&text, name, labels)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "(absent)".into());
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{labels}}}")
        };
        println!("   {series} {value}");
    }
    for line in text.lines().filter(|l| {
        (l.starts_with("gateway_punch_attempts_total")
            || l.starts_with("gateway_punch_outcomes_total")
            || l.starts_with("gateway_tcp_punch_attempts_total")
            || l.starts_with("gateway_turn_allocations")
            || l.starts_with("gateway_relay_packets_total")
            || (cluster
                && (l.starts_with("gateway_cluster_introductions_total")
                    && !l.contains("outcome=\"introduced\"")
                    || l.starts_with("gateway_cluster_messages_total"))))
            && !l.ends_with(" 0")
    }) {
        println!("   {line}");
    }
    Ok(())
}
