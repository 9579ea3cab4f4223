//! The tracing subscriber every command logs through: text lines (the default) or
//! one JSON object per line (`--log-format json`, `log.format = "json"`), to
//! standard error, behind a filter that a reload can replace.
//!
//! Which filter wins: `RUST_LOG`, then `--log-level` / `GATEWAY_LOG` (given at
//! start, they pin the filter: a reload keeps it and says so), then the
//! configuration's `log.filter`, then `info`.
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

use crate::config::LogFormat;

/// The filter used when nothing else gives one.
pub const DEFAULT_FILTER: &str = "info";

/// Why the filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The text is not a tracing filter.
    #[error("log filter {filter:?} is not valid: {message}")]
    BadFilter {
        /// The filter text.
        filter: String,
        /// The parser's message.
        message: String,
    },
    /// The subscriber is gone (cannot happen while the process runs).
    #[error("the log filter cannot be replaced: {0}")]
    Reload(String),
}

/// The installed subscriber's filter, replaceable at run time (cheap to clone).
#[derive(Clone, Debug)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    /// The filter given on the command line or in the environment, which wins over
    /// the configuration's.
    pinned: Option<String>,
}

/// The Redis Cluster client's recovery logs an error for every failed slot refresh,
/// and while every shard is down it retries without pause: a Redis Cluster outage
/// wrote over a million identical lines in a few seconds (redis 1.8.2). The
/// gateway says what matters itself (`cluster: Redis unreachable ...`, the
/// `gateway_cluster_*` metrics), so that module is silenced unless a filter names
/// it.
const QUIET_DEPENDENCY: &str = "redis::cluster_handling::async_connection";

/// Parses a filter, with an error naming it; the noisy Redis Cluster recovery
/// module is off unless the filter names it ([`QUIET_DEPENDENCY`]).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, LogError> {
    let bad = |e: &dyn std::fmt::Display| LogError::BadFilter {
        filter: filter.to_owned(),
        message: e.to_string(),
    };
    let parsed = EnvFilter::try_new(filter).map_err(|e| bad(&e))?;
    if filter.contains(QUIET_DEPENDENCY) {
        return Ok(parsed);
    }
    let quiet = format!("{QUIET_DEPENDENCY}=off")
        .parse()
        .map_err(|e| bad(&e))?;
    Ok(parsed.add_directive(quiet))
}

/// Installs the global subscriber: `format` lines to standard error, filtered by
/// `pinned` (`RUST_LOG`, `--log-level`) if given, else `configured`, else
/// [`DEFAULT_FILTER`]. An invalid filter falls back to the default and says so.
pub fn init(format: LogFormat, pinned: Option<String>, configured: Option<&str>) -> LogHandle {
    let wanted = pinned
        .as_deref()
        .or(configured)
        .unwrap_or(DEFAULT_FILTER)
        .to_owned();
    let (filter, invalid) = match parse_filter(&wanted) {
        Ok(filter) => (filter, None),
        Err(e) => (
            parse_filter(DEFAULT_FILTER).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER)),
            Some(e),
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true)
                    .with_target(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("gateway: cannot install the logger: {e}");
    }
    if let Some(e) = invalid {
        tracing::warn!("{e}; logging at {DEFAULT_FILTER}");
    }
    LogHandle {
        filter: handle,
        pinned,
    }
}

impl LogHandle {
    /// The filter from the command line or environment, which a reload keeps.
    pub fn pinned(&self) -> Option<&str> {
        self.pinned.as_deref()
    }

    /// Applies the configuration's filter (`None`: [`DEFAULT_FILTER`]), unless one
    /// is pinned. Returns the filter now in force.
    pub fn apply_configured(&self, configured: Option<&str>) -> Result<String, LogError> {
        let wanted = match &self.pinned {
            Some(pinned) => pinned.clone(),
            None => configured.unwrap_or(DEFAULT_FILTER).to_owned(),
        };
        let filter = parse_filter(&wanted)?;
        self.filter
            .reload(filter)
            .map_err(|e| LogError::Reload(e.to_string()))?;
        Ok(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_cluster_recovery_flood_is_off_unless_named() {
        let filter = parse_filter("debug").expect("filter").to_string();
        assert!(
            filter.contains("redis::cluster_handling::async_connection=off"),
            "{filter}"
        );
        // An operator who names it gets it.
        let named = parse_filter("info,redis::cluster_handling::async_connection=error")
            .expect("filter")
            .to_string();
        assert!(!named.contains("=off"), "{named}");
        assert!(parse_filter("not a [filter").is_err());
    }
}
