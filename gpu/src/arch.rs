//! Which code path a device gets: compute capability -> NVRTC target.
//!
//! Pure functions so the choice is unit-tested on machines without a GPU.
//! Hopper (9.0) gets `sm_90a` (the `a` target is what unlocks wgmma/setmaxnreg;
//! kernels keep such code behind `#if __CUDA_ARCH__ >= 900`); every other
//! Ampere-or-newer part gets its own plain `sm_XY`, and anything below 8.0 is
//! refused (the kernels use `mma.sync` bf16, `cp.async` and `ldmatrix`).

use crate::{Error, Result};

/// An NVRTC target, e.g. `sm_90a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Arch {
    pub major: i32,
    pub minor: i32,
    /// The architecture-specific (`a`) variant.
    pub specific: bool,
}

impl Arch {
    pub const SM80: Arch = Arch {
        major: 8,
        minor: 0,
        specific: false,
    };
    pub const SM90A: Arch = Arch {
        major: 9,
        minor: 0,
        specific: true,
    };

    /// The target for a device of compute capability `major.minor`.
    pub fn for_capability(major: i32, minor: i32) -> Result<Arch> {
        if major < 8 {
            return Err(Error::UnsupportedArch { major, minor });
        }
        Ok(Arch {
            major,
            minor,
            specific: major == 9 && minor == 0,
        })
    }

    /// NVRTC's `--gpu-architecture` value (`sm_...` makes NVRTC emit a CUBIN,
    /// which runs ptxas and so checks inline PTX at compile time).
    pub fn target(&self) -> String {
        format!(
            "sm_{}{}{}",
            self.major,
            self.minor,
            if self.specific { "a" } else { "" }
        )
    }

    /// The value of `__CUDA_ARCH__` this target compiles with.
    pub fn cuda_arch(&self) -> i32 {
        self.major * 100 + self.minor * 10
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.target())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(major: i32, minor: i32, want: Option<&str>) {
        let got = Arch::for_capability(major, minor).ok().map(|a| a.target());
        assert_eq!(got.as_deref(), want, "capability {major}.{minor}");
    }

    #[test]
    fn capability_to_target() {
        check(9, 0, Some("sm_90a")); // H100 / H200
        check(8, 0, Some("sm_80")); // A100
        check(8, 6, Some("sm_86"));
        check(8, 9, Some("sm_89"));
        check(10, 0, Some("sm_100"));
        check(7, 5, None);
        check(6, 0, None);
    }

    #[test]
    fn cuda_arch_macro() {
        assert_eq!(Arch::SM90A.cuda_arch(), 900);
        assert_eq!(Arch::SM80.cuda_arch(), 800);
    }
}
