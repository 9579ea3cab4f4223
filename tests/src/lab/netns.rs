//! Network namespace plumbing: running `ip`, entering namespaces, deleting them.
use std::{
    fs::File,
    io::{self, Write as _},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

use super::LabError;

/// Prefix of every namespace the lab creates.
pub(crate) const PREFIX: &str = "gwlab-";
/// Where `ip netns` keeps its namespace handles.
pub(crate) const NETNS_DIR: &str = "/var/run/netns";

/// Serialises `ip netns add/del` inside this process (iproute2 sets up the shared
/// `/run/netns` mount on first use and that setup is racy).
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Runs `program args…` (optionally feeding `stdin`), returning stdout or an error that
/// carries the command line and its stderr.
pub(crate) fn run_cmd(
    mut command: Command,
    stdin: Option<&str>,
    shown: &str,
) -> Result<String, LabError> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| LabError::Spawn {
        command: shown.to_owned(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| LabError::Spawn {
                command: shown.to_owned(),
                source,
            })?;
    }
    let output = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: shown.to_owned(),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: shown.to_owned(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip args…`.
pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    let mut command = Command::new("ip");
    command.args(args);
    run_cmd(command, None, &format!("ip {}", args.join(" ")))
}

/// Runs `ip -n netns -batch -` with `script` (one `ip` command per line).
pub(crate) fn ip_batch(netns: &str, script: &str) -> Result<(), LabError> {
    let mut command = Command::new("ip");
    command.args(["-n", netns, "-batch", "-"]);
    run_cmd(
        command,
        Some(script),
        &format!("ip -n {netns} -batch - <<EOF\n{script}EOF"),
    )
    .map(|_| ())
}

/// Creates the namespace `name`.
pub(crate) fn add(name: &str) -> Result<(), LabError> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name]).map(|_| ())
}

/// Whether the namespace `name` exists.
pub(crate) fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Kills every process inside `name`, then deletes it. A namespace that is already
/// gone is not an error.
pub(crate) fn delete(name: &str) -> Result<(), LabError> {
    if !exists(name) {
        return Ok(());
    }
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        let me = std::process::id();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if pid != me
                && let Ok(pid) = i32::try_from(pid)
            {
                // SAFETY: kill(2) on a pid read from `ip netns pids`.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !exists(name) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names of all lab namespaces on the machine.
pub(crate) fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// The pid embedded in a lab namespace name (`gwlab-<pid>-…`).
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether `pid` is a running process.
pub(crate) fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Runs `f` on a new thread that first entered the network namespace `name`.
/// A panic in `f` is resumed in the caller.
pub(crate) fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LabError> {
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).map_err(|source| LabError::Setns {
        netns: name.to_owned(),
        source,
    })?;
    let handle = std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || -> io::Result<T> {
            // SAFETY: setns(2) on an open namespace fd; it only affects this thread,
            // which ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(file);
            Ok(f())
        })
        .map_err(|source| LabError::Io {
            what: format!("spawning a thread for namespace {name}"),
            source,
        })?;
    match handle.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(LabError::Setns {
            netns: name.to_owned(),
            source,
        }),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Writes sysctls (`net/ipv4/ip_forward` style paths under /proc/sys) inside `name`.
/// Entries whose value starts with `?` are optional: a missing file is not an error.
pub(crate) fn sysctls(name: &str, entries: Vec<(String, String)>) -> Result<(), LabError> {
    run_in(name, move || -> Result<(), (String, io::Error)> {
        for (key, value) in entries {
            let (optional, value) = match value.strip_prefix('?') {
                Some(v) => (true, v.to_owned()),
                None => (false, value),
            };
            let path = Path::new("/proc/sys").join(&key);
            if optional && !path.exists() {
                continue;
            }
            std::fs::write(&path, value.as_bytes()).map_err(|e| (key.clone(), e))?;
        }
        Ok(())
    })?
    .map_err(|(key, source)| LabError::Io {
        what: format!("setting sysctl {key} in {name}"),
        source,
    })
}

/// Interface names inside `name` (from /proc/sys/net/ipv4/conf, plus `all`/`default`).
pub(crate) fn ipv4_conf_names(name: &str) -> Result<Vec<String>, LabError> {
    run_in(name, || {
        std::fs::read_dir("/proc/sys/net/ipv4/conf").map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
    })?
    .map_err(|source| LabError::Io {
        what: format!("listing interfaces of {name}"),
        source,
    })
}

/// Runs `program args` as a child of a thread inside `name`, so it inherits the
/// namespace without `ip netns exec`.
pub(crate) fn run_cmd_in(
    name: &str,
    program: &str,
    args: &[&str],
    stdin: Option<String>,
) -> Result<String, LabError> {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let shown = format!("ip netns exec {name} {program} {}", args.join(" "));
    run_in(name, move || {
        let mut command = Command::new(&program);
        command.args(&args);
        run_cmd(command, stdin.as_deref(), &shown)
    })?
}
