//! The one error type of the simulator crate. Variants carry the option, file
//! or field at fault, so the CLI can print an actionable message.

/// Errors from the simulator's planning, cost and replay code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option is out of its domain (`name` is the option, as the CLI spells it).
    #[error("invalid {name}: {reason}")]
    InvalidArgument { name: String, reason: String },
    /// The model (weights + activation peak + overheads) leaves no room for a
    /// single KV block within `gpu_memory_utilization` of the GPU.
    #[error(
        "the model does not fit on {hardware}: {needed_bytes} bytes needed \
         ({detail}) but gpu_memory_utilization x memory = {usable_bytes} bytes"
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
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
