//! `cargo xtask deb`: the Debian package, built with nothing but `dpkg-deb` (part of
//! `dpkg`, which every Debian system has) from a tree staged here, and the check CI
//! runs on it (install with dpkg, `gateway --version`, `systemd-analyze verify`,
//! purge).
//!
//! Why not cargo-deb: it is one more tool to compile and install (minutes on a fresh
//! CI machine, more dependencies to keep), and what it adds (dependency discovery
//! with dpkg-shlibdeps, which needs dpkg-dev) is one line here: the binary needs
//! libc6 and libgcc-s1, and the libc6 version is read off the binary's symbol
//! versions.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::toolchain::{ebpf_object, workspace_root};

/// Where packages are written.
pub fn out_dir() -> PathBuf {
    workspace_root().join("target/debian")
}

/// `cargo xtask deb` options.
#[derive(Debug, clap::Args)]
pub struct DebArgs {
    /// Package the debug build (what CI checks: it builds it anyway, and a release
    /// build would add minutes) instead of a fresh release build.
    #[arg(long)]
    pub debug: bool,
    /// Then install it with dpkg, run the installed `gateway --version`,
    /// `systemd-analyze verify` its unit, parse its configuration and purge it (what
    /// `cargo xtask test` does with --debug). Needs root; refuses when a gateway
    /// package is installed already.
    #[arg(long)]
    pub check: bool,
}

/// The package name, its system user and group.
const PACKAGE: &str = "gateway";
/// Where the unit goes (Debian 12 keeps units under /lib; merged /usr makes it the
/// same directory as /usr/lib).
const UNIT_PATH: &str = "lib/systemd/system/gateway.service";

fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, bytes: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The highest `GLIBC_2.N` symbol version the binary references: the libc6 it needs.
fn glibc_needed(binary: &[u8]) -> Option<(u32, u32)> {
    let needle = b"GLIBC_2.";
    let mut best: Option<(u32, u32)> = None;
    let mut rest = binary;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        let tail = &rest[at + needle.len()..];
        let digits: Vec<u8> = tail
            .iter()
            .copied()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .collect();
        let text = String::from_utf8_lossy(&digits);
        let mut parts = text.split('.');
        if let Some(Ok(minor)) = parts.next().map(str::parse::<u32>) {
            let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            best = best.max(Some((minor, patch)));
        }
        rest = &tail[digits.len().min(tail.len())..];
    }
    best
}

/// The package's version: the workspace's.
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Builds the gateway (release, or debug with `debug`) and packages it; returns the
/// .deb's path.
pub fn build(args: &DebArgs) -> Result<PathBuf> {
    let root = workspace_root();
    if !ebpf_object().exists() {
        eprintln!("deb: no eBPF object yet; building it");
        crate::toolchain::build_ebpf()?;
    }
    if args.debug {
        // The same build as `cargo xtask test`'s (same features unified over the
        // workspace): nothing to rebuild there.
        crate::toolchain::build_host()?;
    } else {
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "--package",
                    "gateway",
                    "--bin",
                    "gateway",
                ]),
        )?;
    }
    let binary = root
        .join("target")
        .join(if args.debug { "debug" } else { "release" })
        .join("gateway");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let name = format!("{PACKAGE}_{}_{arch}", version());
    let stage = out_dir().join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    // The binary, with its debug information stripped (the eBPF object is embedded
    // in it: nothing else to ship for the kernel side).
    let installed = stage.join("usr/bin/gateway");
    let bytes = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    write(&installed, &bytes, 0o755)?;
    match Command::new("strip")
        .arg("--strip-debug")
        .arg(&installed)
        .status()
    {
        Ok(status) if status.success() => {}
        other => eprintln!("deb: strip unavailable or failed ({other:?}); shipping unstripped"),
    }
    let version_line = output(Command::new(&installed).arg("--version"))?;
    if !version_line.contains("eBPF programs embedded") {
        bail!(
            "{} was built without its eBPF object: {version_line}",
            binary.display()
        );
    }

    // Man pages and completions, generated by the binary from its clap definitions.
    let man = stage.join("usr/share/man/man1");
    run(Command::new(&installed).arg("generate-man").arg(&man))?;
    for entry in std::fs::read_dir(&man)? {
        let path = entry?.path();
        run(Command::new("gzip").args(["-9n"]).arg(&path))?;
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/gateway"),
        ("zsh", "usr/share/zsh/vendor-completions/_gateway"),
        ("fish", "usr/share/fish/vendor_completions.d/gateway.fish"),
    ] {
        let script = output(Command::new(&installed).args(["completions", shell]))?;
        write(&stage.join(path), script, 0o644)?;
    }

    // The unit, the commented configuration, the documentation.
    let packaging = root.join("packaging");
    let copy = |from: &str, to: &str, mode: u32| -> Result<()> {
        let bytes = std::fs::read(packaging.join(from))
            .with_context(|| format!("reading packaging/{from}"))?;
        write(&stage.join(to), bytes, mode)
    };
    copy("gateway.service", UNIT_PATH, 0o644)?;
    copy("gateway.toml", "etc/gateway/gateway.toml", 0o644)?;
    let doc = stage.join("usr/share/doc/gateway");
    write(
        &doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: gateway\n\nFiles: *\nLicense: MIT OR Apache-2.0\n",
        0o644,
    )?;
    for file in ["operations.md", "architecture.md"] {
        let bytes = std::fs::read(root.join("docs").join(file))
            .with_context(|| format!("reading docs/{file}"))?;
        write(&doc.join(file), bytes, 0o644)?;
    }

    // Control files.
    let debian = stage.join("DEBIAN");
    let libc = glibc_needed(&bytes)
        .map(|(minor, patch)| {
            if patch == 0 {
                format!("libc6 (>= 2.{minor})")
            } else {
                format!("libc6 (>= 2.{minor}.{patch})")
            }
        })
        .unwrap_or_else(|| "libc6".into());
    let installed_kib = dir_size(&stage)?.div_ceil(1024);
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: gateway developers <gateway@invalid>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {libc}, libgcc-s1, passwd\n\
         Section: net\n\
         Priority: optional\n\
         Description: rendezvous and TURN relay gateway for NAT traversal\n \
         gateway serve answers STUN Binding requests, registers peers and\n \
         introduces them so both punch a hole through their NATs at once, relays\n \
         for those who cannot (standard TURN over UDP and TCP), exports Prometheus\n \
         metrics and counts its traffic in the kernel with eBPF. gateway peer is\n \
         the agent on each NATed host.\n \
         .\n \
         The package ships a hardened systemd unit (Type=notify, watchdog, an\n \
         unprivileged system user with the capabilities eBPF needs), a commented\n \
         /etc/gateway/gateway.toml, man pages and shell completions.\n",
        version = version(),
    );
    write(&debian.join("control"), control, 0o644)?;
    write(
        &debian.join("conffiles"),
        "/etc/gateway/gateway.toml\n",
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(script, &format!("DEBIAN/{script}"), 0o755)?;
    }
    let sums = output(Command::new("sh").current_dir(&stage).args([
        "-c",
        "find usr lib -type f -print0 | sort -z | xargs -0 md5sum",
    ]))?;
    write(&debian.join("md5sums"), sums, 0o644)?;

    let deb = out_dir().join(format!("{name}.deb"));
    // xz level 1 for the CI check (5 s instead of 30 for a debug build's binary).
    let level = if args.debug { "-z1" } else { "-z6" };
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zxz", level])
        .arg(&stage)
        .arg(&deb))?;
    let size = std::fs::metadata(&deb)?.len();
    eprintln!(
        "deb: {} ({:.1} MiB)",
        deb.display(),
        size as f64 / 1048576.0
    );
    Ok(deb)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok")
        })
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Purges the package (and the system user, when this check created it) however the
/// check ends, so the machine is left as it was.
struct Installed {
    remove_user: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let purged = Command::new("dpkg").args(["--purge", PACKAGE]).status();
        if !matches!(purged, Ok(s) if s.success()) {
            eprintln!("deb: warning: dpkg --purge {PACKAGE} failed: {purged:?}");
        }
        if self.remove_user {
            let _ = Command::new("userdel").arg(PACKAGE).status();
            // userdel removes the user's own group too where USERGROUPS_ENAB is on.
            let group_left = Command::new("getent")
                .args(["group", PACKAGE])
                .output()
                .is_ok_and(|o| o.status.success());
            if group_left {
                let _ = Command::new("groupdel").arg(PACKAGE).status();
            }
        }
    }
}

/// What CI checks: build the package (CI: of the debug build), install it with dpkg,
/// run the installed binary, verify the installed unit, check the shipped
/// configuration parses, then purge. Needs root; refuses to touch a gateway package
/// that was installed before.
pub fn check(args: &DebArgs) -> Result<()> {
    let started = std::time::Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the package check installs with dpkg: run it as root");
    }
    if installed(PACKAGE) {
        bail!(
            "a {PACKAGE} package is installed already; the check would replace and purge it. \
             Remove it first (dpkg --purge {PACKAGE})"
        );
    }
    let deb = build(args)?;
    let guard = Installed {
        remove_user: !user_exists(PACKAGE),
    };
    run(Command::new("dpkg").arg("--install").arg(&deb))?;
    let shown = output(Command::new("/usr/bin/gateway").arg("--version"))?;
    eprintln!("deb: installed: {}", shown.trim());
    if !shown.contains(version()) || !shown.contains("eBPF programs embedded") {
        bail!("unexpected `gateway --version`: {shown}");
    }
    if !user_exists(PACKAGE) {
        bail!("the package did not create the system user {PACKAGE}");
    }
    let mode = std::fs::metadata("/etc/gateway/secret")
        .context("the package generates /etc/gateway/secret")?;
    use std::os::unix::fs::PermissionsExt;
    // The gateway refuses a secret its group or others may read.
    if mode.permissions().mode() & 0o777 != 0o600 {
        bail!(
            "/etc/gateway/secret has mode {:o}, not 600",
            mode.permissions().mode()
        );
    }
    run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(Path::new("/").join(UNIT_PATH)))?;
    // The shipped configuration parses.
    output(Command::new("/usr/bin/gateway").args([
        "serve",
        "--config",
        "/etc/gateway/gateway.toml",
        "--print-config",
    ]))?;
    for page in ["gateway", "gateway-serve", "gateway-peer"] {
        let path = format!("/usr/share/man/man1/{page}.1.gz");
        if !Path::new(&path).exists() {
            bail!("{path} missing");
        }
    }
    drop(guard);
    if Path::new("/usr/bin/gateway").exists() || Path::new("/etc/gateway").exists() {
        bail!("dpkg --purge left /usr/bin/gateway or /etc/gateway behind");
    }
    eprintln!(
        "deb: installed, verified and purged {} in {:.0} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_highest_glibc_version() {
        let bytes = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_2.3.4\0GLIBC_PRIVATE\0GLIBC_2.\0";
        assert_eq!(glibc_needed(bytes), Some((34, 0)));
        assert_eq!(glibc_needed(b"nothing"), None);
    }
}
