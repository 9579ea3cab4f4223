//! `setup`, `build-ebpf` and `test`: the toolchain recipe of
//! `../shared/design/ebpf-toolchain.md`, made idempotent.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Debian packages the project needs. rustc-web/rust-web-src/cargo-web: a rustc with
/// its library source, so `-Z build-std=core` works for the BPF target; llvm-22-dev:
/// what bpf-linker links against; nftables/iproute2/conntrack: the NAT lab; curl: the
/// demo's hints; coturn: real TURN clients (turnutils_*) for interop tests and the
/// server `cargo xtask bench-relay` compares against (its service must not run: see
/// [`keep_coturn_service_off`]); python3-venv: a venv for aioice;
/// prometheus: the dashboards test runs a real Prometheus (its own instance inside a
/// lab namespace; the package's service is not used); redis-server (and its
/// redis-cli): the cluster tests start their own Redis servers and Redis Clusters on
/// free loopback ports, the cluster lab tests, the dashboards test (the cluster
/// dashboard's lab run) and `demo --nodes N` one inside the lab's Redis host (the
/// package's own service is not used); systemd: `systemd-analyze verify` of the
/// Debian package's unit (`cargo xtask deb`; dpkg-deb itself is in dpkg, always
/// there); libevent-dev, libssl-dev and pkg-config: to build coturn 4.17.1 from
/// `../shared/vendor` (the relay benchmark's baseline and the relay smoke test's load
/// generator and reflector); ethtool: the relay benchmark's `--as-on-a-wire` (UDP
/// segmentation offload off on `lo`); openssl: the TLS tests' throwaway CA and
/// certificates (tests/src/tls.rs); miniupnpd-nftables: the lab's port-mapping
/// router daemon (NAT-PMP, PCP, UPnP-IGD; started by the tests inside router
/// namespaces, the package's own service is not used); iptables: the lab's WAN
/// emulator queues what crosses the core router with the xtables NFQUEUE target
/// (`iptables-nft-restore`; this kernel has no native nft `queue`).
const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "cargo-web",
    "llvm-22-dev",
    "nftables",
    "iproute2",
    "conntrack",
    "curl",
    "coturn",
    "python3-venv",
    "prometheus",
    "redis-server",
    "systemd",
    "libevent-dev",
    "libssl-dev",
    "pkg-config",
    "ethtool",
    "openssl",
    "miniupnpd-nftables",
    "iptables",
];
/// Debian's policy hook that tells maintainer scripts not to start services.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// aioice (PyPI), an independent ICE/TURN implementation the interop tests drive.
const AIOICE_VERSION: &str = "0.13.0";

/// The venv holding the Python interop clients.
pub fn python_venv() -> PathBuf {
    workspace_root().join("target/python")
}

fn aioice_ok() -> bool {
    Command::new(python_venv().join("bin/python3"))
        .args(["-c", "import aioice"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long each fuzz target runs inside `cargo xtask test` (a smoke run; fuzz
/// longer with `cargo xtask fuzz --seconds N`).
const TEST_FUZZ_SECONDS: u64 = 20;
/// Debian's rustc-web: LLVM 22, with rust-src.
const EBPF_RUSTC: &str = "/usr/bin/rustc";
const EBPF_CARGO: &str = "/usr/bin/cargo";

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn bpf_linker_path() -> PathBuf {
    cargo_home().join("bin").join("bpf-linker")
}

/// The cargo that runs xtask (rustup's or Debian's), for host builds.
pub(crate) fn host_cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn missing_packages() -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    Command::new(bpf_linker_path())
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

fn cargo_fuzz_ok() -> bool {
    Command::new(cargo_home().join("bin").join("cargo-fuzz"))
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// PATH with cargo's install directory first (Debian's cargo does not add it).
fn path_with_cargo_bin() -> Result<std::ffi::OsString> {
    Ok(env::join_paths(
        std::iter::once(cargo_home().join("bin"))
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?)
}

/// `cargo xtask fuzz`: runs every target in fuzz/fuzz_targets for `seconds` each,
/// built with Debian's rustc (nightly flags through RUSTC_BOOTSTRAP, no sanitizer:
/// rustc-web ships no sanitizer runtimes).
pub fn fuzz(seconds: u64, only: Option<&str>) -> Result<()> {
    if !cargo_fuzz_ok() || !Path::new(EBPF_RUSTC).exists() {
        bail!("cargo-fuzz or Debian's rustc-web is missing; run `cargo xtask setup` first");
    }
    let dir = workspace_root().join("fuzz");
    let mut targets: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_owned)
        })
        .collect();
    targets.sort();
    if let Some(only) = only {
        if !targets.iter().any(|t| t == only) {
            bail!(
                "no fuzz target {only:?}; the targets are {}",
                targets.join(", ")
            );
        }
        targets.retain(|t| t == only);
    }
    for target in targets {
        eprintln!("fuzz: {target} for {seconds} s on fuzz/corpus/{target}");
        // The corpus kept in the repository: libFuzzer starts from it and adds the
        // inputs that reach new code.
        let corpus = dir.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus)?;
        let mut command = Command::new(host_cargo());
        command
            .current_dir(&dir)
            .args(["fuzz", "run", "--sanitizer", "none", &target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .env("PATH", path_with_cargo_bin()?)
            .env("RUSTC", EBPF_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1");
        for var in ["RUSTFLAGS", "CARGO_TARGET_DIR", "RUSTUP_TOOLCHAIN"] {
            command.env_remove(var);
        }
        run(&mut command)?;
    }
    Ok(())
}

/// Holds a `policy-rc.d` that forbids starting services while packages install, and
/// removes it afterwards (only if it was ours: images that ship one keep theirs).
struct ServicesHeldOff {
    created: bool,
}

impl ServicesHeldOff {
    fn new() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# written by cargo xtask setup for the install only\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for ServicesHeldOff {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

/// Makes sure Debian's coturn service is neither running nor enabled: the tests and
/// the benchmark start `turnserver` with explicit flags on ports of their own. On a
/// systemd host the unit is disabled and stopped; elsewhere the init script only
/// starts with TURNSERVER_ENABLED=1 in /etc/default/coturn, which is left commented.
fn keep_coturn_service_off() {
    if !Path::new("/usr/bin/turnserver").exists() {
        return;
    }
    if Path::new("/run/systemd/system").exists() {
        let stopped = Command::new("systemctl")
            .args(["disable", "--now", "coturn.service"])
            .output();
        if !matches!(stopped, Ok(ref o) if o.status.success()) {
            eprintln!("setup: warning: could not disable coturn.service: {stopped:?}");
        }
    }
}

/// `cargo xtask setup`.
pub fn setup() -> Result<()> {
    let started = Instant::now();
    let missing = missing_packages();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?}; run `cargo xtask setup` as root (it uses apt-get)"
            );
        }
        eprintln!("setup: installing {missing:?}");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        // No package's service may start on install (coturn's would take port 3478
        // and the tests run `turnserver` themselves).
        let policy = ServicesHeldOff::new()?;
        let installed = run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        drop(policy);
        installed?;
    }
    keep_coturn_service_off();
    if !bpf_linker_ok() {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"
        );
        run(Command::new(host_cargo())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--force",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    if !cargo_fuzz_ok() {
        eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new(host_cargo()).args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }
    if !aioice_ok() {
        eprintln!(
            "setup: making {} with aioice {AIOICE_VERSION}",
            python_venv().display()
        );
        run(Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(python_venv()))?;
        run(Command::new(python_venv().join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("aioice=={AIOICE_VERSION}")))?;
    }
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} is still not usable at {}",
            bpf_linker_path().display()
        );
    }
    eprintln!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Path of the built eBPF object (what `gateway/build.rs` embeds).
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/ebpf/bpfel-unknown-none/release/gateway-ebpf")
}

/// `cargo xtask build-ebpf`.
pub fn build_ebpf() -> Result<()> {
    if !Path::new(EBPF_RUSTC).exists() || !Path::new(EBPF_CARGO).exists() || !bpf_linker_ok() {
        bail!(
            "the eBPF toolchain is missing (Debian rustc-web/cargo-web, bpf-linker {BPF_LINKER_VERSION}); run `cargo xtask setup` first"
        );
    }
    let root = workspace_root();
    let path = path_with_cargo_bin()?;
    let mut command = Command::new(EBPF_CARGO);
    command
        .current_dir(&root)
        .args([
            "build",
            "--package",
            "gateway-ebpf",
            "--features",
            "programs",
            "--bin",
            "gateway-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/ebpf",
        ])
        .env("PATH", path)
        .env("RUSTC", EBPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF for the kernel's verifier and for map type information.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        command.env_remove(var);
    }
    run(&mut command)?;
    let object = ebpf_object();
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the build produced no {}", object.display()))?
        .len();
    eprintln!("build-ebpf: {} ({size} bytes)", object.display());
    Ok(())
}

/// Builds the workspace's host binaries (the gateway embeds the eBPF object).
pub fn build_host() -> Result<()> {
    run(Command::new(host_cargo())
        .current_dir(workspace_root())
        .args(["build", "--workspace", "--bins"]))
}

fn cargo_has(subcommand: &str) -> bool {
    Command::new(host_cargo())
        .args([subcommand, "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `cargo xtask test`.
pub fn test() -> Result<()> {
    let started = Instant::now();
    setup()?;
    build_ebpf()?;
    build_host()?;
    let root = workspace_root();
    if cargo_has("fmt") {
        run(Command::new(host_cargo())
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]))?;
    } else {
        eprintln!("test: rustfmt is not installed; skipping the format check");
    }
    if cargo_has("clippy") {
        run(Command::new(host_cargo()).current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    } else {
        eprintln!("test: clippy is not installed; skipping the lint");
    }
    run(Command::new(host_cargo())
        .current_dir(&root)
        .args(["test", "--workspace"]))?;
    // The Debian package of the debug build just made: install, verify, purge.
    crate::deb::check(&crate::deb::DebArgs {
        debug: true,
        check: true,
    })?;
    fuzz(TEST_FUZZ_SECONDS, None)?;
    eprintln!(
        "test: everything passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
