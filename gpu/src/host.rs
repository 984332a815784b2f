//! Slow twins of every kernel, on the host.
//!
//! For each operation two host versions exist:
//! - an **f64 reference** (through `inferlab_reference` where it has the
//!   operation, otherwise a direct f64 loop written beside it here);
//! - a **plain low-precision** version: inputs in the 16-bit type and every
//!   intermediate rounded to it after each operation (each multiply, each add,
//!   each exp), as a naive 16-bit kernel would compute. Its error against f64 is
//!   the yardstick: a fast kernel may err at most twice as much
//!   (FlashAttention's rule). Both versions read the SAME rounded inputs, so the
//!   measured error is the arithmetic's alone.
//!
//! Also here: host-side GPTQ/AWQ packers from logical codes (cross-checked
//! against `reference::quant::pack` in the tests). The sampler is checked
//! against `reference::speculative::verify` directly.

use ndarray::{Array3, ArrayView3, ArrayView4};
use rayon::prelude::*;

use crate::lowp::Elem;
use crate::Result;
use inferlab_reference::attention::{
    attention_naive, attention_paged, AttentionConfig, Masking, PagedKv,
};

/// Problem of a varlen prefill: per-sequence lengths, heads, head dim.
#[derive(Debug, Clone)]
pub struct PrefillShape {
    pub lq: Vec<usize>,
    pub lk: Vec<usize>,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub causal: bool,
}

impl PrefillShape {
    pub fn cu(v: &[usize]) -> Vec<i32> {
        let mut c = vec![0i32];
        for &x in v {
            c.push(c.last().unwrap() + x as i32);
        }
        c
    }
}

/// f64 reference prefill through `reference::attention::attention_naive`,
/// one call per sequence. Returns (out [total_q, hq, d], lse [total_q, hq]).
pub fn prefill_ref(
    s: &PrefillShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let mut out = Vec::new();
    let mut lse = Vec::new();
    let (mut oq, mut ok) = (0usize, 0usize);
    let cfg = AttentionConfig {
        masking: if s.causal {
            Masking::Causal
        } else {
            Masking::None
        },
        ..Default::default()
    };
    for (&lq, &lk) in s.lq.iter().zip(&s.lk) {
        let qa = Array3::from_shape_fn((lq, hq, d), |(i, h, x)| {
            q[((oq + i) * hq + h) * d + x] as f64
        });
        let ka = Array3::from_shape_fn((lk, hkv, d), |(i, h, x)| {
            k[((ok + i) * hkv + h) * d + x] as f64
        });
        let va = Array3::from_shape_fn((lk, hkv, d), |(i, h, x)| {
            v[((ok + i) * hkv + h) * d + x] as f64
        });
        let r = attention_naive(qa.view(), ka.view(), va.view(), &cfg)?;
        out.extend(r.out.iter().copied());
        lse.extend(r.lse.iter().copied());
        oq += lq;
        ok += lk;
    }
    Ok((out, lse))
}

/// Plain 16-bit attention for one query row and head: scores, max, exp, sums
/// and the weighted sum of V all rounded to `T` after each operation.
fn attn_row_lowp<T: Elem>(
    qr: &[f32],
    keys: &[&[f32]],
    vals: &[&[f32]],
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let r = T::round;
    let d = qr.len();
    if keys.is_empty() {
        out.iter_mut().for_each(|o| *o = 0.0);
        return f32::NEG_INFINITY;
    }
    let s: Vec<f32> = keys
        .iter()
        .map(|kr| {
            let mut acc = 0f32;
            for x in 0..d {
                acc = r(acc + r(qr[x] * kr[x]));
            }
            r(acc * r(scale))
        })
        .collect();
    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = s.iter().map(|&x| r(r(x - m).exp())).collect();
    let mut l = 0f32;
    for &pj in &p {
        l = r(l + pj);
    }
    for x in 0..d {
        let mut acc = 0f32;
        for (j, vr) in vals.iter().enumerate() {
            acc = r(acc + r(p[j] * vr[x]));
        }
        out[x] = r(acc / l);
    }
    r(m + r(l.ln()))
}

/// Plain 16-bit prefill (see [`attn_row_lowp`]); out [total_q, hq, d].
pub fn prefill_lowp<T: Elem>(
    s: &PrefillShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let cq = PrefillShape::cu(&s.lq);
    let ck = PrefillShape::cu(&s.lk);
    let total_q = *cq.last().unwrap() as usize;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; total_q * hq * d];
    let mut lse = vec![0f32; total_q * hq];
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(idx, (o, ls))| {
            let (row, h) = (idx / hq, idx % hq);
            let b = cq
                .iter()
                .rposition(|&c| c as usize <= row)
                .unwrap()
                .min(s.lq.len() - 1);
            let (lq, lk) = (s.lq[b], s.lk[b]);
            let i = row - cq[b] as usize;
            let kh = h / (hq / hkv);
            let nvis = if s.causal { lk - lq + i + 1 } else { lk };
            let k0 = ck[b] as usize;
            let keys: Vec<&[f32]> = (0..nvis)
                .map(|j| &k[((k0 + j) * hkv + kh) * d..][..d])
                .collect();
            let vals: Vec<&[f32]> = (0..nvis)
                .map(|j| &v[((k0 + j) * hkv + kh) * d..][..d])
                .collect();
            *ls = attn_row_lowp::<T>(&q[(row * hq + h) * d..][..d], &keys, &vals, scale, o);
        });
    (out, lse)
}

/// Paged decode problem: q [B, hq, d]; caches [nblocks, bs, hkv, d].
#[derive(Debug, Clone)]
pub struct DecodeShape {
    pub lens: Vec<usize>,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// block_tables[b] has lens[b].div_ceil(bs) entries
    pub block_tables: Vec<Vec<u32>>,
}

/// f64 reference decode through `reference::attention::attention_paged`
/// (itself split-KV with an LSE merge, so it also checks the partitioning idea).
pub fn decode_ref(
    s: &DecodeShape,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (hq, hkv, d, bs, nb) = (s.hq, s.hkv, s.d, s.block_size, s.num_blocks);
    let kc64: Vec<f64> = kc.iter().map(|&x| x as f64).collect();
    let vc64: Vec<f64> = vc.iter().map(|&x| x as f64).collect();
    let kv4 = ArrayView4::from_shape((nb, bs, hkv, d), &kc64).expect("cache shape");
    let vv4 = ArrayView4::from_shape((nb, bs, hkv, d), &vc64).expect("cache shape");
    let mut out = Vec::new();
    let mut lse = Vec::new();
    for (b, &len) in s.lens.iter().enumerate() {
        let qb: Vec<f64> = q[b * hq * d..(b + 1) * hq * d]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let qa = ArrayView3::from_shape((1, hq, d), &qb).expect("q shape");
        let kv = PagedKv {
            k_blocks: kv4,
            v_blocks: vv4,
            block_table: &s.block_tables[b],
            len,
        };
        let r = attention_paged(qa, &kv, bs * 4, &AttentionConfig::default())?;
        out.extend(r.out.iter().copied());
        lse.extend(r.lse.iter().copied());
    }
    Ok((out, lse))
}

/// Plain 16-bit decode: gather the sequence's keys and run [`attn_row_lowp`].
pub fn decode_lowp<T: Elem>(
    s: &DecodeShape,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (hq, hkv, d, bs) = (s.hq, s.hkv, s.d, s.block_size);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; s.lens.len() * hq * d];
    let mut lse = vec![0f32; s.lens.len() * hq];
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(idx, (o, ls))| {
            let (b, h) = (idx / hq, idx % hq);
            let kh = h / (hq / hkv);
            let at = |c: &'_ [f32], t: usize| -> std::ops::Range<usize> {
                let _ = c;
                let blk = s.block_tables[b][t / bs] as usize;
                let off = ((blk * bs + t % bs) * hkv + kh) * d;
                off..off + d
            };
            let keys: Vec<&[f32]> = (0..s.lens[b]).map(|t| &kc[at(kc, t)]).collect();
            let vals: Vec<&[f32]> = (0..s.lens[b]).map(|t| &vc[at(vc, t)]).collect();
            *ls = attn_row_lowp::<T>(&q[(b * hq + h) * d..][..d], &keys, &vals, scale, o);
        });
    (out, lse)
}

/// RMSNorm, f64: y = x / sqrt(mean(x^2) + eps) * w, rows of length `h`.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], h: usize, eps: f64) -> Vec<f64> {
    x.chunks(h)
        .flat_map(|r| {
            let ms = r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            r.iter()
                .zip(w)
                .map(move |(&v, &wi)| v as f64 * inv * wi as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// RMSNorm, plain 16-bit (sum of squares accumulated in `T`).
pub fn rmsnorm_lowp<T: Elem>(x: &[f32], w: &[f32], h: usize, eps: f32) -> Vec<f32> {
    let r = T::round;
    x.chunks(h)
        .flat_map(|row| {
            let mut ss = 0f32;
            for &v in row {
                ss = r(ss + r(v * v));
            }
            let inv = r(1.0 / r(r(r(ss / h as f32) + eps).sqrt()));
            row.iter()
                .zip(w)
                .map(move |(&v, &wi)| r(r(v * inv) * wi))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// RoPE (rotate-half): x [t, h, d], angle = pos * theta^(-2i/d), f64.
pub fn rope_ref(x: &[f32], pos: &[i32], h: usize, d: usize, theta: f64) -> Vec<f64> {
    let mut y = vec![0f64; x.len()];
    let half = d / 2;
    for (t, &p) in pos.iter().enumerate() {
        for hh in 0..h {
            let base = (t * h + hh) * d;
            for i in 0..half {
                let ang = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                let (sn, cs) = ang.sin_cos();
                let (a, b) = (x[base + i] as f64, x[base + i + half] as f64);
                y[base + i] = a * cs - b * sn;
                y[base + i + half] = b * cs + a * sn;
            }
        }
    }
    y
}

/// RoPE, plain 16-bit: cos/sin computed in f32 and cast to `T` (as HF caches
/// them), each product and sum rounded.
pub fn rope_lowp<T: Elem>(x: &[f32], pos: &[i32], h: usize, d: usize, theta: f32) -> Vec<f32> {
    let r = T::round;
    let mut y = vec![0f32; x.len()];
    let half = d / 2;
    for (t, &p) in pos.iter().enumerate() {
        for hh in 0..h {
            let base = (t * h + hh) * d;
            for i in 0..half {
                let ang = p as f32 * theta.powf(-2.0 * i as f32 / d as f32);
                let (sn, cs) = (r(ang.sin()), r(ang.cos()));
                let (a, b) = (x[base + i], x[base + i + half]);
                y[base + i] = r(r(a * cs) - r(b * sn));
                y[base + i + half] = r(r(b * cs) + r(a * sn));
            }
        }
    }
    y
}

/// SwiGLU, f64: silu(g) * u.
pub fn swiglu_ref(g: &[f32], u: &[f32]) -> Vec<f64> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        })
        .collect()
}

/// SwiGLU, plain 16-bit.
pub fn swiglu_lowp<T: Elem>(g: &[f32], u: &[f32]) -> Vec<f32> {
    let r = T::round;
    g.iter()
        .zip(u)
        .map(|(&g, &u)| r(r(g / r(1.0 + r((-g).exp()))) * u))
        .collect()
}

// ---------------------------------------------------------------- W4A16

/// A 4-bit quantized linear layer in logical form: W[k][n] = s[g(k)][n] * (q[k][n] - z[g(k)][n]).
#[derive(Debug, Clone)]
pub struct Int4Linear {
    pub k: usize,
    pub n: usize,
    pub group_size: usize,
    /// q[k * n + j] in 0..16
    pub q: Vec<u8>,
    /// zeros[g * n + j] in 0..16
    pub zeros: Vec<u8>,
    /// scales[g * n + j] (f16 values)
    pub scales: Vec<half::f16>,
    /// group of each input row (act-order when not k / group_size)
    pub g_idx: Vec<i32>,
}

impl Int4Linear {
    pub fn groups(&self) -> usize {
        self.k / self.group_size
    }
    pub fn w(&self, k: usize, j: usize) -> f64 {
        let g = self.g_idx[k] as usize;
        self.scales[g * self.n + j].to_f64()
            * (self.q[k * self.n + j] as f64 - self.zeros[g * self.n + j] as f64)
    }

    /// The same layer as the reference's `QuantizedLinear` (codes [out, in]).
    pub fn to_reference(&self) -> inferlab_reference::quant::QuantizedLinear {
        let (k, n) = (self.k, self.n);
        inferlab_reference::quant::QuantizedLinear {
            bits: 4,
            group_size: self.group_size,
            codes: ndarray::Array2::from_shape_fn((n, k), |(j, kk)| self.q[kk * n + j]),
            scales: ndarray::Array2::from_shape_fn((self.groups(), n), |(g, j)| {
                self.scales[g * n + j].to_f64()
            }),
            zeros: ndarray::Array2::from_shape_fn((self.groups(), n), |(g, j)| {
                self.zeros[g * n + j]
            }),
            g_idx: self.g_idx.iter().map(|&g| g as u32).collect(),
        }
    }

    /// AutoGPTQ v1: (qweight [k/8, n], qzeros [groups, n/8] minus one, scales, g_idx).
    pub fn pack_gptq(&self) -> (Vec<i32>, Vec<i32>) {
        let (k, n) = (self.k, self.n);
        let mut qw = vec![0u32; k / 8 * n];
        for kk in 0..k {
            for j in 0..n {
                qw[(kk / 8) * n + j] |= (self.q[kk * n + j] as u32) << (4 * (kk % 8));
            }
        }
        let g = self.groups();
        let mut qz = vec![0u32; g * n / 8];
        for gg in 0..g {
            for j in 0..n {
                let z = (self.zeros[gg * n + j] as u32).wrapping_sub(1) & 0xF;
                qz[gg * (n / 8) + j / 8] |= z << (4 * (j % 8));
            }
        }
        (
            qw.into_iter().map(|x| x as i32).collect(),
            qz.into_iter().map(|x| x as i32).collect(),
        )
    }

    /// AutoAWQ GEMM: (qweight [k, n/8], qzeros [groups, n/8]), nibble order [0,2,4,6,1,3,5,7].
    pub fn pack_awq(&self) -> (Vec<i32>, Vec<i32>) {
        const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
        let (k, n) = (self.k, self.n);
        let pack = |vals: &dyn Fn(usize, usize) -> u8, rows: usize| -> Vec<i32> {
            let mut out = vec![0u32; rows * n / 8];
            for r in 0..rows {
                for c in 0..n / 8 {
                    let mut w = 0u32;
                    for (slot, &col) in ORDER.iter().enumerate() {
                        w |= (vals(r, c * 8 + col) as u32) << (4 * slot);
                    }
                    out[r * (n / 8) + c] = w;
                }
            }
            out.into_iter().map(|x| x as i32).collect()
        };
        (
            pack(&|r, j| self.q[r * n + j], k),
            pack(&|r, j| self.zeros[r * n + j], self.groups()),
        )
    }
}

/// y = x W in f64; x [m, k].
pub fn w4a16_ref(lin: &Int4Linear, x: &[f32], m: usize) -> Vec<f64> {
    let (k, n) = (lin.k, lin.n);
    let w: Vec<f64> = (0..k * n).map(|i| lin.w(i / n, i % n)).collect();
    let mut y = vec![0f64; m * n];
    y.par_chunks_mut(n).enumerate().for_each(|(r, yr)| {
        for kk in 0..k {
            let xv = x[r * k + kk] as f64;
            for j in 0..n {
                yr[j] += xv * w[kk * n + j];
            }
        }
    });
    y
}

/// Plain 16-bit W4A16: weights dequantized to `T`, products and sums rounded.
pub fn w4a16_lowp<T: Elem>(lin: &Int4Linear, x: &[f32], m: usize) -> Vec<f32> {
    let r = T::round;
    let (k, n) = (lin.k, lin.n);
    let w: Vec<f32> = (0..k * n).map(|i| r(lin.w(i / n, i % n) as f32)).collect();
    let mut y = vec![0f32; m * n];
    y.par_chunks_mut(n).enumerate().for_each(|(row, yr)| {
        for kk in 0..k {
            let xv = x[row * k + kk];
            for j in 0..n {
                yr[j] = r(yr[j] + r(xv * w[kk * n + j]));
            }
        }
    });
    y
}

// ------------------------------------------------------------- errors

/// Error of `got` against the f64 reference: (relative L2, max abs).
/// Any non-finite value in `got` (an unwritten, NaN-poisoned element) gives infinity.
pub fn error(got: &[f32], reference: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), reference.len());
    let mut num = 0f64;
    let mut den = 0f64;
    let mut mx = 0f64;
    for (&g, &r) in got.iter().zip(reference) {
        if !g.is_finite() {
            return (f64::INFINITY, f64::INFINITY);
        }
        let e = g as f64 - r;
        num += e * e;
        den += r * r;
        mx = mx.max(e.abs());
    }
    ((num / den.max(f64::MIN_POSITIVE)).sqrt(), mx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn gptq_and_awq_packing_roundtrip() {
        let (k, n, gs) = (16usize, 16usize, 8usize);
        let lin = Int4Linear {
            k,
            n,
            group_size: gs,
            q: (0..k * n).map(|i| (i * 7 % 16) as u8).collect(),
            zeros: (0..2 * n).map(|i| (i * 5 % 15 + 1) as u8).collect(),
            scales: vec![half::f16::ONE; 2 * n],
            g_idx: (0..k as i32).map(|i| i / gs as i32).collect(),
        };
        let (qw, qz) = lin.pack_gptq();
        for kk in 0..k {
            for j in 0..n {
                let q = (qw[(kk / 8) * n + j] as u32 >> (4 * (kk % 8))) & 0xF;
                assert_eq!(q as u8, lin.q[kk * n + j]);
            }
        }
        let z = ((qz[n / 8 + 1] as u32 >> 4 * 3) & 0xF) + 1; // group 1, column 11
        assert_eq!(z as u8, lin.zeros[n + 11]);
        let (aw, az) = lin.pack_awq();
        // column 1 sits in nibble slot 4, column 2 in slot 1
        assert_eq!((aw[0] as u32 >> 16) & 0xF, lin.q[1] as u32);
        assert_eq!((aw[0] as u32 >> 4) & 0xF, lin.q[2] as u32);
        assert_eq!((az[0] as u32 >> 16) & 0xF, lin.zeros[1] as u32);
    }

    /// AWQ's words re-packed in GPTQ's order (the swap kernels' input for AWQ
    /// layers) hold the same codes as GPTQ's packer, and the zero points
    /// themselves (GPTQ v1 stores them minus one): zeros 0 and 15 included.
    #[test]
    fn awq_repacked_in_gptq_order() {
        let (k, n, gs) = (64usize, 24usize, 16usize);
        let groups = k / gs;
        let lin = Int4Linear {
            k,
            n,
            group_size: gs,
            q: (0..k * n).map(|i| (i * 7 % 16) as u8).collect(),
            zeros: (0..groups * n).map(|i| (i * 5 % 16) as u8).collect(),
            scales: vec![half::f16::ONE; groups * n],
            g_idx: (0..k as i32).map(|i| i / gs as i32).collect(),
        };
        assert!(lin.zeros.contains(&0) && lin.zeros.contains(&15));
        let (aw, az) = lin.pack_awq();
        let (gq, gz) = crate::ops::awq_to_gptq_order(&aw, &az, k, n, groups);
        assert_eq!(gq, lin.pack_gptq().0);
        for g in 0..groups {
            for c in 0..n {
                let z = (gz[g * (n / 8) + c / 8] as u32 >> (4 * (c % 8))) & 0xF;
                assert_eq!(z as u8, lin.zeros[g * n + c], "group {g} column {c}");
            }
        }
    }

    /// The packers used by `gpu check` agree bit for bit with `reference::quant::pack`.
    #[test]
    fn packers_match_reference() {
        use inferlab_reference::quant::pack::{pack_awq, pack_gptq, GptqZeros};
        let (k, n, gs) = (64usize, 24usize, 16usize);
        let lin = Int4Linear {
            k,
            n,
            group_size: gs,
            q: (0..k * n).map(|i| (i * 7 % 16) as u8).collect(),
            zeros: (0..k / gs * n).map(|i| (i * 5 % 15 + 1) as u8).collect(),
            scales: (0..k / gs * n)
                .map(|i| half::f16::from_f32(0.01 * (1 + i % 7) as f32))
                .collect(),
            g_idx: (0..k as i32).map(|i| i / gs as i32).collect(),
        };
        let r = lin.to_reference();
        let (qw, qz) = lin.pack_gptq();
        let g = pack_gptq(&r, GptqZeros::V1).unwrap();
        assert_eq!(qw, g.qweight.iter().copied().collect::<Vec<_>>());
        assert_eq!(qz, g.qzeros.iter().copied().collect::<Vec<_>>());
        assert_eq!(lin.scales, g.scales.iter().copied().collect::<Vec<_>>());
        let (aw, az) = lin.pack_awq();
        let a = pack_awq(&r).unwrap();
        assert_eq!(aw, a.qweight.iter().copied().collect::<Vec<_>>());
        assert_eq!(az, a.qzeros.iter().copied().collect::<Vec<_>>());
    }

    #[test]
    fn lowp_is_worse_than_f32_but_close() {
        // The plain bf16 twin must differ from f64 (it rounds) but stay near it.
        let x: Vec<f32> = (0..256)
            .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..64).map(|i| 0.5 + (i as f32) / 64.0).collect();
        let r = rmsnorm_ref(&x, &w, 64, 1e-6);
        let l = rmsnorm_lowp::<bf16>(&x, &w, 64, 1e-6);
        let (rel, _) = error(&l, &r);
        assert!(rel > 1e-4 && rel < 3e-2, "{rel}");
    }
}
