//! Loads the kernel programs (built by `cargo xtask build-ebpf` and embedded at build
//! time), attaches them with tc (TCX on kernels >= 6.6, a clsact qdisc and netlink
//! filter otherwise or on request), tells them what to watch, and reads their maps
//! back: UDP counters, punch outcomes, the punch flow table.
//!
//! Everything here may fail without the capabilities (root, or `CAP_BPF`, `CAP_PERFMON`
//! and `CAP_NET_ADMIN`: see [`crate::capabilities`]), BTF or tc support; callers then
//! run without eBPF and say so in their log and in `gateway_ebpf_loaded`.
use std::{
    collections::HashMap as StdHashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
};
use gateway_ebpf::{
    BOUNCE_SLOTS, BounceReason, Direction, EGRESS_PROGRAM, Endpoint, FAMILY_IPV4, FAMILY_IPV6,
    FLOW_PUNCHED, FlowKey, FlowState, IGNORED_REMOTES_MAP, INGRESS_PROGRAM, MAX_IGNORED_REMOTES,
    PASS_THROUGH_PROGRAM, PORTS_PER_ENTRY, PUNCH_FLOWS_MAP, PUNCH_STATS_MAP, PUNCH_TIME_BOUNDS_NS,
    PUNCH_TIME_SLOTS, PunchProtocol, PunchStats, SETTINGS_MAP, UDP_COUNTERS_MAP, UdpCounters,
    WATCHED_PORTS_MAP, settings, watch,
};
use prometheus::{
    IntCounter, IntCounterVec, IntGauge, Opts,
    core::{Collector, Desc},
    proto::{Bucket, Histogram, Metric, MetricFamily, MetricType},
};

/// The eBPF object embedded at build time; empty when it was built without one.
static EMBEDDED_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gateway-ebpf.o"));

/// The embedded eBPF object, or `None` when this binary was built without it.
pub fn embedded_object() -> Option<&'static [u8]> {
    (!EMBEDDED_OBJECT.is_empty()).then_some(EMBEDDED_OBJECT)
}

/// Why the eBPF programs could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The binary carries no eBPF object.
    #[error(
        "this gateway binary was built without its eBPF object; run `cargo xtask setup && cargo xtask build-ebpf`, then rebuild"
    )]
    NotEmbedded,
    /// Loading needs `CAP_BPF`, `CAP_PERFMON` (or `CAP_SYS_ADMIN` for both) and
    /// `CAP_NET_ADMIN`: root, or an unprivileged user given them (the systemd unit's
    /// `AmbientCapabilities`).
    #[error(
        "loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (root, or AmbientCapabilities in the systemd unit); missing: {missing}"
    )]
    NotPermitted {
        /// The capabilities this process lacks (space-separated names), or what the
        /// kernel refused when the check passed.
        missing: String,
    },
    /// Too many ports or remotes to watch.
    #[error("at most {max} {what} fit the map, {asked} asked")]
    TooMany {
        /// What there are too many of.
        what: &'static str,
        /// The capacity.
        max: u32,
        /// How many were asked for.
        asked: usize,
    },
    /// The object or a program failed to load or attach; the kernel lacks support
    /// (BPF, BTF, tc/TCX, the verifier refused) or the interface does not exist.
    #[error("{what}: {cause}")]
    Aya {
        /// What was being done.
        what: String,
        /// aya's error, naming the kernel's complaint (shown in this error's message,
        /// so it is not also reported as its source).
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The interface to attach to does not exist (in this network namespace).
    #[error("no network interface named {0:?}")]
    NoSuchInterface(String),
    /// A map or program is missing from the object (a build mismatch).
    #[error("eBPF object lacks map or program {0}")]
    Missing(&'static str),
}

/// Checks this process's capabilities, then loads `object` (its maps are created
/// here; programs are loaded into the kernel by the caller). EPERM from the kernel
/// becomes [`EbpfError::NotPermitted`] as well (a user namespace, a LSM policy).
pub(crate) fn load_checked(object: &[u8]) -> Result<Ebpf, EbpfError> {
    crate::capabilities::check_ebpf()?;
    Ebpf::load(object).map_err(|e| match e {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { ref io_error, .. })
            if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            EbpfError::NotPermitted {
                missing: format!(
                    "none that /proc/self/status shows, but the kernel refused: {io_error}"
                ),
            }
        }
        e => aya_err("loading the eBPF object (does the kernel have BPF and BTF?)")(e),
    })
}

pub(crate) fn aya_err<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> EbpfError {
    let what = what.into();
    move |cause| EbpfError::Aya {
        what,
        cause: Box::new(cause),
    }
}

/// Every interface that is administratively up, loopback included.
pub fn interfaces_up() -> Vec<String> {
    let Ok(entries) = fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let flags = fs::read_to_string(e.path().join("flags")).ok()?;
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
            (flags & 0x1 != 0).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// What the programs watch: which local ports are counted or carry punch flows, and
/// whether STUN traffic on any port counts as punching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchSpec {
    /// UDP ports whose datagrams are counted (`gateway_ebpf_udp_*`): a server's ports.
    pub counted_udp_ports: Vec<u16>,
    /// UDP ports whose flows are punch flows (an agent's punch socket). Also counted.
    pub punch_udp_ports: Vec<u16>,
    /// TCP ports whose flows are punch flows (TCP punching from a known port).
    pub punch_tcp_ports: Vec<u16>,
    /// Treat any UDP datagram with the STUN magic cookie at payload offset 4 as a
    /// punch packet, whatever its port (a NAT router, which runs no agent).
    pub stun_cookie: bool,
    /// Remote endpoints that are never punch flows: the rendezvous server and its
    /// discovery endpoints, which an agent talks to before any punching. Port 0 stands
    /// for every port of the address (the gateway's relay ports).
    pub ignored_remotes: Vec<SocketAddr>,
}

impl WatchSpec {
    /// The watched ports with their [`watch`] flags.
    fn port_flags(&self) -> StdHashMap<u16, u8> {
        let mut flags = StdHashMap::new();
        for &port in &self.counted_udp_ports {
            *flags.entry(port).or_insert(0) |= watch::COUNT_UDP;
        }
        for &port in &self.punch_udp_ports {
            *flags.entry(port).or_insert(0) |= watch::COUNT_UDP | watch::PUNCH_UDP;
        }
        for &port in &self.punch_tcp_ports {
            *flags.entry(port).or_insert(0) |= watch::PUNCH_TCP;
        }
        flags
    }
}

/// How the classifiers are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links where the kernel has them (>= 6.6), falling back to a clsact qdisc
    /// with netlink filters when TCX is missing or refused.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// A clsact qdisc with netlink (cls_bpf) filters only.
    Netlink,
}

impl std::str::FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "netlink" => Ok(Self::Netlink),
            other => Err(format!("{other:?}: expected auto, tcx or netlink")),
        }
    }
}

/// How one program got attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedVia {
    /// A TCX link.
    Tcx,
    /// A netlink tc filter on a clsact qdisc.
    Netlink,
}

impl AttachedVia {
    /// For logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttachedVia::Tcx => "tcx",
            AttachedVia::Netlink => "netlink",
        }
    }
}

/// Which of the object's classifiers a test run exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramRole {
    /// The ingress classifier.
    Ingress,
    /// The egress classifier.
    Egress,
    /// The pass-through baseline (returns `TC_ACT_UNSPEC`, reads nothing).
    PassThrough,
}

impl ProgramRole {
    const fn program_name(self) -> &'static str {
        match self {
            ProgramRole::Ingress => INGRESS_PROGRAM,
            ProgramRole::Egress => EGRESS_PROGRAM,
            ProgramRole::PassThrough => PASS_THROUGH_PROGRAM,
        }
    }
}

/// What `BPF_PROG_TEST_RUN` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value ([`gateway_ebpf::TC_ACT_UNSPEC`] as `u32` for ours).
    pub return_value: u32,
    /// The kernel's mean time per run.
    pub duration: Duration,
}

struct Link {
    interface: String,
    program: &'static str,
    via: AttachedVia,
    id: SchedClassifierLinkId,
}

/// The kernel maps userspace reads while the programs run.
struct KernelMaps {
    udp_counters: Mutex<PerCpuArray<MapData, UdpCounters>>,
    punch_stats: Mutex<PerCpuArray<MapData, PunchStats>>,
    flows: Mutex<HashMap<MapData, FlowKey, FlowState>>,
}

/// The loaded (and usually attached) gateway programs.
pub struct EbpfProbe {
    ebpf: Ebpf,
    links: Vec<Link>,
    maps: Arc<KernelMaps>,
    watch: WatchSpec,
}

impl std::fmt::Debug for EbpfProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfProbe")
            .field("interfaces", &self.interfaces())
            .field("watch", &self.watch)
            .finish()
    }
}

/// Fails with [`EbpfError::NoSuchInterface`] unless `interface` exists here.
pub(crate) fn require_interface(interface: &str) -> Result<(), EbpfError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| EbpfError::NoSuchInterface(interface.to_owned()))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string and nothing else.
    if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
        return Err(EbpfError::NoSuchInterface(interface.to_owned()));
    }
    Ok(())
}

/// Attaches one loaded classifier to `interface` as `mode` says: TCX, a clsact qdisc
/// with a netlink filter, or TCX falling back to netlink (shared by the punch
/// observers and the relay fast path).
pub(crate) fn attach_classifier(
    program: &mut SchedClassifier,
    interface: &str,
    attach_type: TcAttachType,
    mode: AttachMode,
    name: &str,
) -> Result<(SchedClassifierLinkId, AttachedVia), EbpfError> {
    let what = format!("attaching {name} to {interface}");
    let tcx = |program: &mut SchedClassifier| {
        program.attach_with_options(
            interface,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
    };
    let netlink = |program: &mut SchedClassifier| {
        // An existing clsact qdisc is fine.
        let _ = tc::qdisc_add_clsact(interface);
        program.attach_with_options(
            interface,
            attach_type,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
    };
    Ok(match mode {
        AttachMode::Tcx => (tcx(program).map_err(aya_err(what))?, AttachedVia::Tcx),
        AttachMode::Netlink => (
            netlink(program).map_err(aya_err(what))?,
            AttachedVia::Netlink,
        ),
        AttachMode::Auto => match tcx(program) {
            Ok(id) => (id, AttachedVia::Tcx),
            Err(tcx_error) => {
                tracing::info!(%interface, error = %tcx_error, "TCX attach failed; trying a clsact qdisc with netlink filters");
                (
                    netlink(program).map_err(aya_err(what))?,
                    AttachedVia::Netlink,
                )
            }
        },
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EbpfProbe {
    /// Loads the embedded object, applies `watch` and attaches on ingress and egress of
    /// each of `interfaces` (none: loaded only, for [`EbpfProbe::test_run`]).
    pub fn load(
        watch: &WatchSpec,
        interfaces: &[String],
        mode: AttachMode,
    ) -> Result<Self, EbpfError> {
        let object = embedded_object().ok_or(EbpfError::NotEmbedded)?;
        Self::load_object(object, watch, interfaces, mode)
    }

    /// As [`EbpfProbe::load`], from an object file's bytes (benchmarks load the one
    /// just built).
    pub fn load_object(
        object: &[u8],
        watch: &WatchSpec,
        interfaces: &[String],
        mode: AttachMode,
    ) -> Result<Self, EbpfError> {
        let mut ebpf = load_checked(object)?;
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Missing("a classifier program"))?
                .try_into()
                .map_err(aya_err(format!("program {name}")))?;
            program
                .load()
                .map_err(aya_err(format!("loading {name} into the kernel")))?;
        }
        let maps = Arc::new(KernelMaps {
            udp_counters: Mutex::new(take_map(&mut ebpf, UDP_COUNTERS_MAP)?),
            punch_stats: Mutex::new(take_map(&mut ebpf, PUNCH_STATS_MAP)?),
            flows: Mutex::new(take_map(&mut ebpf, PUNCH_FLOWS_MAP)?),
        });
        let mut probe = Self {
            ebpf,
            links: Vec::new(),
            maps,
            watch: WatchSpec::default(),
        };
        probe.apply(watch)?;
        for interface in interfaces {
            probe.attach(interface, mode)?;
        }
        Ok(probe)
    }

    /// Adds `watch` to what the programs watch (ports, STUN cookie, ignored remotes).
    pub fn apply(&mut self, watch: &WatchSpec) -> Result<(), EbpfError> {
        let mut wanted = self.watch.clone();
        wanted.counted_udp_ports.extend(&watch.counted_udp_ports);
        wanted.punch_udp_ports.extend(&watch.punch_udp_ports);
        wanted.punch_tcp_ports.extend(&watch.punch_tcp_ports);
        wanted.stun_cookie |= watch.stun_cookie;
        for remote in &watch.ignored_remotes {
            if !wanted.ignored_remotes.contains(remote) {
                wanted.ignored_remotes.push(remote.to_owned());
            }
        }
        let ports = wanted.port_flags();
        if wanted.ignored_remotes.len() > MAX_IGNORED_REMOTES as usize {
            return Err(EbpfError::TooMany {
                what: "ignored remotes",
                max: MAX_IGNORED_REMOTES,
                asked: wanted.ignored_remotes.len(),
            });
        }
        self.write_port_flags(ports)?;
        {
            let map = self
                .ebpf
                .map_mut(IGNORED_REMOTES_MAP)
                .ok_or(EbpfError::Missing(IGNORED_REMOTES_MAP))?;
            let mut map: HashMap<_, Endpoint, u8> =
                HashMap::try_from(map).map_err(aya_err("opening the ignored-remotes map"))?;
            for remote in &wanted.ignored_remotes {
                map.insert(endpoint(*remote), 1, 0)
                    .map_err(aya_err(format!("ignoring remote {remote}")))?;
            }
        }
        let mut flags = 0;
        if wanted.stun_cookie {
            flags |= settings::STUN_COOKIE;
        }
        if !wanted.ignored_remotes.is_empty() {
            flags |= settings::HAS_IGNORED_REMOTES;
        }
        let map = self
            .ebpf
            .map_mut(SETTINGS_MAP)
            .ok_or(EbpfError::Missing(SETTINGS_MAP))?;
        let mut map: Array<_, u32> =
            Array::try_from(map).map_err(aya_err("opening the settings map"))?;
        map.set(0, flags, 0)
            .map_err(aya_err("writing the settings"))?;
        self.watch = wanted;
        Ok(())
    }

    /// Starts or stops treating these UDP ports as punch ports, writing only their
    /// entries (birthday punching opens and closes hundreds of sockets at once; a
    /// full [`EbpfProbe::apply`] per socket would rewrite every watched port).
    pub fn update_punch_udp_ports(&mut self, add: &[u16], remove: &[u16]) -> Result<(), EbpfError> {
        let mut wanted = self.watch.clone();
        wanted.punch_udp_ports.retain(|p| !remove.contains(p));
        for &port in add {
            if !wanted.punch_udp_ports.contains(&port) {
                wanted.punch_udp_ports.push(port);
            }
        }
        let flags = wanted.port_flags();
        let touched: std::collections::BTreeSet<u16> = add.iter().chain(remove).copied().collect();
        self.write_port_flags(
            touched
                .into_iter()
                .map(|port| (port, flags.get(&port).copied().unwrap_or(0))),
        )?;
        self.watch = wanted;
        Ok(())
    }

    /// Writes each port's watch flags into the port map (0: not watched).
    fn write_port_flags(
        &mut self,
        ports: impl IntoIterator<Item = (u16, u8)>,
    ) -> Result<(), EbpfError> {
        let map = self
            .ebpf
            .map_mut(WATCHED_PORTS_MAP)
            .ok_or(EbpfError::Missing(WATCHED_PORTS_MAP))?;
        let mut map: Array<_, [u8; PORTS_PER_ENTRY]> =
            Array::try_from(map).map_err(aya_err("opening the port map"))?;
        for (port, flags) in ports {
            let index = u32::from(port) / PORTS_PER_ENTRY as u32;
            let mut entry = map
                .get(&index, 0)
                .map_err(aya_err(format!("reading port entry {index}")))?;
            if let Some(slot) = entry.get_mut(usize::from(port) % PORTS_PER_ENTRY) {
                *slot = flags;
            }
            map.set(index, entry, 0)
                .map_err(aya_err(format!("watching port {port}")))?;
        }
        Ok(())
    }

    /// What the programs watch now.
    pub fn watching(&self) -> &WatchSpec {
        &self.watch
    }

    /// Attaches both classifiers to `interface`.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<(), EbpfError> {
        self.attach_programs(
            interface,
            mode,
            [
                (INGRESS_PROGRAM, TcAttachType::Ingress),
                (EGRESS_PROGRAM, TcAttachType::Egress),
            ],
        )
    }

    /// Attaches the pass-through baseline on ingress and egress of `interface`
    /// instead of the real programs: the throughput benchmark's control, which pays
    /// for the attachment but runs no code.
    pub fn attach_baseline(&mut self, interface: &str, mode: AttachMode) -> Result<(), EbpfError> {
        self.attach_programs(
            interface,
            mode,
            [
                (PASS_THROUGH_PROGRAM, TcAttachType::Ingress),
                (PASS_THROUGH_PROGRAM, TcAttachType::Egress),
            ],
        )
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, EbpfError> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(EbpfError::Missing("a classifier program"))?
            .try_into()
            .map_err(aya_err(format!("program {name}")))?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(aya_err(format!("loading {name} into the kernel")))?;
        }
        Ok(program)
    }

    fn attach_programs(
        &mut self,
        interface: &str,
        mode: AttachMode,
        programs: [(&'static str, TcAttachType); 2],
    ) -> Result<(), EbpfError> {
        require_interface(interface)?;
        for (name, attach_type) in programs {
            let program = self.program(name)?;
            let (id, via) = attach_classifier(program, interface, attach_type, mode, name)?;
            self.links.push(Link {
                interface: interface.to_owned(),
                program: name,
                via,
                id,
            });
        }
        Ok(())
    }

    /// The interfaces the programs are attached to, in attach order.
    pub fn interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for link in &self.links {
            if !names.contains(&link.interface) {
                names.push(link.interface.clone());
            }
        }
        names
    }

    /// Each attachment: interface, program name and how it is attached.
    pub fn attachments(&self) -> Vec<(String, &'static str, AttachedVia)> {
        self.links
            .iter()
            .map(|l| (l.interface.clone(), l.program, l.via))
            .collect()
    }

    /// Current UDP totals per direction ([`Direction`] order), summed over CPUs.
    pub fn read_udp_counters(&self) -> Result<[UdpCounters; 2], EbpfError> {
        read_udp_counters(&self.maps)
    }

    /// Current punch outcome totals, summed over CPUs and protocols.
    pub fn read_punch_totals(&self) -> Result<PunchTotals, EbpfError> {
        let [udp, tcp] = read_punch_totals(&self.maps)?;
        Ok(udp.plus(&tcp))
    }

    /// Current punch outcome totals of one protocol's flows, summed over CPUs.
    pub fn read_punch_totals_of(&self, protocol: PunchProtocol) -> Result<PunchTotals, EbpfError> {
        let totals = read_punch_totals(&self.maps)?;
        Ok(totals[protocol as usize])
    }

    /// A handle on the flow table, for expiry and listing from another task.
    pub fn flow_table(&self) -> FlowTable {
        FlowTable {
            maps: self.maps.clone(),
        }
    }

    /// A Prometheus collector that reads every kernel map at scrape time.
    pub fn collector(&self) -> Result<EbpfCollector, prometheus::Error> {
        EbpfCollector::new(self.maps.clone())
    }

    /// Runs one of the classifiers on `frame` (an Ethernet frame) `repeat` times with
    /// `BPF_PROG_TEST_RUN`, against this probe's maps: for tests and the overhead
    /// benchmark. The pass-through baseline is loaded on first use.
    pub fn test_run(
        &mut self,
        role: ProgramRole,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, EbpfError> {
        let name = role.program_name();
        let program = self.program(name)?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(aya_err(format!("BPF_PROG_TEST_RUN of {name}")))?;
        Ok(TestRunOutcome {
            return_value: result.return_value,
            duration: result.duration,
        })
    }

    /// Detaches every program from every interface, logging each (dropping the probe
    /// detaches too, silently).
    pub fn detach(mut self) {
        for link in std::mem::take(&mut self.links) {
            let Some(program) = self.ebpf.program_mut(link.program) else {
                continue;
            };
            let Ok(program): Result<&mut SchedClassifier, _> = program.try_into() else {
                continue;
            };
            match program.detach(link.id) {
                Ok(()) => tracing::info!(
                    interface = %link.interface,
                    program = link.program,
                    via = link.via.as_str(),
                    "eBPF program detached"
                ),
                Err(e) => {
                    tracing::warn!(interface = %link.interface, error = %e, "eBPF detach failed")
                }
            }
        }
    }
}

pub(crate) fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    T::try_from(map).map_err(aya_err(format!("opening map {name}")))
}

/// The key form of a socket address.
fn endpoint(addr: SocketAddr) -> Endpoint {
    let (bytes, family) = match addr.ip() {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, FAMILY_IPV4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_IPV6),
    };
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
        let mut four = [0u8; 4];
        four.copy_from_slice(chunk);
        // The kernel loads the words from the packet in native byte order.
        *word = u32::from_ne_bytes(four);
    }
    Endpoint {
        addr: words,
        port: addr.port(),
        family,
        pad: 0,
    }
}

/// The socket address of a key's endpoint.
fn socket_addr(endpoint: &Endpoint) -> SocketAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(endpoint.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if endpoint.family == FAMILY_IPV4 {
        let [a, b, c, d, ..] = bytes;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    SocketAddr::new(ip, endpoint.port)
}

/// Punch outcomes summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PunchTotals {
    /// Bounced packets by [`BounceReason`] index.
    pub bounced: [u64; BOUNCE_SLOTS],
    /// Punched flows per punch-time bucket (see [`gateway_ebpf::PUNCH_TIME_BOUNDS_NS`]).
    pub punch_time_buckets: [u64; PUNCH_TIME_SLOTS],
    /// Sum of the punch times, nanoseconds.
    pub punch_time_sum_ns: u64,
}

impl PunchTotals {
    /// Flows punched (each counted once).
    pub fn punched(&self) -> u64 {
        self.punch_time_buckets
            .iter()
            .fold(0u64, |a, b| a.wrapping_add(*b))
    }

    /// Bounced packets for one reason.
    pub fn bounced(&self, reason: BounceReason) -> u64 {
        self.bounced.get(reason as usize).copied().unwrap_or(0)
    }

    /// Both totals added up.
    pub fn plus(&self, other: &PunchTotals) -> PunchTotals {
        let mut sum = *self;
        for (a, b) in sum.bounced.iter_mut().zip(other.bounced) {
            *a = a.wrapping_add(b);
        }
        for (a, b) in sum
            .punch_time_buckets
            .iter_mut()
            .zip(other.punch_time_buckets)
        {
            *a = a.wrapping_add(b);
        }
        sum.punch_time_sum_ns = sum.punch_time_sum_ns.wrapping_add(other.punch_time_sum_ns);
        sum
    }
}

fn read_udp_counters(maps: &KernelMaps) -> Result<[UdpCounters; 2], EbpfError> {
    let counters = lock(&maps.udp_counters);
    let mut totals = [UdpCounters::default(); 2];
    for (direction, total) in Direction::ALL.into_iter().zip(totals.iter_mut()) {
        let per_cpu = counters
            .get(&(direction as u32), 0)
            .map_err(aya_err("reading the counter map"))?;
        for value in per_cpu.iter() {
            total.packets = total.packets.wrapping_add(value.packets);
            total.bytes = total.bytes.wrapping_add(value.bytes);
        }
    }
    Ok(totals)
}

/// Punch totals per [`PunchProtocol`] (in its slot order), summed over CPUs.
fn read_punch_totals(maps: &KernelMaps) -> Result<[PunchTotals; 2], EbpfError> {
    let stats = lock(&maps.punch_stats);
    let mut all = [PunchTotals::default(); 2];
    for (protocol, totals) in PunchProtocol::ALL.into_iter().zip(all.iter_mut()) {
        let per_cpu = stats
            .get(&(protocol as u32), 0)
            .map_err(aya_err("reading the punch statistics"))?;
        for value in per_cpu.iter() {
            let mut one = PunchTotals {
                bounced: value.bounced,
                punch_time_buckets: value.punch_time_buckets,
                punch_time_sum_ns: value.punch_time_sum_ns,
            };
            one = totals.plus(&one);
            *totals = one;
        }
    }
    Ok(all)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// One punch flow as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// This side (the source of its egress packets).
    pub local: SocketAddr,
    /// The other side.
    pub remote: SocketAddr,
    /// IP protocol number (17 UDP, 6 TCP).
    pub protocol: u8,
    /// The kernel's record.
    pub state: FlowState,
}

impl Flow {
    /// Whether ingress followed egress on this flow.
    pub fn punched(&self) -> bool {
        self.state.flags & FLOW_PUNCHED != 0
    }

    /// Time from the first egress to the first ingress packet, once punched.
    pub fn punch_time(&self) -> Option<Duration> {
        self.punched().then(|| {
            Duration::from_nanos(
                self.state
                    .punched_ns
                    .saturating_sub(self.state.first_egress_ns),
            )
        })
    }
}

/// A handle on the kernel's punch flow table (shared with the probe).
#[derive(Clone)]
pub struct FlowTable {
    maps: Arc<KernelMaps>,
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable").finish_non_exhaustive()
    }
}

impl FlowTable {
    /// Every flow in the table (at most [`gateway_ebpf::FLOW_TABLE_CAPACITY`]).
    pub fn flows(&self) -> Result<Vec<Flow>, EbpfError> {
        let flows = lock(&self.maps.flows);
        let mut out = Vec::new();
        for entry in flows.iter() {
            // A flow evicted or expired between the key walk and the lookup is gone.
            let Ok((key, state)) = entry else { continue };
            out.push(Flow {
                local: socket_addr(&key.local),
                remote: socket_addr(&key.remote),
                protocol: u8::try_from(key.protocol).unwrap_or(u8::MAX),
                state,
            });
        }
        Ok(out)
    }

    /// Number of flows in the table.
    pub fn len(&self) -> usize {
        lock(&self.maps.flows).keys().filter(Result::is_ok).count()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes flows on which this side has sent nothing for longer than `idle` (so a
    /// flow that comes back after its NAT mapping would have expired is judged afresh:
    /// a NAT refreshes a mapping on outbound traffic); returns how many.
    pub fn expire(&self, idle: Duration) -> usize {
        let now = monotonic_ns();
        let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let mut flows = lock(&self.maps.flows);
        let stale: Vec<FlowKey> = flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| now.saturating_sub(state.last_seen_ns) > idle_ns)
            .map(|(key, _)| key)
            .collect();
        stale.iter().filter(|key| flows.remove(key).is_ok()).count()
    }
}

/// Exports the kernel's maps at scrape time:
/// `gateway_ebpf_udp_packets_total{direction}`, `gateway_ebpf_udp_bytes_total{direction}`,
/// `gateway_punched_flows_total`, `gateway_bounced_packets_total{reason}` (both over
/// all protocols), the same split by protocol in
/// `gateway_punched_flows_by_protocol_total{protocol}` and
/// `gateway_bounced_packets_by_protocol_total{protocol,reason}`,
/// `gateway_ebpf_punch_time_seconds` (histogram) and `gateway_ebpf_flow_table_entries`.
pub struct EbpfCollector {
    maps: Arc<KernelMaps>,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    punched: IntCounter,
    bounced: IntCounterVec,
    punched_by_protocol: IntCounterVec,
    bounced_by_protocol: IntCounterVec,
    flow_entries: IntGauge,
    punch_time: Desc,
}

/// Name of the punch-time histogram.
const PUNCH_TIME_METRIC: &str = "gateway_ebpf_punch_time_seconds";
const PUNCH_TIME_HELP: &str = "Time from a punch flow's first egress packet to its first ingress packet, as seen by the tc eBPF programs";

impl EbpfCollector {
    fn new(maps: Arc<KernelMaps>) -> Result<Self, prometheus::Error> {
        let packets = IntCounterVec::new(
            Opts::new(
                "gateway_ebpf_udp_packets_total",
                "UDP packets on the watched ports seen by the tc eBPF programs, by direction",
            ),
            &["direction"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "gateway_ebpf_udp_bytes_total",
                "Bytes of those packets (IP packet length) seen by the tc eBPF programs, by direction",
            ),
            &["direction"],
        )?;
        for direction in Direction::ALL {
            packets.with_label_values(&[direction.as_str()]);
            bytes.with_label_values(&[direction.as_str()]);
        }
        let punched = IntCounter::new(
            "gateway_punched_flows_total",
            "Punch flows whose first ingress packet followed an egress packet (each flow counted once), seen by the tc eBPF programs",
        )?;
        let bounced = IntCounterVec::new(
            Opts::new(
                "gateway_bounced_packets_total",
                "Packets of punch flows that bounced, by reason: ingress before any egress, ICMP errors quoting the flow, TCP RSTs answering its SYN",
            ),
            &["reason"],
        )?;
        for reason in BounceReason::ALL {
            bounced.with_label_values(&[reason.as_str()]);
        }
        let punched_by_protocol = IntCounterVec::new(
            Opts::new(
                "gateway_punched_flows_by_protocol_total",
                "gateway_punched_flows_total split by the flow's transport protocol (udp, tcp)",
            ),
            &["protocol"],
        )?;
        let bounced_by_protocol = IntCounterVec::new(
            Opts::new(
                "gateway_bounced_packets_by_protocol_total",
                "gateway_bounced_packets_total split by the flow's transport protocol (udp, tcp)",
            ),
            &["protocol", "reason"],
        )?;
        for protocol in PunchProtocol::ALL {
            punched_by_protocol.with_label_values(&[protocol.as_str()]);
            for reason in BounceReason::ALL {
                bounced_by_protocol.with_label_values(&[protocol.as_str(), reason.as_str()]);
            }
        }
        let flow_entries = IntGauge::new(
            "gateway_ebpf_flow_table_entries",
            "Punch flows currently in the kernel's flow table",
        )?;
        let punch_time = Desc::new(
            PUNCH_TIME_METRIC.to_owned(),
            PUNCH_TIME_HELP.to_owned(),
            Vec::new(),
            StdHashMap::new(),
        )?;
        Ok(Self {
            maps,
            packets,
            bytes,
            punched,
            bounced,
            punched_by_protocol,
            bounced_by_protocol,
            flow_entries,
            punch_time,
        })
    }

    fn punch_time_family(totals: &PunchTotals) -> MetricFamily {
        let mut cumulative = 0u64;
        let buckets = PUNCH_TIME_BOUNDS_NS
            .iter()
            .zip(totals.punch_time_buckets)
            .map(|(&bound, count)| {
                cumulative = cumulative.wrapping_add(count);
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(bound as f64 / 1e9);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        let mut histogram = Histogram::default();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(totals.punched());
        histogram.set_sample_sum(totals.punch_time_sum_ns as f64 / 1e9);
        let mut metric = Metric::default();
        metric.set_histogram(histogram);
        let mut family = MetricFamily::default();
        family.set_name(PUNCH_TIME_METRIC.to_owned());
        family.set_help(PUNCH_TIME_HELP.to_owned());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(vec![metric]);
        family
    }
}

/// Moves a counter up to `total` (kernel counters only grow).
fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

impl Collector for EbpfCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.packets.desc();
        descs.extend(self.bytes.desc());
        descs.extend(self.punched.desc());
        descs.extend(self.bounced.desc());
        descs.extend(self.punched_by_protocol.desc());
        descs.extend(self.bounced_by_protocol.desc());
        descs.extend(self.flow_entries.desc());
        descs.push(&self.punch_time);
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match read_udp_counters(&self.maps) {
            Ok(totals) => {
                for (direction, total) in Direction::ALL.into_iter().zip(totals) {
                    let label = [direction.as_str()];
                    catch_up(&self.packets.with_label_values(&label), total.packets);
                    catch_up(&self.bytes.with_label_values(&label), total.bytes);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read eBPF counters"),
        }
        let totals = match read_punch_totals(&self.maps) {
            Ok(per_protocol) => {
                for (protocol, totals) in PunchProtocol::ALL.into_iter().zip(&per_protocol) {
                    catch_up(
                        &self
                            .punched_by_protocol
                            .with_label_values(&[protocol.as_str()]),
                        totals.punched(),
                    );
                    for reason in BounceReason::ALL {
                        catch_up(
                            &self
                                .bounced_by_protocol
                                .with_label_values(&[protocol.as_str(), reason.as_str()]),
                            totals.bounced(reason),
                        );
                    }
                }
                let [udp, tcp] = per_protocol;
                let totals = udp.plus(&tcp);
                catch_up(&self.punched, totals.punched());
                for reason in BounceReason::ALL {
                    catch_up(
                        &self.bounced.with_label_values(&[reason.as_str()]),
                        totals.bounced(reason),
                    );
                }
                totals
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read eBPF punch statistics");
                PunchTotals::default()
            }
        };
        let table = FlowTable {
            maps: self.maps.clone(),
        };
        self.flow_entries
            .set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        let mut families = self.packets.collect();
        families.extend(self.bytes.collect());
        families.extend(self.punched.collect());
        families.extend(self.bounced.collect());
        families.extend(self.punched_by_protocol.collect());
        families.extend(self.bounced_by_protocol.collect());
        families.extend(self.flow_entries.collect());
        families.push(Self::punch_time_family(&totals));
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_both_families() {
        for addr in ["192.0.2.10:3478", "[2001:db8::1]:40000"] {
            let addr: SocketAddr = addr.parse().expect("address");
            assert_eq!(socket_addr(&endpoint(addr)), addr);
        }
        let v4 = endpoint("198.51.100.2:5".parse().expect("address"));
        assert_eq!(v4.family, FAMILY_IPV4);
        assert_eq!(&v4.addr[1..], &[0u32; 3], "the kernel writes zeros there");
        assert_eq!(v4.addr[0].to_ne_bytes(), [198, 51, 100, 2], "wire order");
    }

    #[test]
    fn watched_port_flags_combine_roles() {
        let spec = WatchSpec {
            counted_udp_ports: vec![3478],
            punch_udp_ports: vec![3478, 4000],
            punch_tcp_ports: vec![4000],
            ..WatchSpec::default()
        };
        let flags = spec.port_flags();
        assert_eq!(flags[&3478], watch::COUNT_UDP | watch::PUNCH_UDP);
        assert_eq!(
            flags[&4000],
            watch::COUNT_UDP | watch::PUNCH_UDP | watch::PUNCH_TCP
        );
    }

    #[test]
    fn punch_totals_of_two_protocols_add_up() {
        let mut udp = PunchTotals::default();
        udp.bounced[BounceReason::BeforeEgress as usize] = 2;
        udp.punch_time_buckets[0] = 1;
        udp.punch_time_sum_ns = 5;
        let mut tcp = PunchTotals::default();
        tcp.bounced[BounceReason::TcpRst as usize] = 8;
        tcp.bounced[BounceReason::BeforeEgress as usize] = 1;
        tcp.punch_time_buckets[3] = 1;
        tcp.punch_time_sum_ns = 7;
        let sum = udp.plus(&tcp);
        assert_eq!(sum.bounced(BounceReason::BeforeEgress), 3);
        assert_eq!(sum.bounced(BounceReason::TcpRst), 8);
        assert_eq!(sum.punched(), 2);
        assert_eq!(sum.punch_time_sum_ns, 12);
        assert_eq!(
            PunchProtocol::ALL.map(|p| p as u32),
            [0, 1],
            "slot order of the kernel map"
        );
        assert_eq!(PunchProtocol::from_ip(6), PunchProtocol::Tcp);
        assert_eq!(PunchProtocol::from_ip(17), PunchProtocol::Udp);
    }

    #[test]
    fn punch_time_histogram_is_cumulative_in_seconds() {
        let mut totals = PunchTotals::default();
        totals.punch_time_buckets[0] = 2; // <= 1 ms
        totals.punch_time_buckets[3] = 1; // <= 10 ms
        totals.punch_time_buckets[PUNCH_TIME_SLOTS - 1] = 1; // > 10 s
        totals.punch_time_sum_ns = 12_000_000_000;
        let family = EbpfCollector::punch_time_family(&totals);
        let histogram = family.get_metric()[0].get_histogram();
        assert_eq!(histogram.get_sample_count(), 4);
        assert!((histogram.get_sample_sum() - 12.0).abs() < 1e-9);
        let buckets = histogram.get_bucket();
        assert_eq!(buckets.len(), PUNCH_TIME_BOUNDS_NS.len());
        assert!((buckets[0].upper_bound() - 0.001).abs() < 1e-12);
        assert_eq!(buckets[0].cumulative_count(), 2);
        assert_eq!(buckets[2].cumulative_count(), 2);
        assert_eq!(buckets[3].cumulative_count(), 3);
        assert_eq!(
            buckets[12].cumulative_count(),
            3,
            "the 11 s one is only in +Inf"
        );
    }
}
