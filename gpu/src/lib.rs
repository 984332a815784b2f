//! # inferlab-gpu: the reference's operations as CUDA kernels
//!
//! Kernels live in `gpu/kernels/*.cu` (header-free CUDA C, see `common.cuh`),
//! are embedded in the binary and compiled by NVRTC at first use for the
//! device's compute capability ([`arch`]), then cached per (module, arch)
//! ([`context::Gpu`]). cudarc loads libcuda/libnvrtc/libcublas at run time, so
//! this crate builds, tests and runs on machines without CUDA, where
//! [`Gpu::new`] returns [`Error::NoDevice`].
//!
//! Layout:
//! - [`arch`], [`compile`], [`context`]: target choice, NVRTC, the registry.
//! - [`ops`]: typed launch wrappers, one per kernel (prefill, paged decode,
//!   reshape_and_cache, W4A16 GPTQ/AWQ, rejection sampler, RMSNorm/RoPE/SwiGLU).
//! - [`host`]: the slow twins: f64 references and "plain low-precision"
//!   implementations (round after every op) that set the error bounds.
//! - [`check`]: every kernel against the reference (`inferlab gpu check`).
//! - [`bench`]: timings and ceilings (`inferlab gpu bench`).

pub mod arch;
pub mod bench;
pub mod check;
pub mod compile;
pub mod context;
pub mod error;
pub mod host;
pub mod lowp;
pub mod ops;

pub use arch::Arch;
pub use compile::Module;
pub use context::{driver_present, Gpu};
pub use error::{Error, Result};
