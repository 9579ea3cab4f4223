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

/// Parses a filter, with an error naming it.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(filter).map_err(|e| LogError::BadFilter {
        filter: filter.to_owned(),
        message: e.to_string(),
    })
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
        Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some(e)),
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
