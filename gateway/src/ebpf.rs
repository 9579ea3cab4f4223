//! Loads the kernel programs (built by `cargo xtask build-ebpf` and embedded at build
//! time), attaches them with tc (TCX on kernels >= 6.6, netlink clsact before), tells
//! them which ports to count, and reads their per-CPU counters back.
//!
//! Everything here may fail on a host without root, BTF or tc support; the daemon
//! then runs without eBPF and says so in its log and in `gateway_ebpf_loaded`.
use std::{
    fs,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc, tc::SchedClassifierLinkId},
};
use gateway_ebpf::{
    Direction, MAX_WATCHED_UDP_PORTS, UDP_COUNTERS_MAP, UDP_EGRESS_PROGRAM, UDP_INGRESS_PROGRAM,
    UdpCounters, WATCHED_UDP_PORTS_MAP,
};
use prometheus::{
    IntCounterVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
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
    /// Loading needs CAP_BPF/CAP_NET_ADMIN (in practice: root).
    #[error("loading eBPF programs needs root (CAP_BPF and CAP_NET_ADMIN)")]
    NotPermitted,
    /// No interface to attach to.
    #[error("no network interface to attach to")]
    NoInterfaces,
    /// Too many ports to watch.
    #[error("at most {MAX_WATCHED_UDP_PORTS} ports can be watched, {0} asked")]
    TooManyPorts(usize),
    /// The object or a program failed to load or attach.
    #[error("{what}: {source}")]
    Aya {
        /// What was being done.
        what: String,
        /// aya's error, whose chain names the kernel's complaint.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map is missing from the object (a build mismatch).
    #[error("eBPF object lacks map or program {0}")]
    Missing(&'static str),
}

fn aya_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Aya { what, source }
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

/// The loaded and attached UDP counting programs.
pub struct UdpCounterProbe {
    ebpf: Ebpf,
    links: Vec<(String, TcAttachType, SchedClassifierLinkId)>,
    counters: Arc<Mutex<PerCpuArray<MapData, UdpCounters>>>,
}

impl std::fmt::Debug for UdpCounterProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpCounterProbe")
            .field("interfaces", &self.interfaces())
            .finish()
    }
}

impl UdpCounterProbe {
    /// Loads the embedded object, watches `ports` and attaches on ingress and egress
    /// of each interface (every interface that is up when `interfaces` is empty).
    pub fn load(ports: &[u16], interfaces: &[String]) -> Result<Self, EbpfError> {
        let object = embedded_object().ok_or(EbpfError::NotEmbedded)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc_geteuid() } != 0 {
            return Err(EbpfError::NotPermitted);
        }
        if ports.len() > MAX_WATCHED_UDP_PORTS as usize {
            return Err(EbpfError::TooManyPorts(ports.len()));
        }
        let interfaces = if interfaces.is_empty() {
            interfaces_up()
        } else {
            interfaces.to_vec()
        };
        if interfaces.is_empty() {
            return Err(EbpfError::NoInterfaces);
        }
        let mut ebpf =
            Ebpf::load(object).map_err(|e| aya_err("loading the eBPF object")(Box::new(e)))?;
        {
            let map = ebpf
                .map_mut(WATCHED_UDP_PORTS_MAP)
                .ok_or(EbpfError::Missing(WATCHED_UDP_PORTS_MAP))?;
            let mut watched: HashMap<_, u16, u8> =
                HashMap::try_from(map).map_err(|e| aya_err("opening the port map")(Box::new(e)))?;
            for &port in ports {
                watched
                    .insert(port, 1, 0)
                    .map_err(|e| aya_err(format!("watching port {port}"))(Box::new(e)))?;
            }
        }
        let mut links = Vec::new();
        for (program_name, attach_type) in [
            (UDP_INGRESS_PROGRAM, TcAttachType::Ingress),
            (UDP_EGRESS_PROGRAM, TcAttachType::Egress),
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(program_name)
                .ok_or(EbpfError::Missing("a classifier program"))?
                .try_into()
                .map_err(|e| aya_err(format!("program {program_name}"))(Box::new(e)))?;
            program.load().map_err(|e| {
                aya_err(format!("loading {program_name} into the kernel"))(Box::new(e))
            })?;
            for iface in &interfaces {
                // Only needed for the netlink fallback on kernels without TCX; an
                // existing clsact qdisc is fine.
                let _ = tc::qdisc_add_clsact(iface);
                let link = program.attach(iface, attach_type).map_err(|e| {
                    aya_err(format!("attaching {program_name} to {iface}"))(Box::new(e))
                })?;
                links.push((iface.clone(), attach_type, link));
            }
        }
        let counters = ebpf
            .take_map(UDP_COUNTERS_MAP)
            .ok_or(EbpfError::Missing(UDP_COUNTERS_MAP))?;
        let counters = PerCpuArray::try_from(counters)
            .map_err(|e| aya_err("opening the counter map")(Box::new(e)))?;
        Ok(Self {
            ebpf,
            links,
            counters: Arc::new(Mutex::new(counters)),
        })
    }

    /// The interfaces the programs are attached to.
    pub fn interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.links.iter().map(|(i, _, _)| i.clone()).collect();
        names.dedup();
        names
    }

    /// Current totals per direction, summed over CPUs.
    pub fn read(&self) -> Result<[UdpCounters; 2], EbpfError> {
        read_counters(&self.counters)
    }

    /// A Prometheus collector that reads the counters at scrape time.
    pub fn collector(&self) -> Result<UdpCounterCollector, prometheus::Error> {
        UdpCounterCollector::new(self.counters.clone())
    }

    /// Detaches every program from every interface (dropping does it too; this
    /// reports failures).
    pub fn detach(mut self) {
        for (program_name, attach_type) in [
            (UDP_INGRESS_PROGRAM, TcAttachType::Ingress),
            (UDP_EGRESS_PROGRAM, TcAttachType::Egress),
        ] {
            let Some(program) = self.ebpf.program_mut(program_name) else {
                continue;
            };
            let Ok(program): Result<&mut SchedClassifier, _> = program.try_into() else {
                continue;
            };
            let mut rest = Vec::new();
            for (iface, ty, link) in self.links.drain(..) {
                if ty == attach_type {
                    match program.detach(link) {
                        Ok(()) => {
                            tracing::info!(interface = %iface, program = program_name, "eBPF program detached")
                        }
                        Err(e) => {
                            tracing::warn!(interface = %iface, error = %e, "eBPF detach failed")
                        }
                    }
                } else {
                    rest.push((iface, ty, link));
                }
            }
            self.links = rest;
        }
    }
}

fn read_counters(
    counters: &Mutex<PerCpuArray<MapData, UdpCounters>>,
) -> Result<[UdpCounters; 2], EbpfError> {
    let counters = counters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut totals = [UdpCounters::default(); 2];
    for direction in Direction::ALL {
        let per_cpu = counters
            .get(&(direction as u32), 0)
            .map_err(|e| aya_err("reading the counter map")(Box::new(e)))?;
        let total = &mut totals[direction as usize];
        for value in per_cpu.iter() {
            total.packets = total.packets.wrapping_add(value.packets);
            total.bytes = total.bytes.wrapping_add(value.bytes);
        }
    }
    Ok(totals)
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Exports the kernel's UDP counters as `gateway_ebpf_udp_packets_total` and
/// `gateway_ebpf_udp_bytes_total`, labelled by direction, read at scrape time.
pub struct UdpCounterCollector {
    counters: Arc<Mutex<PerCpuArray<MapData, UdpCounters>>>,
    packets: IntCounterVec,
    bytes: IntCounterVec,
}

impl UdpCounterCollector {
    fn new(
        counters: Arc<Mutex<PerCpuArray<MapData, UdpCounters>>>,
    ) -> Result<Self, prometheus::Error> {
        let packets = IntCounterVec::new(
            Opts::new(
                "gateway_ebpf_udp_packets_total",
                "UDP packets on the gateway's ports seen by the tc eBPF programs, by direction",
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
        Ok(Self {
            counters,
            packets,
            bytes,
        })
    }
}

impl Collector for UdpCounterCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.packets.desc();
        descs.extend(self.bytes.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match read_counters(&self.counters) {
            Ok(totals) => {
                for direction in Direction::ALL {
                    let total = totals[direction as usize];
                    let label = [direction.as_str()];
                    let packets = self.packets.with_label_values(&label);
                    packets.inc_by(total.packets.saturating_sub(packets.get()));
                    let bytes = self.bytes.with_label_values(&label);
                    bytes.inc_by(total.bytes.saturating_sub(bytes.get()));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read eBPF counters"),
        }
        let mut families = self.packets.collect();
        families.extend(self.bytes.collect());
        families
    }
}
