//! Speculative decoding: draft-then-verify with lossless rejection sampling
//! (Leviathan et al. 2023; Chen et al. 2023), its variants, and its theory.
//!
//! - [`verify`]: the verification rule on distributions with explicit uniforms
//!   (`rejection_sample`, the GPU kernel's oracle), greedy, warps, Medusa's
//!   typical acceptance, SpecInfer tree verification.
//! - [`theory`]: β = 1 − TV, tokens per pass, expected rejections, speedup, best k
//!   (the simulator calls `expected_tokens_per_pass{,_vec}`).
//! - [`lossless`]: analytic output laws, exact enumeration of a k-token step,
//!   chi-square goodness of fit and its power (the proof that the rule is lossless).
//! - [`decode`]: the loop over real models: `Proposer`s (draft model,
//!   self-speculative first N layers, n-gram) and the `Verifier`, with KV rollback.

pub mod decode;
pub mod lossless;
pub mod theory;
pub mod verify;
