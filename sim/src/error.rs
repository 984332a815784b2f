//! The simulator's one error type. Every variant names what was wrong and
//! where (file and line for traces, the option for configurations), so the
//! CLI can print it as is.

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
    /// An option is out of its domain (`name` is the option, as the CLI spells it).
    #[error("invalid {name}: {reason}")]
    InvalidArgument { name: String, reason: String },
    /// The model (weights + activation peak + overheads) leaves no room for a
    /// single KV block within `gpu_memory_utilization` of the GPU.
    #[error(
        "the model does not fit on {hardware}: {needed_bytes} bytes needed \
         ({detail}) but gpu_memory_utilization x memory = {usable_bytes} bytes; \
         spread it over more GPUs (--tp) or quantize the weights (--quant)"
    )]
    DoesNotFit {
        hardware: String,
        needed_bytes: u64,
        usable_bytes: u64,
        detail: String,
    },
    #[error(transparent)]
    Reference(#[from] inferlab_reference::Error),
    #[error(transparent)]
    Models(#[from] inferlab_models::ModelsError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An option out of its domain.
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
