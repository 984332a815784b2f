//! Speculative decoding: draft-then-verify with lossless rejection sampling
//! (Leviathan et al. 2023; Chen et al. 2023), its variants, and its theory.

pub mod decode;
pub mod lossless;
pub mod theory;
pub mod verify;
