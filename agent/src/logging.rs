//! The agent's log output: stderr, filtered by `WEFT_LOG` (EnvFilter syntax, `info` when unset),
//! and a handle that changes the filter while the agent runs (the admin endpoint's `/logging`).
use std::{fmt, io::IsTerminal};

use tracing_subscriber::{
    filter::ParseError, fmt as format, layer::SubscriberExt, reload, util::SubscriberInitExt,
    EnvFilter, Registry,
};

/// The environment variable holding the initial filter.
const ENV_VAR: &str = "WEFT_LOG";

/// Installs the process-wide subscriber and returns the handle to its filter.
pub fn init() -> LogFilter {
    let filter = EnvFilter::try_from_env(ENV_VAR).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            format::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a terminal: logs collected from files stay plain text.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    LogFilter(handle)
}

/// The filter of the subscriber [`init`] installed.
#[derive(Clone)]
pub struct LogFilter(reload::Handle<EnvFilter, Registry>);

impl fmt::Debug for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LogFilter")
            .field(&self.current().ok())
            .finish()
    }
}

#[derive(Debug)]
pub enum FilterError {
    /// The directives do not parse; the filter in force is unchanged.
    Invalid(ParseError),
    /// The subscriber is gone (never outside tests and shutdown).
    Unavailable(reload::Error),
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(err) => write!(f, "invalid log filter: {err}"),
            Self::Unavailable(err) => write!(f, "cannot change the log filter: {err}"),
        }
    }
}

impl std::error::Error for FilterError {}

impl LogFilter {
    /// The filter in force, as EnvFilter directives.
    pub fn current(&self) -> Result<String, FilterError> {
        self.0
            .with_current(ToString::to_string)
            .map_err(FilterError::Unavailable)
    }

    /// Replaces the filter with `directives` (e.g. `debug` or `weft=debug,h2=info`); returns the
    /// new filter as it reads back.
    pub fn set(&self, directives: &str) -> Result<String, FilterError> {
        let filter = EnvFilter::builder()
            .parse(directives)
            .map_err(FilterError::Invalid)?;
        self.0.reload(filter).map_err(FilterError::Unavailable)?;
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter handle on a subscriber of the test's own (not the process-wide one).
    fn filter(initial: &str) -> (impl tracing::Subscriber, LogFilter) {
        let (layer, handle) = reload::Layer::new(EnvFilter::new(initial));
        (
            tracing_subscriber::registry().with(layer),
            LogFilter(handle),
        )
    }

    #[test]
    fn set_replaces_the_filter() {
        let (_subscriber, filter) = filter("info");
        assert_eq!(filter.current().unwrap(), "info");
        let set = filter.set("h2=info,weft=debug").unwrap();
        let mut directives: Vec<&str> = set.split(',').collect();
        directives.sort_unstable();
        assert_eq!(directives, ["h2=info", "weft=debug"]);
        assert_eq!(filter.current().unwrap(), set);
    }

    #[test]
    fn an_invalid_filter_changes_nothing() {
        let (_subscriber, filter) = filter("warn");
        for invalid in ["weft=loud", "weft[{=debug", "=debug"] {
            let err = filter.set(invalid).unwrap_err();
            assert!(matches!(err, FilterError::Invalid(_)), "{invalid}: {err}");
        }
        assert_eq!(filter.current().unwrap(), "warn");
    }

    #[test]
    fn a_dropped_subscriber_is_reported() {
        let (subscriber, filter) = filter("info");
        drop(subscriber);
        assert!(matches!(
            filter.set("debug"),
            Err(FilterError::Unavailable(_))
        ));
    }
}
