//! `inferlab gpu bench`: achieved TFLOP/s or GB/s per kernel and shape, with
//! the device's own ceilings measured in the same process (a 16-byte copy
//! kernel for bandwidth, cuBLAS bf16 GEMM 8192^3 for matrix rate) and cuBLAS
//! bf16 as the in-process peer for W4A16. Timing: CUDA events around each
//! launch, warm-up first, median of `reps`; inputs are random, never zeros.
//! W4A16 rotates among weight copies whose total exceeds L2, so that the
//! 4-bit weights are read from HBM as they would be in a model.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{sys::CUevent_flags, CudaSlice};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::DrvExt;
use crate::host::Int4Linear;
use crate::lowp::{to_elem, Elem};
use crate::ops::{
    self, ClusterPlan, DecodeKernel, DecodeLaunch, DecodeMerge, DecodeWs, GridOrder, Int4Weights,
    KvHint, Prefill, PrefillKernel, RingPlan, ScaleLoad, SwapLaunch, SwapPlan, SwapX, V6Opts,
    W4Kernel, W4Plan, WeightL2,
};
use crate::{Error, Gpu, Result};
use inferlab_reference::attention::Masking;

/// One measured line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub kernel: String,
    pub shape: String,
    pub ms: f64,
    /// "TFLOP/s" or "GB/s"
    pub unit: String,
    pub value: f64,
    /// fraction of the measured ceiling of that unit
    pub of_ceiling: f64,
}

impl BenchRow {
    /// A bandwidth row: `gbs` GB/s, and its fraction of the measured copy
    /// bandwidth `copy_gbs`.
    fn gbs(
        kernel: impl Into<String>,
        shape: impl Into<String>,
        ms: f64,
        gbs: f64,
        copy_gbs: f64,
    ) -> BenchRow {
        BenchRow {
            kernel: kernel.into(),
            shape: shape.into(),
            ms,
            unit: "GB/s".into(),
            value: gbs,
            of_ceiling: gbs / copy_gbs,
        }
    }
}

/// Median time in ms of one launch of `f`: `reps` samples after `warmup`
/// launches, each sample = `batch` launches back to back between two events,
/// divided by `batch`. With `batch` > 1 the host's launch cost (argument
/// packing, function lookup) overlaps the previous launch, as it does in a
/// model's stream of kernels; with `batch` = 1 a kernel shorter than that cost
/// would be timed as the cost. `f(i)` gets a distinct `i` per launch.
pub fn time_ms(
    gpu: &Gpu,
    warmup: usize,
    reps: usize,
    batch: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let batch = batch.max(1);
    for i in 0..warmup {
        f(i)?;
    }
    gpu.sync()?;
    let mut ts = Vec::with_capacity(reps);
    let mut n = warmup;
    for _ in 0..reps {
        let a = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .drv("event")?;
        for _ in 0..batch {
            f(n)?;
            n += 1;
        }
        let b = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .drv("event")?;
        b.synchronize().drv("event sync")?;
        ts.push(a.elapsed_ms(&b).drv("elapsed")? as f64 / batch as f64);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

/// Bytes of the buffer [`time_ms_flushed`] clears before each launch: what
/// triton's `do_bench` (the peers' timer, `bench/gpu/peers.py`) allocates.
const FLUSH_BYTES: usize = 256 << 20;

/// Median time in ms of one launch of `f`, timed as triton's `do_bench` times
/// the PyTorch peers: before each sample a 256 MiB buffer is cleared (L2
/// flushed, and left holding dirty lines whose write-back competes with the
/// kernel), then one launch between two events. The host enqueues `f` while
/// the clear runs, so its launch cost is not timed; nothing overlaps the
/// kernel (no previous kernel's tail, no programmatic dependent launch gain).
/// [`time_ms`] (launches back to back) is the model-stream figure; this one
/// is the like-for-like comparison with the peers' numbers.
pub fn time_ms_flushed(
    gpu: &Gpu,
    flush: &mut CudaSlice<u8>,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..warmup {
        f(i)?;
    }
    let mut ts = Vec::with_capacity(reps);
    for r in 0..reps {
        gpu.stream.memset_zeros(flush).drv("flush")?;
        let a = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .drv("event")?;
        f(warmup + r)?;
        let b = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .drv("event")?;
        b.synchronize().drv("event sync")?;
        ts.push(a.elapsed_ms(&b).drv("elapsed")? as f64);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

/// The L2-flush buffer of [`time_ms_flushed`].
pub fn flush_buffer(gpu: &Gpu) -> Result<CudaSlice<u8>> {
    gpu.stream
        .alloc_zeros(FLUSH_BYTES)
        .drv("alloc flush buffer")
}

fn rand16<T: Elem>(gpu: &Gpu, rng: &mut ChaCha8Rng, n: usize) -> Result<CudaSlice<T>> {
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    gpu.stream.clone_htod(&to_elem::<T>(&v)).drv("upload")
}

pub struct Ceilings {
    pub copy_gbs: f64,
    pub gemm_tflops: f64,
}

fn cublas_err(op: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cublas {
        op: op.into(),
        reason: format!("{e:?}"),
    }
}

/// y[m, n] = x[m, k] W[k, n] with W stored [n, k] row-major (a Linear's weight),
/// bf16 through cuBLAS (column-major view: C^T = W^T... = op(A) B).
fn cublas_linear(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<()> {
    // column-major: Y^T [n, m] = W [n, k] (row-major = W^T col-major, use T) * X^T [k, m]
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    // SAFETY: buffers sized by the caller to n*k, m*k, m*n.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| cublas_err("gemm", e))
}

pub fn ceilings(
    gpu: &Gpu,
    blas: &CudaBlas,
    rng: &mut ChaCha8Rng,
    rows: &mut Vec<BenchRow>,
) -> Result<Ceilings> {
    let copy_gbs = copy_ceiling(gpu, rows)?;
    let n = 8192;
    let a = rand16::<bf16>(gpu, rng, n * n)?;
    let b = rand16::<bf16>(gpu, rng, n * n)?;
    let mut c: CudaSlice<bf16> = gpu.stream.alloc_zeros(n * n).drv("alloc")?;
    let ms = time_ms(gpu, 3, 10, 1, |_| {
        cublas_linear(blas, n, n, n, &a, &b, &mut c)
    })?;
    let gemm_tflops = 2.0 * (n as f64).powi(3) / ms / 1e9;
    rows.push(BenchRow {
        kernel: "ceiling: cuBLAS bf16 GEMM".into(),
        shape: "8192^3".into(),
        ms,
        unit: "TFLOP/s".into(),
        value: gemm_tflops,
        of_ceiling: 1.0,
    });
    Ok(Ceilings {
        copy_gbs,
        gemm_tflops,
    })
}

/// The 16-byte copy ceiling (read + write GB/s of a 2 GiB copy), as a row.
pub fn copy_ceiling(gpu: &Gpu, rows: &mut Vec<BenchRow>) -> Result<f64> {
    let bytes = 2usize << 30;
    let src: CudaSlice<u8> = {
        let v: Vec<u8> = (0..bytes / 4096)
            .flat_map(|i| [(i % 251) as u8; 4096])
            .collect();
        gpu.stream.clone_htod(&v).drv("upload")?
    };
    let mut dst: CudaSlice<u8> = gpu.stream.alloc_zeros(bytes).drv("alloc")?;
    let ms = time_ms(gpu, 3, 10, 1, |_| ops::copy16(gpu, &src, &mut dst))?;
    let copy_gbs = 2.0 * bytes as f64 / ms / 1e6;
    rows.push(BenchRow {
        kernel: "ceiling: copy16 (read+write)".into(),
        shape: "2 GiB".into(),
        ms,
        unit: "GB/s".into(),
        value: copy_gbs,
        of_ceiling: 1.0,
    });
    Ok(copy_gbs)
}

/// Prefill B4 L4096 H32 d128 bf16, causal and full, every kernel of
/// [`PrefillKernel::all`] (or, with `only`, those whose label starts with one
/// of its comma-separated prefixes, e.g. `v2,v3`).
pub fn bench_prefill(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Ceilings,
    only: Option<&str>,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let (b, l, h, d) = (4usize, 4096usize, 32usize, 128usize);
    let q = rand16::<bf16>(gpu, rng, b * l * h * d)?;
    let k = rand16::<bf16>(gpu, rng, b * l * h * d)?;
    let v = rand16::<bf16>(gpu, rng, b * l * h * d)?;
    let cu: Vec<i32> = (0..=b as i32).map(|i| i * l as i32).collect();
    let cu = gpu.stream.clone_htod(&cu).drv("upload")?;
    let mut out: CudaSlice<bf16> = gpu.stream.alloc_zeros(b * l * h * d).drv("alloc")?;
    let mut lse: CudaSlice<f32> = gpu.stream.alloc_zeros(b * l * h).drv("alloc")?;
    for masking in [Masking::Causal, Masking::None] {
        for kernel in PrefillKernel::all(d, gpu.arch) {
            let label = kernel.label();
            if only.is_some_and(|o| !o.split(',').any(|f| label.starts_with(f))) {
                continue;
            }
            let p = Prefill {
                batch: b,
                total_q: b * l,
                total_k: b * l,
                max_lq: l,
                hq: h,
                hkv: h,
                d,
                masking,
                kernel,
            };
            let ms = time_ms(gpu, 3, 10, 1, |_| {
                ops::prefill(gpu, &p, &q, &k, &v, &cu, &cu, &mut out, &mut lse)
            })?;
            let tf = b as f64 * Prefill::flops(l, l, h, d, masking) / ms / 1e9;
            rows.push(BenchRow {
                kernel: format!(
                    "prefill bf16 {} {}",
                    if masking == Masking::Causal {
                        "causal"
                    } else {
                        "full"
                    },
                    label
                ),
                shape: format!("B{b} L{l} H{h} d{d}"),
                ms,
                unit: "TFLOP/s".into(),
                value: tf,
                of_ceiling: tf / c.gemm_tflops,
            });
        }
    }
    Ok(())
}

/// Paged decode B64 ctx4096 GQA 32/8 d128 bf16 at block sizes 16 and 32: every
/// partition kernel (or, with `only`, those whose label starts with one of its
/// comma-separated prefixes, e.g. `v5,v4 mma w4 s2`). Without `only`, the
/// plan rule's plan also flushed (the Goals row); with `only`, every selected
/// plan flushed (3 interleaved rounds) plus the flushed read ceiling and the
/// default over an unshuffled block table (diagnostics, gpu/NOTES.md item 25).
pub fn bench_decode(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Ceilings,
    only: Option<&str>,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let (b, hq, hkv, d, ctx) = (64usize, 32usize, 8usize, 128usize, 4096usize);
    // bytes every plan reads: the K and V caches, bf16
    let kv_bytes = 2.0 * (b * ctx * hkv * d * 2) as f64;
    let plain = DecodeLaunch::Plain;
    let mut kernels: Vec<(usize, DecodeKernel)> = vec![
        (256, DecodeKernel::V1 { min_blocks: 4 }),
        (512, DecodeKernel::V1 { min_blocks: 4 }),
        (1024, DecodeKernel::V1 { min_blocks: 4 }),
    ];
    for partition in [512usize, 1024] {
        kernels.extend(DecodeKernel::split_plans(partition));
    }
    for (warps, stages) in DecodeKernel::V4_PLANS {
        kernels.push((
            256,
            DecodeKernel::V4 {
                warps,
                stages,
                launch: plain,
            },
        ));
    }
    for partition in [512usize, 1024] {
        kernels.push((
            partition,
            DecodeKernel::V4 {
                warps: 4,
                stages: 2,
                launch: DecodeLaunch::Dependent,
            },
        ));
    }
    // v6: every option combination, launched dependently (gpu/NOTES.md item
    // 18), at partitions 512 and 1024; at 2048 and 4096 (1 or 2 x 512 CTAs)
    // a few, as many CTAs per SM as fit (3: 2.6 / 1.3 waves) or 2 (3.9 / 1.9)
    for partition in [512usize, 1024] {
        for opts in V6Opts::all() {
            kernels.push((partition, DecodeKernel::v6(opts, 2, 0)));
        }
    }
    let few = V6Opts::all()
        .into_iter()
        .filter(|o| o.merge != DecodeMerge::Cluster && o.order == GridOrder::PartitionsFirst);
    for opts in few {
        // (partition, stages, CTAs per SM); 3 stages fit 2 CTAs per SM anyway
        for (partition, stages, ctas_per_sm) in [
            (1024usize, 2usize, 2usize),
            (2048, 2, 0),
            (2048, 2, 2),
            (4096, 2, 0),
            (4096, 2, 2),
            (1024, 3, 0),
            (2048, 3, 0),
            (4096, 3, 0),
        ] {
            kernels.push((partition, DecodeKernel::v6(opts, stages, ctas_per_sm)));
        }
    }
    // v6 with CTAs of 2 warps at one partition per sequence (512 CTAs:
    // one wave at 4 CTAs per SM, gpu/NOTES.md item 25), and the default
    // launched plainly (no programmatic dependent launch)
    for (warps, stages) in DecodeKernel::V6_NARROW_PLANS {
        for ctas_per_sm in [0usize, 4] {
            kernels.push((ctx, DecodeKernel::v6_narrow(warps, stages, ctas_per_sm)));
        }
    }
    if let DecodeKernel::V6 {
        opts,
        warps,
        stages,
        ctas_per_sm,
        ..
    } = DecodeKernel::DEFAULT
    {
        kernels.push((
            ctx,
            DecodeKernel::V6 {
                opts,
                warps,
                stages,
                ctas_per_sm,
                launch: plain,
            },
        ));
    }
    // v7 (whole-block copies, one warp per KV head; gpu/NOTES.md item 26):
    // 8 heads per CTA (64 KB per stage: one CTA per SM) at 2 partitions (128
    // CTAs: one wave on 132 SMs) merged by the merge kernel or a cluster of
    // 2; 4 or 2 heads per CTA at one partition (128 / 256 CTAs, no merge),
    // 2..4 stages, as many CTAs per SM as fit or 1 (padded), launched
    // dependently or plainly; 8 heads at 8 partitions of 512 (also timed at
    // block size 32)
    let v7 = |heads, stages, merge, ctas_per_sm, launch| DecodeKernel::V7 {
        heads,
        stages,
        merge,
        ctas_per_sm,
        launch,
    };
    let pdl = DecodeLaunch::Dependent;
    for (partition, kernel) in [
        (
            2048usize,
            v7(8usize, 2usize, DecodeMerge::Kernel, 0usize, pdl),
        ),
        (2048, v7(8, 3, DecodeMerge::Kernel, 0, pdl)),
        (2048, v7(8, 2, DecodeMerge::Cluster, 0, pdl)),
        (4096, v7(4, 2, DecodeMerge::Direct, 0, pdl)),
        (4096, v7(4, 3, DecodeMerge::Direct, 0, pdl)),
        (4096, v7(4, 3, DecodeMerge::Direct, 0, plain)),
        (4096, v7(4, 3, DecodeMerge::Direct, 1, pdl)),
        (4096, v7(4, 4, DecodeMerge::Direct, 0, pdl)),
        (4096, v7(4, 4, DecodeMerge::Direct, 1, pdl)),
        (4096, v7(2, 3, DecodeMerge::Direct, 0, pdl)),
        (4096, v7(2, 4, DecodeMerge::Direct, 0, pdl)),
        (4096, v7(2, 4, DecodeMerge::Direct, 2, pdl)),
        (512, v7(8, 2, DecodeMerge::Kernel, 0, pdl)),
    ] {
        if !matches!(
            kernel,
            DecodeKernel::V7 {
                merge: DecodeMerge::Cluster,
                ..
            }
        ) || gpu.arch.major >= 9
        {
            kernels.push((partition, kernel));
        }
    }
    // v5 ignores the partition (512: also timed at block size 32)
    for (warps, stages) in DecodeKernel::V5_PLANS {
        for launch in [plain, DecodeLaunch::Dependent] {
            kernels.push((
                512,
                DecodeKernel::V5 {
                    warps,
                    stages,
                    ctas: 0,
                    launch,
                },
            ));
        }
    }
    kernels.retain(|(_, k)| {
        let label = k.label();
        only.is_none_or(|o| o.split(',').any(|f| label.starts_with(f)))
    });
    for bs in [16usize, 32] {
        let per = ctx / bs;
        let nb = b * per;
        // shuffled physical blocks, as a real allocator leaves them
        let mut ids: Vec<i32> = (0..nb as i32).collect();
        for i in (1..nb).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let kc = rand16::<bf16>(gpu, rng, nb * bs * hkv * d)?;
        let vc = rand16::<bf16>(gpu, rng, nb * bs * hkv * d)?;
        let bt = gpu.stream.clone_htod(&ids).drv("upload")?;
        let lens = gpu.stream.clone_htod(&vec![ctx as i32; b]).drv("upload")?;
        let q = rand16::<bf16>(gpu, rng, b * hq * d)?;
        let mut out: CudaSlice<bf16> = gpu.stream.alloc_zeros(b * hq * d).drv("alloc")?;
        let mut lse: CudaSlice<f32> = gpu.stream.alloc_zeros(b * hq).drv("alloc")?;
        if bs == 16 {
            // what a plain stream reads of the same bytes (the K and V caches,
            // contiguously): the headroom above any paged kernel
            let mut sink: CudaSlice<u32> = gpu.stream.alloc_zeros(1).drv("alloc")?;
            let ms = time_ms(gpu, 3, 10, 4, |_| {
                ops::decode_read_ceiling(gpu, &kc, &vc, &mut sink)
            })?;
            let gbs = kv_bytes / ms / 1e6;
            rows.push(BenchRow::gbs(
                "ceiling: read K+V (contiguous, 16-byte loads)",
                format!("B{b} ctx{ctx} {hq}/{hkv} d{d}"),
                ms,
                gbs,
                c.copy_gbs,
            ));
        }
        let dims = ops::DecodeDims {
            batch: b,
            hq,
            hkv,
            d,
            block_size: bs,
            num_blocks: nb,
            max_blocks: per,
            max_len: ctx,
        };
        let plan = |partition, kernel| dims.with_plan(partition, kernel);
        for &(partition, kernel) in &kernels {
            if bs == 32 && partition != 512 {
                continue;
            }
            let p = plan(partition, kernel);
            let mut ws = DecodeWs::new(gpu, &p)?;
            let ms = time_ms(gpu, 3, 10, 4, |_| {
                ops::paged_decode(
                    gpu, &p, &q, &kc, &vc, &bt, &lens, &mut ws, &mut out, &mut lse,
                )
            })?;
            let gbs = kv_bytes / ms / 1e6;
            let split = if matches!(kernel, DecodeKernel::V5 { .. }) {
                "flat".to_string()
            } else {
                format!("part{partition}")
            };
            rows.push(BenchRow::gbs(
                format!("paged_decode bf16 bs{bs} {split} {}", kernel.label()),
                format!("B{b} ctx{ctx} {hq}/{hkv} d{d}"),
                ms,
                gbs,
                c.copy_gbs,
            ));
        }
        if bs == 16 && only.is_some() {
            // every selected plan as the peers are timed (do_bench: L2 flushed,
            // one launch per event pair), in 3 interleaved rounds of 30
            // launches (the row: the middle of the 3 medians; every round on
            // stderr), then diagnostics: the contiguous read ceiling flushed,
            // and the default plan over an unshuffled block table (physical
            // blocks in sequence order: what DRAM locality costs the paged
            // layout), back to back and flushed
            let mut flush = flush_buffer(gpu)?;
            let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); kernels.len()];
            for round in 0..3 {
                for (i, &(partition, kernel)) in kernels.iter().enumerate() {
                    let p = plan(partition, kernel);
                    let mut ws = DecodeWs::new(gpu, &p)?;
                    let ms = time_ms_flushed(gpu, &mut flush, 3, 30, |_| {
                        ops::paged_decode(
                            gpu, &p, &q, &kc, &vc, &bt, &lens, &mut ws, &mut out, &mut lse,
                        )
                    })?;
                    eprintln!(
                        "flushed round {round} part{partition} {}: {ms:.4} ms",
                        kernel.label()
                    );
                    rounds[i].push(ms);
                }
            }
            for (&(partition, kernel), r) in kernels.iter().zip(rounds.iter_mut()) {
                r.sort_by(|a, b| a.total_cmp(b));
                let ms = r[r.len() / 2];
                rows.push(BenchRow::gbs(
                    format!(
                        "flushed paged_decode bf16 bs{bs} part{partition} {}",
                        kernel.label()
                    ),
                    format!("B{b} ctx{ctx} {hq}/{hkv} d{d}"),
                    ms,
                    kv_bytes / ms / 1e6,
                    c.copy_gbs,
                ));
            }
            let mut sink: CudaSlice<u32> = gpu.stream.alloc_zeros(1).drv("alloc")?;
            let ms = time_ms_flushed(gpu, &mut flush, 3, 30, |_| {
                ops::decode_read_ceiling(gpu, &kc, &vc, &mut sink)
            })?;
            rows.push(BenchRow::gbs(
                "diag: read K+V contiguous, flushed",
                format!("B{b} ctx{ctx} {hq}/{hkv} d{d}"),
                ms,
                kv_bytes / ms / 1e6,
                c.copy_gbs,
            ));
            let seq: Vec<i32> = (0..nb as i32).collect();
            let bt_seq = gpu.stream.clone_htod(&seq).drv("upload")?;
            let auto = dims.auto(gpu.sm_count.max(1) as usize);
            let mut ws = DecodeWs::new(gpu, &auto)?;
            let mut run = || {
                ops::paged_decode(
                    gpu, &auto, &q, &kc, &vc, &bt_seq, &lens, &mut ws, &mut out, &mut lse,
                )
            };
            let b2b = time_ms(gpu, 3, 10, 4, |_| run())?;
            let fl = time_ms_flushed(gpu, &mut flush, 3, 30, |_| run())?;
            for (what, ms) in [("back to back", b2b), ("flushed", fl)] {
                rows.push(BenchRow::gbs(
                    format!(
                        "diag: sequential blocks, {what}, part{} {}",
                        auto.partition,
                        auto.kernel.label()
                    ),
                    format!("B{b} ctx{ctx} {hq}/{hkv} d{d}"),
                    ms,
                    kv_bytes / ms / 1e6,
                    c.copy_gbs,
                ));
            }
        }
        if bs == 16 && only.is_none() {
            // the plan rule's plan (the default kernel, one partition per
            // sequence here) as the peers
            // are timed (do_bench: L2 flushed, one launch per event pair)
            // and with the K/V copies under L2 evict_first (the flush leaves L2
            // full of dirty lines; evict_first keeps the K/V stream from
            // evicting them, so their write-back leaves the timed launch)
            let mut flush = flush_buffer(gpu)?;
            let auto = dims.auto(gpu.sm_count.max(1) as usize);
            let mut goal = vec![auto.kernel];
            // (v6 only: v7 has no L2 hint, its `with_hint` is itself)
            if auto.kernel.with_hint(KvHint::EvictFirst) != auto.kernel {
                goal.push(auto.kernel.with_hint(KvHint::EvictFirst));
            }
            for kernel in goal {
                let p = plan(auto.partition, kernel);
                let mut ws = DecodeWs::new(gpu, &p)?;
                let ms = time_ms_flushed(gpu, &mut flush, 3, 30, |_| {
                    ops::paged_decode(
                        gpu, &p, &q, &kc, &vc, &bt, &lens, &mut ws, &mut out, &mut lse,
                    )
                })?;
                let gbs = kv_bytes / ms / 1e6;
                rows.push(BenchRow::gbs(
                    format!(
                        "flushed paged_decode bf16 bs{bs} part{} {}",
                        p.partition,
                        p.kernel.label()
                    ),
                    format!("B{b} ctx{ctx} {hq}/{hkv} d{d}"),
                    ms,
                    gbs,
                    c.copy_gbs,
                ));
            }
        }
    }
    Ok(())
}

/// Sequences x context lengths of the decode-rule sweep (GQA 32/8 d128 bf16,
/// block size 16).
pub const RULE_BATCHES: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
pub const RULE_CONTEXTS: [usize; 3] = [1024, 4096, 16384];

/// The plans the decode-rule sweep times at one shape: partitions from
/// max_len / n for n in 1..128 (rounded up to 32, deduplicated; at most 256
/// blocks for v6, 64 for v4; at most 40 CTAs per SM but always the two
/// longest) with the default (v6 direct at one partition,
/// merge kernel at more), v6 with the merge kernel and the eager table (2 CTAs
/// per SM by registers), v6 = v4's body with every option off (3 CTAs per SM)
/// and `V4_DEFAULT` (v4 w4 s2 pdl).
pub fn rule_candidates(dims: &ops::DecodeDims, sm_count: usize) -> Vec<(usize, DecodeKernel)> {
    let len = dims.max_len;
    // at most ~20 waves of 2 CTAs per SM (more only adds merge work), but
    // always the two longest valid partitions
    let max_ctas = 40 * sm_count.max(1);
    let pairs = dims.batch * dims.hkv;
    let mut parts: Vec<usize> = [
        1usize, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128,
    ]
    .iter()
    .map(|&n| len.div_ceil(n).next_multiple_of(32))
    .filter(|&p| p >= 32)
    .collect();
    parts.sort_unstable();
    parts.dedup();
    let eager = V6Opts {
        table: ops::TableLoad::Eager,
        ..V6Opts::V4
    };
    let mut plans = Vec::new();
    let mut kept = 0;
    for &p in parts.iter().rev() {
        let blocks = p.div_ceil(dims.block_size);
        if blocks > 256 || (kept >= 2 && pairs * len.div_ceil(p) > max_ctas) {
            continue;
        }
        kept += 1;
        plans.push((p, DecodeKernel::DEFAULT));
        plans.push((p, DecodeKernel::v6(eager, 2, 0)));
        plans.push((p, DecodeKernel::v6(V6Opts::V4, 2, 0)));
        if blocks <= 64 {
            plans.push((p, DecodeKernel::V4_DEFAULT));
        }
    }
    plans
}

/// `gpu bench --only decode-rule`: every plan of [`rule_candidates`] at every
/// shape of [`RULE_BATCHES`] x [`RULE_CONTEXTS`], timed back to back over
/// enough copies of the block tables (disjoint blocks of one shuffled pool)
/// that the K/V bytes read exceed L2, as a model's layers would leave them.
/// The rule's plan ([`ops::DecodeDims::plan`] for this device) is marked
/// `(rule)` in its row; [`rule_summary`] compares it with the best. `heads`:
/// "HQ/HKV/D/BS" (query heads, KV heads, head dim, block size), by default
/// 32/8/128/16.
pub fn bench_decode_rule(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Ceilings,
    heads: Option<&str>,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let (hq, hkv, d, bs) = match heads {
        None => (32usize, 8usize, 128usize, 16usize),
        Some(h) => {
            let v: Vec<usize> = h.split('/').filter_map(|x| x.parse().ok()).collect();
            match v[..] {
                [hq, hkv, d, bs] if hkv > 0 && bs > 0 && hq % hkv == 0 => (hq, hkv, d, bs),
                _ => {
                    return Err(Error::invalid(
                        "--only decode-rule:HQ/HKV/D/BS",
                        format!("{h} (e.g. 32/8/128/16)"),
                    ))
                }
            }
        }
    };
    let max_b = *RULE_BATCHES.iter().max().unwrap();
    let max_ctx = *RULE_CONTEXTS.iter().max().unwrap();
    let pool = max_b * max_ctx / bs; // blocks: the largest shape exactly
    let cache = pool * bs * hkv * d;
    // the pool filled from one random 64 MiB tile (values do not change times)
    let tile_n = 32usize << 20;
    let tile = rand16::<bf16>(gpu, rng, tile_n)?;
    let mut kc: CudaSlice<bf16> = gpu.stream.alloc_zeros(cache).drv("alloc")?;
    let mut vc: CudaSlice<bf16> = gpu.stream.alloc_zeros(cache).drv("alloc")?;
    for dst in [&mut kc, &mut vc] {
        let mut at = 0;
        while at < cache {
            let n = tile_n.min(cache - at);
            let mut view = dst.slice_mut(at..at + n);
            gpu.stream
                .memcpy_dtod(&tile.slice(0..n), &mut view)
                .drv("fill pool")?;
            at += n;
        }
    }
    let l2_bytes = 3 * (50usize << 20);
    for &ctx in &RULE_CONTEXTS {
        for &b in &RULE_BATCHES {
            let per = ctx / bs;
            let kv_bytes = 2 * b * ctx * hkv * d * 2;
            // copies of the tables: disjoint blocks, together > 3 x L2
            let copies = l2_bytes.div_ceil(kv_bytes).clamp(1, pool / (b * per));
            let mut ids: Vec<i32> = (0..pool as i32).collect();
            for i in (1..pool).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            let mut tables = Vec::with_capacity(copies);
            for k in 0..copies {
                let t = &ids[k * b * per..(k + 1) * b * per];
                tables.push(gpu.stream.clone_htod(t).drv("upload")?);
            }
            let lens = gpu.stream.clone_htod(&vec![ctx as i32; b]).drv("upload")?;
            let q = rand16::<bf16>(gpu, rng, b * hq * d)?;
            let mut out: CudaSlice<bf16> = gpu.stream.alloc_zeros(b * hq * d).drv("alloc")?;
            let mut lse: CudaSlice<f32> = gpu.stream.alloc_zeros(b * hq).drv("alloc")?;
            let dims = ops::DecodeDims {
                batch: b,
                hq,
                hkv,
                d,
                block_size: bs,
                num_blocks: pool,
                max_blocks: per,
                max_len: ctx,
            };
            let rule = dims.plan(gpu.sm_count.max(1) as usize);
            let mut plans = rule_candidates(&dims, gpu.sm_count.max(1) as usize);
            eprintln!("decode-rule B{b} ctx{ctx}: {} plans", plans.len());
            if !plans.contains(&rule) {
                plans.push(rule);
            }
            let mut time_plan = |plan: (usize, DecodeKernel)| -> Result<f64> {
                let p = dims.with_plan(plan.0, plan.1);
                let mut ws = DecodeWs::new(gpu, &p)?;
                time_ms(gpu, 3, 10, 8, |i| {
                    ops::paged_decode(
                        gpu,
                        &p,
                        &q,
                        &kc,
                        &vc,
                        &tables[i % copies],
                        &lens,
                        &mut ws,
                        &mut out,
                        &mut lse,
                    )
                })
            };
            let shape = format!("B{b} ctx{ctx} {hq}/{hkv} d{d} bs{bs}");
            let row = |what: &str, plan: (usize, DecodeKernel), ms: f64| {
                let gbs = kv_bytes as f64 / ms / 1e6;
                BenchRow {
                    kernel: format!(
                        "decode-rule{what} part{} x{} {}",
                        plan.0,
                        dims.with_plan(plan.0, plan.1).nparts(),
                        plan.1.label()
                    ),
                    shape: shape.clone(),
                    ms,
                    unit: "GB/s".into(),
                    value: gbs,
                    of_ceiling: gbs / c.copy_gbs,
                }
            };
            let mut best = (f64::INFINITY, rule);
            for plan in plans {
                let ms = time_plan(plan)?;
                if ms < best.0 {
                    best = (ms, plan);
                }
                let mut r = row("", plan, ms);
                if plan == rule {
                    r.kernel += " (rule)";
                }
                rows.push(r);
            }
            // the best of ~50 noisy timings is biased low: time the rule's
            // plan and the sweep's best again, alternating, 5 rounds each
            if best.1 != rule {
                let (mut tr, mut tb) = (Vec::new(), Vec::new());
                for _ in 0..5 {
                    tr.push(time_plan(rule)?);
                    tb.push(time_plan(best.1)?);
                }
                for t in [&mut tr, &mut tb] {
                    t.sort_by(|a, b| a.total_cmp(b));
                }
                rows.push(row(" final rule", rule, tr[2]));
                rows.push(row(" final best", best.1, tb[2]));
            }
        }
    }
    Ok(())
}

/// Per shape of a decode-rule sweep: the rule's plan and time, the best plan
/// and time, and rule / best (empty without decode-rule rows).
pub fn rule_summary(rows: &[BenchRow]) -> String {
    let mut shapes: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.kernel.starts_with("decode-rule ")) {
        if !shapes.contains(&r.shape.as_str()) {
            shapes.push(&r.shape);
        }
    }
    if shapes.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n## Decode plan rule vs the best measured plan\n\nWhere the sweep's best is another plan, both were timed again, alternating, 5 rounds (median): `final` columns; the sweep's own figures alongside.\n\n| shape | rule's plan | sweep ms | best plan | sweep ms | final rule ms | final best ms | rule / best |\n|---|---|---|---|---|---|---|---|\n",
    );
    let name = |r: &BenchRow, prefix: &str| {
        r.kernel
            .trim_start_matches(prefix)
            .trim_end_matches(" (rule)")
            .to_string()
    };
    let mut worst: f64 = 0.0;
    for shape in shapes {
        let of: Vec<&BenchRow> = rows
            .iter()
            .filter(|r| r.kernel.starts_with("decode-rule part") && r.shape == shape)
            .collect();
        let best = of.iter().min_by(|a, b| a.ms.total_cmp(&b.ms)).unwrap();
        let fin = |what: &str| {
            rows.iter()
                .find(|r| r.shape == shape && r.kernel.starts_with(what))
                .map(|r| r.ms)
        };
        let Some(rule) = of.iter().find(|r| r.kernel.ends_with(" (rule)")) else {
            s += &format!(
                "| {shape} | (not timed) | - | {} | {:.4} | - | - | - |\n",
                name(best, "decode-rule "),
                best.ms
            );
            continue;
        };
        let (fr, fb) = match (
            fin("decode-rule final rule "),
            fin("decode-rule final best "),
        ) {
            (Some(r), Some(b)) => (r, b),
            _ => (rule.ms, best.ms),
        };
        let ratio = fr / fb;
        worst = worst.max(ratio);
        s += &format!(
            "| {shape} | {} | {:.4} | {} | {:.4} | {:.4} | {:.4} | {:.3} |\n",
            name(rule, "decode-rule "),
            rule.ms,
            name(best, "decode-rule "),
            best.ms,
            fr,
            fb,
            ratio
        );
    }
    s += &format!("\nworst rule / best (final): {worst:.3}\n");
    s
}

/// Launches per timed sample for W4A16 (tens of microseconds each).
const W4_BATCH: usize = 8;

pub fn bench_w4a16(
    gpu: &Gpu,
    blas: &CudaBlas,
    rng: &mut ChaCha8Rng,
    c: &Ceilings,
    only_m: Option<usize>,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let (n, k, gs) = (14336usize, 4096usize, 128usize);
    let copies = 4; // 4 x 30 MB > 50 MB L2
    let mut ws = Vec::new();
    // copies of GPTQ, AWQ, then GPTQ with act-order (g_idx a shuffle of the
    // uniform groups, as act-order quantization leaves it)
    for i in 0..copies * 3 {
        let mut g_idx: Vec<i32> = (0..k as i32).map(|i| i / gs as i32).collect();
        if i >= 2 * copies {
            for j in (1..k).rev() {
                g_idx.swap(j, rng.random_range(0..=j));
            }
        }
        let lin = Int4Linear {
            k,
            n,
            group_size: gs,
            q: (0..k * n).map(|_| rng.random_range(0..16u8)).collect(),
            zeros: (0..k / gs * n).map(|_| rng.random_range(1..16u8)).collect(),
            scales: (0..k / gs * n)
                .map(|_| f16::from_f32(0.01 + 0.01 * rng.random::<f32>()))
                .collect(),
            g_idx,
        };
        ws.push(if (copies..2 * copies).contains(&i) {
            let (qw, qz) = lin.pack_awq();
            Int4Weights::awq(gpu, k, n, gs, &qw, &qz, &lin.scales)?
        } else {
            let (qw, qz) = lin.pack_gptq();
            Int4Weights::gptq(gpu, k, n, gs, &qw, &qz, &lin.scales, &lin.g_idx)?
        });
    }
    // the floors with every M and with M = 1 alone (their profiles, item 27)
    if only_m.is_none_or(|m| m == 1) {
        w4a16_read_floor(gpu, c, ws[0].bytes(), copies, rows)?;
    }
    let wb: Vec<CudaSlice<bf16>> = (0..2)
        .map(|_| rand16::<bf16>(gpu, rng, n * k))
        .collect::<Result<_>>()?;
    // M 4 and 8 only when asked for (w4a16:4, w4a16:8: where act-order
    // switches from x gathered in the kernel to gathered first)
    for m in [1usize, 4, 8, 16, 64] {
        if only_m.is_some_and(|o| o != m) || (only_m.is_none() && (m == 4 || m == 8)) {
            continue;
        }
        let x = rand16::<bf16>(gpu, rng, m * k)?;
        let mut y: CudaSlice<bf16> = gpu.stream.alloc_zeros(m * n).drv("alloc")?;
        let ms_blas = time_ms(gpu, 3, 20, W4_BATCH, |i| {
            cublas_linear(blas, m, n, k, &wb[i % 2], &x, &mut y)
        })?;
        let shape = format!("M{m} N{n} K{k} g{gs}");
        rows.push(BenchRow::gbs(
            "cuBLAS bf16 (peer)",
            shape.clone(),
            ms_blas,
            (n * k * 2) as f64 / ms_blas / 1e6,
            c.copy_gbs,
        ));
        // The default choice first (the goal table's row), then the CUDA-core
        // twin, then the tensor-core kernel's plans ("plan w.. u.. s..").
        let mut runs: Vec<(String, std::ops::Range<usize>, W4Kernel)> = vec![
            ("gptq".into(), 0..copies, W4Kernel::Auto),
            ("awq".into(), copies..2 * copies, W4Kernel::Auto),
            (
                "gptq act-order".into(),
                2 * copies..3 * copies,
                W4Kernel::Auto,
            ),
            ("cuda-core gptq".into(), 0..copies, W4Kernel::CudaCore),
            (
                "cuda-core gptq act-order".into(),
                2 * copies..3 * copies,
                W4Kernel::CudaCore,
            ),
        ];
        for scales in [ScaleLoad::OnGroupChange, ScaleLoad::WithWeights] {
            for unroll in [4usize, 8] {
                for splits in [1usize, 2, 4, 8] {
                    let pf = scales == ScaleLoad::WithWeights;
                    if pf && unroll == 8 && m > 16 {
                        continue;
                    }
                    let plan = W4Plan {
                        warps: 4,
                        unroll,
                        splits,
                        scales,
                    };
                    runs.push((
                        format!(
                            "plan gptq w4 u{unroll} s{splits}{}",
                            if pf { " pf" } else { "" }
                        ),
                        0..copies,
                        W4Kernel::Mma(plan),
                    ));
                }
            }
        }
        if m <= 16 {
            for (cols, &(warps, slots)) in [32usize, 64]
                .into_iter()
                .flat_map(|c| RingPlan::variants(c).iter().map(move |v| (c, v)))
            {
                for per_sm in [1usize, 2, 3] {
                    let plan = RingPlan {
                        cols,
                        warps,
                        slots,
                        ctas: 0,
                        ctas_per_sm: per_sm,
                    };
                    // the CTAs of one wave must fit an SM's shared memory
                    if !ops::w4a16_ring_applies(gpu, &ws[0], m, &plan)
                        || per_sm * (plan.smem(m, k) + 1024) > 228 * 1024
                    {
                        continue;
                    }
                    runs.push((
                        format!("plan gptq ring{cols} w{warps} r{slots} x{per_sm}"),
                        0..copies,
                        W4Kernel::Ring(plan),
                    ));
                }
            }
        }
        if m <= 16 {
            let nt = SwapPlan::tiles(m);
            for (xk, &(warps, slots, ksteps), launch) in [SwapX::Staged, SwapX::Ring]
                .into_iter()
                .flat_map(|xk| SwapPlan::variants(nt, xk).iter().map(move |v| (xk, v)))
                .flat_map(|(xk, v)| [(xk, v, SwapLaunch::Plain), (xk, v, SwapLaunch::Dependent)])
            {
                for per_sm in 1..=SwapPlan::min_blocks(nt, (warps, slots, ksteps), xk) {
                    let plan = SwapPlan {
                        warps,
                        slots,
                        ksteps,
                        ctas: 0,
                        ctas_per_sm: per_sm,
                        launch,
                        x: xk,
                        l2: WeightL2::Normal,
                    };
                    // the CTAs of one wave must fit an SM's shared memory
                    if !ops::w4a16_swap_applies(gpu, &ws[0], m, &plan)
                        || per_sm * (plan.smem(m, k) + 1024) > gpu.smem_optin + 1024
                    {
                        continue;
                    }
                    runs.push((
                        format!(
                            "plan gptq swap{} w{warps} r{slots}{} x{per_sm}{}",
                            if xk == SwapX::Ring { "x" } else { "" },
                            if ksteps > 1 {
                                format!(" k{ksteps}")
                            } else {
                                String::new()
                            },
                            if launch == SwapLaunch::Dependent {
                                " pdl"
                            } else {
                                ""
                            }
                        ),
                        0..copies,
                        W4Kernel::Swap(plan),
                    ));
                }
            }
        }
        if m <= 16 {
            let nt = SwapPlan::tiles(m);
            for (&(warps, slots, ksteps, cols), size, launch) in ClusterPlan::variants(nt)
                .iter()
                .flat_map(|v| [2usize, 4].map(|c| (v, c)))
                .flat_map(|(v, c)| [(v, c, SwapLaunch::Plain), (v, c, SwapLaunch::Dependent)])
            {
                let plan = ClusterPlan {
                    warps,
                    slots,
                    ksteps,
                    size,
                    cols,
                    clusters: 0,
                    launch,
                    l2: WeightL2::Normal,
                };
                if !ops::w4a16_cluster_applies(gpu, &ws[0], m, &plan) {
                    continue;
                }
                let name = plan.kernel_name("bf16", m);
                let (clusters, _) = ops::cluster_grid(gpu, &ws[0], m, &plan, &name)?;
                runs.push((
                    format!(
                        "plan gptq swapcl w{warps} r{slots} k{ksteps}{} c{size} ({clusters} clusters){}",
                        if cols == 32 { " h32" } else { "" },
                        if launch == SwapLaunch::Dependent {
                            " pdl"
                        } else {
                            ""
                        }
                    ),
                    0..copies,
                    W4Kernel::Cluster(plan),
                ));
            }
        }
        // act-order layers: the kernels that can read x through the
        // permutation as they stage it, as `Auto` would launch them (dependent
        // launch, weights evict_first), with x gathered in the kernel and
        // gathered first (ops::ActOrderX)
        let act_runs = if m <= 16 {
            act_order_plans(gpu, &ws[2 * copies], m)
        } else {
            Vec::new()
        };
        // the default kernel and cuBLAS again, one launch per event pair (how
        // earlier runs timed them: host launch cost included)
        let ms1 = time_ms(gpu, 3, 20, 1, |i| {
            ops::w4a16(gpu, &ws[i % copies], m, &x, &mut y)
        })?;
        let ms1_blas = time_ms(gpu, 3, 20, 1, |i| {
            cublas_linear(blas, m, n, k, &wb[i % 2], &x, &mut y)
        })?;
        // and both as the peers are timed (do_bench: L2 flushed, one launch)
        let mut flush = flush_buffer(gpu)?;
        let msf = time_ms_flushed(gpu, &mut flush, 3, 50, |i| {
            ops::w4a16(gpu, &ws[i % copies], m, &x, &mut y)
        })?;
        let msf_blas = time_ms_flushed(gpu, &mut flush, 3, 50, |i| {
            cublas_linear(blas, m, n, k, &wb[i % 2], &x, &mut y)
        })?;
        // act-order's default, flushed (x read through the permutation)
        let msf_act = time_ms_flushed(gpu, &mut flush, 3, 50, |i| {
            ops::w4a16(gpu, &ws[2 * copies + i % copies], m, &x, &mut y)
        })?;
        // the default plan with its weight copies under L2's normal policy,
        // both ways (the default is evict_first: the flush leaves L2 full of
        // dirty lines, and evict_first keeps the weight stream from evicting
        // them, so less of their write-back falls in the timed launch)
        let default = W4Kernel::Auto.resolve(gpu, &ws[0], m);
        let normal = default.with_l2(WeightL2::Normal);
        let mut l2_rows = Vec::new();
        if normal != default {
            let f = time_ms_flushed(gpu, &mut flush, 3, 50, |i| {
                ops::w4a16_with(gpu, &ws[i % copies], m, &x, &mut y, normal)
            })?;
            l2_rows.push((
                format!(
                    "w4a16 flushed gptq l2-normal bf16 (x{:.2} of cuBLAS flushed)",
                    msf_blas / f
                ),
                f,
                ws[0].bytes(),
            ));
            let b = time_ms(gpu, 3, 20, W4_BATCH, |i| {
                ops::w4a16_with(gpu, &ws[i % copies], m, &x, &mut y, normal)
            })?;
            l2_rows.push((
                format!("w4a16 gptq l2-normal bf16 (x{:.2} of cuBLAS)", ms_blas / b),
                b,
                ws[0].bytes(),
            ));
        }
        drop(flush);
        for (label, ms, bytes) in l2_rows.into_iter().chain([
            (
                format!(
                    "w4a16 flushed gptq bf16 (x{:.2} of cuBLAS flushed)",
                    msf_blas / msf
                ),
                msf,
                ws[0].bytes(),
            ),
            (
                "cuBLAS bf16 flushed (peer)".to_string(),
                msf_blas,
                n * k * 2,
            ),
            (
                format!(
                    "w4a16 flushed gptq act-order bf16 (x{:.2} of cuBLAS flushed, x{:.2} of gptq flushed)",
                    msf_blas / msf_act,
                    msf / msf_act
                ),
                msf_act,
                ws[2 * copies].bytes(),
            ),
            (
                format!(
                    "w4a16 single-launch gptq bf16 (x{:.2} of cuBLAS single-launch)",
                    ms1_blas / ms1
                ),
                ms1,
                ws[0].bytes(),
            ),
            (
                "cuBLAS bf16 single-launch (peer)".to_string(),
                ms1_blas,
                n * k * 2,
            ),
        ]) {
            let gbs = bytes as f64 / ms / 1e6;
            rows.push(BenchRow::gbs(label, shape.clone(), ms, gbs, c.copy_gbs));
        }
        for (label, kernel) in act_runs {
            for (how, suffix) in [
                (ops::ActOrderX::InKernel, "x-in-kernel"),
                (ops::ActOrderX::Gathered, "x-gathered"),
            ] {
                let set = &ws[2 * copies..3 * copies];
                let ms = time_ms(gpu, 3, 20, W4_BATCH, |i| {
                    ops::w4a16_act_order(gpu, &set[i % set.len()], m, &x, &mut y, kernel, how)
                })?;
                rows.push(BenchRow::gbs(
                    format!(
                        "w4a16 {label} {suffix} bf16 (x{:.2} of cuBLAS)",
                        ms_blas / ms
                    ),
                    shape.clone(),
                    ms,
                    set[0].bytes() as f64 / ms / 1e6,
                    c.copy_gbs,
                ));
            }
        }
        for (label, range, kernel) in runs {
            let set = &ws[range];
            let ms = time_ms(gpu, 3, 20, W4_BATCH, |i| {
                ops::w4a16_with(gpu, &set[i % set.len()], m, &x, &mut y, kernel)
            })?;
            let gbs = set[0].bytes() as f64 / ms / 1e6;
            rows.push(BenchRow::gbs(
                format!("w4a16 {label} bf16 (x{:.2} of cuBLAS)", ms_blas / ms),
                shape.clone(),
                ms,
                gbs,
                c.copy_gbs,
            ));
        }
    }
    Ok(())
}

/// The act-order plans the bench times both ways (x gathered in the kernel
/// and first) at `m` rows: the cluster kernel's 64-column k2 plan (Auto's at
/// m <= 8) and `ClusterPlan::auto` (m 9..=16), clusters of 2, and the staged
/// swap kernel's `SwapPlan::auto_staged` (Auto's on sm_80).
fn act_order_plans(gpu: &Gpu, w: &Int4Weights, m: usize) -> Vec<(String, W4Kernel)> {
    let mut v = Vec::new();
    let mut cl = vec![ClusterPlan::auto_act_order(1, w.k, w.group_size, gpu.arch)];
    cl.push(ClusterPlan::auto(16, w.k, w.group_size, gpu.arch));
    for p in cl.into_iter().flatten() {
        if ops::w4a16_cluster_applies(gpu, w, m, &p) {
            v.push((
                format!(
                    "plan gptq act-order swapcl w{} r{} k{}{} c{} pdl",
                    p.warps,
                    p.slots,
                    p.ksteps,
                    if p.cols == 32 { " h32" } else { "" },
                    p.size
                ),
                W4Kernel::Cluster(p),
            ));
        }
    }
    if let Some(p) = SwapPlan::auto_staged(m).filter(|p| ops::w4a16_swap_applies(gpu, w, m, p)) {
        v.push((
            format!("plan gptq act-order swap w{} r{} x1 pdl", p.warps, p.slots),
            W4Kernel::Swap(p),
        ));
    }
    v
}

/// The floor under any W4A16 kernel at small M: a plain read of as many bytes
/// as the weights hold (`bytes`, the decode bench's 16-byte-load read kernel,
/// all loads in flight at once), back to back over `copies` buffers (more
/// than L2 holds) and timed as the peers are (`time_ms_flushed`). A kernel
/// that must read the weights cannot beat the flushed row.
fn w4a16_read_floor(
    gpu: &Gpu,
    c: &Ceilings,
    bytes: usize,
    copies: usize,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let half = bytes.div_ceil(32) * 8; // bf16 elements per buffer, a multiple of 8
    let bufs: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)> = (0..copies)
        .map(|_| -> Result<_> {
            Ok((
                gpu.stream.alloc_zeros(half).drv("alloc")?,
                gpu.stream.alloc_zeros(half).drv("alloc")?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut sink: CudaSlice<u32> = gpu.stream.alloc_zeros(1).drv("alloc")?;
    let read = |i: usize, sink: &mut CudaSlice<u32>| {
        let (a, b) = &bufs[i % copies];
        ops::decode_read_ceiling(gpu, a, b, sink)
    };
    let ms = time_ms(gpu, 3, 20, W4_BATCH, |i| read(i, &mut sink))?;
    let mut flush = flush_buffer(gpu)?;
    let msf = time_ms_flushed(gpu, &mut flush, 3, 50, |i| read(i, &mut sink))?;
    let total = 4 * half;
    let mut timed = vec![
        (
            "ceiling: read the W4A16 bytes (16-byte loads)".to_string(),
            ms,
        ),
        ("ceiling: read the W4A16 bytes, flushed".to_string(), msf),
    ];
    // The same bytes as one buffer per copy, read by the floor kernels of
    // kernels/w4a16.cu: one round of loads per thread (normal / evict_first
    // L2 policy, the latter as the W4A16 kernels' weight copies) and bulk
    // copies (sm_90+).
    let ones: Vec<CudaSlice<u8>> = (0..copies)
        .map(|_| gpu.stream.alloc_zeros(total).drv("alloc"))
        .collect::<Result<_>>()?;
    let mut hows = vec![
        (
            "one-round loads",
            ops::ReadFloor::Loads(ops::WeightL2::Normal),
        ),
        (
            "one-round loads, evict_first",
            ops::ReadFloor::Loads(ops::WeightL2::EvictFirst),
        ),
    ];
    if gpu.arch.major >= 9 {
        hows.push((
            "bulk copies 32 KB x1 CTA/SM, evict_first",
            ops::ReadFloor::Bulk {
                chunk: 32 << 10,
                ctas_per_sm: 1,
            },
        ));
        hows.push((
            "bulk copies 16 KB x2 CTA/SM, evict_first",
            ops::ReadFloor::Bulk {
                chunk: 16 << 10,
                ctas_per_sm: 2,
            },
        ));
    }
    for (what, how) in hows {
        let read = |i: usize, sink: &mut CudaSlice<u32>| {
            ops::w4a16_read_floor(gpu, &ones[i % copies], how, sink)
        };
        let ms = time_ms(gpu, 3, 20, W4_BATCH, |i| read(i, &mut sink))?;
        let msf = time_ms_flushed(gpu, &mut flush, 3, 50, |i| read(i, &mut sink))?;
        timed.push((format!("ceiling: read the W4A16 bytes ({what})"), ms));
        timed.push((
            format!("ceiling: read the W4A16 bytes ({what}), flushed"),
            msf,
        ));
    }
    for (label, ms) in timed {
        let gbs = total as f64 / ms / 1e6;
        rows.push(BenchRow::gbs(
            label,
            format!("{total} bytes"),
            ms,
            gbs,
            c.copy_gbs,
        ));
    }
    Ok(())
}

/// Registers and local memory (spills) per thread of the W4A16 tensor-core
/// kernels, one line each (the NVRTC log carries no ptxas report).
pub fn w4a16_resources(gpu: &Gpu) -> Result<String> {
    let mut names = vec!["gptq_mma_bf16_mt1_w4_u4_p0".to_string()];
    for &(w, r) in RingPlan::variants(32) {
        for mr in [8, 16] {
            names.push(format!("gptq_ring_bf16_w{w}_r{r}_m{mr}"));
        }
    }
    for &(w, r) in RingPlan::variants(64) {
        names.push(format!("gptq_wide_bf16_w{w}_r{r}"));
    }
    for nt in [1, 2] {
        for x in [SwapX::Staged, SwapX::Ring] {
            for &(w, r, ks) in SwapPlan::variants(nt, x) {
                let p = SwapPlan {
                    warps: w,
                    slots: r,
                    ksteps: ks,
                    ctas: 0,
                    ctas_per_sm: 1,
                    launch: SwapLaunch::Plain,
                    x,
                    l2: WeightL2::Normal,
                };
                names.push(p.kernel_name("bf16", 8 * nt));
            }
        }
    }
    for nt in [1, 2] {
        for &(w, r, ks, cols) in ClusterPlan::variants(nt) {
            let p = ClusterPlan {
                warps: w,
                slots: r,
                ksteps: ks,
                cols,
                size: 4,
                clusters: 0,
                launch: SwapLaunch::Plain,
                l2: WeightL2::Normal,
            };
            names.push(p.kernel_name("bf16", 8 * nt));
        }
    }
    let mut s = String::new();
    for name in names {
        let f = gpu.function(crate::Module::W4a16, &name, 0)?;
        s += &format!(
            "{name}: {} registers, {} bytes local per thread\n",
            f.num_regs().drv("num_regs")?,
            f.local_size_bytes().drv("local size")?
        );
    }
    Ok(s)
}

/// Run the benchmarks; `only` (prefill | prefill:LABELS | decode |
/// decode:LABELS | decode-rule[:HQ/HKV/D/BS] | w4a16 | w4a16:M) runs one family (w4a16:M: only M rows;
/// prefill:v2,v3 or decode:v5,v4: only kernels whose labels start so) without
/// the ceilings (for profiling one kernel under ncu), except decode, which
/// measures the copy ceiling its goal is stated against.
pub fn run_all(
    gpu: &Gpu,
    seed: u64,
    only: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<Vec<BenchRow>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blas = CudaBlas::new(gpu.stream.clone()).map_err(|e| cublas_err("create handle", e))?;
    let mut rows = Vec::new();
    let (family, sub) = match only.map(|o| o.split_once(':').unwrap_or((o, ""))) {
        Some((f, m)) => (Some(f), Some(m).filter(|m| !m.is_empty())),
        None => (None, None),
    };
    let c = if only.is_none() {
        progress("ceilings");
        ceilings(gpu, &blas, &mut rng, &mut rows)?
    } else if matches!(family, Some("decode" | "decode-rule")) {
        // decode's goal is a fraction of the copy bandwidth: measure it here too
        progress("ceiling: copy");
        Ceilings {
            copy_gbs: copy_ceiling(gpu, &mut rows)?,
            gemm_tflops: f64::NAN,
        }
    } else {
        Ceilings {
            copy_gbs: f64::NAN,
            gemm_tflops: f64::NAN,
        }
    };
    let w4_m = sub.and_then(|m| m.parse::<usize>().ok());
    let want = |k: &str| family.is_none_or(|o| o == k);
    if want("prefill") {
        progress("prefill");
        bench_prefill(gpu, &mut rng, &c, sub, &mut rows)
            .unwrap_or_else(|e| eprintln!("bench prefill failed: {e}"));
    }
    if want("decode") {
        progress("paged_decode");
        bench_decode(gpu, &mut rng, &c, sub, &mut rows)
            .unwrap_or_else(|e| eprintln!("bench decode failed: {e}"));
    }
    // the plan-rule sweep is long: only when asked for by name
    if family == Some("decode-rule") {
        progress("decode plan rule sweep");
        bench_decode_rule(gpu, &mut rng, &c, sub, &mut rows)
            .unwrap_or_else(|e| eprintln!("bench decode-rule failed: {e}"));
    }
    if want("w4a16") {
        progress("w4a16");
        bench_w4a16(gpu, &blas, &mut rng, &c, w4_m, &mut rows)
            .unwrap_or_else(|e| eprintln!("bench w4a16 failed: {e}"));
    }
    Ok(rows)
}

pub fn render(rows: &[BenchRow]) -> String {
    let mut s =
        String::from("| kernel | shape | ms | figure | of ceiling |\n|---|---|---|---|---|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {:.4} | {:.1} {} | {:.0}% |\n",
            r.kernel,
            r.shape,
            r.ms,
            r.value,
            r.unit,
            100.0 * r.of_ceiling
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{rule_summary, BenchRow};

    fn row(kernel: &str, shape: &str, ms: f64) -> BenchRow {
        BenchRow {
            kernel: kernel.into(),
            shape: shape.into(),
            ms,
            unit: "GB/s".into(),
            value: 1.0,
            of_ceiling: 1.0,
        }
    }

    /// The summary compares the rule's row with the fastest sweep row, and
    /// with the re-timed pair where there is one (not the sweep's figures).
    #[test]
    fn rule_summary_ratios() {
        let rows = vec![
            row("decode-rule part256 x4 v6 (rule)", "B1", 0.0110),
            row("decode-rule part128 x8 v6", "B1", 0.0100),
            row("decode-rule final rule part256 x4 v6", "B1", 0.0105),
            row("decode-rule final best part128 x8 v6", "B1", 0.0100),
            row("decode-rule part512 x1 v6 (rule)", "B2", 0.0200),
            row("decode-rule part256 x2 v6", "B2", 0.0210),
            row("paged_decode bf16 part4096 v6", "B64", 0.2),
        ];
        let s = rule_summary(&rows);
        assert!(s.contains("| B1 | part256 x4 v6 | 0.0110 | part128 x8 v6 | 0.0100 | 0.0105 | 0.0100 | 1.050 |"), "{s}");
        assert!(s.contains("| B2 | part512 x1 v6 | 0.0200 | part512 x1 v6 | 0.0200 | 0.0200 | 0.0200 | 1.000 |"), "{s}");
        assert!(!s.contains("B64"), "{s}");
        assert!(s.contains("worst rule / best (final): 1.050"), "{s}");
        assert!(rule_summary(&rows[6..]).is_empty());
    }
}
