//! The one error type of this crate. Every variant names the file (or catalog
//! entry) and the field that was wrong, so a user can act on the message.

use std::path::PathBuf;

/// Errors from descriptors, checkpoints and tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid descriptor: {message}")]
    Descriptor { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: truncated: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: tensor `{name}`: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    /// A file whose bytes contradict its own format (bad magic, a count that
    /// cannot fit, an invalid value).
    #[error("{path}: corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("unknown {kind} `{name}` (known: {known})")]
    Unknown {
        kind: &'static str,
        name: String,
        known: String,
    },
}

pub type Result<T, E = ModelsError> = std::result::Result<T, E>;
