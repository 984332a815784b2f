//! Bit layouts of published quantized checkpoints, each with its inverse.
//!
//! ```text
//! AutoGPTQ (bits 2..=8; AutoGPTQ itself ships 2, 3, 4, 8):
//!   qweight int32 [⌈in·b/32⌉, out]   column o = codes[o, 0..in] as one LSB-first bit
//!                                    stream: value j at bit j·b (3-bit values cross
//!                                    words: 32 values fill 3 words, as AutoGPTQ's pack)
//!   qzeros  int32 [groups, ⌈out·b/32⌉] row k = zeros[k, 0..out], same stream;
//!                                    v1 stores zero − 1 (mod 2^b), v2 the true zero
//!   scales  f16   [groups, out]
//!   g_idx   int32 [in]
//! AWQ GEMM (4-bit only):
//!   qweight int32 [in, out/8]        word (i, c), nibble k = code[o = 8c + ORDER[k], i]
//!   qzeros  int32 [groups, out/8]    same order;  ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
//!   scales  f16   [groups, out]      (no g_idx: groups are i / group_size)
//! GGUF (ggml's reference quantizers), blocks of 32 consecutive weights of a row:
//!   Q4_0  f16 d, 16 B: q = min(15, trunc(x/d + 8.5)), d = signed-absmax / −8;  x ≈ (q−8)·d
//!   Q4_1  f16 d, f16 m, 16 B: q = min(15, trunc((x−m)/d + 0.5)), d = (max−min)/15; x ≈ q·d + m
//!   Q8_0  f16 d, 32 i8: q = round(x/d), d = absmax/127;  x ≈ q·d
//!   4-bit bytes hold element j in the low nibble and j + 16 in the high one.
//! ```
//! Scales are rounded to f16 when packed (the only lossy step; codes, zeros and
//! g_idx round-trip exactly). v1 cannot express a true zero of 0 for readers that
//! add 1 without wrapping (AutoGPTQ's kernels): it is stored as 2^b − 1 and this
//! unpacker wraps it back to 0.

use half::f16;
use ndarray::Array2;

use super::{check_bits, QuantizedLinear};
use crate::{Error, Result};

/// Pack `values` (each < 2^bits) as an LSB-first bit stream of u32 words.
pub fn pack_bits(values: &[u32], bits: u32) -> Vec<u32> {
    let mut words = vec![0u32; (values.len() * bits as usize).div_ceil(32)];
    for (j, &v) in values.iter().enumerate() {
        let bit = j * bits as usize;
        let (w, off) = (bit / 32, (bit % 32) as u32);
        words[w] |= v << off;
        if off + bits > 32 {
            words[w + 1] |= v >> (32 - off);
        }
    }
    words
}

/// Inverse of [`pack_bits`]: the first `count` values.
pub fn unpack_bits(words: &[u32], bits: u32, count: usize) -> Vec<u32> {
    let mask = (1u32 << bits) - 1;
    (0..count)
        .map(|j| {
            let bit = j * bits as usize;
            let (w, off) = (bit / 32, (bit % 32) as u32);
            let mut v = words[w] >> off;
            if off + bits > 32 {
                v |= words[w + 1] << (32 - off);
            }
            v & mask
        })
        .collect()
}

/// How GPTQ zeros are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptqZeros {
    /// AutoGPTQ's original format: zero − 1.
    V1,
    /// GPTQModel's "v2": the true zero.
    V2,
}

/// AutoGPTQ tensors of one linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqPacked {
    pub bits: u32,
    pub group_size: usize,
    pub qweight: Array2<i32>,
    pub qzeros: Array2<i32>,
    pub scales: Array2<f16>,
    pub g_idx: Vec<i32>,
}

pub fn pack_gptq(q: &QuantizedLinear, zeros: GptqZeros) -> Result<GptqPacked> {
    q.validate()?;
    let b = q.bits;
    let mask = (1u32 << b) - 1;
    let (o, n) = q.codes.dim();
    let groups = q.scales.nrows();
    let wrows = (n * b as usize).div_ceil(32);
    let mut qweight = Array2::<i32>::zeros((wrows, o));
    for r in 0..o {
        let col: Vec<u32> = q.codes.row(r).iter().map(|&c| c as u32).collect();
        for (w, word) in pack_bits(&col, b).into_iter().enumerate() {
            qweight[[w, r]] = word as i32;
        }
    }
    let zcols = (o * b as usize).div_ceil(32);
    let mut qzeros = Array2::<i32>::zeros((groups, zcols));
    for k in 0..groups {
        let row: Vec<u32> = q
            .zeros
            .row(k)
            .iter()
            .map(|&z| match zeros {
                GptqZeros::V1 => (z as u32).wrapping_sub(1) & mask,
                GptqZeros::V2 => z as u32,
            })
            .collect();
        for (c, word) in pack_bits(&row, b).into_iter().enumerate() {
            qzeros[[k, c]] = word as i32;
        }
    }
    Ok(GptqPacked {
        bits: b,
        group_size: q.group_size,
        qweight,
        qzeros,
        scales: q.scales.mapv(f16::from_f64),
        g_idx: q.g_idx.iter().map(|&g| g as i32).collect(),
    })
}

/// Inverse of [`pack_gptq`] for a layer of `in_features` inputs.
pub fn unpack_gptq(
    p: &GptqPacked,
    zeros: GptqZeros,
    in_features: usize,
) -> Result<QuantizedLinear> {
    check_bits(p.bits)?;
    let b = p.bits;
    let mask = (1u32 << b) - 1;
    let (groups, o) = p.scales.dim();
    let want_w = ((in_features * b as usize).div_ceil(32), o);
    let want_z = (groups, (o * b as usize).div_ceil(32));
    if p.qweight.dim() != want_w || p.qzeros.dim() != want_z || p.g_idx.len() != in_features {
        return Err(Error::shape(
            "GPTQ tensors",
            format!("qweight {want_w:?}, qzeros {want_z:?}, g_idx [{in_features}]"),
            format!(
                "qweight {:?}, qzeros {:?}, g_idx [{}]",
                p.qweight.dim(),
                p.qzeros.dim(),
                p.g_idx.len()
            ),
        ));
    }
    let mut codes = Array2::<u8>::zeros((o, in_features));
    for r in 0..o {
        let words: Vec<u32> = p.qweight.column(r).iter().map(|&w| w as u32).collect();
        for (i, v) in unpack_bits(&words, b, in_features).into_iter().enumerate() {
            codes[[r, i]] = v as u8;
        }
    }
    let mut zs = Array2::<u8>::zeros((groups, o));
    for k in 0..groups {
        let words: Vec<u32> = p.qzeros.row(k).iter().map(|&w| w as u32).collect();
        for (r, v) in unpack_bits(&words, b, o).into_iter().enumerate() {
            zs[[k, r]] = match zeros {
                GptqZeros::V1 => (v + 1) & mask,
                GptqZeros::V2 => v,
            } as u8;
        }
    }
    if let Some(i) = p.g_idx.iter().position(|&g| g < 0) {
        return Err(Error::invalid("g_idx", format!("g_idx[{i}] is negative")));
    }
    let q = QuantizedLinear {
        bits: b,
        group_size: p.group_size,
        codes,
        scales: p.scales.mapv(f64::from),
        zeros: zs,
        g_idx: p.g_idx.iter().map(|&g| g as u32).collect(),
    };
    q.validate()?;
    Ok(q)
}

/// AWQ's interleaving of 8 nibbles within a word.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// AutoAWQ `WQLinear_GEMM` tensors of one linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqPacked {
    pub group_size: usize,
    pub qweight: Array2<i32>,
    pub qzeros: Array2<i32>,
    pub scales: Array2<f16>,
}

fn awq_word(vals: impl Fn(usize) -> u32) -> i32 {
    let mut w = 0u32;
    for (k, &o) in AWQ_ORDER.iter().enumerate() {
        w |= vals(o) << (4 * k);
    }
    w as i32
}

pub fn pack_awq(q: &QuantizedLinear) -> Result<AwqPacked> {
    q.validate()?;
    let (o, n) = q.codes.dim();
    if q.bits != 4 {
        return Err(Error::invalid(
            "bits",
            format!("AWQ GEMM packs 4-bit weights only, got {}", q.bits),
        ));
    }
    if o % 8 != 0 {
        return Err(Error::invalid(
            "out_features",
            format!("{o} is not a multiple of 8 (AWQ GEMM)"),
        ));
    }
    let g = q.group_size;
    if q.g_idx
        .iter()
        .enumerate()
        .any(|(i, &k)| k as usize != i / g)
    {
        return Err(Error::invalid(
            "g_idx",
            "AWQ GEMM has no g_idx: act-order layers cannot be stored",
        ));
    }
    let groups = q.scales.nrows();
    let qweight = Array2::from_shape_fn((n, o / 8), |(i, c)| {
        awq_word(|k| q.codes[[8 * c + k, i]] as u32)
    });
    let qzeros = Array2::from_shape_fn((groups, o / 8), |(kg, c)| {
        awq_word(|k| q.zeros[[kg, 8 * c + k]] as u32)
    });
    Ok(AwqPacked {
        group_size: g,
        qweight,
        qzeros,
        scales: q.scales.mapv(f16::from_f64),
    })
}

pub fn unpack_awq(p: &AwqPacked) -> Result<QuantizedLinear> {
    let (n, c8) = p.qweight.dim();
    let o = c8 * 8;
    let g = p.group_size;
    if g == 0 || n % g != 0 || p.scales.dim() != (n / g, o) || p.qzeros.dim() != (n / g, c8) {
        return Err(Error::shape(
            "AWQ tensors",
            format!(
                "scales [{}, {o}], qzeros [{}, {c8}] for group {g}",
                n / g.max(1),
                n / g.max(1)
            ),
            format!("scales {:?}, qzeros {:?}", p.scales.dim(), p.qzeros.dim()),
        ));
    }
    let nib = |w: i32, o_in_word: usize| -> u8 {
        let k = AWQ_ORDER
            .iter()
            .position(|&x| x == o_in_word)
            .expect("order is a permutation");
        ((w as u32 >> (4 * k)) & 0xF) as u8
    };
    let q = QuantizedLinear {
        bits: 4,
        group_size: g,
        codes: Array2::from_shape_fn((o, n), |(r, i)| nib(p.qweight[[i, r / 8]], r % 8)),
        scales: p.scales.mapv(f64::from),
        zeros: Array2::from_shape_fn((n / g, o), |(k, r)| nib(p.qzeros[[k, r / 8]], r % 8)),
        g_idx: (0..n).map(|i| (i / g) as u32).collect(),
    };
    q.validate()?;
    Ok(q)
}

/// GGUF block quantization types written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgufType {
    pub fn block_bytes(&self) -> usize {
        match self {
            GgufType::Q4_0 => 18,
            GgufType::Q4_1 => 20,
            GgufType::Q8_0 => 34,
        }
    }
}

/// Quantize `x` (length a multiple of 32) with ggml's reference quantizer.
pub fn gguf_quantize(x: &[f32], t: GgufType) -> Result<Vec<u8>> {
    if x.len() % 32 != 0 {
        return Err(Error::invalid(
            "length",
            format!("{} is not a multiple of the GGUF block 32", x.len()),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "GGUF input".into(),
            index: format!("[{i}]"),
        });
    }
    let mut out = Vec::with_capacity(x.len() / 32 * t.block_bytes());
    for blk in x.chunks(32) {
        match t {
            GgufType::Q4_0 => {
                let mut amax = 0.0f32;
                let mut max = 0.0f32;
                for &v in blk {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = 15.min((blk[j] * id + 8.5) as i8 as u8);
                    let q1 = 15.min((blk[j + 16] * id + 8.5) as i8 as u8);
                    out.push(q0 | (q1 << 4));
                }
            }
            GgufType::Q4_1 => {
                let min = blk.iter().copied().fold(f32::MAX, f32::min);
                let max = blk.iter().copied().fold(-f32::MAX, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = 15.min(((blk[j] - min) * id + 0.5) as i8 as u8);
                    let q1 = 15.min(((blk[j + 16] - min) * id + 0.5) as i8 as u8);
                    out.push(q0 | (q1 << 4));
                }
            }
            GgufType::Q8_0 => {
                let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for &v in blk {
                    out.push((v * id).round() as i8 as u8);
                }
            }
        }
    }
    Ok(out)
}

/// Dequantize GGUF blocks (as ggml's `dequantize_row_*`).
pub fn gguf_dequantize(bytes: &[u8], t: GgufType) -> Result<Vec<f32>> {
    let bb = t.block_bytes();
    if bytes.len() % bb != 0 {
        return Err(Error::invalid(
            "GGUF data",
            format!(
                "{} bytes is not a whole number of {bb}-byte blocks",
                bytes.len()
            ),
        ));
    }
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::with_capacity(bytes.len() / bb * 32);
    for blk in bytes.chunks(bb) {
        let mut vals = [0f32; 32];
        match t {
            GgufType::Q4_0 => {
                let d = h(&blk[0..2]);
                for j in 0..16 {
                    vals[j] = ((blk[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    vals[j + 16] = ((blk[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgufType::Q4_1 => {
                let (d, m) = (h(&blk[0..2]), h(&blk[2..4]));
                for j in 0..16 {
                    vals[j] = (blk[4 + j] & 0xF) as f32 * d + m;
                    vals[j + 16] = (blk[4 + j] >> 4) as f32 * d + m;
                }
            }
            GgufType::Q8_0 => {
                let d = h(&blk[0..2]);
                for j in 0..32 {
                    vals[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
        }
        out.extend_from_slice(&vals);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::bytes::QuantFormat;
    use proptest::prelude::*;

    fn layer(
        bits: u32,
        o: usize,
        n: usize,
        g: usize,
        codes: &[u8],
        zeros: &[u8],
        scales: &[f32],
        perm: bool,
    ) -> QuantizedLinear {
        let mask = ((1u32 << bits) - 1) as u8;
        let groups = n / g;
        let mut g_idx: Vec<u32> = (0..n).map(|i| (i / g) as u32).collect();
        if perm {
            g_idx.reverse();
        }
        QuantizedLinear {
            bits,
            group_size: g,
            codes: Array2::from_shape_fn((o, n), |(r, c)| codes[(r * n + c) % codes.len()] & mask),
            // f16-representable scales: the packers round to f16
            scales: Array2::from_shape_fn((groups, o), |(k, r)| {
                f16::from_f32(scales[(k * o + r) % scales.len()]).to_f64()
            }),
            zeros: Array2::from_shape_fn((groups, o), |(k, r)| {
                zeros[(k * o + r) % zeros.len()] & mask
            }),
            g_idx,
        }
    }

    proptest! {
        #[test]
        fn gptq_round_trip(
            bits in prop_oneof![Just(2u32), Just(3), Just(4), Just(8), Just(5)],
            o in 1usize..20, gmul in 1usize..4, g in prop_oneof![Just(8usize), Just(32)],
            codes in proptest::collection::vec(any::<u8>(), 1..200),
            zeros in proptest::collection::vec(any::<u8>(), 1..50),
            scales in proptest::collection::vec(1e-4f32..10.0, 1..50),
            perm in any::<bool>(),
            v2 in any::<bool>(),
        ) {
            let n = g * gmul;
            let q = layer(bits, o, n, g, &codes, &zeros, &scales, perm);
            let z = if v2 { GptqZeros::V2 } else { GptqZeros::V1 };
            let p = pack_gptq(&q, z).unwrap();
            let bytes = QuantFormat::Gptq { bits, group_size: g as u32 }.packed_bytes(o as u64, n as u64).unwrap();
            prop_assert_eq!(bytes.weights, 4 * p.qweight.len() as u64);
            prop_assert_eq!(bytes.zeros, 4 * p.qzeros.len() as u64);
            prop_assert_eq!(bytes.scales, 2 * p.scales.len() as u64);
            prop_assert_eq!(bytes.g_idx, 4 * p.g_idx.len() as u64);
            prop_assert_eq!(unpack_gptq(&p, z, n).unwrap(), q);
        }

        #[test]
        fn awq_round_trip(
            o8 in 1usize..4, gmul in 1usize..4,
            codes in proptest::collection::vec(any::<u8>(), 1..200),
            zeros in proptest::collection::vec(any::<u8>(), 1..50),
            scales in proptest::collection::vec(1e-4f32..10.0, 1..50),
        ) {
            let q = layer(4, 8 * o8, 16 * gmul, 16, &codes, &zeros, &scales, false);
            let p = pack_awq(&q).unwrap();
            let bytes = QuantFormat::Awq { bits: 4, group_size: 16 }.packed_bytes(8 * o8 as u64, 16 * gmul as u64).unwrap();
            prop_assert_eq!(bytes.weights, 4 * p.qweight.len() as u64);
            prop_assert_eq!(bytes.total(), 4 * (p.qweight.len() + p.qzeros.len()) as u64 + 2 * p.scales.len() as u64);
            prop_assert_eq!(unpack_awq(&p).unwrap(), q);
        }

        /// ggml's quantizers: the reader inverts the writer's layout, and each
        /// weight lies within half a step of its value (plus the f16 rounding of
        /// d, m: |q|·|d − f16(d)| ≤ levels·2^-11·|d|), Q4_0's one-sided clip excepted.
        #[test]
        fn gguf_round_trip(vals in proptest::collection::vec(-4.0f32..4.0, 64)) {
            for t in [GgufType::Q4_0, GgufType::Q4_1, GgufType::Q8_0] {
                let b = gguf_quantize(&vals, t).unwrap();
                prop_assert_eq!(b.len() as u64, match t {
                    GgufType::Q4_0 => QuantFormat::GgufQ4_0,
                    GgufType::Q4_1 => QuantFormat::GgufQ4_1,
                    GgufType::Q8_0 => QuantFormat::GgufQ8_0,
                }.packed_bytes(1, 64).unwrap().total());
                let back = gguf_dequantize(&b, t).unwrap();
                prop_assert_eq!(gguf_quantize(&back, t).unwrap().len(), b.len());
                for (blk, bb) in vals.chunks(32).zip(back.chunks(32)) {
                    let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let (lo, hi) = (blk.iter().copied().fold(f32::MAX, f32::min), blk.iter().copied().fold(f32::MIN, f32::max));
                    let step = match t { GgufType::Q4_0 => amax / 8.0, GgufType::Q4_1 => (hi - lo) / 15.0, GgufType::Q8_0 => amax / 127.0 };
                    let levels = match t { GgufType::Q8_0 => 128.0, _ => 16.0 };
                    let tol = step / 2.0 + levels * step * 2f32.powi(-11) + amax * 2f32.powi(-11) + 1e-6;
                    for (&x, &y) in blk.iter().zip(bb) {
                        // Q4_0 codes span [−8d, 7d] with d = max/−8: values of the sign
                        // opposite to max beyond 7.5·|d| clip to 7d, up to one step away.
                        let extra = if t == GgufType::Q4_0 && x.abs() > 7.5 * step { step / 2.0 } else { 0.0 };
                        prop_assert!((x - y).abs() <= tol + extra, "{:?}: {} vs {} (step {})", t, x, y, step);
                    }
                }
            }
        }
    }

    #[test]
    fn bit_stream_hand_patterns() {
        // 4-bit: codes 0..8 of one column fill one word, LSB first
        assert_eq!(pack_bits(&[0, 1, 2, 3, 4, 5, 6, 7], 4), vec![0x7654_3210]);
        // 3-bit: value 10 straddles words 0 and 1 (bits 30..32)
        let mut v = vec![0u32; 32];
        v[10] = 0b101;
        assert_eq!(pack_bits(&v, 3), vec![0x4000_0000, 0x0000_0001, 0]);
        // value 21 straddles words 1 and 2 (bit 63..65)
        let mut v = vec![0u32; 32];
        v[21] = 0b011;
        assert_eq!(pack_bits(&v, 3), vec![0, 0x8000_0000, 0x0000_0001]);
        assert_eq!(pack_bits(&[7; 32], 3), vec![u32::MAX; 3]);
        assert_eq!(pack_bits(&[0xAB, 0xCD, 0x12, 0x34], 8), vec![0x3412_CDAB]);
        assert_eq!(
            pack_bits(&[1, 2, 3, 0, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1], 2),
            vec![0x5555_FF39]
        );
    }

    #[test]
    fn gptq_v1_sym_4bit_qzeros_are_0x77777777() {
        let q = layer(4, 8, 16, 8, &[3], &[8], &[0.5], false);
        let p = pack_gptq(&q, GptqZeros::V1).unwrap();
        assert!(p.qzeros.iter().all(|&w| w as u32 == 0x7777_7777));
        let p2 = pack_gptq(&q, GptqZeros::V2).unwrap();
        assert!(p2.qzeros.iter().all(|&w| w as u32 == 0x8888_8888));
        assert!(p.qweight.iter().all(|&w| w as u32 == 0x3333_3333));
        // unpacking a hand-made v1 tensor gives scale·(q − zero)
        let mut hand = p.clone();
        hand.qweight.fill(0xF0F0_F0F0u32 as i32);
        let u = unpack_gptq(&hand, GptqZeros::V1, 16).unwrap();
        assert_eq!(u.codes[[0, 0]], 0);
        assert_eq!(u.codes[[0, 1]], 15);
        assert_eq!(u.dequantize()[[0, 1]], 0.5 * 7.0);
        assert_eq!(u.dequantize()[[0, 0]], -0.5 * 8.0);
        // v1 zero 0 wraps through 15
        let z0 = layer(4, 8, 16, 8, &[3], &[0], &[0.5], false);
        let p = pack_gptq(&z0, GptqZeros::V1).unwrap();
        assert!(p.qzeros.iter().all(|&w| w as u32 == 0xFFFF_FFFF));
        assert_eq!(unpack_gptq(&p, GptqZeros::V1, 16).unwrap(), z0);
    }

    #[test]
    fn awq_word_order() {
        // one input row, out = 8, code[o] = o → nibbles hold [0,2,4,6,1,3,5,7]
        let mut q = layer(4, 8, 8, 8, &[0], &[1], &[1.0], false);
        for o in 0..8 {
            q.codes[[o, 0]] = o as u8;
        }
        let p = pack_awq(&q).unwrap();
        assert_eq!(p.qweight[[0, 0]] as u32, 0x7531_6420);
        assert_eq!(p.qzeros[[0, 0]] as u32, 0x1111_1111);
        // a hand-made word decodes to the documented codes
        let mut hand = p.clone();
        hand.qweight[[1, 0]] = 0x0000_00F1u32 as i32; // nibble0 → o=0: 1, nibble1 → o=2: 15
        let u = unpack_awq(&hand).unwrap();
        assert_eq!(
            (u.codes[[0, 1]], u.codes[[2, 1]], u.codes[[1, 1]]),
            (1, 15, 0)
        );
        assert!(pack_awq(&layer(3, 8, 8, 8, &[0], &[1], &[1.0], false)).is_err());
        assert!(pack_awq(&layer(4, 6, 8, 8, &[0], &[1], &[1.0], false)).is_err());
        assert!(pack_awq(&layer(4, 8, 16, 8, &[0], &[1], &[1.0], true)).is_err());
    }

    #[test]
    fn gguf_hand_blocks() {
        // Q4_0: max-magnitude −2 → d = 0.25; x = 1.0 → trunc(4 + 8.5) = 12
        let mut x = vec![0.0f32; 32];
        x[0] = -2.0;
        x[1] = 1.0;
        x[16] = 0.5;
        let b = gguf_quantize(&x, GgufType::Q4_0).unwrap();
        assert_eq!(&b[0..2], &f16::from_f32(0.25).to_le_bytes());
        assert_eq!(b[2], 0 | (10 << 4)); // x0 = −2 → 0; x16 = 0.5 → 10
        assert_eq!(b[3], 12 | (8 << 4));
        // Q8_0: amax 127 → d = 1
        let mut y: Vec<f32> = (0..32).map(|i| i as f32 * 4.0 - 1.0).collect();
        y[31] = 127.0;
        let b = gguf_quantize(&y, GgufType::Q8_0).unwrap();
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!(b[2] as i8, -1);
        assert_eq!(b[32] as i8, 119);
        assert_eq!(b[33] as i8, 127);
        // Q4_1: [0, 15] → d = 1, m = 0, q = x
        let z: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        let b = gguf_quantize(&z, GgufType::Q4_1).unwrap();
        assert_eq!(b[4], 0x00);
        assert_eq!(b[5], 0x11);
        assert_eq!(gguf_dequantize(&b, GgufType::Q4_1).unwrap(), z);
        assert!(gguf_quantize(&z[..31], GgufType::Q4_1).is_err());
        assert!(gguf_dequantize(&b[..19], GgufType::Q4_1).is_err());
    }
}
