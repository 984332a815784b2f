//! Runtime-dispatched vector width for plain Rust loops.
//!
//! The binary targets baseline x86-64, where element-wise loops vectorize only
//! 4 lanes wide. [`wide`] runs a closure compiled again with AVX-512 (or AVX2)
//! enabled when the CPU has it. The code is the same either way, only the
//! vectors are wider: Rust never contracts `a·b + c` into an FMA nor reorders
//! float operations, so results are bit-identical on every path. That is why
//! one function serves every caller (the bf16 operand builders, GPTQ's column
//! loop, run.c's attention loop) instead of one hand-written wrapper per
//! function and instruction set.
//!
//! Callers mark the closure `#[inline(always)]`: only code inlined into the
//! feature-enabled `run` is compiled for the wider vectors.

/// Run `f` compiled for AVX-512 (F, BW, VL) when the CPU has it, else for
/// AVX2 when it has that, else as is. Same bits on every path (module doc).
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512bw") {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            #[inline]
            unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the features were detected just above.
            return unsafe { run(f) };
        }
        if std::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            #[inline]
            unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the feature was detected just above.
            return unsafe { run(f) };
        }
    }
    f()
}
