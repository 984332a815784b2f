//! Weight quantization: RTN, GPTQ, AWQ and their on-disk formats.
//!
//! Every method here produces the same thing, a [`QuantizedLinear`]: integer
//! codes `q[o][i]` in `0..=maxq`, one `(scale, zero)` pair per output row and
//! input group, and `g_idx[i]` naming the group of input column `i`. The weight it
//! stands for is `ŵ[o][i] = scale[g][o] · (q[o][i] − zero[g][o])` with
//! `g = g_idx[i]` — AutoGPTQ's convention, so that one dequantizer, one packer
//! ([`pack`]) and one byte counter ([`bytes`]) serve all three methods.
//!
//! - [`rtn`]: round-to-nearest, and the group-parameter search ([`rtn::find_params`])
//!   exactly as GPTQ's reference `Quantizer.find_params` computes it.
//! - [`gptq`]: Frantar et al.'s GPTQ (Hessian, Cholesky of the inverse, lazy
//!   batches, act-order, static groups) with its column-at-a-time slow twin.
//! - [`awq`]: llm-awq / AutoAWQ activation-aware scaling and clipping search.
//! - [`pack`]: AutoGPTQ v1/v2, AWQ GEMM and GGUF Q4_0/Q4_1/Q8_0 bit layouts.
//! - [`bytes`]: the single source of truth for how many bytes a packed format
//!   takes; the simulator's memory accounting calls it rather than its own formula.
//!
//! Arithmetic is f64 throughout (the reference code uses f32 for weights); scales
//! are kept in f64 here and only rounded to f16 by the packers, which say so.

pub mod awq;
pub mod bytes;
pub mod gptq;
pub mod io;
pub mod layer;
pub mod linalg;
pub mod model;
pub mod pack;
pub mod rtn;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::{Error, Result};

/// How weights share quantization parameters along the input dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One `(scale, zero)` for the whole tensor.
    PerTensor,
    /// One pair per output row (GPTQ's `groupsize = -1`).
    PerChannel,
    /// One pair per output row and each run of `n` input columns; `n` divides `in`.
    Group(usize),
}

impl Grouping {
    /// The group length along the input dimension for an `in_features`-wide weight.
    pub fn group_len(&self, in_features: usize) -> Result<usize> {
        match *self {
            Grouping::PerTensor | Grouping::PerChannel => Ok(in_features),
            Grouping::Group(g) => {
                if g == 0 || in_features % g != 0 {
                    Err(Error::invalid(
                        "group_size",
                        format!("{g} does not divide the input dimension {in_features}"),
                    ))
                } else {
                    Ok(g)
                }
            }
        }
    }
}

/// Symmetric (absmax, fixed zero at the middle code) or asymmetric (zero-point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Symmetric,
    Asymmetric,
}

/// GPTQ's optional search for a shrunk clipping range (`Quantizer(mse=True)`):
/// try ranges `p·[xmin, xmax]` for `p = 1 − k/grid`, `k < maxshrink·grid`, keep the
/// one with the least `Σ|x − Q(x)|^norm`. Reference defaults: 2.4, 100, 0.8.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MseSearch {
    pub norm: f64,
    pub grid: usize,
    pub max_shrink: f64,
}

impl Default for MseSearch {
    fn default() -> Self {
        MseSearch {
            norm: 2.4,
            grid: 100,
            max_shrink: 0.8,
        }
    }
}

/// The shared quantizer settings of RTN and GPTQ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    pub bits: u32,
    pub grouping: Grouping,
    pub scheme: Scheme,
    pub mse: Option<MseSearch>,
}

impl QuantSpec {
    /// 4-bit, groups of 128, asymmetric, no MSE search.
    pub fn new(bits: u32, grouping: Grouping, scheme: Scheme) -> Self {
        QuantSpec {
            bits,
            grouping,
            scheme,
            mse: None,
        }
    }
    /// Largest code, `2^bits − 1`; errors outside 2..=8 bits.
    pub fn maxq(&self) -> Result<u32> {
        check_bits(self.bits)?;
        Ok((1u32 << self.bits) - 1)
    }
}

pub(crate) fn check_bits(bits: u32) -> Result<()> {
    if !(2..=8).contains(&bits) {
        return Err(Error::invalid("bits", format!("{bits} is not in 2..=8")));
    }
    Ok(())
}

/// A quantized `[out, in]` linear weight in AutoGPTQ's logical layout.
///
/// ```text
///   codes   [out, in]      u8 in 0..=maxq
///   scales  [groups, out]  f64 (packers round to f16)
///   zeros   [groups, out]  u8 in 0..=maxq (true zero; v1 packing stores zero−1)
///   g_idx   [in]           group of each input column (i / group_size unless act-order)
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    pub bits: u32,
    pub group_size: usize,
    pub codes: Array2<u8>,
    pub scales: Array2<f64>,
    pub zeros: Array2<u8>,
    pub g_idx: Vec<u32>,
}

impl QuantizedLinear {
    pub fn out_features(&self) -> usize {
        self.codes.nrows()
    }
    pub fn in_features(&self) -> usize {
        self.codes.ncols()
    }
    /// `ŵ = scale · (q − zero)`, `[out, in]`, rows in parallel, each row's
    /// group parameters gathered once. The same bits as its slow twin
    /// [`Self::dequantize_slow`] (the same f64 expression per entry); a
    /// whole-model run dequantizes every linear twice (its codes and RTN's).
    pub fn dequantize(&self) -> Array2<f64> {
        let (o, n) = self.codes.dim();
        let groups = self.scales.nrows();
        let mut out = vec![0f64; o * n];
        out.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let codes = self.codes.row(r);
                let params: Vec<(f64, f64)> = (0..groups)
                    .map(|g| (self.scales[[g, r]], self.zeros[[g, r]] as f64))
                    .collect();
                for ((v, &q), &g) in row.iter_mut().zip(codes).zip(&self.g_idx) {
                    let (s, z) = params[g as usize];
                    *v = s * (q as f64 - z);
                }
            });
        Array2::from_shape_vec((o, n), out).expect("[out, in] entries")
    }
    /// The slow twin of [`Self::dequantize`], entry by entry.
    pub fn dequantize_slow(&self) -> Array2<f64> {
        let (o, n) = self.codes.dim();
        Array2::from_shape_fn((o, n), |(r, c)| {
            let g = self.g_idx[c] as usize;
            self.scales[[g, r]] * (self.codes[[r, c]] as f64 - self.zeros[[g, r]] as f64)
        })
    }
    /// Check internal consistency (shapes, code and zero ranges, g_idx range).
    pub fn validate(&self) -> Result<()> {
        check_bits(self.bits)?;
        let maxq = ((1u32 << self.bits) - 1) as u8;
        let (o, n) = self.codes.dim();
        let groups = self.scales.nrows();
        if self.scales.ncols() != o || self.zeros.dim() != (groups, o) || self.g_idx.len() != n {
            return Err(Error::shape(
                "quantized linear",
                format!("scales/zeros [groups, {o}], g_idx [{n}]"),
                format!(
                    "scales {:?}, zeros {:?}, g_idx [{}]",
                    self.scales.dim(),
                    self.zeros.dim(),
                    self.g_idx.len()
                ),
            ));
        }
        if let Some(i) = self.g_idx.iter().position(|&g| g as usize >= groups) {
            return Err(Error::invalid(
                "g_idx",
                format!(
                    "g_idx[{i}] = {} but there are {groups} groups",
                    self.g_idx[i]
                ),
            ));
        }
        if self
            .codes
            .iter()
            .chain(self.zeros.iter())
            .any(|&c| c > maxq)
        {
            return Err(Error::invalid(
                "codes",
                format!("a code or zero exceeds {maxq}"),
            ));
        }
        Ok(())
    }
}

/// Reject NaN/Inf, naming the argument and the first bad index (f64 or f32).
/// Contiguous arrays are scanned in parallel chunks without early exit (so the
/// test vectorizes); only a failed scan looks for the first bad index.
pub fn check_finite<T: Copy + Into<f64> + Sync>(what: &str, a: ArrayView2<T>) -> Result<()> {
    let finite = |v: &T| (*v).into().is_finite();
    let all_finite = match a.as_slice_memory_order() {
        Some(s) => s
            .par_chunks(1 << 14)
            .all(|c| c.iter().fold(true, |ok, v| ok & finite(v))),
        None => a.iter().all(finite),
    };
    if all_finite {
        return Ok(());
    }
    if let Some((idx, _)) = a.indexed_iter().find(|(_, v)| !finite(v)) {
        return Err(Error::NonFinite {
            what: what.to_string(),
            index: format!("[{}, {}]", idx.0, idx.1),
        });
    }
    Ok(())
}

/// `‖X·Wᵀ − X·Ŵᵀ‖²_F`: the squared output error of a layer on activations
/// `x` `[tokens, in]` (GPTQ's objective, summed over tokens and outputs).
pub fn output_error(x: ArrayView2<f64>, w: ArrayView2<f64>, w_hat: ArrayView2<f64>) -> f64 {
    let d = &w - &w_hat;
    let e = x.dot(&d.t());
    e.iter().map(|v| v * v).sum()
}
