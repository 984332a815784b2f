//! The one error type of the GPU crate. Each variant names what failed and
//! carries the data needed to act on it (the NVRTC log, the driver call, the shape).

use cudarc::driver::DriverError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libcuda could not be loaded or reports no device: the CPU-only machine case.
    #[error("no CUDA device/driver found: {reason}")]
    NoDevice { reason: String },
    /// libnvrtc could not be loaded.
    #[error("NVRTC (libnvrtc.so) not found: {reason}")]
    NoNvrtc { reason: String },
    /// The device's compute capability has no code path here.
    #[error("unsupported compute capability {major}.{minor}: kernels need sm_80 or newer")]
    UnsupportedArch { major: i32, minor: i32 },
    /// NVRTC rejected a module; `log` is NVRTC's own log.
    #[error("NVRTC failed to compile module `{module}` for {arch}:\n{log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// A CUDA driver call failed; `op` says which step.
    #[error("CUDA driver error in {op}: {source}")]
    Driver {
        op: String,
        #[source]
        source: DriverError,
    },
    #[error("cuBLAS error in {op}: {reason}")]
    Cublas { op: String, reason: String },
    /// An argument has the wrong shape.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// An argument is out of the kernels' domain.
    #[error("invalid {name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error(transparent)]
    Reference(#[from] inferlab_reference::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
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

/// `.drv("what")?` on driver results: attach the step name.
pub(crate) trait DrvExt<T> {
    fn drv(self, op: &str) -> Result<T>;
}
impl<T> DrvExt<T> for std::result::Result<T, DriverError> {
    fn drv(self, op: &str) -> Result<T> {
        self.map_err(|source| Error::Driver {
            op: op.to_string(),
            source,
        })
    }
}
