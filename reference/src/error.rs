//! The one error type of the reference crate. Variants carry the argument or
//! file and the field at fault; none of them is a panic in disguise.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument has the wrong shape: `what` names it.
    #[error("{what}: expected shape {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// An argument is out of its domain.
    #[error("invalid {name}: {reason}")]
    InvalidArgument { name: String, reason: String },
    /// NaN or infinity where finite numbers are required.
    #[error("{what} contains a non-finite value at {index}")]
    NonFinite { what: String, index: String },
    /// A numerical procedure failed (for example a Cholesky factorization).
    #[error("{what}: {reason}")]
    Numerical { what: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] inferlab_models::ModelsError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
    pub fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}
