//! Reloading the configuration on SIGHUP.
//!
//! The file given with `--config` is read again, the flags given at start applied
//! over it again (they keep overriding it), the result validated, the secret files
//! read (permissions checked), the peer policy built. Any error refuses the reload
//! as a whole: the old configuration stays in force, the reason is logged (naming
//! the file, and the line for a syntax error or unknown key) and counted
//! (`gateway_config_reloads_total{outcome="failed"}`).
//!
//! What applies live: the shared secrets (`auth.secret_file(s)`: rotation), the
//! relay's peer ranges and limits (`relay.allowed_peer_ranges`,
//! `denied_peer_ranges`, `max_*`, `bandwidth_bytes_per_second`), the drain settings
//! (`server.alternate`, `server.drain_timeout`), the log filter (`log.filter`) and
//! the TLS certificate and key (the contents of `tls.cert_file` and `tls.key_file`,
//! also picked up without a SIGHUP when the files change: [`crate::tls`]).
//! Nothing established is dropped: allocations, permissions, channels, fast-path
//! entries, registrations and TCP connections stay.
//!
//! Settings bound to sockets, threads or loaded programs need a restart
//! ([`RESTART_KEYS`]). As PostgreSQL does with such parameters, a reload that
//! changes one applies everything else, logs a warning naming each key kept at its
//! running value ("server.listen changes need a restart"), and counts
//! `outcome="partial"`: a rotation is never blocked by an unrelated edit waiting
//! for the next restart.
use std::{net::SocketAddr, path::PathBuf};

use crate::{
    config::{Config, ConfigError},
    lifecycle::Services,
    logging::{LogError, LogHandle},
    proto::{credentials::SharedSecret, peer_policy::PeerPolicy},
    rendezvous::lock,
    secrets::{self, SecretError},
};

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or parsed, or a value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A secret file cannot be used.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The log filter cannot be applied.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What became of a reload.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Everything applied.
    Success,
    /// Applied, but for these settings, which need a restart (kept as running).
    Partial(Vec<&'static str>),
    /// Refused as a whole; the old configuration stays.
    Failed(ReloadError),
}

impl ReloadOutcome {
    /// The `outcome` label of `gateway_config_reloads_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ReloadOutcome::Success => "success",
            ReloadOutcome::Partial(_) => "partial",
            ReloadOutcome::Failed(_) => "failed",
        }
    }
}

/// The settings that only take effect at start (each named as in the file).
pub const RESTART_KEYS: [&str; 30] = [
    "server.listen",
    "server.discovery_listen",
    "server.discovery",
    "server.discovery_second_address",
    "server.discovery_unauthenticated",
    "server.tcp_forge_synack",
    "server.threads",
    "metrics.listen",
    "metrics.enabled",
    "ebpf.enabled",
    "ebpf.required",
    "ebpf.interfaces",
    "auth.secret_file",
    "relay.enabled",
    "relay.tcp",
    "relay.realm",
    "relay.addresses",
    "relay.port_range",
    "relay.fast_path",
    "relay.fast_path_interfaces",
    "cluster.redis",
    "cluster.mode",
    "cluster.password_file",
    "cluster.node_id",
    "cluster.tls_ca_file",
    "log.format",
    "server.replies_per_source",
    "tls.listen",
    "tls.cert_file",
    "tls.key_file",
];

/// The restart-only settings that differ between `old` and `new` (names from
/// [`RESTART_KEYS`]; `auth.secret_file` when a secret appears or goes, which
/// starts or stops the rendezvous and the relay).
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (old, new);
    let changed = [
        o.server.listen != n.server.listen,
        o.server.discovery_listen != n.server.discovery_listen,
        o.server.discovery != n.server.discovery,
        o.server.discovery_second_address != n.server.discovery_second_address,
        o.server.discovery_unauthenticated != n.server.discovery_unauthenticated,
        o.server.tcp_forge_synack != n.server.tcp_forge_synack,
        o.server.threads != n.server.threads,
        o.metrics.listen != n.metrics.listen,
        o.metrics.enabled != n.metrics.enabled,
        o.ebpf.enabled != n.ebpf.enabled,
        o.ebpf.required != n.ebpf.required,
        o.ebpf.interfaces != n.ebpf.interfaces,
        o.auth.has_secret() != n.auth.has_secret(),
        o.relay.enabled != n.relay.enabled,
        o.relay.tcp != n.relay.tcp,
        o.relay.realm != n.relay.realm,
        o.relay.addresses != n.relay.addresses,
        o.relay.port_range != n.relay.port_range,
        o.relay.fast_path != n.relay.fast_path,
        o.relay.fast_path_interfaces != n.relay.fast_path_interfaces,
        o.cluster.redis != n.cluster.redis,
        o.cluster.mode != n.cluster.mode,
        o.cluster.password_file != n.cluster.password_file,
        o.cluster.node_id != n.cluster.node_id,
        o.cluster.tls_ca_file != n.cluster.tls_ca_file,
        o.log.format != n.log.format,
        o.server.replies_per_source != n.server.replies_per_source,
        o.tls.listen != n.tls.listen,
        o.tls.cert_file != n.tls.cert_file,
        o.tls.key_file != n.tls.key_file,
    ];
    RESTART_KEYS
        .iter()
        .zip(changed)
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect()
}

/// The running configuration `old` with every live setting taken from `new`
/// (restart-only ones stay as they run).
pub fn merge_live(old: &Config, new: &Config) -> Config {
    let mut merged = old.clone();
    if old.auth.has_secret() == new.auth.has_secret() {
        merged.auth = new.auth.clone();
    }
    let (relay, from) = (&mut merged.relay, &new.relay);
    relay.max_allocations = from.max_allocations;
    relay.max_allocations_per_user = from.max_allocations_per_user;
    relay.max_permissions = from.max_permissions;
    relay.max_channels = from.max_channels;
    relay.max_lifetime_seconds = from.max_lifetime_seconds;
    relay.bandwidth_bytes_per_second = from.bandwidth_bytes_per_second;
    relay.allowed_peer_ranges = from.allowed_peer_ranges.clone();
    relay.denied_peer_ranges = from.denied_peer_ranges.clone();
    relay.nat64_prefixes = from.nat64_prefixes.clone();
    merged.server.alternate = new.server.alternate;
    merged.server.drain_timeout = new.server.drain_timeout;
    merged.log.filter = new.log.filter.clone();
    merged
}

/// Applies the command-line flags given at start over a configuration.
pub type ApplyFlags = Box<dyn Fn(&mut Config) + Send + Sync>;

/// A new configuration, checked and ready to apply.
struct Prepared {
    config: Config,
    restart: Vec<&'static str>,
    secret: Option<SharedSecret>,
    policy: PeerPolicy,
    certificate: Option<crate::tls::Loaded>,
}

/// Re-reads and applies the configuration (see the module docs).
pub struct Reloader {
    path: Option<PathBuf>,
    flags: ApplyFlags,
    current: Config,
    /// The bound service address (the relay's own-address rule).
    listen: SocketAddr,
    services: Services,
    log: Option<LogHandle>,
}

impl Reloader {
    /// A reloader for a daemon started with `current` (read from `path`, when
    /// given, with `flags` applied), serving on `listen`.
    pub fn new(
        path: Option<PathBuf>,
        flags: ApplyFlags,
        current: Config,
        listen: SocketAddr,
        services: Services,
        log: Option<LogHandle>,
    ) -> Self {
        Self {
            path,
            flags,
            current,
            listen,
            services,
            log,
        }
    }

    /// The configuration in force.
    pub fn current(&self) -> &Config {
        &self.current
    }

    /// Reads, checks and applies the configuration; logs and counts the outcome.
    pub fn reload(&mut self) -> ReloadOutcome {
        let outcome = match self.prepare() {
            Ok(prepared) => match self.apply(prepared) {
                Ok(restart) if restart.is_empty() => ReloadOutcome::Success,
                Ok(restart) => ReloadOutcome::Partial(restart),
                Err(e) => ReloadOutcome::Failed(e),
            },
            Err(e) => ReloadOutcome::Failed(e),
        };
        let metrics = &self.services.metrics;
        metrics
            .config_reloads
            .with_label_values(&[outcome.label()])
            .inc();
        metrics
            .config_last_reload_successful
            .set(i64::from(!matches!(outcome, ReloadOutcome::Failed(_))));
        match &outcome {
            ReloadOutcome::Success => tracing::info!(outcome = "success", "configuration reloaded"),
            ReloadOutcome::Partial(keys) => {
                for key in keys {
                    tracing::warn!(
                        key,
                        "{key} changes need a restart; keeping the running value"
                    );
                }
                tracing::info!(
                    outcome = "partial",
                    restart_needed = ?keys,
                    "configuration reloaded but for settings that need a restart"
                );
            }
            ReloadOutcome::Failed(e) => tracing::error!(
                outcome = "failed",
                "configuration reload refused, the running configuration is kept: {e}"
            ),
        }
        outcome
    }

    /// Everything that can fail, before anything changes.
    fn prepare(&self) -> Result<Prepared, ReloadError> {
        let mut new = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        (self.flags)(&mut new);
        new.validate()?;
        let restart = restart_only_changes(&self.current, &new);
        let config = merge_live(&self.current, &new);
        config.validate()?;
        let secret = if config.auth.has_secret() {
            Some(secrets::load(&config.auth.secret_paths())?)
        } else {
            None
        };
        let policy = crate::turn::peer_policy(&config, self.listen)?;
        if let Some(filter) = &config.log.filter {
            crate::logging::parse_filter(filter)?;
        }
        // The TLS listeners' certificate and key (the files they started with: new
        // paths need a restart) are read now, so a missing or broken one refuses the
        // reload before anything changes; handed over in `apply` like the secrets.
        let certificate = match &self.services.tls {
            Some(tls) => Some(tls.read()?),
            None => None,
        };
        Ok(Prepared {
            config,
            restart,
            secret,
            policy,
            certificate,
        })
    }

    /// Hands the prepared configuration to the cores and the logger; returns the
    /// restart-only keys that were not applied.
    fn apply(&mut self, prepared: Prepared) -> Result<Vec<&'static str>, ReloadError> {
        let Prepared {
            config,
            restart,
            secret,
            policy,
            certificate,
        } = prepared;
        if let Some(log) = &self.log {
            if let Some(pinned) = log.pinned()
                && config.log.filter != self.current.log.filter
            {
                tracing::warn!(
                    pinned,
                    "log.filter changed but the filter given at start (--log-level, GATEWAY_LOG or RUST_LOG) stays in force"
                );
            }
            log.apply_configured(config.log.filter.as_deref())?;
        }
        if let Some(core) = &self.services.rendezvous {
            lock(core).set_connect_policy(config.auth.connect.policy());
        }
        if let Some(secret) = secret {
            if let Some(core) = &self.services.rendezvous {
                lock(core).set_secret(secret.clone());
            }
            if let Some(relay) = &self.services.relay {
                relay.reconfigure(secret, policy, crate::turn::turn_config(&config));
            }
        }
        if let (Some(tls), Some(certificate)) = (&self.services.tls, certificate) {
            tls.install(certificate);
        }
        self.current = config;
        Ok(restart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{health::Health, metrics::Metrics};
    use std::os::unix::fs::PermissionsExt;

    fn parse(text: &str) -> Config {
        Config::from_toml(text, "test").expect("valid")
    }

    #[test]
    fn restart_only_settings_are_named_and_live_ones_merged() {
        let old = parse("[server]\nlisten = \"0.0.0.0:3478\"\n[relay]\nmax_channels = 10\n");
        let new = parse(
            "[server]\nlisten = \"0.0.0.0:3479\"\nalternate = \"192.0.2.9:3478\"\n[relay]\nmax_channels = 20\nport_range = \"50000-50010\"\nallowed_peer_ranges = [\"10.0.0.0/8\"]\n[log]\nfilter = \"debug\"\n",
        );
        assert_eq!(
            restart_only_changes(&old, &new),
            vec!["server.listen", "relay.port_range"]
        );
        let merged = merge_live(&old, &new);
        assert_eq!(merged.server.listen, old.server.listen, "kept as running");
        assert_eq!(merged.relay.port_range, old.relay.port_range);
        assert_eq!(merged.relay.max_channels, 20, "applied");
        assert_eq!(merged.relay.allowed_peer_ranges, ["10.0.0.0/8"]);
        assert_eq!(merged.server.alternate, new.server.alternate);
        assert_eq!(merged.log.filter.as_deref(), Some("debug"));
        assert!(restart_only_changes(&old, &merge_live(&old, &new)).is_empty());
        // A secret appearing starts the rendezvous: a restart.
        let with_secret = parse("[auth]\nsecret_file = \"/s\"\n");
        assert_eq!(
            restart_only_changes(&old, &with_secret),
            ["auth.secret_file"]
        );
        assert!(!merge_live(&old, &with_secret).auth.has_secret());
        // Rotation is live: the list of files changes, not whether there is one.
        let one = parse("[auth]\nsecret_file = \"/new\"\n");
        let two = parse("[auth]\nsecret_files = [\"/newer\", \"/new\"]\n");
        assert!(restart_only_changes(&one, &two).is_empty());
        assert_eq!(merge_live(&one, &two).auth.secret_paths().len(), 2);
    }

    fn services() -> Services {
        Services {
            tls: None,
            rendezvous: None,
            relay: None,
            health: Health::new(),
            metrics: Metrics::new().expect("metrics"),
        }
    }

    #[test]
    fn a_broken_reload_is_refused_whole_and_counted() {
        let dir = std::env::temp_dir().join(format!("gw-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config_path = dir.join("gateway.toml");
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cret\n").expect("secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let text = format!(
            "[auth]\nsecret_file = {:?}\n[server]\ndrain_timeout = 5\n",
            secret.display().to_string()
        );
        std::fs::write(&config_path, &text).expect("config");
        let start = Config::load(&config_path).expect("valid");
        let services = services();
        let metrics = services.metrics.clone();
        let mut reloader = Reloader::new(
            Some(config_path.clone()),
            Box::new(|config: &mut Config| config.server.threads = 1),
            start,
            "0.0.0.0:3478".parse().expect("addr"),
            services,
            None,
        );
        let count = |outcome: &str| metrics.config_reloads.with_label_values(&[outcome]).get();
        assert!(matches!(reloader.reload(), ReloadOutcome::Success));
        // An unknown key: refused, the line named, the old configuration kept.
        std::fs::write(
            &config_path,
            text.replace("drain_timeout = 5", "drain_timeout = 9\nlisen = \"x\""),
        )
        .expect("write");
        let ReloadOutcome::Failed(e) = reloader.reload() else {
            panic!("an unknown key must be refused");
        };
        let message = e.to_string();
        assert!(message.contains("gateway.toml"), "{message}");
        assert!(message.contains("line 5"), "{message}");
        assert!(message.contains("lisen"), "{message}");
        assert_eq!(reloader.current().server.drain_timeout, 5, "old one kept");
        assert_eq!(metrics.config_last_reload_successful.get(), 0);
        // A secret file others can read: refused, with the fix.
        std::fs::write(&config_path, text.replace("= 5", "= 7")).expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let ReloadOutcome::Failed(e) = reloader.reload() else {
            panic!("a loose secret file must be refused");
        };
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert_eq!(reloader.current().server.drain_timeout, 5);
        // Fixed: applied; a restart-only change is named and the rest applied.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(
            &config_path,
            format!("{}listen = \"0.0.0.0:4000\"\n", text.replace("= 5", "= 7")),
        )
        .expect("write");
        let ReloadOutcome::Partial(keys) = reloader.reload() else {
            panic!("a listen change needs a restart");
        };
        assert_eq!(keys, ["server.listen"]);
        assert_eq!(reloader.current().server.drain_timeout, 7);
        assert_eq!(reloader.current().server.listen.port(), 3478);
        // The file gone: refused, naming it.
        std::fs::remove_file(&config_path).expect("remove");
        let ReloadOutcome::Failed(e) = reloader.reload() else {
            panic!("a missing file must be refused");
        };
        assert!(e.to_string().contains("gateway.toml"), "{e}");
        assert_eq!(
            (count("success"), count("partial"), count("failed")),
            (1, 1, 3)
        );
        assert_eq!(metrics.config_last_reload_successful.get(), 0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
