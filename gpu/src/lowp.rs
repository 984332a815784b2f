//! The 16-bit element types the kernels run in, seen from the host.
//!
//! [`Elem::round`] is the rounding a plain 16-bit kernel applies after each
//! operation; the "plain low-precision" twins in [`crate::host`] use it to
//! set each check's error bound.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

pub trait Elem:
    DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + std::fmt::Debug + 'static
{
    /// Kernel name suffix: `bf16` or `f16`.
    const NAME: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn nan() -> Self;
    /// Round an f32 to this type and back.
    #[inline]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn nan() -> Self {
        bf16::NAN
    }
}

impl Elem for f16 {
    const NAME: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn nan() -> Self {
        f16::NAN
    }
}

/// Convert a slice of f32 to `T` (round to nearest even).
pub fn to_elem<T: Elem>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// Convert a slice of `T` to f32 (exact).
pub fn to_f32<T: Elem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_and_idempotent() {
        // 1 + 2^-9 is halfway between two bf16 values: ties to even -> 1.0
        assert_eq!(<bf16 as Elem>::round(1.0 + 1.0 / 512.0), 1.0);
        assert_eq!(<bf16 as Elem>::round(1.0 + 3.0 / 512.0), 1.0 + 1.0 / 128.0);
        assert_eq!(<f16 as Elem>::round(1.0 + 1.0 / 4096.0), 1.0);
        for x in [0.1f32, -3.7, 1e-3, 65504.0] {
            let r = <f16 as Elem>::round(x);
            assert_eq!(<f16 as Elem>::round(r), r);
        }
    }
}
