//! # inferlab-gpu: the reference's operations as CUDA kernels
//!
//! Kernels live in `gpu/kernels/*.cu` and are compiled by NVRTC at first use.
//! cudarc loads the CUDA libraries at run time, so this crate builds and runs on
//! machines without CUDA and reports plainly that no device is present.
