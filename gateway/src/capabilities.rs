//! The process's effective capabilities, read from `/proc/self/status`, so the eBPF
//! loaders can say which capability is missing instead of assuming that only root
//! may load programs (the shipped systemd unit runs as an unprivileged user with
//! `CAP_BPF CAP_NET_ADMIN CAP_PERFMON` as ambient capabilities).
use std::fmt;

/// One Linux capability, by its number in `<linux/capability.h>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    bit: u8,
    name: &'static str,
}

impl Capability {
    /// `CAP_NET_BIND_SERVICE`: bind ports below 1024.
    pub const NET_BIND_SERVICE: Self = Self::new(10, "CAP_NET_BIND_SERVICE");
    /// `CAP_NET_ADMIN`: attach tc programs (TCX links, clsact qdiscs, filters).
    pub const NET_ADMIN: Self = Self::new(12, "CAP_NET_ADMIN");
    /// `CAP_NET_RAW`: raw sockets (only the lab-only forged SYN-ACKs need it).
    pub const NET_RAW: Self = Self::new(13, "CAP_NET_RAW");
    /// `CAP_SYS_ADMIN`: stands in for `CAP_BPF` and `CAP_PERFMON` (kernels before
    /// 5.8 know only this one).
    pub const SYS_ADMIN: Self = Self::new(21, "CAP_SYS_ADMIN");
    /// `CAP_PERFMON`: lets the verifier accept what tracing-style programs do
    /// (pointer arithmetic the unprivileged verifier refuses).
    pub const PERFMON: Self = Self::new(38, "CAP_PERFMON");
    /// `CAP_BPF`: create maps and load programs.
    pub const BPF: Self = Self::new(39, "CAP_BPF");

    const fn new(bit: u8, name: &'static str) -> Self {
        Self { bit, name }
    }

    /// The capability's name as `capabilities(7)` spells it.
    pub fn name(self) -> &'static str {
        self.name
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// A set of capabilities (the kernel's 64-bit mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CapabilitySet(u64);

impl CapabilitySet {
    /// The effective set of this process, from the `CapEff:` line of
    /// `/proc/self/status`; `None` when it cannot be read (no procfs).
    pub fn effective() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Self::parse_status(&status, "CapEff:")
    }

    /// Parses the hexadecimal mask of the line starting with `key` (`CapEff:`,
    /// `CapPrm:`, `CapAmb:`...) of a `/proc/PID/status` text.
    pub fn parse_status(status: &str, key: &str) -> Option<Self> {
        let hex = status.lines().find_map(|l| l.strip_prefix(key))?.trim();
        u64::from_str_radix(hex, 16).ok().map(Self)
    }

    /// Whether `cap` is in the set.
    pub fn has(self, cap: Capability) -> bool {
        self.0 & (1u64 << cap.bit) != 0
    }

    /// What loading and attaching tc eBPF programs needs that this set lacks:
    /// `CAP_NET_ADMIN`, and `CAP_BPF` with `CAP_PERFMON` or else `CAP_SYS_ADMIN`.
    /// Empty when nothing is missing.
    pub fn missing_for_ebpf(self) -> Vec<Capability> {
        let mut missing = Vec::new();
        let admin = self.has(Capability::SYS_ADMIN);
        for cap in [Capability::BPF, Capability::PERFMON] {
            if !admin && !self.has(cap) {
                missing.push(cap);
            }
        }
        if !self.has(Capability::NET_ADMIN) {
            missing.push(Capability::NET_ADMIN);
        }
        missing
    }
}

/// Checks that this process may load and attach tc eBPF programs; the error lists
/// what is missing. A process whose capabilities cannot be read is let through (the
/// kernel will answer EPERM if it must).
pub fn check_ebpf() -> Result<(), crate::ebpf::EbpfError> {
    let Some(set) = CapabilitySet::effective() else {
        return Ok(());
    };
    let missing = set.missing_for_ebpf();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(crate::ebpf::EbpfError::NotPermitted {
            missing: missing
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(" "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tgateway\nCapInh:\t0000000000000000\n\
        CapPrm:\t000000c000001400\nCapEff:\t000000c000001400\nCapAmb:\t000000c000001400\n";

    #[test]
    fn reads_the_systemd_unit_set() {
        // CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
        let set = CapabilitySet::parse_status(STATUS, "CapEff:").expect("parsed");
        assert!(set.has(Capability::BPF));
        assert!(set.has(Capability::PERFMON));
        assert!(set.has(Capability::NET_ADMIN));
        assert!(set.has(Capability::NET_BIND_SERVICE));
        assert!(!set.has(Capability::NET_RAW));
        assert!(!set.has(Capability::SYS_ADMIN));
        assert_eq!(set.missing_for_ebpf(), Vec::new());
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(
            CapabilitySet(0).missing_for_ebpf(),
            vec![Capability::BPF, Capability::PERFMON, Capability::NET_ADMIN]
        );
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, not for CAP_NET_ADMIN.
        let admin = CapabilitySet(1 << 21);
        assert_eq!(admin.missing_for_ebpf(), vec![Capability::NET_ADMIN]);
        let only_bpf = CapabilitySet((1 << 39) | (1 << 12));
        assert_eq!(only_bpf.missing_for_ebpf(), vec![Capability::PERFMON]);
        assert_eq!(
            CapabilitySet::parse_status("CapEff:\tzz\n", "CapEff:"),
            None
        );
        assert_eq!(CapabilitySet::parse_status("", "CapEff:"), None);
    }
}
