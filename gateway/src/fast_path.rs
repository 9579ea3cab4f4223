//! The TURN relay's kernel fast path: loads the `relay_fast_path` tc ingress classifier
//! of the embedded eBPF object, attaches it to the relay's interfaces, and keeps its
//! maps in line with the TURN core's [`FastPath`] instructions. Also reads back what
//! the kernel relayed, per allocation and in total, for the relay's metrics.
//!
//! The kernel handles bound channels (IPv4): between two clients of this gateway
//! (relay to relay), and between a client and any other peer (ChannelData to plain UDP
//! and back); everything else stays with the userspace relay (see
//! `gateway-ebpf/src/relay.rs` and docs/architecture.md).
use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions, tc::SchedClassifierLinkId},
};
use gateway_ebpf::{
    RELAY_ALLOCATION_COUNTERS_MAP, RELAY_CHANNELS_MAP, RELAY_DESTINATION_LOCAL,
    RELAY_MAX_ALLOCATIONS, RELAY_PEERS_MAP, RELAY_PROGRAM, RELAY_SETTINGS_MAP, RELAY_TOTALS_MAP,
    RelayChannel, RelayChannelKey, RelayCounters, RelayPeer, RelayPeerKey, RelaySettings,
};

use crate::{
    ebpf::{AttachMode, AttachedVia, EbpfError, aya_err, embedded_object, monotonic_ns, take_map},
    proto::turn::server::{FastChannel, FastPath},
};

/// Where the fast path works: the service port, the relay ports, the interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPathConfig {
    /// The TURN service port (ChannelData arrives there).
    pub service_port: u16,
    /// The relay port range.
    pub relay_ports: std::ops::RangeInclusive<u16>,
    /// Interfaces to attach to (ingress).
    pub interfaces: Vec<String>,
    /// TCX, netlink, or TCX with a netlink fallback.
    pub mode: AttachMode,
    /// This host's addresses: a rewritten packet to one of them (or to any loopback
    /// address) is delivered locally.
    pub local_addresses: Vec<IpAddr>,
}

/// What the fast path relayed, summed over CPUs.
pub type FastPathCounters = RelayCounters;

/// The loaded and attached fast path.
pub struct RelayFastPath {
    ebpf: Ebpf,
    links: Vec<(String, SchedClassifierLinkId, AttachedVia)>,
    channels: HashMap<MapData, RelayChannelKey, RelayChannel>,
    peers: HashMap<MapData, RelayPeerKey, RelayPeer>,
    allocation_counters: PerCpuArray<MapData, RelayCounters>,
    totals: PerCpuArray<MapData, RelayCounters>,
    config: FastPathConfig,
    /// Installed entries by (client, channel).
    installed: StdHashMap<(SocketAddr, u16), FastChannel>,
    /// Installed entries per allocation id.
    per_allocation: StdHashMap<u32, usize>,
    /// The totals already folded into the metrics.
    folded: RelayCounters,
}

impl std::fmt::Debug for RelayFastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayFastPath")
            .field("config", &self.config)
            .field("installed", &self.installed.len())
            .finish()
    }
}

impl RelayFastPath {
    /// Loads the embedded object's relay program, configures it and attaches it to
    /// the ingress of every interface of `config`.
    pub fn load(config: FastPathConfig) -> Result<Self, EbpfError> {
        let object = embedded_object().ok_or(EbpfError::NotEmbedded)?;
        let mut ebpf = crate::ebpf::load_checked(object)?;
        {
            let program: &mut SchedClassifier = ebpf
                .program_mut(RELAY_PROGRAM)
                .ok_or(EbpfError::Missing("the relay fast-path program"))?
                .try_into()
                .map_err(aya_err(format!("program {RELAY_PROGRAM}")))?;
            program
                .load()
                .map_err(aya_err(format!("loading {RELAY_PROGRAM} into the kernel")))?;
        }
        {
            let map = ebpf
                .map_mut(RELAY_SETTINGS_MAP)
                .ok_or(EbpfError::Missing(RELAY_SETTINGS_MAP))?;
            let mut map: Array<_, RelaySettings> =
                Array::try_from(map).map_err(aya_err("opening the relay settings"))?;
            let settings = RelaySettings {
                service_port: config.service_port,
                relay_port_min: *config.relay_ports.start(),
                relay_port_max: *config.relay_ports.end(),
                pad: 0,
            };
            map.set(0, settings, 0)
                .map_err(aya_err("writing the relay settings"))?;
        }
        let mut fast = Self {
            channels: take_map(&mut ebpf, RELAY_CHANNELS_MAP)?,
            peers: take_map(&mut ebpf, RELAY_PEERS_MAP)?,
            allocation_counters: take_map(&mut ebpf, RELAY_ALLOCATION_COUNTERS_MAP)?,
            totals: take_map(&mut ebpf, RELAY_TOTALS_MAP)?,
            ebpf,
            links: Vec::new(),
            config,
            installed: StdHashMap::new(),
            per_allocation: StdHashMap::new(),
            folded: RelayCounters::default(),
        };
        for interface in fast.config.interfaces.clone() {
            fast.attach(&interface)?;
        }
        Ok(fast)
    }

    fn attach(&mut self, interface: &str) -> Result<(), EbpfError> {
        crate::ebpf::require_interface(interface)?;
        let mode = self.config.mode;
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(RELAY_PROGRAM)
            .ok_or(EbpfError::Missing("the relay fast-path program"))?
            .try_into()
            .map_err(aya_err(format!("program {RELAY_PROGRAM}")))?;
        let (id, via) = crate::ebpf::attach_classifier(
            program,
            interface,
            TcAttachType::Ingress,
            mode,
            RELAY_PROGRAM,
        )?;
        tracing::info!(%interface, via = via.as_str(), "relay fast path attached");
        self.links.push((interface.to_owned(), id, via));
        Ok(())
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> Vec<String> {
        self.links.iter().map(|(i, _, _)| i.clone()).collect()
    }

    /// Entries installed now.
    pub fn installed(&self) -> usize {
        self.installed.len()
    }

    /// Applies one instruction of the TURN core. Entries the kernel cannot serve
    /// (IPv6, allocation ids beyond its counters) are skipped: their traffic stays
    /// in userspace.
    pub fn apply(&mut self, instruction: &FastPath) -> Result<(), EbpfError> {
        match instruction {
            FastPath::Install(entry) => self.install(entry),
            FastPath::Remove(entry) => self.remove(entry),
        }
    }

    fn install(&mut self, entry: &FastChannel) -> Result<(), EbpfError> {
        let Some((key, channel, peer_key, peer)) = self.encode(entry) else {
            return Ok(());
        };
        let id = (entry.client, entry.channel);
        if !self.installed.contains_key(&id) {
            let count = self.per_allocation.entry(entry.allocation).or_insert(0);
            if *count == 0 {
                // A fresh allocation id: its counters start at zero.
                let zeros = PerCpuValues::try_from(vec![RelayCounters::default(); nr_cpus()])
                    .map_err(aya_err("per-CPU zeros"))?;
                self.allocation_counters
                    .set(entry.allocation, zeros, 0)
                    .map_err(aya_err("resetting allocation counters"))?;
            }
            *count += 1;
        }
        // The reverse entry first: a packet that finds the channel finds its way back.
        self.peers
            .insert(peer_key, peer, 0)
            .map_err(aya_err("installing a relay peer entry"))?;
        self.channels
            .insert(key, channel, 0)
            .map_err(aya_err("installing a relay channel entry"))?;
        self.installed.insert(id, *entry);
        Ok(())
    }

    fn remove(&mut self, entry: &FastChannel) -> Result<(), EbpfError> {
        let id = (entry.client, entry.channel);
        let Some(installed) = self.installed.remove(&id) else {
            return Ok(());
        };
        if let Some((key, _, peer_key, _)) = self.encode(&installed) {
            // Gone already is fine (nothing else removes entries, but be lenient).
            let _ = self.channels.remove(&key);
            let _ = self.peers.remove(&peer_key);
        }
        if let Some(count) = self.per_allocation.get_mut(&installed.allocation) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_allocation.remove(&installed.allocation);
                if let Ok(counters) = self.allocation_counters(installed.allocation) {
                    tracing::debug!(
                        allocation = installed.allocation,
                        ?counters,
                        "allocation left the fast path"
                    );
                }
            }
        }
        Ok(())
    }

    /// The map entries of `entry`, or `None` when the kernel cannot serve it.
    fn encode(
        &self,
        entry: &FastChannel,
    ) -> Option<(RelayChannelKey, RelayChannel, RelayPeerKey, RelayPeer)> {
        let (SocketAddr::V4(client), IpAddr::V4(service), SocketAddr::V4(relay)) =
            (entry.client, entry.service, entry.relay)
        else {
            return None;
        };
        let SocketAddr::V4(peer) =
            SocketAddr::new(entry.peer.ip().to_canonical(), entry.peer.port())
        else {
            return None;
        };
        if entry.allocation >= RELAY_MAX_ALLOCATIONS {
            return None;
        }
        let word = |ip: std::net::Ipv4Addr| u32::from_ne_bytes(ip.octets());
        let port = |port: u16| u16::from_ne_bytes(port.to_be_bytes());
        let local = |ip: IpAddr| {
            if ip.is_loopback() || self.config.local_addresses.contains(&ip) {
                RELAY_DESTINATION_LOCAL
            } else {
                0
            }
        };
        let expires_ns = deadline_ns(entry.expires);
        let key = RelayChannelKey {
            client_ip: word(*client.ip()),
            service_ip: word(service),
            client_port: port(client.port()),
            service_port: port(self.config.service_port),
            channel: port(entry.channel),
            pad: 0,
        };
        let channel = RelayChannel {
            relay_ip: word(*relay.ip()),
            peer_ip: word(*peer.ip()),
            relay_port: port(relay.port()),
            peer_port: port(peer.port()),
            allocation: entry.allocation,
            flags: local(IpAddr::V4(*peer.ip())),
            pad: 0,
            expires_ns,
        };
        let peer_key = RelayPeerKey {
            peer_ip: word(*peer.ip()),
            relay_ip: word(*relay.ip()),
            peer_port: port(peer.port()),
            relay_port: port(relay.port()),
        };
        let peer_entry = RelayPeer {
            client_ip: key.client_ip,
            service_ip: key.service_ip,
            client_port: key.client_port,
            service_port: key.service_port,
            channel: key.channel,
            pad: 0,
            allocation: entry.allocation,
            flags: local(IpAddr::V4(*client.ip())),
            expires_ns,
        };
        Some((key, channel, peer_key, peer_entry))
    }

    /// What the kernel relayed for allocation `id` since its first entry, summed over
    /// CPUs.
    pub fn allocation_counters(&self, id: u32) -> Result<FastPathCounters, EbpfError> {
        let values = self
            .allocation_counters
            .get(&id, 0)
            .map_err(aya_err("reading allocation counters"))?;
        Ok(sum(values.iter()))
    }

    /// What the kernel relayed in total, summed over CPUs.
    pub fn totals(&self) -> Result<FastPathCounters, EbpfError> {
        let values = self
            .totals
            .get(&0, 0)
            .map_err(aya_err("reading the fast-path totals"))?;
        Ok(sum(values.iter()))
    }

    /// What the kernel relayed since the last call (for `_total` counters).
    pub fn take_new(&mut self) -> Result<FastPathCounters, EbpfError> {
        let now = self.totals()?;
        let before = std::mem::replace(&mut self.folded, now);
        Ok(RelayCounters {
            to_peer_packets: now.to_peer_packets.saturating_sub(before.to_peer_packets),
            to_peer_bytes: now.to_peer_bytes.saturating_sub(before.to_peer_bytes),
            to_client_packets: now
                .to_client_packets
                .saturating_sub(before.to_client_packets),
            to_client_bytes: now.to_client_bytes.saturating_sub(before.to_client_bytes),
        })
    }

    /// Runs the program once on `frame` (an Ethernet frame) with `BPF_PROG_TEST_RUN`,
    /// against this fast path's maps: its return value and the frame as it left.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(i32, Vec<u8>), EbpfError> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(RELAY_PROGRAM)
            .ok_or(EbpfError::Missing("the relay fast-path program"))?
            .try_into()
            .map_err(aya_err(format!("program {RELAY_PROGRAM}")))?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(aya_err(format!("BPF_PROG_TEST_RUN of {RELAY_PROGRAM}")))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// Detaches the program from every interface (dropping does it too, silently);
    /// the maps go with the last file descriptor.
    pub fn detach(mut self) {
        for (interface, id, via) in std::mem::take(&mut self.links) {
            let Some(program) = self.ebpf.program_mut(RELAY_PROGRAM) else {
                continue;
            };
            let Ok(program): Result<&mut SchedClassifier, _> = program.try_into() else {
                continue;
            };
            match program.detach(id) {
                Ok(()) => {
                    tracing::info!(%interface, via = via.as_str(), "relay fast path detached")
                }
                Err(e) => tracing::warn!(%interface, error = %e, "relay fast path detach failed"),
            }
        }
    }
}

fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

fn sum<'a>(values: impl Iterator<Item = &'a RelayCounters>) -> RelayCounters {
    values.fold(RelayCounters::default(), |a, v| RelayCounters {
        to_peer_packets: a.to_peer_packets + v.to_peer_packets,
        to_peer_bytes: a.to_peer_bytes + v.to_peer_bytes,
        to_client_packets: a.to_client_packets + v.to_client_packets,
        to_client_bytes: a.to_client_bytes + v.to_client_bytes,
    })
}

/// `deadline` on the kernel's CLOCK_MONOTONIC (what `Instant` measures on Linux).
fn deadline_ns(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    monotonic_ns().saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
}

/// The interfaces that carry `addresses` (an unspecified address: every interface
/// that is up), for the fast path's default attachment.
pub fn interfaces_of(addresses: &[IpAddr]) -> Vec<String> {
    if addresses.iter().any(IpAddr::is_unspecified) {
        return crate::ebpf::interfaces_up();
    }
    let mut names = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below; sockaddrs are
    // read according to their family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return names;
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let entry = &*cursor;
            if !entry.ifa_addr.is_null() && !entry.ifa_name.is_null() {
                let ip = match i32::from((*entry.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip
                    && addresses.contains(&ip)
                {
                    let name = std::ffi::CStr::from_ptr(entry.ifa_name)
                        .to_string_lossy()
                        .into_owned();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
            cursor = entry.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_on_lo() {
        assert_eq!(interfaces_of(&["127.0.0.1".parse().expect("ip")]), ["lo"]);
        assert!(interfaces_of(&["192.0.2.123".parse().expect("ip")]).is_empty());
    }
}
