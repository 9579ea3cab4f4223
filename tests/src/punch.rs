//! A punching scenario in the lab: `gateway serve` (rendezvous and discovery) on the
//! public server and two `gateway peer` agents, alice connecting to bob, behind two
//! NATs or the same one. Used by the punch and matrix tests and `cargo xtask
//! punch-bench`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use gateway::proto::credentials::{Credentials, SharedSecret};

use crate::{
    daemon::{DaemonError, GatewayProcess, PeerProcess},
    lab::{Host, Lab, LabError, NatPreset, WanConditions},
};

/// The lab gateway's shared secret.
pub const SECRET: &[u8] = b"lab punch secret";
/// The gateway's other Binding endpoints in the lab (its discovery port and its second
/// address), as `gateway peer` flags.
pub const DISCOVER: &[&str] = &[
    "--discover",
    "192.0.2.10:3479",
    "--discover",
    "192.0.2.11:3478",
];
/// The gateway's service address in the lab.
pub const SERVICE: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10)),
    3478,
);

/// Where the two peers live.
#[derive(Clone, Debug)]
pub enum Topology {
    /// Alice behind the first preset, bob behind the second, two sites.
    TwoSites(NatPreset, NatPreset),
    /// Both behind one NAT of this preset (two hosts of one site).
    SameSite(NatPreset),
}

/// A running punching scenario; everything is torn down on drop.
#[derive(Debug)]
pub struct PunchLab {
    /// The lab (dropped last).
    pub lab: Lab,
    /// The gateway.
    pub gateway: GatewayProcess,
    /// The initiating agent.
    pub alice: PeerProcess,
    /// The responding agent.
    pub bob: PeerProcess,
    secret_path: PathBuf,
}

impl Drop for PunchLab {
    fn drop(&mut self) {
        std::fs::remove_file(&self.secret_path).ok();
    }
}

/// Credentials for `peer` under [`SECRET`], valid for an hour.
pub fn credentials(peer: &str) -> Credentials {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    SharedSecret::new(SECRET)
        .issue(peer, expiry)
        .unwrap_or_else(|e| panic!("peer id {peer:?}: {e}"))
}

fn hosts(lab: &Lab, topology: &Topology) -> Result<(Host, Host), LabError> {
    let missing = || LabError::Invalid("lab lacks a host".into());
    Ok(match topology {
        Topology::TwoSites(..) => (
            lab.site("a")
                .and_then(|s| s.host(0))
                .ok_or_else(missing)?
                .clone(),
            lab.site("b")
                .and_then(|s| s.host(0))
                .ok_or_else(missing)?
                .clone(),
        ),
        Topology::SameSite(_) => (
            lab.site("a")
                .and_then(|s| s.host(0))
                .ok_or_else(missing)?
                .clone(),
            lab.site("a")
                .and_then(|s| s.host(1))
                .ok_or_else(missing)?
                .clone(),
        ),
    })
}

/// Builds the lab, starts the gateway and bob, waits until bob is registered and
/// classified (at most 5 s: a UDP-blocked bob never is), then starts alice with
/// `--connect bob`. Both agents get [`DISCOVER`] plus their own extra flags.
pub fn start(
    topology: Topology,
    alice_args: &[&str],
    bob_args: &[&str],
) -> Result<PunchLab, DaemonError> {
    start_with_gateway(topology, &[], alice_args, bob_args)
}

/// [`start`], with extra `gateway serve` flags (e.g. `--tcp-forge-synack`).
pub fn start_with_gateway(
    topology: Topology,
    gateway_args: &[&str],
    alice_args: &[&str],
    bob_args: &[&str],
) -> Result<PunchLab, DaemonError> {
    start_under(
        topology,
        WanConditions::default(),
        gateway_args,
        alice_args,
        bob_args,
    )
}

/// [`start`] as the README's "Running the gateway yourself" runs it: no
/// `--discovery-listen` on the gateway, no `--discover` on the agents (they use the
/// endpoints the gateway names in its Register answer).
pub fn start_without_discovery_flags(
    topology: Topology,
    alice_args: &[&str],
    bob_args: &[&str],
) -> Result<PunchLab, DaemonError> {
    start_as(
        topology,
        false,
        WanConditions::default(),
        &|_| Ok(()),
        &[],
        alice_args,
        bob_args,
    )
}

/// [`start_with_gateway`] in a lab with WAN conditions (e.g. a
/// [`crate::lab::WanProfile`]'s): bob's registration and classification may then
/// take a few round trips longer, so it is waited for up to 10 s.
pub fn start_under(
    topology: Topology,
    wan: WanConditions,
    gateway_args: &[&str],
    alice_args: &[&str],
    bob_args: &[&str],
) -> Result<PunchLab, DaemonError> {
    start_prepared(
        topology,
        wan,
        &|_| Ok(()),
        gateway_args,
        alice_args,
        bob_args,
    )
}

/// [`start_under`], running `prepare` on the built lab before anything starts in it
/// (e.g. a core rule that blocks the direct path, to force the relay fallback).
pub fn start_prepared(
    topology: Topology,
    wan: WanConditions,
    prepare: &dyn Fn(&Lab) -> Result<(), LabError>,
    gateway_args: &[&str],
    alice_args: &[&str],
    bob_args: &[&str],
) -> Result<PunchLab, DaemonError> {
    start_as(
        topology,
        true,
        wan,
        prepare,
        gateway_args,
        alice_args,
        bob_args,
    )
}

/// Builds the lab (with `wan` conditions, `prepare` run on it) and starts
/// everything; `discovery_flags`: the gateway gets `--discovery-listen` and the
/// agents [`DISCOVER`].
fn start_as(
    topology: Topology,
    discovery_flags: bool,
    wan: WanConditions,
    prepare: &dyn Fn(&Lab) -> Result<(), LabError>,
    gateway_args: &[&str],
    alice_args: &[&str],
    bob_args: &[&str],
) -> Result<PunchLab, DaemonError> {
    let discover: &[&str] = if discovery_flags { DISCOVER } else { &[] };
    let delayed = !wan.is_ideal();
    let lab = match &topology {
        Topology::TwoSites(a, b) => Lab::builder()
            .site("a", a.clone())
            .site("b", b.clone())
            .wan(wan)
            .build()?,
        Topology::SameSite(p) => Lab::builder()
            .site_with_hosts("a", p.clone(), 2)
            .wan(wan)
            .build()?,
    };
    prepare(&lab)?;
    let (gateway, secret_path) = start_gateway_with(lab.server(), discovery_flags, gateway_args)?;
    let (host_a, host_b) = hosts(&lab, &topology)?;
    let (alice_creds, bob_creds) = (credentials("alice"), credentials("bob"));
    let mut args = discover.to_vec();
    args.extend_from_slice(bob_args);
    let mut bob = PeerProcess::start(
        &host_b,
        SERVICE,
        &bob_creds.username,
        &bob_creds.password,
        &args,
    )?;
    bob.wait_for(
        "nat mapping",
        Duration::from_secs(if delayed { 10 } else { 5 }),
    );
    let mut args = vec!["--connect", "bob"];
    args.extend_from_slice(discover);
    args.extend_from_slice(alice_args);
    let alice = PeerProcess::start(
        &host_a,
        SERVICE,
        &alice_creds.username,
        &alice_creds.password,
        &args,
    )?;
    Ok(PunchLab {
        lab,
        gateway,
        alice,
        bob,
        secret_path,
    })
}

/// Starts `gateway serve` on the lab's server (rendezvous with [`SECRET`], discovery
/// socket, relay, metrics on port 9478) with extra flags; returns it and the secret
/// file to delete afterwards.
pub fn start_gateway(
    lab: &Lab,
    gateway_args: &[&str],
) -> Result<(GatewayProcess, PathBuf), DaemonError> {
    start_gateway_on(lab.server(), gateway_args)
}

/// [`start_gateway`] on any public host of the lab (e.g. one of several servers):
/// the same flags, metrics on its first address, port 9478.
pub fn start_gateway_on(
    host: &Host,
    gateway_args: &[&str],
) -> Result<(GatewayProcess, PathBuf), DaemonError> {
    start_gateway_with(host, true, gateway_args)
}

/// [`start_gateway_on`], with `--discovery-listen 0.0.0.0:3479` only when
/// `discovery_listen` (without it, serve binds its default discovery socket, the
/// same port).
fn start_gateway_with(
    host: &Host,
    discovery_listen: bool,
    gateway_args: &[&str],
) -> Result<(GatewayProcess, PathBuf), DaemonError> {
    let secret_path = std::env::temp_dir().join(format!(
        "gw-punch-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    crate::daemon::write_secret(&secret_path, SECRET).map_err(|source| DaemonError::Io {
        what: "writing the secret".into(),
        source,
    })?;
    let secret_arg = secret_path.to_string_lossy().into_owned();
    let mut serve_args = vec!["--listen", "0.0.0.0:3478"];
    if discovery_listen {
        serve_args.extend_from_slice(&["--discovery-listen", "0.0.0.0:3479"]);
    }
    serve_args.extend_from_slice(&[
        "--no-ebpf",
        "--secret-file",
        &secret_arg,
        // The lab's "public" addresses are RFC 5737 documentation ranges, which
        // the relay's default policy denies as reserved.
        "--allow-peer",
        "198.51.100.0/24",
        "--allow-peer",
        "203.0.113.0/24",
        "--allow-peer",
        "192.0.2.0/24",
    ]);
    serve_args.extend_from_slice(gateway_args);
    let gateway = GatewayProcess::start(host, SocketAddr::from((host.addr(), 9478)), &serve_args)?;
    Ok((gateway, secret_path))
}

/// Which way two agents reached each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathSeen {
    /// Punched.
    Direct,
    /// Through the gateway's TURN relay.
    Relayed,
}

impl PunchLab {
    /// Waits for both agents to report a direct path; the initiator's elapsed time.
    pub fn wait_direct(&mut self, timeout: Duration) -> Option<Duration> {
        match self.wait_path(timeout)? {
            (PathSeen::Direct, elapsed) => Some(elapsed),
            (PathSeen::Relayed, _) => None,
        }
    }

    /// Waits for both agents to report a path (the first one each reports) and says
    /// which kind alice got, with her elapsed time.
    pub fn wait_path(&mut self, timeout: Duration) -> Option<(PathSeen, Duration)> {
        let line = self.alice.wait_for("path-up", timeout)?;
        self.bob.wait_for("path-up", Duration::from_secs(3))?;
        let kind = match line.split_whitespace().nth(3) {
            Some("direct") => PathSeen::Direct,
            _ => PathSeen::Relayed,
        };
        let elapsed = line
            .split_whitespace()
            .skip_while(|w| *w != "elapsed_ms")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)?;
        Some((kind, elapsed))
    }
}

/// A UDP "application" on each side: alice's (site a, host 0) sends to her forwarder
/// on 127.0.0.1:5000, bob's (site b, host 0) listens on 127.0.0.1:6000 where his
/// forwarder delivers (agents run with `--forward-listen 127.0.0.1:5000` and
/// `--forward-to 127.0.0.1:6000`). Alice's datagram must reach bob's application
/// and bob's answer come back; panics naming `what` otherwise.
pub fn udp_forward_both_ways(lab: &Lab, what: &str) {
    use std::net::UdpSocket;
    let app = |site: &str, bind: &'static str| -> UdpSocket {
        let app: UdpSocket = lab
            .site(site)
            .and_then(|s| s.host(0))
            .expect("host")
            .run(move || UdpSocket::bind(bind))
            .expect("namespace")
            .expect("bind");
        app.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        app
    };
    let (app_a, app_b) = (app("a", "127.0.0.1:0"), app("b", "127.0.0.1:6000"));
    let mut buf = [0u8; 1500];
    let mut from_forwarder = None;
    for attempt in 0..10 {
        let message = format!("{what} #{attempt}");
        app_a
            .send_to(message.as_bytes(), "127.0.0.1:5000")
            .expect("send");
        if let Ok((len, from)) = app_b.recv_from(&mut buf) {
            assert_eq!(&buf[..len], message.as_bytes());
            from_forwarder = Some(from);
            break;
        }
    }
    let from = from_forwarder.unwrap_or_else(|| panic!("alice's app never reached bob's ({what})"));
    app_b.send_to(b"pong", from).expect("reply");
    let (len, _) = app_a
        .recv_from(&mut buf)
        .expect("bob's answer reaches alice's app");
    assert_eq!(&buf[..len], b"pong");
}
