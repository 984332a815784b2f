//! `inferlab gpu check`: every kernel against the reference on fresh random
//! inputs with awkward shapes; outputs NaN-poisoned before each launch.
//!
//! The bound (FlashAttention's rule): with both versions fed the SAME inputs
//! rounded to the 16-bit type, the kernel's error against the f64 reference
//! must be at most 2x the error of the plain 16-bit implementation
//! ([`crate::host`], rounding after every operation), in relative L2 norm and
//! in max-abs. Why this is right and not loose-by-choice: the kernel rounds only
//! its inputs (shared with the plain version, so not counted) and its output
//! (one rounding, which the plain version also pays), and accumulates in f32;
//! a plain 16-bit implementation pays a rounding per operation on top of that,
//! so a correct kernel lands well under 1x, and any indexing/masking mistake
//! produces O(1) errors in some element, which the max-abs criterion catches.
//! Exact operations (cache writes, the sampler) must match bit for bit.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::DrvExt;
use crate::host::{self, DecodeShape, Int4Linear, PrefillShape};
use crate::lowp::{to_elem, to_f32, Elem};
use crate::ops::{
    self, DecodeDims, DecodeKernel, DecodeLaunch, DecodeMerge, DecodeWs, GridOrder, Int4Weights,
    Prefill, PrefillKernel, V6Opts,
};
use crate::{Gpu, Result};
use inferlab_reference::attention::Masking;

/// One line of the pass/fail table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    pub kernel: String,
    pub dtype: String,
    pub shape: String,
    /// kernel error vs f64: (relative L2, max abs); for exact checks, mismatches.
    pub err: (f64, f64),
    /// plain 16-bit error vs f64 (the bound is 2x this); None for exact checks.
    pub plain: Option<(f64, f64)>,
    pub pass: bool,
    pub note: String,
}

impl CheckRow {
    fn tol(
        kernel: &str,
        dtype: &str,
        shape: String,
        err: (f64, f64),
        plain: (f64, f64),
    ) -> CheckRow {
        let pass = err.0.is_finite()
            && err.1.is_finite()
            && err.0 <= 2.0 * plain.0
            && err.1 <= 2.0 * plain.1;
        CheckRow {
            kernel: kernel.into(),
            dtype: dtype.into(),
            shape,
            err,
            plain: Some(plain),
            pass,
            note: String::new(),
        }
    }
    fn exact(
        kernel: &str,
        dtype: &str,
        shape: String,
        mismatches: usize,
        note: String,
    ) -> CheckRow {
        CheckRow {
            kernel: kernel.into(),
            dtype: dtype.into(),
            shape,
            err: (mismatches as f64, 0.0),
            plain: None,
            pass: mismatches == 0,
            note,
        }
    }
}

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    // sum of uniforms: cheap, bounded, roughly normal
    (0..n)
        .map(|_| {
            (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * scale * 2.0
        })
        .collect()
}

fn poisoned<T: Elem>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    gpu.stream.clone_htod(&vec![T::nan(); n]).drv("poison")
}

fn poisoned_f32(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    gpu.stream.clone_htod(&vec![f32::NAN; n]).drv("poison")
}

fn down<T: Elem>(gpu: &Gpu, s: &CudaSlice<T>) -> Result<Vec<f32>> {
    Ok(to_f32(&gpu.stream.clone_dtoh(s).drv("download")?))
}

/// Round host values to T (the inputs both versions see) and upload.
fn up<T: Elem>(gpu: &Gpu, x: &[f32]) -> Result<(Vec<f32>, CudaSlice<T>)> {
    let e: Vec<T> = to_elem(x);
    Ok((to_f32(&e), gpu.stream.clone_htod(&e).drv("upload")?))
}

fn lse_err(got: &[f32], reference: &[f64], plain: &[f32]) -> ((f64, f64), (f64, f64)) {
    // rows with no keys have lse = -inf in all three; compare the finite ones
    let keep: Vec<usize> = (0..reference.len())
        .filter(|&i| reference[i].is_finite())
        .collect();
    let g: Vec<f32> = keep.iter().map(|&i| got[i]).collect();
    let r: Vec<f64> = keep.iter().map(|&i| reference[i]).collect();
    let p: Vec<f32> = keep.iter().map(|&i| plain[i]).collect();
    (host::error(&g, &r), host::error(&p, &r))
}

fn check_prefill<T: Elem>(gpu: &Gpu, rng: &mut ChaCha8Rng, rows: &mut Vec<CheckRow>) -> Result<()> {
    for d in [64usize, 128] {
        for masking in [Masking::None, Masking::Causal] {
            // awkward: a single token, a prime, one past a power of two; under
            // causal the middle sequence has Lq < Lk (bottom-right alignment)
            let lq = vec![1usize, 97, 1025];
            let lk = if masking == Masking::Causal {
                vec![1usize, 130, 1025]
            } else {
                vec![5usize, 97, 1025]
            };
            let s = PrefillShape {
                lq: lq.clone(),
                lk: lk.clone(),
                hq: 9,
                hkv: 3,
                d,
                causal: masking == Masking::Causal,
            };
            let (tq, tk): (usize, usize) = (lq.iter().sum(), lk.iter().sum());
            let (qh, q) = up::<T>(gpu, &randn(rng, tq * 9 * d, 1.0))?;
            let (kh, k) = up::<T>(gpu, &randn(rng, tk * 3 * d, 1.0))?;
            let (vh, v) = up::<T>(gpu, &randn(rng, tk * 3 * d, 1.0))?;
            let cu_q = gpu
                .stream
                .clone_htod(&PrefillShape::cu(&lq))
                .drv("upload")?;
            let cu_k = gpu
                .stream
                .clone_htod(&PrefillShape::cu(&lk))
                .drv("upload")?;
            let (r_out, r_lse) = host::prefill_ref(&s, &qh, &kh, &vh)?;
            let (p_out, p_lse) = host::prefill_lowp::<T>(&s, &qh, &kh, &vh);
            for kernel in PrefillKernel::all(d, gpu.arch) {
                let p = Prefill {
                    batch: 3,
                    total_q: tq,
                    total_k: tk,
                    max_lq: 1025,
                    hq: 9,
                    hkv: 3,
                    d,
                    masking,
                    kernel,
                };
                let mut out = poisoned::<T>(gpu, tq * 9 * d)?;
                let mut lse = poisoned_f32(gpu, tq * 9)?;
                ops::prefill(gpu, &p, &q, &k, &v, &cu_q, &cu_k, &mut out, &mut lse)?;
                let got = down(gpu, &out)?;
                let got_lse = gpu.stream.clone_dtoh(&lse).drv("download")?;
                let shape = format!(
                    "Lq {lq:?} Lk {lk:?} 9/3 d{d} {masking:?} {}",
                    kernel.label()
                );
                rows.push(CheckRow::tol(
                    "prefill",
                    T::NAME,
                    shape.clone(),
                    host::error(&got, &r_out),
                    host::error(&p_out, &r_out),
                ));
                let (e, pl) = lse_err(&got_lse, &r_lse, &p_lse);
                rows.push(CheckRow::tol("prefill lse", T::NAME, shape, e, pl));
            }
        }
    }
    Ok(())
}

fn check_decode<T: Elem>(gpu: &Gpu, rng: &mut ChaCha8Rng, rows: &mut Vec<CheckRow>) -> Result<()> {
    for (d, bs, hq, hkv) in [
        (64usize, 16usize, 9usize, 3usize),
        (128, 32, 9, 3),
        (128, 16, 32, 4),
        (64, 32, 8, 8),
    ] {
        let lens = vec![1usize, 97, 1025, 16, 33];
        let need: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
        let num_blocks = need.iter().sum::<usize>() + 7;
        // random, non-contiguous physical blocks
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let mut it = ids.into_iter();
        let tables: Vec<Vec<u32>> = need.iter().map(|&n| (&mut it).take(n).collect()).collect();
        let max_blocks = *need.iter().max().unwrap();
        let mut bt = vec![0i32; lens.len() * max_blocks];
        for (b, t) in tables.iter().enumerate() {
            for (i, &x) in t.iter().enumerate() {
                bt[b * max_blocks + i] = x as i32;
            }
        }
        let s = DecodeShape {
            lens: lens.clone(),
            hq,
            hkv,
            d,
            block_size: bs,
            num_blocks,
            block_tables: tables,
        };
        let cache = num_blocks * bs * hkv * d;
        let (qh, q) = up::<T>(gpu, &randn(rng, lens.len() * hq * d, 1.0))?;
        let (kh, kc) = up::<T>(gpu, &randn(rng, cache, 1.0))?;
        let (vh, vc) = up::<T>(gpu, &randn(rng, cache, 1.0))?;
        let btd = gpu.stream.clone_htod(&bt).drv("upload")?;
        let lensd = gpu
            .stream
            .clone_htod(&lens.iter().map(|&l| l as i32).collect::<Vec<_>>())
            .drv("upload")?;
        let (r_out, r_lse) = host::decode_ref(&s, &qh, &kh, &vh)?;
        let (p_out, p_lse) = host::decode_lowp::<T>(&s, &qh, &kh, &vh);
        let mut kernels = Vec::new();
        for partition in [64usize, 512] {
            for min_blocks in [4usize, 6, 8] {
                if min_blocks == 4 || (partition == 512 && d == 128 && hq / hkv <= 4) {
                    kernels.push((partition, DecodeKernel::V1 { min_blocks }));
                }
            }
            kernels.extend(DecodeKernel::split_plans(partition));
            kernels.push((
                partition,
                DecodeKernel::V4 {
                    warps: 4,
                    stages: 2,
                    launch: DecodeLaunch::Dependent,
                },
            ));
        }
        // v6: every option combination at 5, 3 and 1 partitions (clusters of
        // 5, 3, 1 where the device has clusters; 2048: 65 block ids staged)
        for partition in [256usize, 512, 2048] {
            for opts in V6Opts::all() {
                if opts.merge == DecodeMerge::Cluster && gpu.arch.major < 9 {
                    continue;
                }
                kernels.push((partition, DecodeKernel::v6(opts, 2, 0)));
            }
        }
        // v6 with its occupancy forced to 2 CTAs per SM (padded shared
        // memory), and with 3 stages (every option that has them)
        for opts in V6Opts::all() {
            if opts.merge == DecodeMerge::Cluster || opts.order == GridOrder::HeadsFirst {
                continue;
            }
            for partition in [512usize, 2048] {
                for (stages, ctas_per_sm) in [(2usize, 2usize), (3, 0)] {
                    kernels.push((partition, DecodeKernel::v6(opts, stages, ctas_per_sm)));
                }
            }
        }
        // v6 with CTAs of 2 warps (eager table, direct output: merge
        // kernel at 5 and 3 partitions, direct at 1), as many CTAs per SM as
        // fit and 4 (padded shared memory)
        for (warps, stages) in DecodeKernel::V6_NARROW_PLANS {
            for partition in [256usize, 512, 2048] {
                for ctas_per_sm in [0usize, 4] {
                    kernels.push((
                        partition,
                        DecodeKernel::v6_narrow(warps, stages, ctas_per_sm),
                    ));
                }
            }
        }
        // v5: one wave (more CTAs than tiles here: every sequence split, merged
        // by its last CTA), 3 CTAs per KV head (ranges crossing sequences,
        // pieces starting mid-sequence) and 1 per head (every sequence whole);
        // partition unused
        for (warps, stages) in DecodeKernel::V5_PLANS {
            for ctas in [0usize, hkv, 3 * hkv] {
                kernels.push((
                    64,
                    DecodeKernel::V5 {
                        warps,
                        stages,
                        ctas,
                        launch: DecodeLaunch::Plain,
                    },
                ));
            }
        }
        kernels.push((
            64,
            DecodeKernel::V5 {
                warps: 4,
                stages: 2,
                ctas: 0,
                launch: DecodeLaunch::Dependent,
            },
        ));
        // the plan rule's choice on this device, and on devices of 1 and 16
        // SMs (one partition per sequence, fewer partitions): tagged "rule"
        let dims = DecodeDims {
            batch: lens.len(),
            hq,
            hkv,
            d,
            block_size: bs,
            num_blocks,
            max_blocks,
            max_len: 1025,
        };
        // v7 (whole-block copies, one warp per KV head): the default heads
        // per CTA at 5, 3 and 1 partitions, 2 and 3 stages, every merge
        // (clusters of 5, 3, 1 where the device has clusters); every other
        // divisor of Hkv as heads per CTA at 3 partitions (LastCta, Direct)
        let mut v7 = Vec::new();
        for partition in [256usize, 512, 2048] {
            for stages in [2usize, 3] {
                for merge in DecodeKernel::V7_MERGES {
                    v7.push((partition, DecodeKernel::v7(0, stages, merge)));
                }
            }
        }
        for partition in [512usize, 2048] {
            for merge in [DecodeMerge::Kernel, DecodeMerge::Direct] {
                v7.push((partition, DecodeKernel::v7(0, 4, merge)));
            }
            // one CTA per SM by padded shared memory
            v7.push((
                partition,
                DecodeKernel::V7 {
                    heads: 0,
                    stages: 3,
                    merge: DecodeMerge::Direct,
                    ctas_per_sm: 1,
                    launch: DecodeLaunch::Dependent,
                },
            ));
        }
        // the rule's v7 kernel (4 heads per CTA) at 3 partitions and 1
        if hkv % 4 == 0 {
            for partition in [512usize, 2048] {
                v7.push((partition, DecodeKernel::V7_DEFAULT));
            }
        }
        for heads in (1..=8).filter(|h| hkv % h == 0 && *h != ops::v7_heads_per_cta(hkv)) {
            for merge in [DecodeMerge::LastCta, DecodeMerge::Direct] {
                v7.push((512, DecodeKernel::v7(heads, 2, merge)));
            }
        }
        for (partition, kernel) in v7 {
            let DecodeKernel::V7 {
                heads,
                stages,
                merge,
                ..
            } = kernel
            else {
                continue;
            };
            // (3 stages of 8 heads at d128 exceed an A100's shared memory)
            if (merge != DecodeMerge::Cluster || gpu.arch.major >= 9)
                && ops::v7_smem(&dims, heads, stages) <= gpu.smem_optin
            {
                kernels.push((partition, kernel));
            }
        }
        let mut rule = Vec::new();
        // (and on batch x hkv / 4 SMs, where the rule picks v7 if hkv % 4 == 0,
        // d == 128 and queries are grouped; v6 otherwise)
        let v7_sms = (hkv % 4 == 0).then_some(lens.len() * hkv / 4);
        for sms in [gpu.sm_count.max(1) as usize, 16, 1]
            .into_iter()
            .chain(v7_sms)
        {
            let plan = dims.plan(sms);
            if !rule.iter().any(|(_, p)| *p == plan) {
                rule.push((sms, plan));
            }
        }
        let plans = kernels.into_iter().map(|pk| (String::new(), pk)).chain(
            rule.into_iter()
                .map(|(sms, pk)| (format!(" (rule, {sms} SMs)"), pk)),
        );
        for (tag, (partition, kernel)) in plans {
            let p = dims.with_plan(partition, kernel);
            let mut ws = DecodeWs::new(gpu, &p)?;
            // v5 and v6 / v7 last-CTA run twice on one workspace: their arrival
            // counters must be left at zero for the next launch
            let launches = if matches!(
                kernel,
                DecodeKernel::V5 { .. }
                    | DecodeKernel::V6 {
                        opts: V6Opts {
                            merge: DecodeMerge::LastCta,
                            ..
                        },
                        ..
                    }
                    | DecodeKernel::V7 {
                        merge: DecodeMerge::LastCta,
                        ..
                    }
            ) {
                2
            } else {
                1
            };
            for launch in 0..launches {
                let mut out = poisoned::<T>(gpu, lens.len() * hq * d)?;
                let mut lse = poisoned_f32(gpu, lens.len() * hq)?;
                ops::paged_decode(
                    gpu, &p, &q, &kc, &vc, &btd, &lensd, &mut ws, &mut out, &mut lse,
                )?;
                let got = down(gpu, &out)?;
                let got_lse = gpu.stream.clone_dtoh(&lse).drv("download")?;
                let again = if launch > 0 { " (2nd launch)" } else { "" };
                let shape = format!(
                    "lens {lens:?} {hq}/{hkv} d{d} bs{bs} part{partition} {}{tag}{again}",
                    kernel.label()
                );
                rows.push(CheckRow::tol(
                    "paged_decode",
                    T::NAME,
                    shape.clone(),
                    host::error(&got, &r_out),
                    host::error(&p_out, &r_out),
                ));
                let (e, pl) = lse_err(&got_lse, &r_lse, &p_lse);
                rows.push(CheckRow::tol("paged_decode lse", T::NAME, shape, e, pl));
            }
        }
    }
    Ok(())
}

fn check_cache<T: Elem>(gpu: &Gpu, rng: &mut ChaCha8Rng, rows: &mut Vec<CheckRow>) -> Result<()> {
    let (tokens, hkv, d, bs, nb) = (97usize, 3usize, 128usize, 16usize, 11usize);
    let mut slots: Vec<i32> = (0..(nb * bs) as i32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.random_range(0..=i));
    }
    slots.truncate(tokens);
    slots[5] = -1; // a padding token
    let (kh, key) = up::<T>(gpu, &randn(rng, tokens * hkv * d, 1.0))?;
    let (vh, val) = up::<T>(gpu, &randn(rng, tokens * hkv * d, 1.0))?;
    let sd = gpu.stream.clone_htod(&slots).drv("upload")?;
    let mut kc = poisoned::<T>(gpu, nb * bs * hkv * d)?;
    let mut vc = poisoned::<T>(gpu, nb * bs * hkv * d)?;
    ops::reshape_and_cache(gpu, tokens, hkv, d, &key, &val, &sd, &mut kc, &mut vc)?;
    let (kg, vg) = (down(gpu, &kc)?, down(gpu, &vc)?);
    let row = hkv * d;
    let mut bad = 0usize;
    let mut written = vec![false; nb * bs];
    for (t, &sl) in slots.iter().enumerate() {
        if sl < 0 {
            continue;
        }
        written[sl as usize] = true;
        for i in 0..row {
            bad += (kg[sl as usize * row + i].to_bits() != kh[t * row + i].to_bits()) as usize;
            bad += (vg[sl as usize * row + i].to_bits() != vh[t * row + i].to_bits()) as usize;
        }
    }
    // untouched slots must still hold the poison
    for (sl, w) in written.iter().enumerate() {
        if !w {
            bad += kg[sl * row..(sl + 1) * row]
                .iter()
                .filter(|x| !x.is_nan())
                .count();
        }
    }
    rows.push(CheckRow::exact(
        "reshape_and_cache",
        T::NAME,
        format!("{tokens} tok, {hkv}x{d}, bs{bs}, 1 padding"),
        bad,
        String::new(),
    ));
    Ok(())
}

fn random_int4(rng: &mut ChaCha8Rng, k: usize, n: usize, gs: usize, act_order: bool) -> Int4Linear {
    let groups = k / gs;
    let mut g_idx: Vec<i32> = (0..k).map(|i| (i / gs) as i32).collect();
    if act_order {
        for i in (1..k).rev() {
            g_idx.swap(i, rng.random_range(0..=i));
        }
    }
    Int4Linear {
        k,
        n,
        group_size: gs,
        q: (0..k * n).map(|_| rng.random_range(0..16u8)).collect(),
        zeros: (0..groups * n).map(|_| rng.random_range(1..16u8)).collect(),
        scales: (0..groups * n)
            .map(|_| f16::from_f32(0.002 + 0.02 * rng.random::<f32>()))
            .collect(),
        g_idx,
    }
}

/// Ring-kernel plans for the check: every compiled variant on a one-wave
/// grid (at this size: one step per worker, up to 32 workers per slab), and
/// small grids whose workers run across slab and group boundaries.
fn ring_plans(gpu: &Gpu, w: &Int4Weights, m: usize, label: &str) -> Vec<(String, ops::W4Kernel)> {
    let mut v = Vec::new();
    for (cols, &(warps, slots)) in [32usize, 64]
        .into_iter()
        .flat_map(|c| ops::RingPlan::variants(c).iter().map(move |v| (c, v)))
    {
        for ctas in [0usize, 1, 3] {
            let plan = ops::RingPlan {
                cols,
                warps,
                slots,
                ctas,
                ctas_per_sm: 2,
            };
            if !ops::w4a16_ring_applies(gpu, w, m, &plan) {
                continue;
            }
            v.push((
                format!(
                    "{label} ring c{cols} w{warps} r{slots} {}",
                    if ctas == 0 {
                        "2/SM".to_string()
                    } else {
                        format!("{ctas} ctas")
                    }
                ),
                ops::W4Kernel::Ring(plan),
            ));
        }
    }
    v
}

/// Swapped-operand ring plans for the check: every compiled variant for m's
/// tile count on a one-wave grid and on 1 and 3 CTAs (runs across pair and
/// group boundaries).
fn swap_plans(gpu: &Gpu, w: &Int4Weights, m: usize, label: &str) -> Vec<(String, ops::W4Kernel)> {
    let mut v = Vec::new();
    use ops::{SwapLaunch, SwapX};
    for (xk, &(warps, slots, ksteps)) in [SwapX::Staged, SwapX::Ring].into_iter().flat_map(|xk| {
        ops::SwapPlan::variants(ops::SwapPlan::tiles(m), xk)
            .iter()
            .map(move |v| (xk, v))
    }) {
        for (ctas, launch) in [0usize, 1, 3]
            .into_iter()
            .flat_map(|c| [(c, SwapLaunch::Plain), (c, SwapLaunch::Dependent)])
        {
            let plan = ops::SwapPlan {
                warps,
                slots,
                ksteps,
                ctas,
                ctas_per_sm: 2,
                launch,
                x: xk,
                l2: l2_for(launch),
            };
            if !ops::w4a16_swap_applies(gpu, w, m, &plan) {
                continue;
            }
            v.push((
                format!(
                    "{label} swap{} w{warps} r{slots}{} {}{}",
                    if xk == SwapX::Ring { "x" } else { "" },
                    if ksteps > 1 {
                        format!(" k{ksteps}")
                    } else {
                        String::new()
                    },
                    if ctas == 0 {
                        "2/SM".to_string()
                    } else {
                        format!("{ctas} ctas")
                    },
                    if launch == SwapLaunch::Dependent {
                        " pdl ef"
                    } else {
                        ""
                    }
                ),
                ops::W4Kernel::Swap(plan),
            ));
        }
    }
    v
}

/// The weight L2 policy a checked swap or cluster plan runs with: the
/// dependent launches take `EvictFirst`, the plain ones `Normal`, so both
/// policies run on every variant without doubling the plans (a cache policy
/// cannot change the result; the check shows that the hinted copies compile
/// and run).
fn l2_for(launch: ops::SwapLaunch) -> ops::WeightL2 {
    match launch {
        ops::SwapLaunch::Plain => ops::WeightL2::Normal,
        ops::SwapLaunch::Dependent => ops::WeightL2::EvictFirst,
    }
}

/// Cluster-reduced plans for the check (sm_90+ only): every compiled variant
/// for m's tile count, clusters of 4 CTAs on a grid that fills the GPU and on
/// 1 and 3 clusters (runs across pair and group boundaries, several pairs per
/// cluster), and clusters of 3 (an uneven split of the groups), each plain and
/// as a dependent launch.
fn cluster_plans(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    label: &str,
) -> Vec<(String, ops::W4Kernel)> {
    use ops::{ClusterPlan, SwapLaunch};
    let mut v = Vec::new();
    for &(warps, slots, ksteps, cols) in ClusterPlan::variants(ops::SwapPlan::tiles(m)) {
        for (size, clusters) in [(4usize, 0usize), (4, 1), (4, 3), (3, 0), (3, 2), (2, 0)] {
            for launch in [SwapLaunch::Plain, SwapLaunch::Dependent] {
                let plan = ClusterPlan {
                    warps,
                    slots,
                    ksteps,
                    size,
                    cols,
                    clusters,
                    launch,
                    l2: l2_for(launch),
                };
                if !ops::w4a16_cluster_applies(gpu, w, m, &plan) {
                    continue;
                }
                v.push((
                    format!(
                        "{label} swapcl w{warps} r{slots} k{ksteps} h{cols} c{size} {}{}",
                        if clusters == 0 {
                            "fill".to_string()
                        } else {
                            format!("{clusters} clusters")
                        },
                        if launch == SwapLaunch::Dependent {
                            " pdl ef"
                        } else {
                            ""
                        }
                    ),
                    ops::W4Kernel::Cluster(plan),
                ));
            }
        }
    }
    v
}

/// One check row per W4A16 kernel variant on the same inputs: output poisoned,
/// error against the f64 reference `r` next to the plain low-precision `p`'s.
#[allow(clippy::too_many_arguments)]
fn check_w4_kernels<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    (r, p): (&[f64], &[f32]),
    shape: &str,
    kernels: Vec<(String, ops::W4Kernel)>,
    rows: &mut Vec<CheckRow>,
) -> Result<()> {
    use ops::ActOrderX;
    for (name, kernel) in kernels {
        // act-order layers on the kernels that can gather x themselves: both
        // ways (Auto's choice depends on m)
        let ways: &[(ActOrderX, &str)] = if w.perm.is_some() && kernel.gathers_x() {
            &[
                (ActOrderX::InKernel, " x-in-kernel"),
                (ActOrderX::Gathered, " x-gathered"),
            ]
        } else {
            &[]
        };
        // x as `w4a16_with` passes it (None), then each way above
        let runs = std::iter::once((None, "")).chain(ways.iter().map(|&(h, s)| (Some(h), s)));
        for (how, suffix) in runs {
            let mut y = poisoned::<T>(gpu, m * w.n)?;
            match how {
                None => ops::w4a16_with(gpu, w, m, x, &mut y, kernel)?,
                Some(how) => ops::w4a16_act_order(gpu, w, m, x, &mut y, kernel, how)?,
            }
            let got = down(gpu, &y)?;
            rows.push(CheckRow::tol(
                &format!("w4a16 {name}{suffix}"),
                T::NAME,
                shape.to_string(),
                host::error(&got, r),
                host::error(p, r),
            ));
        }
    }
    Ok(())
}

/// The ring kernel at group size 32 (a group per step) and a K that makes
/// slabs short (8 steps), so runs of a few workers cross many slabs; Auto's
/// twin is the tensor-core kernel gptq_mma (and the CUDA-core kernel).
fn check_w4a16_ring<T: Elem>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    rows: &mut Vec<CheckRow>,
) -> Result<()> {
    use ops::{ScaleLoad, W4Kernel, W4Plan};
    let (k, n, gs) = (256usize, 264usize, 32usize);
    let lin = random_int4(rng, k, n, gs, false);
    let (qw, qz) = lin.pack_gptq();
    let w = Int4Weights::gptq(gpu, k, n, gs, &qw, &qz, &lin.scales, &lin.g_idx)?;
    for m in [1usize, 5, 8, 11, 16] {
        let (xh, x) = up::<T>(gpu, &randn(rng, m * k, 1.0))?;
        let r = host::w4a16_ref(&lin, &xh, m);
        let p = host::w4a16_lowp::<T>(&lin, &xh, m);
        let mut kernels = vec![
            ("gptq".to_string(), W4Kernel::Auto),
            ("gptq cuda-core".to_string(), W4Kernel::CudaCore),
            (
                "gptq mma w4 u4 s1".to_string(),
                W4Kernel::Mma(W4Plan {
                    warps: 4,
                    unroll: 4,
                    splits: 1,
                    scales: ScaleLoad::OnGroupChange,
                }),
            ),
        ];
        kernels.extend(ring_plans(gpu, &w, m, "gptq"));
        kernels.extend(swap_plans(gpu, &w, m, "gptq"));
        kernels.extend(cluster_plans(gpu, &w, m, "gptq"));
        let shape = format!("M{m} K{k} N{n} g{gs}");
        check_w4_kernels(gpu, &w, m, &x, (&r, &p), &shape, kernels, rows)?;
    }
    Ok(())
}

fn check_w4a16<T: Elem>(gpu: &Gpu, rng: &mut ChaCha8Rng, rows: &mut Vec<CheckRow>) -> Result<()> {
    use ops::{ScaleLoad, W4Kernel, W4Plan};
    let (k, n, gs) = (1024usize, 520usize, 128usize);
    for (label, act) in [("gptq", false), ("gptq act-order", true), ("awq", false)] {
        let lin = random_int4(rng, k, n, gs, act);
        let w = if label == "awq" {
            let (qw, qz) = lin.pack_awq();
            Int4Weights::awq(gpu, k, n, gs, &qw, &qz, &lin.scales)?
        } else {
            let (qw, qz) = lin.pack_gptq();
            Int4Weights::gptq(gpu, k, n, gs, &qw, &qz, &lin.scales, &lin.g_idx)?
        };
        for m in [1usize, 3, 16, 64] {
            let (xh, x) = up::<T>(gpu, &randn(rng, m * k, 1.0))?;
            let r = host::w4a16_ref(&lin, &xh, m);
            let p = host::w4a16_lowp::<T>(&lin, &xh, m);
            // Auto; then, where the tensor-core kernel applies, its slow twin
            // (CUDA cores) and the tensor-core kernel without split-K over CTAs.
            let mut kernels = vec![(label.to_string(), W4Kernel::Auto)];
            if ops::w4a16_mma_applies(&w, m) {
                kernels.push((format!("{label} cuda-core"), W4Kernel::CudaCore));
                let warps = if m <= 16 { 8 } else { 4 };
                let plan = W4Plan {
                    warps,
                    unroll: 4,
                    splits: 1,
                    scales: ScaleLoad::OnGroupChange,
                };
                kernels.push((format!("{label} mma w{warps} u4 s1"), W4Kernel::Mma(plan)));
                let plan = W4Plan {
                    warps: 4,
                    unroll: 4,
                    splits: 3,
                    scales: ScaleLoad::WithWeights,
                };
                kernels.push((
                    format!("{label} mma w4 u4 s3 scales-with-weights"),
                    W4Kernel::Mma(plan),
                ));
            }
            if m <= 16 {
                kernels.extend(ring_plans(gpu, &w, m, label));
                kernels.extend(swap_plans(gpu, &w, m, label));
                kernels.extend(cluster_plans(gpu, &w, m, label));
            }
            let shape = format!("M{m} K{k} N{n} g{gs}");
            check_w4_kernels(gpu, &w, m, &x, (&r, &p), &shape, kernels, rows)?;
        }
    }
    Ok(())
}

fn check_sampler(gpu: &Gpu, rng: &mut ChaCha8Rng, rows: &mut Vec<CheckRow>) -> Result<()> {
    use inferlab_reference::speculative::verify::{rejection_sample, VerifyUniforms};
    use ndarray::ArrayView2;
    let (b, k, v) = (37usize, 4usize, 1000usize);
    // peaked random distributions so that accepts and rejects both occur
    let dist = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        let w: Vec<f32> = (0..v).map(|_| rng.random::<f32>().powi(8)).collect();
        let s: f32 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect()
    };
    let mut q = Vec::new();
    let mut p = Vec::new();
    let mut draft = Vec::new();
    for bb in 0..b {
        for i in 0..=k {
            let pd = dist(rng);
            if i < k {
                // odd sequences: a draft close to the target (mostly accepted,
                // reaching the bonus path); even: independent (mostly rejected)
                let qd = if bb % 2 == 1 {
                    let w: Vec<f32> = pd
                        .iter()
                        .map(|&x| x * (0.8 + 0.4 * rng.random::<f32>()))
                        .collect();
                    let s: f32 = w.iter().sum();
                    w.into_iter().map(|x| x / s).collect()
                } else {
                    dist(rng)
                };
                // draft token: argmax of q, so acceptance depends on p vs q
                let x = (0..v).max_by(|&a, &c| qd[a].total_cmp(&qd[c])).unwrap();
                draft.push(x as i32);
                q.extend(qd);
            }
            p.extend(pd);
        }
    }
    // uniforms drawn in f32 so the reference's f64 -> f32 conversion is exact
    let u_acc: Vec<f32> = (0..b * k).map(|_| rng.random::<f32>()).collect();
    let u_res: Vec<f32> = (0..b).map(|_| rng.random::<f32>()).collect();
    let s = &gpu.stream;
    let mut out = s.clone_htod(&vec![i32::MIN; b * (k + 1)]).drv("poison")?;
    let mut n_out = s.clone_htod(&vec![i32::MIN; b]).drv("poison")?;
    ops::rejection_sample(
        gpu,
        b,
        k,
        v,
        &s.clone_htod(&draft).drv("upload")?,
        &s.clone_htod(&q).drv("upload")?,
        &s.clone_htod(&p).drv("upload")?,
        &s.clone_htod(&u_acc).drv("upload")?,
        &s.clone_htod(&u_res).drv("upload")?,
        &mut out,
        &mut n_out,
    )?;
    let got = s.clone_dtoh(&out).drv("download")?;
    let got_n = s.clone_dtoh(&n_out).drv("download")?;
    let mut bad = 0;
    let mut accepted = 0;
    let mut full = 0;
    for bb in 0..b {
        let target =
            ArrayView2::from_shape((k + 1, v), &p[bb * (k + 1) * v..(bb + 1) * (k + 1) * v])
                .expect("shape");
        let dr = ArrayView2::from_shape((k, v), &q[bb * k * v..(bb + 1) * k * v]).expect("shape");
        let toks: Vec<u32> = draft[bb * k..(bb + 1) * k]
            .iter()
            .map(|&t| t as u32)
            .collect();
        let uni = VerifyUniforms {
            accept: u_acc[bb * k..(bb + 1) * k]
                .iter()
                .map(|&u| u as f64)
                .collect(),
            resample: u_res[bb] as f64,
        };
        let r = rejection_sample(target, dr, &toks, &uni)?;
        accepted += r.accepted;
        full += (r.accepted == k) as usize;
        let mut want: Vec<i32> = r.tokens.iter().map(|&t| t as i32).collect();
        want.resize(k + 1, -1);
        bad += (want[..] != got[bb * (k + 1)..(bb + 1) * (k + 1)]) as usize
            + (r.tokens.len() as i32 != got_n[bb]) as usize;
    }
    rows.push(CheckRow::exact(
        "rejection_sample",
        "f32",
        format!("B{b} k{k} V{v}"),
        bad,
        format!(
            "vs reference; {accepted} of {} drafts accepted, {full} sequences fully (bonus)",
            b * k
        ),
    ));
    Ok(())
}

fn check_elementwise<T: Elem>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    rows: &mut Vec<CheckRow>,
) -> Result<()> {
    // RMSNorm: 97 rows of an odd width
    let (r, h) = (97usize, 1000usize);
    let (xh, x) = up::<T>(gpu, &randn(rng, r * h, 1.0))?;
    let (wh, w) = up::<T>(gpu, &randn(rng, h, 1.0))?;
    let mut y = poisoned::<T>(gpu, r * h)?;
    ops::rmsnorm(gpu, r, h, 1e-6, &x, &w, &mut y)?;
    let got = down(gpu, &y)?;
    let rf = host::rmsnorm_ref(&xh, &wh, h, 1e-6);
    rows.push(CheckRow::tol(
        "rmsnorm",
        T::NAME,
        format!("{r}x{h}"),
        host::error(&got, &rf),
        host::error(&host::rmsnorm_lowp::<T>(&xh, &wh, h, 1e-6), &rf),
    ));
    // RoPE: 97 tokens at scattered positions up to 4096, 9 heads, d 128
    let (t, hh, d) = (97usize, 9usize, 128usize);
    let pos: Vec<i32> = (0..t).map(|_| rng.random_range(0..4096)).collect();
    let (xh, x) = up::<T>(gpu, &randn(rng, t * hh * d, 1.0))?;
    let pd = gpu.stream.clone_htod(&pos).drv("upload")?;
    let mut y = poisoned::<T>(gpu, t * hh * d)?;
    ops::rope(gpu, t, hh, d, 10000.0, &x, &pd, &mut y)?;
    let got = down(gpu, &y)?;
    let rf = host::rope_ref(&xh, &pos, hh, d, 10000.0);
    rows.push(CheckRow::tol(
        "rope",
        T::NAME,
        format!("{t} tok x {hh} x {d}"),
        host::error(&got, &rf),
        host::error(&host::rope_lowp::<T>(&xh, &pos, hh, d, 10000.0), &rf),
    ));
    // SwiGLU
    let n = 97 * 1000 + 3;
    let (gh, g) = up::<T>(gpu, &randn(rng, n, 2.0))?;
    let (uh, u) = up::<T>(gpu, &randn(rng, n, 1.0))?;
    let mut y = poisoned::<T>(gpu, n)?;
    ops::swiglu(gpu, n, &g, &u, &mut y)?;
    let got = down(gpu, &y)?;
    let rf = host::swiglu_ref(&gh, &uh);
    rows.push(CheckRow::tol(
        "swiglu",
        T::NAME,
        format!("{n}"),
        host::error(&got, &rf),
        host::error(&host::swiglu_lowp::<T>(&gh, &uh), &rf),
    ));
    Ok(())
}

/// Run every check (or, with `only`, the one family of that name);
/// `progress` is told each family's name as it starts. A
/// family that errors (an NVRTC log, a driver fault) becomes one FAIL row
/// carrying the error, and the other families still run.
pub fn run_all(gpu: &Gpu, seed: u64, progress: &dyn Fn(&str)) -> Result<Vec<CheckRow>> {
    run_only(gpu, seed, None, progress)
}

/// [`run_all`] restricted to the family named `only` (e.g. "w4a16"); each
/// family keeps the seeded stream it has in the full run.
pub fn run_only(
    gpu: &Gpu,
    seed: u64,
    only: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<Vec<CheckRow>> {
    type Family<'a> = (
        &'a str,
        Box<dyn Fn(&Gpu, &mut ChaCha8Rng, &mut Vec<CheckRow>) -> Result<()> + 'a>,
    );
    let families: Vec<Family> = vec![
        (
            "elementwise",
            Box::new(|g: &Gpu, r: &mut ChaCha8Rng, o: &mut Vec<CheckRow>| {
                check_elementwise::<bf16>(g, r, o)?;
                check_elementwise::<f16>(g, r, o)
            }),
        ),
        ("rejection_sample", Box::new(check_sampler)),
        (
            "reshape_and_cache",
            Box::new(|g: &Gpu, r: &mut ChaCha8Rng, o: &mut Vec<CheckRow>| {
                check_cache::<bf16>(g, r, o)?;
                check_cache::<f16>(g, r, o)
            }),
        ),
        (
            "w4a16",
            Box::new(|g: &Gpu, r: &mut ChaCha8Rng, o: &mut Vec<CheckRow>| {
                check_w4a16::<bf16>(g, r, o)?;
                check_w4a16::<f16>(g, r, o)?;
                check_w4a16_ring::<bf16>(g, r, o)?;
                check_w4a16_ring::<f16>(g, r, o)
            }),
        ),
        (
            "paged_decode",
            Box::new(|g: &Gpu, r: &mut ChaCha8Rng, o: &mut Vec<CheckRow>| {
                check_decode::<bf16>(g, r, o)?;
                check_decode::<f16>(g, r, o)
            }),
        ),
        (
            "prefill",
            Box::new(|g: &Gpu, r: &mut ChaCha8Rng, o: &mut Vec<CheckRow>| {
                check_prefill::<bf16>(g, r, o)?;
                check_prefill::<f16>(g, r, o)
            }),
        ),
    ];
    let mut rows = Vec::new();
    // `decode` names the paged_decode family too (as in `gpu bench --only decode`)
    let only = only.map(|o| if o == "decode" { "paged_decode" } else { o });
    if let Some(o) = only {
        if !families.iter().any(|(name, _)| *name == o) {
            return Err(crate::Error::invalid(
                "--only",
                format!(
                    "{o} (one of {})",
                    families.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    for (i, (name, f)) in families.iter().enumerate() {
        if only.is_some_and(|o| o != *name) {
            continue;
        }
        progress(name);
        // each family its own seeded stream: one failing does not shift the others' inputs
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
        if let Err(e) = f(gpu, &mut rng, &mut rows) {
            rows.push(CheckRow {
                kernel: name.to_string(),
                dtype: "-".into(),
                shape: "-".into(),
                err: (f64::NAN, f64::NAN),
                plain: None,
                pass: false,
                note: format!("error: {e}"),
            });
        }
    }
    Ok(rows)
}

/// The table `inferlab gpu check` prints.
pub fn render(rows: &[CheckRow]) -> String {
    let mut s = String::from("| kernel | dtype | shape | err rel-L2 | err max | 2x plain rel-L2 | 2x plain max | result |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let (b0, b1) = match r.plain {
            Some((a, b)) => (format!("{:.2e}", 2.0 * a), format!("{:.2e}", 2.0 * b)),
            None => ("exact".into(), "exact".into()),
        };
        let (e0, e1) = if r.plain.is_some() {
            (format!("{:.2e}", r.err.0), format!("{:.2e}", r.err.1))
        } else {
            (format!("{} mismatches", r.err.0), r.note.clone())
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.kernel,
            r.dtype,
            r.shape,
            e0,
            e1,
            b0,
            b1,
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    s
}
