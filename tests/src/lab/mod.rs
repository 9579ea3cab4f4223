//! The NAT lab: topologies of network namespaces joined by veth pairs, with site
//! routers that behave like the NAT named by a [`NatPreset`]. See `docs/lab.md`.
//!
//! ```no_run
//! use gateway_tests::lab::{Lab, LabAvailability, NatPreset, require_root};
//! if require_root() == LabAvailability::OptedOut {
//!     eprintln!("SKIPPED (GATEWAY_LAB_OPT_OUT=1)");
//!     return;
//! }
//! let lab = Lab::builder().site("a", NatPreset::full_cone()).build().unwrap();
//! let socket = lab.site("a").unwrap().host(0).unwrap().udp_bind(4000).unwrap();
//! socket.send_to(b"hi", (lab.server().addr(), 5000)).unwrap();
//! ```
mod netns;
mod nft;
mod portmap;
mod preset;
mod wan;

use std::{
    fmt::Write as _,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

pub use portmap::{NAT_PMP_PORT, PortMappingDaemon, PortMappingProtocols, UPNP_HTTP_PORT};
pub use preset::{
    Filtering, Mapping, NatPreset, PortAllocation, RouterKind, UnknownPreset, Unsolicited,
};
pub use wan::{Direction, LinkConditions, UnknownProfile, WanConditions, WanProfile, WanStats};

/// The public addresses of the server host (for NAT behaviour discovery).
pub const SERVER_ADDRS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)];
/// The core router's address on the server segment.
pub const CORE_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The most server hosts one lab can have ([`LabBuilder::servers`]).
pub const MAX_SERVERS: usize = 8;
/// The address of the lab's Redis host on the server segment
/// ([`LabBuilder::redis_host`]).
pub const REDIS_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);

/// The two public addresses of server `k` (0-based): 192.0.2.(10k+10) and
/// 192.0.2.(10k+11); server 0's are [`SERVER_ADDRS`]. `k` must be below
/// [`MAX_SERVERS`].
pub fn server_addrs(k: usize) -> [Ipv4Addr; 2] {
    let base = u8::try_from(10 * k + 10).unwrap_or(u8::MAX - 1);
    [
        Ipv4Addr::new(192, 0, 2, base),
        Ipv4Addr::new(192, 0, 2, base + 1),
    ]
}
/// The most sites one lab can have (the 203.0.113.0/24 plan has 16 /28s).
pub const MAX_SITES: usize = 16;

/// Why building or using the lab failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line (with any script fed to it).
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A command could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The error.
        source: io::Error,
    },
    /// Entering a namespace failed.
    #[error("entering network namespace {netns}: {source}")]
    Setns {
        /// The namespace.
        netns: String,
        /// The error.
        source: io::Error,
    },
    /// Some other I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The requested topology is not possible.
    #[error("invalid lab: {0}")]
    Invalid(String),
}

/// Whether the lab can run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabAvailability {
    /// Root with `ip` and `nft`: build labs.
    Available,
    /// Not root and `GATEWAY_LAB_OPT_OUT=1`: the caller must print a loud SKIPPED and return.
    OptedOut,
}

/// For a test's first line: true when the lab can run; false (after printing a loud
/// SKIPPED line) only when the operator opted out with `GATEWAY_LAB_OPT_OUT=1`; panics
/// with instructions otherwise (see [`require_root`]).
pub fn lab_available() -> bool {
    if require_root() == LabAvailability::OptedOut {
        eprintln!("SKIPPED (GATEWAY_LAB_OPT_OUT=1): this test needs root and network namespaces");
        return false;
    }
    true
}

/// Checks that the lab can run: root (CAP_NET_ADMIN), `ip` and `nft`. Without root it
/// returns [`LabAvailability::OptedOut`] only when `GATEWAY_LAB_OPT_OUT=1` is set, and
/// panics otherwise, so tests never pass silently by skipping.
pub fn require_root() -> LabAvailability {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        if std::env::var("GATEWAY_LAB_OPT_OUT").as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED (GATEWAY_LAB_OPT_OUT=1): the NAT lab tests need root; they did NOT run"
            );
            return LabAvailability::OptedOut;
        }
        panic!(
            "the NAT lab tests need root (CAP_NET_ADMIN to create network namespaces), \
             nftables and iproute2. Run `cargo xtask setup`, then run the tests as root \
             (e.g. `sudo -E cargo test`). On a laptop you may set GATEWAY_LAB_OPT_OUT=1 \
             to skip them (CI never does). Effective uid is {euid}."
        );
    }
    for (tool, args) in [("ip", ["-V"]), ("nft", ["--version"])] {
        let ok = Command::new(tool)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "the NAT lab needs `{tool}` ({}) on PATH; run `cargo xtask setup`",
            if tool == "ip" { "iproute2" } else { "nftables" }
        );
    }
    LabAvailability::Available
}

/// The WAN profile named by `GATEWAY_LAB_PROFILE` (`lan` when unset), for the NAT
/// and TCP matrices that `cargo xtask wan-matrix` runs under a delayed profile.
/// Panics on an unknown name, so a typo never measures the wrong thing.
pub fn profile_from_env() -> WanProfile {
    match std::env::var("GATEWAY_LAB_PROFILE") {
        Ok(name) if !name.is_empty() => name
            .parse()
            .unwrap_or_else(|e| panic!("GATEWAY_LAB_PROFILE: {e}")),
        _ => WanProfile::Lan,
    }
}

/// Deletes every lab namespace whose creating process (the pid in
/// `gwlab-<pid>-…`) no longer runs, killing processes still inside it. Returns how
/// many were deleted.
pub fn remove_stale_namespaces() -> Result<usize, LabError> {
    let me = std::process::id();
    let mut removed = 0;
    for name in netns::list() {
        if let Some(pid) = netns::owner_pid(&name)
            && pid != me
            && !netns::alive(pid)
            && netns::exists(&name)
        {
            netns::delete(&name)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Deletes every lab namespace on the machine, including those of running processes
/// (for a human's `cargo xtask lab clean`). Returns how many were deleted.
pub fn remove_all_namespaces() -> Result<usize, LabError> {
    let mut removed = 0;
    for name in netns::list() {
        netns::delete(&name)?;
        removed += 1;
    }
    Ok(removed)
}

/// Names of all lab namespaces currently on the machine.
pub fn list_namespaces() -> Vec<String> {
    netns::list()
}

/// Whether the network namespace `name` exists.
pub fn namespace_exists(name: &str) -> bool {
    netns::exists(name)
}

/// A namespace of the lab (a host, a router, the core or the server) and its addresses.
/// Cloning is cheap; the [`Lab`] alone owns (and deletes) the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    netns: String,
    addrs: Vec<Ipv4Addr>,
    role: String,
}

impl Host {
    /// The network namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The primary address (a router's is its WAN address).
    pub fn addr(&self) -> Ipv4Addr {
        self.addrs[0]
    }

    /// All addresses (the server has two; a router has WAN then LAN).
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }

    /// What this namespace is, e.g. `site a host 0`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    /// Sockets created by `f` stay in this namespace. A panic in `f` is resumed here.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LabError> {
        netns::run_in(&self.netns, f)
    }

    fn io<T>(&self, what: String, r: Result<io::Result<T>, LabError>) -> Result<T, LabError> {
        r?.map_err(|source| LabError::Io {
            what: format!("{what} in {}", self.netns),
            source,
        })
    }

    /// A UDP socket bound to `0.0.0.0:port` in this namespace (0 for any port).
    pub fn udp_bind(&self, port: u16) -> Result<UdpSocket, LabError> {
        self.udp_bind_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    }

    /// A UDP socket bound to `addr` in this namespace (e.g. one of the server's addresses).
    pub fn udp_bind_on(&self, addr: SocketAddr) -> Result<UdpSocket, LabError> {
        self.io(
            format!("binding UDP {addr}"),
            self.run(move || UdpSocket::bind(addr)),
        )
    }

    /// A TCP listener on `0.0.0.0:port` in this namespace.
    pub fn tcp_listen(&self, port: u16) -> Result<TcpListener, LabError> {
        self.tcp_listen_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    }

    /// A TCP listener on `addr` in this namespace.
    pub fn tcp_listen_on(&self, addr: SocketAddr) -> Result<TcpListener, LabError> {
        self.io(
            format!("listening on TCP {addr}"),
            self.run(move || TcpListener::bind(addr)),
        )
    }

    /// Connects from this namespace to `to`. The outer error is the lab's; the inner one
    /// is the connection's (refused, timed out…), which tests often expect.
    pub fn tcp_connect(
        &self,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<io::Result<TcpStream>, LabError> {
        self.run(move || TcpStream::connect_timeout(&to, timeout))
    }

    /// `ip netns exec <netns> <program>`, for spawning processes in this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// Runs a shell line in this namespace and returns its stdout; fails with its
    /// stderr if it exits unsuccessfully.
    pub fn sh(&self, cmd: &str) -> Result<String, LabError> {
        let mut command = self.command("sh");
        command.args(["-c", cmd]);
        netns::run_cmd(
            command,
            None,
            &format!("ip netns exec {} sh -c {cmd:?}", self.netns),
        )
    }
}

/// One site: a router and the hosts on its LAN.
#[derive(Debug, Clone)]
pub struct Site {
    name: String,
    index: usize,
    preset: NatPreset,
    router: Host,
    hosts: Vec<Host>,
    lan: String,
}

impl Site {
    /// The site's name as given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The site's position in the lab (it picks the address plan, see `docs/lab.md`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The router's preset.
    pub fn preset(&self) -> &NatPreset {
        &self.preset
    }

    /// The router (addresses: WAN, then LAN).
    pub fn router(&self) -> &Host {
        &self.router
    }

    /// Host `i` on the LAN, if there is one.
    pub fn host(&self, i: usize) -> Option<&Host> {
        self.hosts.get(i)
    }

    /// All hosts on the LAN.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The router's WAN address: what a NAT site's hosts appear as publicly. Hosts of
    /// `no-nat`/`firewall-only` sites appear with their own addresses instead; see
    /// [`Site::public_addr`].
    pub fn wan_addr(&self) -> Ipv4Addr {
        self.router.addrs[0]
    }

    /// The address host `i` appears as to the outside.
    pub fn public_addr(&self, i: usize) -> Option<Ipv4Addr> {
        let host = self.hosts.get(i)?;
        Some(match self.preset.kind {
            RouterKind::Nat => self.wan_addr(),
            RouterKind::NoNat | RouterKind::FirewallOnly => host.addr(),
        })
    }

    /// The LAN prefix in CIDR notation.
    pub fn lan(&self) -> &str {
        &self.lan
    }

    /// The router's conntrack table (`conntrack -L`), for debugging.
    pub fn conntrack(&self) -> Result<String, LabError> {
        self.router.sh("conntrack -L 2>/dev/null")
    }

    /// The router's nftables rule set (`nft list ruleset`).
    pub fn ruleset(&self) -> Result<String, LabError> {
        netns::run_cmd_in(self.router.netns(), "nft", &["list", "ruleset"], None)
    }
}

/// A built topology. Dropping it deletes all its namespaces (also while unwinding).
#[derive(Debug)]
pub struct Lab {
    namespaces: Vec<String>,
    core: Host,
    /// Server 0 first; at least one.
    servers: Vec<Host>,
    redis: Option<Host>,
    sites: Vec<Site>,
    wan: WanConditions,
    /// Dropped (stopped) before the namespaces are deleted.
    emulator: Option<wan::Emulator>,
}

/// Collects the sites (and the public side's hosts) of a [`Lab`] to build.
#[derive(Debug, Clone)]
pub struct LabBuilder {
    sites: Vec<(String, NatPreset, usize)>,
    servers: usize,
    redis: bool,
    wan: WanConditions,
}

impl Default for LabBuilder {
    fn default() -> Self {
        Self {
            sites: Vec::new(),
            servers: 1,
            redis: false,
            wan: WanConditions::default(),
        }
    }
}

impl LabBuilder {
    /// Adds a site with one host.
    #[must_use]
    pub fn site(self, name: &str, preset: NatPreset) -> Self {
        self.site_with_hosts(name, preset, 1)
    }

    /// Adds a site with `hosts` hosts on its LAN.
    #[must_use]
    pub fn site_with_hosts(mut self, name: &str, preset: NatPreset, hosts: usize) -> Self {
        self.sites.push((name.to_owned(), preset, hosts));
        self
    }

    /// Puts `n` server hosts on the public segment instead of one (1..=[`MAX_SERVERS`]),
    /// e.g. one per gateway node of a cluster. Server `k` has the addresses
    /// [`server_addrs`]`(k)`: 192.0.2.10 and .11, 192.0.2.20 and .21, ...
    #[must_use]
    pub fn servers(mut self, n: usize) -> Self {
        self.servers = n;
        self
    }

    /// Adds a host for Redis on the public segment ([`REDIS_HOST_ADDR`], 192.0.2.100).
    /// The lab runs nothing there; `gateway_tests::redis::RedisServer::start_in` starts
    /// a redis-server in it, and dropping the lab kills whatever still runs there.
    #[must_use]
    pub fn redis_host(mut self) -> Self {
        self.redis = true;
        self
    }

    /// WAN conditions on the core's links (delay, jitter, loss, reordering, rate cap;
    /// see [`WanConditions`]). The default changes nothing and starts no emulator.
    #[must_use]
    pub fn wan(mut self, conditions: WanConditions) -> Self {
        self.wan = conditions;
        self
    }

    /// The WAN conditions of a named profile ([`WanProfile`]).
    #[must_use]
    pub fn profile(self, profile: WanProfile) -> Self {
        self.wan(profile.conditions())
    }

    /// Creates every namespace, link, address, route and rule set. On error everything
    /// created so far is removed.
    pub fn build(self) -> Result<Lab, LabError> {
        self.validate()?;
        clean_before_build();
        let id = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}{}-{id}", netns::PREFIX, std::process::id());
        let host = |role: &str, addrs: Vec<Ipv4Addr>, what: String| Host {
            netns: format!("{prefix}-{role}"),
            addrs,
            role: what,
        };
        let core = host("core", vec![CORE_SERVER_SIDE], "core router".to_owned());
        // Server 0 keeps the names of a one-server lab.
        let servers = (0..self.servers)
            .map(|k| {
                if k == 0 {
                    host("srv", SERVER_ADDRS.to_vec(), "server".to_owned())
                } else {
                    host(
                        &format!("srv{k}"),
                        server_addrs(k).to_vec(),
                        format!("server {k}"),
                    )
                }
            })
            .collect();
        let redis = self
            .redis
            .then(|| host("redis", vec![REDIS_HOST_ADDR], "redis host".to_owned()));
        let mut sites = Vec::new();
        for (index, (name, preset, n_hosts)) in self.sites.into_iter().enumerate() {
            let plan = AddressPlan::new(index, &preset);
            let router = host(
                &format!("{name}-r"),
                vec![plan.router_wan(), plan.router_lan()],
                format!("site {name} router ({})", preset.name()),
            );
            let hosts = (0..n_hosts)
                .map(|j| {
                    host(
                        &format!("{name}-h{j}"),
                        vec![plan.host(j)],
                        format!("site {name} host {j}"),
                    )
                })
                .collect();
            sites.push(Site {
                name,
                index,
                lan: plan.lan_cidr(),
                preset,
                router,
                hosts,
            });
        }
        let mut lab = Lab {
            namespaces: Vec::new(),
            core,
            servers,
            redis,
            sites,
            wan: self.wan,
            emulator: None,
        };
        lab.create()?;
        Ok(lab)
    }

    fn validate(&self) -> Result<(), LabError> {
        if self.servers == 0 || self.servers > MAX_SERVERS {
            return Err(LabError::Invalid(format!(
                "{} servers; 1..={MAX_SERVERS}",
                self.servers
            )));
        }
        if self.sites.len() > MAX_SITES {
            return Err(LabError::Invalid(format!(
                "{} sites; at most {MAX_SITES}",
                self.sites.len()
            )));
        }
        for (i, (name, preset, hosts)) in self.sites.iter().enumerate() {
            if name.is_empty()
                || name.len() > 12
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(LabError::Invalid(format!(
                    "site name {name:?}: use 1-12 characters a-z, 0-9"
                )));
            }
            if self.sites[..i].iter().any(|(n, _, _)| n == name) {
                return Err(LabError::Invalid(format!("site {name:?} given twice")));
            }
            let max_hosts = if preset.kind == RouterKind::Nat {
                200
            } else {
                13
            };
            if *hosts == 0 || *hosts > max_hosts {
                return Err(LabError::Invalid(format!(
                    "site {name:?}: {hosts} hosts; 1..={max_hosts} for this kind of site"
                )));
            }
            if let Some(reason) = preset.invalid_reason() {
                return Err(LabError::Invalid(format!(
                    "site {name:?}, preset {}: {reason}",
                    preset.name()
                )));
            }
        }
        if let Some(reason) = self.wan.invalid_reason() {
            return Err(LabError::Invalid(format!("WAN conditions: {reason}")));
        }
        if let Some((name, _)) = self
            .wan
            .per_site
            .iter()
            .find(|(n, _)| !self.sites.iter().any(|(s, _, _)| s == n))
        {
            return Err(LabError::Invalid(format!(
                "WAN conditions for site {name:?}, which the lab does not have"
            )));
        }
        Ok(())
    }
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Before building: delete namespaces of dead processes and, on this process's first
/// lab, leftovers that carry this pid (an earlier process that had the same pid).
fn clean_before_build() {
    static OWN_LEFTOVERS: Once = Once::new();
    OWN_LEFTOVERS.call_once(|| {
        let me = std::process::id();
        for name in netns::list() {
            if netns::owner_pid(&name) == Some(me)
                && let Err(e) = netns::delete(&name)
            {
                tracing::warn!("could not delete leftover namespace {name}: {e}");
            }
        }
    });
    if let Err(e) = remove_stale_namespaces() {
        tracing::warn!("could not remove stale lab namespaces: {e}");
    }
}

/// Addresses of site `index` (see `docs/lab.md`).
struct AddressPlan {
    index: u8,
    nat: bool,
}

impl AddressPlan {
    fn new(index: usize, preset: &NatPreset) -> Self {
        Self {
            // validate() keeps index below MAX_SITES.
            index: u8::try_from(index).unwrap_or(u8::MAX),
            nat: preset.kind == RouterKind::Nat,
        }
    }
    fn core_wan(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 4 * self.index + 1)
    }
    fn router_wan(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 4 * self.index + 2)
    }
    fn router_lan(&self) -> Ipv4Addr {
        self.host_octet(1)
    }
    fn host(&self, j: usize) -> Ipv4Addr {
        self.host_octet(u8::try_from(j + 2).unwrap_or(u8::MAX))
    }
    fn host_octet(&self, n: u8) -> Ipv4Addr {
        if self.nat {
            Ipv4Addr::new(10, 0, self.index + 1, n)
        } else {
            Ipv4Addr::new(203, 0, 113, 16 * self.index + n)
        }
    }
    fn lan_prefix_len(&self) -> u8 {
        if self.nat { 24 } else { 28 }
    }
    fn lan_cidr(&self) -> String {
        let net = if self.nat {
            Ipv4Addr::new(10, 0, self.index + 1, 0)
        } else {
            Ipv4Addr::new(203, 0, 113, 16 * self.index)
        };
        format!("{net}/{}", self.lan_prefix_len())
    }
}

/// Sysctls every namespace gets: no reverse-path filter, no redirects.
fn common_sysctls(netns: &str, forwarding: bool) -> Result<Vec<(String, String)>, LabError> {
    let mut v = vec![(
        "net/ipv4/ip_forward".to_owned(),
        if forwarding { "1" } else { "0" }.to_owned(),
    )];
    for iface in netns::ipv4_conf_names(netns)? {
        for (key, value) in [
            ("rp_filter", "0"),
            ("send_redirects", "0"),
            ("accept_redirects", "0"),
        ] {
            v.push((format!("net/ipv4/conf/{iface}/{key}"), value.to_owned()));
        }
    }
    Ok(v)
}

impl Lab {
    /// Starts describing a lab.
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    /// The server host (addresses 192.0.2.10 and 192.0.2.11); with several servers,
    /// server 0.
    pub fn server(&self) -> &Host {
        &self.servers[0]
    }

    /// Every server host, server 0 first ([`LabBuilder::servers`]; server `k` has the
    /// addresses [`server_addrs`]`(k)`).
    pub fn servers(&self) -> &[Host] {
        &self.servers
    }

    /// The Redis host (192.0.2.100), if the lab was built with
    /// [`LabBuilder::redis_host`].
    pub fn redis_host(&self) -> Option<&Host> {
        self.redis.as_ref()
    }

    /// The hosts on the public segment: the servers, then the Redis host.
    fn public_hosts(&self) -> Vec<Host> {
        self.servers.iter().chain(&self.redis).cloned().collect()
    }

    /// The core router joining the server and every site's WAN.
    pub fn core(&self) -> &Host {
        &self.core
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// All sites in the order they were added.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// Every namespace this lab owns.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    fn add_ns(&mut self, name: &str) -> Result<(), LabError> {
        netns::add(name)?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    fn create(&mut self) -> Result<(), LabError> {
        let core = self.core.netns.clone();
        let public = self.public_hosts();
        self.add_ns(&core)?;
        for host in &public {
            self.add_ns(&host.netns)?;
        }
        let sites = self.sites.clone();
        for site in &sites {
            self.add_ns(&site.router.netns)?;
            for host in &site.hosts {
                self.add_ns(&host.netns)?;
            }
        }

        // Core: veths to the server segment and to every router's WAN, created in
        // place. One public host: a veth `s0` straight to its eth0. Several (servers,
        // the Redis host): `s0` is a bridge with one veth port `s0p<k>` per host.
        let mut script = String::from("link set lo up\n");
        if let [only] = public.as_slice() {
            let _ = writeln!(
                script,
                "link add s0 type veth peer name eth0 netns {}",
                only.netns
            );
        } else {
            let _ = writeln!(script, "link add s0 type bridge");
            for (k, host) in public.iter().enumerate() {
                let _ = writeln!(
                    script,
                    "link add s0p{k} type veth peer name eth0 netns {}",
                    host.netns
                );
                let _ = writeln!(script, "link set s0p{k} master s0");
                let _ = writeln!(script, "link set s0p{k} up");
            }
        }
        let _ = writeln!(script, "addr add {CORE_SERVER_SIDE}/24 dev s0");
        let _ = writeln!(script, "link set s0 up");
        for site in &sites {
            let plan = AddressPlan::new(site.index, &site.preset);
            let c = format!("c{}", site.index);
            let _ = writeln!(
                script,
                "link add {c} type veth peer name wan netns {}",
                site.router.netns
            );
            let _ = writeln!(script, "addr add {}/30 dev {c}", plan.core_wan());
            let _ = writeln!(script, "link set {c} up");
        }
        netns::ip_batch(&core, &script)?;

        // Public hosts: their addresses (a server has two) on one segment.
        for host in &public {
            let mut script = String::from("link set lo up\n");
            for a in &host.addrs {
                let _ = writeln!(script, "addr add {a}/24 dev eth0");
            }
            let _ = writeln!(script, "link set eth0 up");
            let _ = writeln!(script, "route add default via {CORE_SERVER_SIDE}");
            netns::ip_batch(&host.netns, &script)?;
            netns::sysctls(&host.netns, common_sysctls(&host.netns, false)?)?;
        }

        for site in &sites {
            let plan = AddressPlan::new(site.index, &site.preset);
            let r = &site.router.netns;
            let mut script = String::from("link set lo up\n");
            let _ = writeln!(script, "addr add {}/30 dev wan", plan.router_wan());
            let _ = writeln!(script, "link set wan up");
            let _ = writeln!(script, "route add default via {}", plan.core_wan());
            let _ = writeln!(script, "link add br0 type bridge");
            let _ = writeln!(
                script,
                "addr add {}/{} dev br0",
                plan.router_lan(),
                plan.lan_prefix_len()
            );
            for (j, host) in site.hosts.iter().enumerate() {
                let _ = writeln!(
                    script,
                    "link add h{j} type veth peer name eth0 netns {}",
                    host.netns
                );
                let _ = writeln!(script, "link set h{j} master br0");
                let _ = writeln!(script, "link set h{j} up");
            }
            let _ = writeln!(script, "link set br0 up");
            netns::ip_batch(r, &script)?;

            let mut sysctls = common_sysctls(r, true)?;
            sysctls.push((
                "net/bridge/bridge-nf-call-iptables".to_owned(),
                "?0".to_owned(),
            ));
            netns::sysctls(r, sysctls)?;

            let ruleset = nft::router_ruleset(&site.preset, plan.router_wan(), &plan.lan_cidr());
            netns::run_cmd_in(r, "nft", &["-f", "-"], Some(ruleset.clone())).map_err(
                |e| match e {
                    LabError::Command {
                        command,
                        status,
                        stderr,
                    } => LabError::Command {
                        command: format!("{command} <<EOF\n{ruleset}EOF"),
                        status,
                        stderr,
                    },
                    other => other,
                },
            )?;
            // nf_conntrack is loaded now, so its per-namespace sysctls exist.
            if let Some(t) = site.preset.udp_mapping_timeout {
                let secs = t.as_secs().max(1).to_string();
                netns::sysctls(
                    r,
                    vec![
                        (
                            "net/netfilter/nf_conntrack_udp_timeout".to_owned(),
                            secs.clone(),
                        ),
                        (
                            "net/netfilter/nf_conntrack_udp_timeout_stream".to_owned(),
                            secs,
                        ),
                    ],
                )?;
            }

            for host in &site.hosts {
                let mut script = String::from("link set lo up\n");
                let _ = writeln!(
                    script,
                    "addr add {}/{} dev eth0",
                    host.addr(),
                    plan.lan_prefix_len()
                );
                let _ = writeln!(script, "link set eth0 up");
                let _ = writeln!(script, "route add default via {}", plan.router_lan());
                netns::ip_batch(&host.netns, &script)?;
                netns::sysctls(&host.netns, common_sysctls(&host.netns, false)?)?;
            }
        }

        // Core routes to public LANs, once every link is up; then forwarding.
        let mut script = String::new();
        for site in &sites {
            if site.preset.kind != RouterKind::Nat {
                let plan = AddressPlan::new(site.index, &site.preset);
                let _ = writeln!(
                    script,
                    "route add {} via {}",
                    plan.lan_cidr(),
                    plan.router_wan()
                );
            }
        }
        if !script.is_empty() {
            netns::ip_batch(&core, &script)?;
        }
        let mut sysctls = common_sysctls(&core, true)?;
        if public.len() > 1 {
            sysctls.push((
                "net/bridge/bridge-nf-call-iptables".to_owned(),
                "?0".to_owned(),
            ));
        }
        netns::sysctls(&core, sysctls)?;
        self.start_wan()
    }

    /// Starts the WAN emulator in the core when some link has conditions: the emulator
    /// binds the core's queue first, then every forwarded packet is queued to it.
    fn start_wan(&mut self) -> Result<(), LabError> {
        if self.wan.is_ideal() {
            return Ok(());
        }
        let core = self.core.netns.clone();
        let mut names = vec![("s0".to_owned(), self.wan.gateway.clone())];
        for site in &self.sites {
            names.push((
                format!("c{}", site.index),
                self.wan.site(&site.name).clone(),
            ));
        }
        let links = netns::run_in(&core, move || {
            names
                .into_iter()
                .map(|(name, link)| {
                    let c = std::ffi::CString::new(name).unwrap_or_default();
                    // SAFETY: if_nametoindex(3) on a NUL-terminated name.
                    (unsafe { libc::if_nametoindex(c.as_ptr()) }, link)
                })
                .collect::<Vec<_>>()
        })?;
        if links.iter().any(|(i, _)| *i == 0) {
            return Err(LabError::Invalid(
                "a core interface of the WAN emulator is missing".into(),
            ));
        }
        self.emulator = Some(wan::Emulator::start(&core, links, rand::random())?);
        // Every packet arriving at the core (prerouting: its input link's `up`) and
        // leaving it (postrouting: its output link's `down`), forwarded or the core's
        // own (a TTL-exceeded or port-unreachable answer crosses its link both ways).
        netns::run_cmd_in(
            &core,
            "iptables-nft-restore",
            &[],
            Some(
                "*mangle\n-A PREROUTING -j NFQUEUE --queue-num 0\n\
                 -A POSTROUTING -j NFQUEUE --queue-num 0\nCOMMIT\n"
                    .to_owned(),
            ),
        )
        .map_err(|e| match e {
            LabError::Spawn { command, source } => LabError::Spawn {
                command: format!(
                    "{command} (the WAN emulator needs iptables-nft-restore: run `cargo xtask setup`)"
                ),
                source,
            },
            other => other,
        })?;
        Ok(())
    }

    /// The lab's WAN conditions (all ideal unless the builder set some).
    pub fn wan(&self) -> &WanConditions {
        &self.wan
    }

    /// What the WAN emulator did so far (`None` when the lab has no WAN conditions).
    pub fn wan_stats(&self) -> Option<WanStats> {
        self.emulator.as_ref().map(wan::Emulator::stats)
    }

    /// A human-readable description: namespaces, addresses, presets and how to enter them.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "NAT lab ({} namespaces, IPv4 only)",
            self.namespaces.len()
        );
        let line = |s: &mut String, h: &Host| {
            let addrs: Vec<String> = h.addrs.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                s,
                "  {:34} {:40} ip netns exec {} bash",
                h.role,
                addrs.join(", "),
                h.netns
            );
        };
        for host in self.public_hosts() {
            line(&mut s, &host);
        }
        line(&mut s, &self.core);
        if !self.wan.is_ideal() {
            let _ = writeln!(
                s,
                "  WAN (core links; up = toward the core): gateway up {}, down {}",
                self.wan.gateway.up, self.wan.gateway.down
            );
            for site in &self.sites {
                let l = self.wan.site(&site.name);
                let _ = writeln!(s, "  WAN site {}: up {}, down {}", site.name, l.up, l.down);
            }
        }
        for site in &self.sites {
            let _ = writeln!(
                s,
                "  site {} [{}]: {}; LAN {}, public address {}",
                site.name,
                site.preset.name(),
                site.preset.summary(),
                site.lan,
                match site.preset.kind {
                    RouterKind::Nat => site.wan_addr().to_string(),
                    _ => "each host's own".to_owned(),
                }
            );
            line(&mut s, &site.router);
            for h in &site.hosts {
                line(&mut s, h);
            }
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The emulator first: it releases what it holds and leaves the core.
        self.emulator = None;
        for name in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete(name) {
                eprintln!("NAT lab: could not delete namespace {name}: {e}");
            }
        }
    }
}
