//! A real port-mapping router daemon on a site router: Debian's `miniupnpd`
//! (nftables backend), answering NAT-PMP, PCP and UPnP-IGD on the site's LAN.
//!
//! miniupnpd keeps its rules in chains of its own, in an `inet` table (its nftables
//! backend's family), which the lab creates with base chains that run just before
//! the router's own `ip lab` chains: its DNAT before the lab's, its SNAT (mapped
//! flows keep their external port toward every peer) before the lab's, its forward
//! accepts before the lab's filter. The lab's forward chain also accepts what was
//! DNATed (`ct status dnat`), since its filtering would drop unsolicited inbound
//! packets to a mapped port.
//!
//! miniupnpd refuses to serve when its WAN address is in a reserved range (the lab's
//! RFC 5737 addresses) unless its STUN self-check passes: it asks `stun` (the lab's
//! gateway, which must answer CHANGE-REQUEST from its other address and port without
//! credentials) whether unsolicited packets reach it. So the router's input accepts
//! the gateway's addresses, and the router's own packets leave with their ports (the
//! lab's SNAT applies to the LAN's).
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use super::{LabError, Site, netns};

/// The NAT-PMP and PCP port on the router's LAN address (RFC 6886, RFC 6887).
pub const NAT_PMP_PORT: u16 = 5351;
/// The UPnP HTTP port miniupnpd listens on in the lab.
pub const UPNP_HTTP_PORT: u16 = 5000;

/// Which port-mapping protocols a lab router answers: miniupnpd serves PCP and
/// NAT-PMP on one switch, so the lab drops the version it should not speak (the
/// first byte of a datagram to port 5351: 0 for NAT-PMP, 2 for PCP) in the router's
/// input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMappingProtocols {
    /// PCP (RFC 6887).
    pub pcp: bool,
    /// NAT-PMP (RFC 6886).
    pub nat_pmp: bool,
    /// UPnP-IGD.
    pub upnp: bool,
}

impl PortMappingProtocols {
    /// All three, as miniupnpd serves by default.
    pub const ALL: Self = Self {
        pcp: true,
        nat_pmp: true,
        upnp: true,
    };
    /// PCP alone.
    pub const PCP: Self = Self {
        pcp: true,
        nat_pmp: false,
        upnp: false,
    };
    /// NAT-PMP alone.
    pub const NAT_PMP: Self = Self {
        pcp: false,
        nat_pmp: true,
        upnp: false,
    };
    /// UPnP-IGD alone.
    pub const UPNP: Self = Self {
        pcp: false,
        nat_pmp: false,
        upnp: true,
    };
}

/// The nftables table miniupnpd writes to on a lab router.
const TABLE: &str = "upnp";

/// A running miniupnpd on a site router; killed (and its rules removed with the
/// namespace) on drop.
#[derive(Debug)]
pub struct PortMappingDaemon {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl PortMappingDaemon {
    /// What miniupnpd printed so far (it runs with `-d`, logging to stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the daemon still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for PortMappingDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The chains miniupnpd fills, with base chains a step ahead of the lab's.
fn upnp_ruleset() -> String {
    format!(
        "table inet {TABLE} {{
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat - 1; policy accept;
    jump prerouting_miniupnpd
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"
    )
}

impl Site {
    /// Starts miniupnpd on this site's router (NAT-PMP, PCP and UPnP-IGD on the LAN
    /// bridge, mappings for every LAN host and port 1024-65535), its STUN self-check
    /// against `stun`; waits until it serves or fails with its log.
    pub fn start_port_mapping(&self, stun: SocketAddr) -> Result<PortMappingDaemon, LabError> {
        self.start_port_mapping_with(stun, PortMappingProtocols::ALL)
    }

    /// [`Site::start_port_mapping`] answering only `protocols`.
    pub fn start_port_mapping_with(
        &self,
        stun: SocketAddr,
        protocols: PortMappingProtocols,
    ) -> Result<PortMappingDaemon, LabError> {
        let router = self.router.netns().to_owned();
        for (speaks, version) in [(protocols.nat_pmp, 0), (protocols.pcp, 2)] {
            if !speaks {
                let version = version.to_string();
                netns::run_cmd_in(
                    &router,
                    "nft",
                    &[
                        "insert", "rule", "ip", "lab", "input", "udp", "dport", "5351", "@th,64,8",
                        &version, "drop",
                    ],
                    None,
                )?;
            }
        }
        netns::run_cmd_in(&router, "nft", &["-f", "-"], Some(upnp_ruleset()))?;
        // Inbound packets miniupnpd DNATed pass the lab's filter (before its drops).
        let chain = netns::run_cmd_in(
            &router,
            "nft",
            &["-a", "list", "chain", "ip", "lab", "forward"],
            None,
        )?;
        let handle = chain
            .lines()
            .find(|l| l.contains("ct state established,related accept"))
            .and_then(|l| l.rsplit_once("# handle "))
            .map(|(_, h)| h.trim().to_owned())
            .ok_or_else(|| LabError::Invalid(format!("no established rule in {chain}")))?;
        netns::run_cmd_in(
            &router,
            "nft",
            &[
                "add", "rule", "ip", "lab", "forward", "position", &handle, "iifname", "wan", "ct",
                "status", "dnat", "accept",
            ],
            None,
        )?;
        // The router's own traffic keeps its ports (the lab's SNAT would randomise
        // them on a symmetric preset, and miniupnpd's STUN self-check would then
        // rightly find itself behind a symmetric NAT).
        let wan = self.router.addr().to_string();
        netns::run_cmd_in(
            &router,
            "nft",
            &[
                "insert", "rule", "ip", "lab", "post_nat", "oifname", "wan", "ip", "saddr", &wan,
                "accept",
            ],
            None,
        )?;
        // The STUN self-check's answers come from the gateway's other address and
        // port: unsolicited to the router's own input, which drops those by default.
        let [first, second] = super::SERVER_ADDRS;
        let servers = format!("{{ {first}, {second} }}");
        netns::run_cmd_in(
            &router,
            "nft",
            &[
                "insert", "rule", "ip", "lab", "input", "iifname", "wan", "ip", "saddr", &servers,
                "meta", "l4proto", "udp", "accept",
            ],
            None,
        )?;
        let dir = std::env::temp_dir().join(format!(
            "gw-miniupnpd-{}-{}-{}",
            std::process::id(),
            self.name,
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut conf = String::new();
        let _ = writeln!(conf, "ext_ifname=wan");
        let _ = writeln!(conf, "listening_ip=br0");
        let _ = writeln!(conf, "http_port={UPNP_HTTP_PORT}");
        let yes = |on: bool| if on { "yes" } else { "no" };
        let _ = writeln!(
            conf,
            "enable_natpmp={}",
            yes(protocols.pcp || protocols.nat_pmp)
        );
        let _ = writeln!(conf, "enable_upnp={}", yes(protocols.upnp));
        let _ = writeln!(conf, "secure_mode=yes");
        let _ = writeln!(conf, "system_uptime=yes");
        let _ = writeln!(conf, "notify_interval=60");
        let _ = writeln!(conf, "clean_ruleset_interval=600");
        let _ = writeln!(conf, "min_lifetime=10");
        let _ = writeln!(conf, "max_lifetime=86400");
        let _ = writeln!(conf, "ext_perform_stun=yes");
        let _ = writeln!(conf, "ext_stun_host={}", stun.ip());
        let _ = writeln!(conf, "ext_stun_port={}", stun.port());
        let _ = writeln!(conf, "upnp_table_name={TABLE}");
        let _ = writeln!(conf, "upnp_nat_table_name={TABLE}");
        let _ = writeln!(conf, "upnp_forward_chain=miniupnpd");
        let _ = writeln!(conf, "upnp_nat_chain=prerouting_miniupnpd");
        let _ = writeln!(conf, "upnp_nat_postrouting_chain=postrouting_miniupnpd");
        let _ = writeln!(
            conf,
            "uuid=3d3cec3a-8cf0-11e0-98ee-001a6b{:06x}",
            self.index
        );
        let _ = writeln!(conf, "allow 1024-65535 {} 1024-65535", self.lan);
        let _ = writeln!(conf, "deny 0-65535 0.0.0.0/0 0-65535");
        let conf_path = dir.join("miniupnpd.conf");
        let log = dir.join("miniupnpd.log");
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| LabError::Io { what, source }
        };
        std::fs::write(&conf_path, conf).map_err(io("writing miniupnpd.conf"))?;
        let log_file = std::fs::File::create(&log).map_err(io("creating the miniupnpd log"))?;
        let child = self
            .router
            .command("/usr/sbin/miniupnpd")
            .arg("-d")
            .arg("-f")
            .arg(&conf_path)
            .arg("-P")
            .arg(dir.join("miniupnpd.pid"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io("cloning the log"))?)
            .stderr(log_file)
            .spawn()
            .map_err(io(
                "starting /usr/sbin/miniupnpd (Debian's miniupnpd-nftables)",
            ))?;
        let mut daemon = PortMappingDaemon {
            child: Some(child),
            dir,
            log,
        };
        // Serving once its log says it listens for what it serves (after the STUN
        // self-check, which ends with "Port forwarding is now disabled" when it fails).
        let ready = if protocols.pcp || protocols.nat_pmp {
            "Listening for NAT-PMP/PCP traffic"
        } else {
            "HTTP listening on port"
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && daemon.running() {
            let log = daemon.log_text();
            if log.contains("Port forwarding is now disabled") {
                break;
            }
            if log.contains(ready) {
                return Ok(daemon);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LabError::Invalid(format!(
            "miniupnpd on {} did not serve (or its STUN self-check failed) within 15 s; its log:\n{}",
            self.router.role(),
            daemon.log_text()
        )))
    }
}
