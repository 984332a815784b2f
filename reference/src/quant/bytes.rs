//! Exact byte counts of packed weight formats for one `[out, in]` linear layer.
//!
//! Counts follow the on-disk tensors exactly:
//! ```text
//!   GPTQ (AutoGPTQ v1/v2): qweight int32 [in*bits/32, out], qzeros int32 [groups, out*bits/32],
//!                          scales f16 [groups, out], g_idx int32 [in] (always stored)
//!   AWQ GEMM:              qweight int32 [in, out*bits/32], qzeros int32 [groups, out*bits/32],
//!                          scales f16 [groups, out]
//!   GGUF Q4_0: 32-element blocks of f16 d + 16 bytes          = 18 B / 32 weights
//!   GGUF Q4_1: 32-element blocks of f16 d, f16 m + 16 bytes   = 20 B / 32 weights
//!   GGUF Q8_0: 32-element blocks of f16 d + 32 bytes          = 34 B / 32 weights
//! ```
//! Packed int32 words round up (a partial last word is still a whole word).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A weight storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum QuantFormat {
    /// Unquantized, `bits` per weight (32, 16 or 8).
    Dense {
        bits: u32,
    },
    /// AutoGPTQ packing (v1 stores zeros minus one, v2 true zeros: same bytes).
    Gptq {
        bits: u32,
        group_size: u32,
    },
    /// AWQ GEMM packing.
    Awq {
        bits: u32,
        group_size: u32,
    },
    GgufQ4_0,
    GgufQ4_1,
    GgufQ8_0,
}

/// Bytes of each component of a packed layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PackedBytes {
    pub weights: u64,
    pub scales: u64,
    pub zeros: u64,
    pub g_idx: u64,
}

impl PackedBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.scales + self.zeros + self.g_idx
    }
}

fn words(n_values: u64, bits: u32) -> u64 {
    (n_values * bits as u64).div_ceil(32)
}

impl QuantFormat {
    /// Byte counts for an `[out_features, in_features]` weight.
    pub fn packed_bytes(&self, out_features: u64, in_features: u64) -> Result<PackedBytes> {
        let n = out_features * in_features;
        let group_count = |g: u32| -> Result<u64> {
            if g == 0 || in_features % g as u64 != 0 {
                return Err(Error::invalid(
                    "group_size",
                    format!("{g} does not divide the input dimension {in_features}"),
                ));
            }
            Ok(in_features / g as u64)
        };
        let check_bits = |b: u32| -> Result<()> {
            if !(2..=8).contains(&b) {
                return Err(Error::invalid("bits", format!("{b} is not in 2..=8")));
            }
            Ok(())
        };
        let gguf_blocks = || -> Result<u64> {
            if in_features % 32 != 0 {
                return Err(Error::invalid(
                    "in_features",
                    format!("{in_features} is not a multiple of the GGUF block size 32"),
                ));
            }
            Ok(n / 32)
        };
        Ok(match *self {
            QuantFormat::Dense { bits } => PackedBytes {
                weights: (n * bits as u64).div_ceil(8),
                ..Default::default()
            },
            QuantFormat::Gptq { bits, group_size } => {
                check_bits(bits)?;
                let g = group_count(group_size)?;
                PackedBytes {
                    weights: 4 * words(in_features, bits) * out_features,
                    zeros: 4 * g * words(out_features, bits),
                    scales: 2 * g * out_features,
                    g_idx: 4 * in_features,
                }
            }
            QuantFormat::Awq { bits, group_size } => {
                check_bits(bits)?;
                let g = group_count(group_size)?;
                PackedBytes {
                    weights: 4 * in_features * words(out_features, bits),
                    zeros: 4 * g * words(out_features, bits),
                    scales: 2 * g * out_features,
                    g_idx: 0,
                }
            }
            QuantFormat::GgufQ4_0 => {
                let b = gguf_blocks()?;
                PackedBytes {
                    weights: 16 * b,
                    scales: 2 * b,
                    ..Default::default()
                }
            }
            QuantFormat::GgufQ4_1 => {
                let b = gguf_blocks()?;
                PackedBytes {
                    weights: 16 * b,
                    scales: 2 * b,
                    zeros: 2 * b,
                    g_idx: 0,
                }
            }
            QuantFormat::GgufQ8_0 => {
                let b = gguf_blocks()?;
                PackedBytes {
                    weights: 32 * b,
                    scales: 2 * b,
                    ..Default::default()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gptq_4bit_g128_4096_square() {
        let b = QuantFormat::Gptq {
            bits: 4,
            group_size: 128,
        }
        .packed_bytes(4096, 4096)
        .unwrap();
        assert_eq!(b.weights, 4096 * 4096 / 2);
        assert_eq!(b.scales, 32 * 4096 * 2);
        assert_eq!(b.zeros, 32 * 4096 / 2);
        assert_eq!(b.g_idx, 4096 * 4);
    }

    #[test]
    fn gguf_q4_1_is_20_bytes_per_32() {
        let b = QuantFormat::GgufQ4_1.packed_bytes(576, 1536).unwrap();
        assert_eq!(b.total(), 576 * 1536 / 32 * 20);
    }

    #[test]
    fn group_must_divide() {
        assert!(QuantFormat::Gptq {
            bits: 4,
            group_size: 128
        }
        .packed_bytes(10, 576)
        .is_err());
    }
}
