//! The nftables guard that keeps the kernel from spoiling a splice attempt.
//!
//! While an attempt runs, the kernel would answer a stray SYN-ACK with a RST to the
//! peer and abort a low-TTL `connect()` on the ICMP time-exceeded it provokes.
//! [`SuppressionRules`] drops those in a table of its own, and the [`NftGuard`] it
//! returns deletes that table on drop, in the network namespace it was made in, so
//! no rule outlives the attempt (error paths and unwinding included).
use std::{
    fs::File,
    io::{self, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{RawError, io_err};

/// nftables rules that keep the kernel from spoiling a splice attempt, installed in
/// one table of their own by [`SuppressionRules::install`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuppressionRules {
    /// Drop RSTs this host sends to these endpoints (a kernel that sees a stray
    /// SYN-ACK or segment for no socket of its own answers with one).
    pub rst_to: Vec<SocketAddr>,
    /// Drop incoming ICMP and ICMPv6 time-exceeded messages while the rules stand:
    /// Linux aborts a connect() in SYN_SENT that gets one, which is what a low-TTL
    /// SYN provokes from the router where it expires.
    pub icmp_time_exceeded: bool,
}

static NEXT_TABLE: AtomicU32 = AtomicU32::new(0);

impl SuppressionRules {
    /// The nft script that creates `table` with these rules.
    pub fn script(&self, table: &str) -> String {
        let mut s = format!("table inet {table} {{\n");
        s.push_str("  chain input {\n    type filter hook input priority -150; policy accept;\n");
        if self.icmp_time_exceeded {
            s.push_str("    icmp type time-exceeded counter drop\n");
            s.push_str("    icmpv6 type time-exceeded counter drop\n");
        }
        s.push_str("  }\n");
        s.push_str("  chain output {\n    type filter hook output priority -150; policy accept;\n");
        for to in &self.rst_to {
            let family = if to.is_ipv4() { "ip" } else { "ip6" };
            s.push_str(&format!(
                "    {family} daddr {} tcp dport {} tcp flags & rst == rst counter drop\n",
                to.ip(),
                to.port()
            ));
        }
        s.push_str("  }\n}\n");
        s
    }

    /// Installs the rules in a new table (`inet gateway_splice_<pid>_<n>`) of the
    /// calling thread's network namespace. The returned guard deletes the table when
    /// dropped, wherever that happens.
    pub fn install(&self) -> Result<NftGuard, RawError> {
        for to in &self.rst_to {
            if to.ip().is_unspecified() {
                return Err(RawError::Unspecified(to.ip()));
            }
        }
        let table = format!(
            "gateway_splice_{}_{}",
            std::process::id(),
            NEXT_TABLE.fetch_add(1, Ordering::Relaxed)
        );
        let netns = File::open("/proc/thread-self/ns/net")
            .map_err(io_err("opening this thread's network namespace"))?;
        let netns_ino = netns
            .metadata()
            .map_err(io_err("reading this thread's network namespace"))?
            .ino();
        nft(&["-f", "-"], Some(&self.script(&table)))?;
        tracing::debug!(%table, "installed splice suppression rules");
        Ok(NftGuard {
            table,
            netns,
            netns_ino,
            removed: false,
        })
    }
}

/// Runs `nft args` (feeding `stdin`) in the calling thread's network namespace.
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, RawError> {
    let shown = || {
        let mut s = args.join(" ");
        if let Some(text) = stdin {
            s.push_str(" <<EOF\n");
            s.push_str(text);
            s.push_str("EOF");
        }
        s
    };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running nft {}", args.join(" "))))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(io_err("writing to nft"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for nft {}", args.join(" "))))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RawError::Nft {
            args: shown(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Owns an nftables table made by [`SuppressionRules::install`] and deletes it on
/// drop, in the network namespace it was made in, even when dropped from another
/// thread or while unwinding. [`NftGuard::remove`] does the same and reports errors.
#[derive(Debug)]
pub struct NftGuard {
    table: String,
    netns: File,
    netns_ino: u64,
    removed: bool,
}

impl NftGuard {
    /// The table's name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Deletes the table now.
    pub fn remove(mut self) -> Result<(), RawError> {
        self.removed = true;
        self.delete()
    }

    fn delete(&self) -> Result<(), RawError> {
        let args = ["delete", "table", "inet", self.table.as_str()];
        let here = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
        if here.ok() == Some(self.netns_ino) {
            return nft(&args, None).map(|_| ());
        }
        let fd = self.netns.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) on an open namespace file; it affects only this
                    // scoped thread, which ends right after.
                    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(RawError::Io {
                            what: "entering the rules' network namespace".to_owned(),
                            source: io::Error::last_os_error(),
                        });
                    }
                    nft(&args, None).map(|_| ())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(RawError::Io {
                        what: "removing nft rules".to_owned(),
                        source: io::Error::other("the removing thread panicked"),
                    })
                })
        })
    }
}

impl Drop for NftGuard {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = self.delete()
        {
            tracing::warn!(table = %self.table, "could not remove splice suppression rules: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_script_names_each_peer() {
        let rules = SuppressionRules {
            rst_to: vec![
                "192.0.2.1:80".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            ],
            icmp_time_exceeded: true,
        };
        let script = rules.script("t");
        assert!(
            script.contains("ip daddr 192.0.2.1 tcp dport 80 tcp flags & rst == rst counter drop")
        );
        assert!(script.contains("ip6 daddr 2001:db8::1 tcp dport 443"));
        assert!(script.contains("icmpv6 type time-exceeded counter drop"));
        let quiet = SuppressionRules::default().script("t");
        assert!(!quiet.contains("drop"));
    }
}
