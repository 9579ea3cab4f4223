//! The gateway's configuration: a TOML file whose every field has a default, so
//! `gateway serve` runs with no file at all. Command-line flags override the file.
use std::{net::SocketAddr, path::Path};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys are errors too).
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file's path.
        path: String,
        /// The parser's message, with line and column.
        source: toml::de::Error,
    },
    /// A value is syntactically fine but unusable.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration of `gateway serve`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The UDP service (STUN framing on one port).
    pub server: ServerConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The kernel programs.
    pub ebpf: EbpfConfig,
    /// Authentication of peers and relay users.
    pub auth: AuthConfig,
}

/// Authentication of peers and relay users.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the shared secret from which REST-style credentials are derived
    /// (`gateway credentials` issues them). Keep it readable by the gateway only.
    pub secret_file: Option<std::path::PathBuf>,
}

/// The UDP service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port of the UDP socket (3478 is STUN's registered port).
    pub listen: SocketAddr,
    /// A second UDP socket answering STUN Binding only, for NAT mapping discovery
    /// (another port than `listen`). Off by default.
    pub discovery_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3478)),
            discovery_listen: None,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving `GET /metrics`; loopback by default so
    /// nothing is exposed until the operator decides to.
    pub listen: SocketAddr,
    /// Set to false to run without the HTTP endpoint.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9478)),
            enabled: true,
        }
    }
}

/// The kernel programs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// Try to load and attach the programs. Failing is logged and exported as
    /// `gateway_ebpf_loaded 0` unless `required` is set.
    pub enabled: bool,
    /// Refuse to start when the programs cannot be loaded and attached.
    pub required: bool,
    /// Interfaces to attach to; empty means every interface that is up.
    pub interfaces: Vec<String>,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            required: false,
            interfaces: Vec::new(),
        }
    }
}

impl Config {
    /// Parses a configuration from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Checks the values that the type system cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen.port() == 0 {
            return Err(ConfigError::Invalid(
                "server.listen needs a fixed port: peers must know where to reach the gateway"
                    .into(),
            ));
        }
        if let Some(discovery) = self.server.discovery_listen
            && (discovery.port() == 0 || discovery == self.server.listen)
        {
            return Err(ConfigError::Invalid(
                "server.discovery_listen needs its own fixed port, other than server.listen".into(),
            ));
        }
        if self.ebpf.required && !self.ebpf.enabled {
            return Err(ConfigError::Invalid(
                "ebpf.required = true contradicts ebpf.enabled = false".into(),
            ));
        }
        for name in &self.ebpf.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains('/') {
                return Err(ConfigError::Invalid(format!(
                    "ebpf.interfaces: {name:?} is not a valid interface name"
                )));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (what `gateway serve --print-config` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("", "test").expect("valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.server.listen.port(), 3478);
        assert!(config.metrics.listen.ip().is_loopback());
    }

    #[test]
    fn file_values_override_defaults() {
        let config = Config::from_toml(
            "[server]\nlisten = \"192.0.2.10:3479\"\n[ebpf]\ninterfaces = [\"eth0\"]\n",
            "test",
        )
        .expect("valid");
        assert_eq!(
            config.server.listen,
            "192.0.2.10:3479".parse().expect("addr")
        );
        assert_eq!(config.ebpf.interfaces, vec!["eth0".to_owned()]);
        assert!(config.metrics.enabled);
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        let err = Config::from_toml("[server]\nlisen = \"0.0.0.0:1\"\n", "gw.toml")
            .expect_err("typo must be refused");
        let text = err.to_string();
        assert!(text.contains("gw.toml"), "{text}");
        assert!(text.contains("lisen"), "{text}");
    }

    #[test]
    fn contradictions_are_refused() {
        assert!(Config::from_toml("[ebpf]\nenabled = false\nrequired = true\n", "t").is_err());
        assert!(Config::from_toml("[server]\nlisten = \"0.0.0.0:0\"\n", "t").is_err());
        assert!(Config::from_toml("[ebpf]\ninterfaces = [\"a/b\"]\n", "t").is_err());
    }

    #[test]
    fn printed_config_parses_back() {
        let mut config = Config::default();
        config.ebpf.interfaces = vec!["lo".into()];
        let again = Config::from_toml(&config.to_toml(), "printed").expect("round trip");
        assert_eq!(again, config);
    }
}
