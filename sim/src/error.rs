//! The simulator's one error type. Every variant names what was wrong and
//! where (file and line for traces, the option for configurations), so the
//! CLI can print it as is. `simcost` adds its own variants here.

use std::path::PathBuf;

/// Errors of `inferlab-sim`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A trace row that cannot be read (line numbers start at 1 and count the header).
    #[error("{path}:{line}: field `{field}`: {reason}")]
    TraceRow {
        path: PathBuf,
        line: u64,
        field: String,
        reason: String,
    },
    /// A trace whose header or structure is wrong.
    #[error("{path}: {reason}")]
    TraceFormat { path: PathBuf, reason: String },
    /// Arrival times go backwards and the policy is `reject`.
    #[error(
        "{path}:{line}: arrival {arrival_ns} ns is earlier than the previous row's {previous_ns} ns \
         (the trace must be sorted by arrival; pass `--unsorted sort` to sort it in memory)"
    )]
    Unsorted {
        path: PathBuf,
        line: u64,
        arrival_ns: i128,
        previous_ns: i128,
    },
    /// An option or configuration value out of range.
    #[error("invalid option `{option}`: {reason}")]
    Config { option: String, reason: String },
    /// The model (weights plus fixed overheads) leaves no room for one KV block.
    #[error("{what}: needs {needed_bytes} bytes but only {available_bytes} are available")]
    DoesNotFit {
        what: String,
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error(transparent)]
    Models(#[from] inferlab_models::ModelsError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(option: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            option: option.into(),
            reason: reason.into(),
        }
    }
}
