//! Typed launch wrappers: one function per kernel, shapes checked before launch.
//!
//! Every wrapper takes device buffers the caller owns and enqueues on
//! `gpu.stream`; nothing synchronizes. Names of the `extern "C"` kernels are
//! built from the element type (`bf16` / `f16`) and the compile-time variant.

use cudarc::driver::{sys, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::f16;

use crate::error::DrvExt;
use crate::lowp::Elem;
use crate::{Arch, Error, Gpu, Module, Result};
use inferlab_reference::attention::Masking;

fn need(what: &str, ok: bool, reason: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(what, reason()))
    }
}

fn len_is<T>(what: &str, s: &CudaSlice<T>, want: usize) -> Result<()> {
    if s.len() < want {
        return Err(Error::shape(
            what,
            format!("at least {want} elements"),
            format!("{}", s.len()),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- prefill

/// Varlen prefill attention problem (see kernels/prefill.cu for layouts).
#[derive(Debug, Clone, Copy)]
pub struct Prefill {
    pub batch: usize,
    pub total_q: usize,
    pub total_k: usize,
    pub max_lq: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub masking: Masking,
    /// Which kernel (see kernels/prefill.cu).
    pub kernel: PrefillKernel,
}

/// The prefill (FlashAttention-2 forward) kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// v1 `flash_fwd`: one m16 tile per warp, `warps` 4 (any head_dim) or 8
    /// (head_dim 128) per CTA (query tile 16 x warps), 64-key tiles, Q in
    /// registers, padded shared memory. The slow twin of v2.
    V1 { warps: usize },
    /// v2 `flash2`: FlashAttention-2's sm80 plan, 128-row query tile, 4 warps
    /// of two m16 tiles each sharing every K/V fragment, `block_n`-key tiles
    /// (32 or 64 at head_dim 128, 64 at head_dim 64), Q in swizzled shared
    /// memory, 2 CTAs per SM.
    V2 { block_n: usize },
    /// v3 `flash3` (sm_90a only, head_dim 128): v2's algorithm on warpgroup
    /// MMA (wgmma), `warpgroups` (2, or 1 with block_n 64) warpgroups of 64
    /// rows, `block_n` (64 or 128)-key tiles. `overlap`: S of the next tile
    /// runs on the tensor cores during the softmax of this one
    /// (FlashAttention-3's intra-warpgroup pipelining).
    V3 {
        block_n: usize,
        overlap: bool,
        warpgroups: usize,
    },
    /// v4 `flash4` (sm_90a only, head_dim 128): FlashAttention-3's
    /// warp-specialized plan. A producer warpgroup loads Q and 128-key K/V
    /// tiles by TMA into a 2-slot ring guarded by mbarriers; two consumer
    /// warpgroups of 64 rows run v3's overlapped S / softmax / P V on them.
    /// `schedule`: whether the consumers take turns issuing their GEMMs
    /// (FA3's ping-pong); `grid`: one CTA per 128-row block, or one per SM.
    V4 { schedule: WgSchedule, grid: CtaGrid },
}

/// How v4's work items (query block, head, sequence) map to CTAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtaGrid {
    /// One CTA per item, heaviest (causal) first.
    PerItem,
    /// One CTA per SM walking the items (in the per-item grid's order, strided
    /// by the grid):
    /// the producer loads the next item's Q and K/V while the consumers
    /// finish and store this one.
    Persistent,
    /// As `Persistent`, but after its first item each CTA takes the next one
    /// from an atomic counter (in the same order), so CTAs that drew light
    /// causal items take more of them.
    Dynamic,
}

/// How v4's two consumer warpgroups share the tensor cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgSchedule {
    /// Each issues its GEMMs as soon as its data is there.
    Free,
    /// Ping-pong on named barriers: one's softmax runs under the other's GEMMs.
    PingPong,
}

impl PrefillKernel {
    /// The fastest kernel measured for `d` on `arch` (H200, B4 L4096 H32):
    /// on sm_90a at head_dim 128 v4 with ping-pong, one CTA per item
    /// (`bench/results/gpu-2026-12-01-s5-prefill.md`, gpu/NOTES.md item 15:
    /// causal 608-611 TFLOP/s in three calls, 1.13x-1.14x SDPA cuDNN; full
    /// 630-640, where v4 without ping-pong measured 0-5% faster, 642-667);
    /// elsewhere v2 with 32-key tiles (64 KB of shared memory, so 2 CTAs per
    /// SM on an A100 too; n64 is 3% faster on the H200 but needs 96 KB), and
    /// v2 n64 at head_dim 64 (gpu/NOTES.md item 12).
    pub fn default_for(d: usize, arch: Arch) -> PrefillKernel {
        if d != 128 {
            PrefillKernel::V2 { block_n: 64 }
        } else if arch != Arch::SM90A {
            PrefillKernel::V2 { block_n: 32 }
        } else {
            PrefillKernel::V4 {
                schedule: WgSchedule::PingPong,
                grid: CtaGrid::PerItem,
            }
        }
    }

    /// Every kernel that exists for `d` (64 or 128) on `arch`, slow twins first.
    pub fn all(d: usize, arch: Arch) -> Vec<PrefillKernel> {
        let v2 = |block_n| PrefillKernel::V2 { block_n };
        if d == 128 {
            let mut v = vec![
                PrefillKernel::V1 { warps: 4 },
                PrefillKernel::V1 { warps: 8 },
                v2(32),
                v2(64),
            ];
            if arch == Arch::SM90A {
                for (block_n, overlap, warpgroups) in [
                    (64, false, 2),
                    (128, false, 2),
                    (128, true, 2),
                    (64, false, 1),
                    (64, true, 1),
                ] {
                    v.push(PrefillKernel::V3 {
                        block_n,
                        overlap,
                        warpgroups,
                    });
                }
                for grid in [CtaGrid::PerItem, CtaGrid::Persistent, CtaGrid::Dynamic] {
                    for schedule in [WgSchedule::Free, WgSchedule::PingPong] {
                        v.push(PrefillKernel::V4 { schedule, grid });
                    }
                }
            }
            v
        } else {
            vec![PrefillKernel::V1 { warps: 4 }, v2(64)]
        }
    }

    /// Short name for tables: `w8`, `v2 n64`, `v3 n128 ovl`, `v3 n64 g1`, `v4 pp dyn`.
    pub fn label(&self) -> String {
        match *self {
            PrefillKernel::V1 { warps } => format!("w{warps}"),
            PrefillKernel::V2 { block_n } => format!("v2 n{block_n}"),
            PrefillKernel::V3 {
                block_n,
                overlap,
                warpgroups,
            } => format!(
                "v3 n{block_n}{}{}",
                if warpgroups == 1 { " g1" } else { "" },
                if overlap { " ovl" } else { "" }
            ),
            PrefillKernel::V4 { schedule, grid } => format!(
                "v4{}{}",
                if schedule == WgSchedule::PingPong {
                    " pp"
                } else {
                    ""
                },
                match grid {
                    CtaGrid::PerItem => "",
                    CtaGrid::Persistent => " pe",
                    CtaGrid::Dynamic => " dyn",
                }
            ),
        }
    }

    /// Query rows per CTA.
    fn block_m(&self) -> usize {
        match *self {
            PrefillKernel::V1 { warps } => 16 * warps,
            PrefillKernel::V2 { .. } => 128,
            PrefillKernel::V3 { warpgroups, .. } => 64 * warpgroups,
            PrefillKernel::V4 { .. } => 128,
        }
    }

    fn threads(&self) -> usize {
        match *self {
            PrefillKernel::V1 { warps } => 32 * warps,
            PrefillKernel::V2 { .. } => 128,
            PrefillKernel::V3 { warpgroups, .. } => 128 * warpgroups,
            // one producer and two consumer warpgroups
            PrefillKernel::V4 { .. } => 384,
        }
    }

    fn valid(&self, d: usize, arch: Arch) -> bool {
        match *self {
            PrefillKernel::V1 { warps } => warps == 4 || (warps == 8 && d == 128),
            PrefillKernel::V2 { block_n } => block_n == 64 || (block_n == 32 && d == 128),
            PrefillKernel::V3 {
                block_n,
                overlap,
                warpgroups,
            } => {
                d == 128
                    && arch == Arch::SM90A
                    && match warpgroups {
                        2 => block_n == 128 || (block_n == 64 && !overlap),
                        1 => block_n == 64,
                        _ => false,
                    }
            }
            PrefillKernel::V4 { .. } => d == 128 && arch == Arch::SM90A,
        }
    }

    fn name(&self, elem: &str, d: usize) -> String {
        match *self {
            PrefillKernel::V1 { warps } => format!(
                "flash_fwd_{elem}_d{d}{}",
                if warps == 8 { "_w8" } else { "" }
            ),
            PrefillKernel::V2 { block_n } => format!("flash2_{elem}_d{d}_n{block_n}"),
            PrefillKernel::V3 {
                block_n,
                overlap,
                warpgroups,
            } => format!(
                "flash3_{elem}_d{d}_n{block_n}{}{}",
                if overlap { "o" } else { "" },
                if warpgroups == 1 { "_g1" } else { "" }
            ),
            PrefillKernel::V4 { schedule, grid } => format!(
                "flash4_{elem}_d{d}_s2{}{}",
                if schedule == WgSchedule::PingPong {
                    "p"
                } else {
                    ""
                },
                match grid {
                    CtaGrid::PerItem => "",
                    CtaGrid::Persistent => "_pe",
                    CtaGrid::Dynamic => "_dyn",
                }
            ),
        }
    }
}

impl Prefill {
    pub fn smem_bytes(&self) -> usize {
        match self.kernel {
            // K and V, 2 stages of 64 padded rows
            PrefillKernel::V1 { .. } => 4 * 64 * (self.d + 8) * 2,
            // Q [128][d] + K and V, 2 stages of block_n rows, unpadded
            PrefillKernel::V2 { block_n } => (128 + 4 * block_n) * self.d * 2,
            // the same, plus 1 KiB to align the base to the 1024-byte swizzle atom
            PrefillKernel::V3 {
                block_n,
                warpgroups,
                ..
            } => (64 * warpgroups + 4 * block_n) * self.d * 2 + 1024,
            // Q [128][d], 2 K and 2 V slots of 128 keys, the 1 KiB alignment,
            // 2 + 4 x 2 + 4 mbarriers (8 bytes each) and 2 item slots (256 reserved)
            PrefillKernel::V4 { .. } => (128 + 4 * 128) * self.d * 2 + 1024 + 256,
        }
    }
    /// FLOPs counted the usual way (4 * Lq * Lk * D per head, halved by causality).
    pub fn flops(lq: usize, lk: usize, hq: usize, d: usize, masking: Masking) -> f64 {
        let f = 4.0 * lq as f64 * lk as f64 * hq as f64 * d as f64;
        if masking == Masking::Causal {
            f / 2.0
        } else {
            f
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn prefill<T: Elem>(
    gpu: &Gpu,
    p: &Prefill,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    cu_q: &CudaSlice<i32>,
    cu_k: &CudaSlice<i32>,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    need("head_dim", p.d == 64 || p.d == 128, || {
        format!("{} (64 or 128)", p.d)
    })?;
    need("heads", p.hkv > 0 && p.hq % p.hkv == 0, || {
        format!("{} over {}", p.hq, p.hkv)
    })?;
    need("kernel", p.kernel.valid(p.d, gpu.arch), || {
        format!(
            "{:?} does not exist for head_dim {} on {}",
            p.kernel, p.d, gpu.arch
        )
    })?;
    len_is("q", q, p.total_q * p.hq * p.d)?;
    len_is("k", k, p.total_k * p.hkv * p.d)?;
    len_is("v", v, p.total_k * p.hkv * p.d)?;
    len_is("out", out, p.total_q * p.hq * p.d)?;
    len_is("lse", lse, p.total_q * p.hq)?;
    len_is("cu_q", cu_q, p.batch + 1)?;
    len_is("cu_k", cu_k, p.batch + 1)?;
    let name = p.kernel.name(T::NAME, p.d);
    let smem = p.smem_bytes();
    let f = gpu.function(Module::Prefill, &name, smem)?;
    let bm = p.kernel.block_m();
    let cfg = LaunchConfig {
        grid_dim: (
            p.max_lq.div_ceil(bm).max(1) as u32,
            p.hq as u32,
            p.batch as u32,
        ),
        block_dim: (p.kernel.threads() as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let scale_log2 = std::f32::consts::LOG2_E / (p.d as f32).sqrt();
    let (hq, hkv) = (p.hq as i32, p.hkv as i32);
    let causal = (p.masking == Masking::Causal) as i32;
    if let PrefillKernel::V4 { grid, .. } = p.kernel {
        let nmb = p.max_lq.div_ceil(bm).max(1);
        let items = nmb * p.hq * p.batch;
        let grid_dim = match grid {
            CtaGrid::PerItem => cfg.grid_dim,
            CtaGrid::Persistent | CtaGrid::Dynamic => {
                (items.min(gpu.sm_count as usize) as u32, 1, 1)
            }
        };
        let (nmb, nbatch) = (nmb as i32, p.batch as i32);
        // two zeroed counters (item dispenser, finished CTAs) that the dynamic
        // kernel leaves zero again; the other grids ignore them
        return gpu.with_scratch(0, 2, |_, ctr| {
            let st = &gpu.stream;
            let (qp, _gq) = q.device_ptr(st);
            let (kp, _gk) = k.device_ptr(st);
            let (vp, _gv) = v.device_ptr(st);
            let (cqp, _gcq) = cu_q.device_ptr(st);
            let (ckp, _gck) = cu_k.device_ptr(st);
            let (op, _go) = out.device_ptr_mut(st);
            let (lp, _gl) = lse.device_ptr_mut(st);
            let (cp, _gc) = ctr.device_ptr_mut(st);
            let tq = tensor_map::<T>(qp, p.hq * p.d, p.total_q, bm, "q")?;
            let tk = tensor_map::<T>(kp, p.hkv * p.d, p.total_k, 128, "k")?;
            let tv = tensor_map::<T>(vp, p.hkv * p.d, p.total_k, 128, "v")?;
            let mut params: [*mut std::ffi::c_void; 14] = [
                &tq as *const _ as *mut _,
                &tk as *const _ as *mut _,
                &tv as *const _ as *mut _,
                &op as *const _ as *mut _,
                &lp as *const _ as *mut _,
                &cqp as *const _ as *mut _,
                &ckp as *const _ as *mut _,
                &hq as *const _ as *mut _,
                &hkv as *const _ as *mut _,
                &scale_log2 as *const _ as *mut _,
                &causal as *const _ as *mut _,
                &nmb as *const _ as *mut _,
                &nbatch as *const _ as *mut _,
                &cp as *const _ as *mut _,
            ];
            // SAFETY: `params` points at one value per kernel parameter in the
            // kernel's order and types (three 128-byte tensor maps, device
            // pointers as CUdeviceptr, i32 / f32 scalars), alive until the call
            // returns; buffer sizes checked above, the tensor maps cover exactly
            // q, k and v, and the scratch holds the 2 counters.
            unsafe {
                sys::cuLaunchKernel(
                    f.cu_function(),
                    grid_dim.0,
                    grid_dim.1,
                    grid_dim.2,
                    cfg.block_dim.0,
                    1,
                    1,
                    cfg.shared_mem_bytes,
                    st.cu_stream(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .drv(&name)
        });
    }
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(q).arg(k).arg(v).arg(out).arg(lse).arg(cu_q).arg(cu_k);
    b.arg(&hq).arg(&hkv).arg(&scale_log2).arg(&causal);
    // SAFETY: argument list matches the kernel signature; sizes checked above.
    unsafe { b.launch(cfg) }.drv(&name)?;
    Ok(())
}

/// A TMA descriptor of a row-major [rows][cols] bf16/f16 matrix (2-D, rows =
/// tokens, cols = heads x head_dim), read in boxes of 64 columns (128 bytes)
/// x `box_rows` rows with the 128-byte swizzle (v4's shared layout); boxes
/// past the last row read as zero.
fn tensor_map<T: Elem>(
    base: sys::CUdeviceptr,
    cols: usize,
    rows: usize,
    box_rows: usize,
    what: &str,
) -> Result<sys::CUtensorMap> {
    use sys::*;
    let dtype = if T::NAME == "bf16" {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    } else {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    };
    let dims: [u64; 2] = [cols as u64, rows.max(1) as u64];
    let strides: [u64; 1] = [(cols * 2) as u64];
    let boxd: [u32; 2] = [64, box_rows as u32];
    let estr: [u32; 2] = [1, 1];
    // SAFETY: a zeroed CUtensorMap is plain bytes the call overwrites.
    let mut m: CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: all arrays hold `rank` (strides rank - 1) entries and outlive the
    // call, which only encodes the descriptor on the host.
    unsafe {
        cuTensorMapEncodeTiled(
            &mut m,
            dtype,
            2,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .drv(&format!("tensor map of {what}"))?;
    Ok(m)
}

// ---------------------------------------------------------------- decode

/// Paged decode problem (see kernels/decode.cu).
#[derive(Debug, Clone, Copy)]
pub struct Decode {
    /// The shape (batch, heads, head dim, cache and table sizes).
    pub dims: DecodeDims,
    /// Tokens per split-KV partition (a multiple of 32; v1..v4).
    pub partition: usize,
    /// Which partition kernel (see kernels/decode.cu).
    pub kernel: DecodeKernel,
}

/// Where the v2 decode kernel keeps the (scaled) query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QPlace {
    Registers,
    Shared,
}

/// Stream ordering of the v4 / v5 decode launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeLaunch {
    /// Ordinary launches: each starts when the previous kernel has finished.
    Plain,
    /// Programmatic dependent launches (sm_90+; plain elsewhere): the kernel
    /// may be scheduled while the previous one in the stream still runs and
    /// waits (`griddepcontrol.wait`, first thing) until it has completed, so
    /// only the launch latency is hidden; nothing is read early.
    Dependent,
}

/// How a v6 CTA reads its partition's block-table row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableLoad {
    /// After the sequence length (only the blocks the partition holds), as v4.
    AfterLength,
    /// Together with the length (the partition's whole row slice): one
    /// dependent global round trip less at CTA start-up.
    Eager,
}

/// The L2 cache policy of v6's K/V copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvHint {
    /// No hint, as v4.
    Plain,
    /// `createpolicy ... L2::evict_first` on every K/V cp.async (read once).
    EvictFirst,
}

/// The order of v6's grid (which CTAs the block scheduler dispatches together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridOrder {
    /// (partitions, KV heads, sequences), as v4.
    PartitionsFirst,
    /// (KV heads, partitions, sequences): the KV-head CTAs that share every
    /// token row of the cache are dispatched side by side.
    HeadsFirst,
}

/// Where v6 and v7 merge the partitions of a (sequence, KV head or head group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMerge {
    /// The separate `decode_merge` kernel over the workspace, as v4.
    Kernel,
    /// In the kernel: the partitions are one thread block cluster (sm_90+, at
    /// most 8 partitions) and merge through distributed shared memory.
    Cluster,
    /// In the kernel: the partition CTA that arrives last (an arrival counter
    /// per pair, reset by it) merges the workspace's partials.
    LastCta,
    /// With one partition (`nparts() == 1`) the partition kernel writes out
    /// and lse and no merge kernel runs; with more, as `Kernel`.
    Direct,
}

impl DecodeMerge {
    /// The merge's bits of a kernel's `OPT` (kernels/decode.cu `DEC_CLUSTER`,
    /// `DEC_LAST`, `DEC_DIRECT`; v6 and v7).
    fn bits(self) -> usize {
        match self {
            DecodeMerge::Kernel => 0,
            DecodeMerge::Cluster => 8,
            DecodeMerge::LastCta => 16,
            DecodeMerge::Direct => 32,
        }
    }
    /// Whether the partition kernel leaves out/lse final with `nparts`
    /// partitions (else the merge kernel runs after it).
    fn merges_in_kernel(self, nparts: i32) -> bool {
        match self {
            DecodeMerge::Kernel => false,
            DecodeMerge::Cluster | DecodeMerge::LastCta => true,
            DecodeMerge::Direct => nparts == 1,
        }
    }
    /// The merge's part of a kernel label (v6, v7): empty for the merge kernel.
    fn label(self) -> &'static str {
        match self {
            DecodeMerge::Kernel => "",
            DecodeMerge::Cluster => " cluster",
            DecodeMerge::LastCta => " last",
            DecodeMerge::Direct => " direct",
        }
    }
}

/// v6's options (`OPT` bits of `paged_decode_v4` in kernels/decode.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Opts {
    pub table: TableLoad,
    pub hint: KvHint,
    pub order: GridOrder,
    pub merge: DecodeMerge,
}

impl V6Opts {
    /// The eager block table and direct output, every other option off (the
    /// default's options, and the only ones of the narrow v6 kernels).
    pub const EAGER_DIRECT: V6Opts = V6Opts {
        table: TableLoad::Eager,
        hint: KvHint::Plain,
        order: GridOrder::PartitionsFirst,
        merge: DecodeMerge::Direct,
    };
    /// v4's behaviour: every option off.
    pub const V4: V6Opts = V6Opts {
        table: TableLoad::AfterLength,
        hint: KvHint::Plain,
        order: GridOrder::PartitionsFirst,
        merge: DecodeMerge::Kernel,
    };

    /// The kernel's `OPT` value (the `_o..` suffix of its name).
    pub fn bits(&self) -> usize {
        let mut o = 0;
        if self.table == TableLoad::Eager {
            o |= 1;
        }
        if self.hint == KvHint::EvictFirst {
            o |= 2;
        }
        if self.order == GridOrder::HeadsFirst {
            o |= 4;
        }
        o | self.merge.bits()
    }

    /// Every combination (32), in `bits` order.
    pub fn all() -> Vec<V6Opts> {
        let mut v = Vec::new();
        for merge in [
            DecodeMerge::Kernel,
            DecodeMerge::Cluster,
            DecodeMerge::LastCta,
            DecodeMerge::Direct,
        ] {
            for order in [GridOrder::PartitionsFirst, GridOrder::HeadsFirst] {
                for hint in [KvHint::Plain, KvHint::EvictFirst] {
                    for table in [TableLoad::AfterLength, TableLoad::Eager] {
                        v.push(V6Opts {
                            table,
                            hint,
                            order,
                            merge,
                        });
                    }
                }
            }
        }
        v
    }
}

/// The partition kernel of paged decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// v1: K/V loaded into registers, `unroll` 4 tokens per slot in flight.
    /// `min_blocks` = CTAs per SM the registers are capped for: 4, or 6 / 8
    /// for head_dim 128 with groups of at most 4.
    V1 { min_blocks: usize },
    /// v2: K/V staged by cp.async in shared memory, `stages` stages of
    /// `unroll` tokens per slot: (2, 4) or (4, 3).
    V2 {
        unroll: usize,
        stages: usize,
        q: QPlace,
    },
    /// v3: tensor cores (mma.sync), 64-token tiles staged by cp.async in
    /// `stages` (2 or 3) stages.
    V3 { stages: usize },
    /// v4: v3's tensor-core body, CTAs of `warps` (1, 2 or 4) warps, stages of
    /// 16 tokens per warp, `stages` (2..4) deep; swizzled unpadded tiles.
    /// `launch` applies to the partition kernel and the merge kernel.
    V4 {
        warps: usize,
        stages: usize,
        launch: DecodeLaunch,
    },
    /// v5: v4's pipeline in a persistent grid: per KV head, the line of all
    /// (sequence, tile) work split evenly over `ctas` / hkv CTAs (`ctas` 0: one
    /// wave, as many as fit on every SM; else at least hkv); pieces of a split
    /// (sequence, KV head) are merged by the last of its CTAs, so there is no
    /// merge kernel and `partition` is unused.
    V5 {
        warps: usize,
        stages: usize,
        ctas: usize,
        launch: DecodeLaunch,
    },
    /// v6: v4 w4 s2 with the options of [`V6Opts`] (gpu/NOTES.md item 18);
    /// partitions of up to 256 blocks. `ctas_per_sm` 0: as many CTAs per SM
    /// as fit (3 at d128 unless registers say 2); else the launch asks for
    /// enough dynamic shared memory that at most that many fit (it picks the
    /// number of waves: 2 per SM at partition 2048 = 3.9 waves of 264).
    /// `warps` 4 (every option), or 2 with the eager table and direct output
    /// only ([`DecodeKernel::V6_NARROW_PLANS`], gpu/NOTES.md item 25).
    V6 {
        opts: V6Opts,
        /// Warps per CTA (16 tokens each per stage): 4 or 2.
        warps: usize,
        /// 2, or 3 (96 KB: 2 CTAs per SM) for the kernel and last-CTA merges
        /// in partitions-first order.
        stages: usize,
        ctas_per_sm: usize,
        launch: DecodeLaunch,
    },
    /// v7 (gpu/NOTES.md item 26): one CTA per (partition, group of `heads`
    /// KV heads, sequence), one warp per KV head, copying each 16-token stage
    /// of the group's heads whole (at `heads` 8 = Hkv 8, d128, block size 16:
    /// a whole 32 KB block of K and of V) instead of a head's 256-byte pieces
    /// at a 2 KB stride; eager block table. `merge`: `Direct` (one partition:
    /// out/lse by the kernel, else the merge kernel), `Cluster` (sm_90+, at
    /// most 8 partitions), `LastCta` or `Kernel`.
    V7 {
        /// KV heads per CTA (= warps): a divisor of Hkv, at most 8; 0: the
        /// largest such ([`v7_heads_per_cta`]).
        heads: usize,
        /// 2, 3 or 4 (kernel merge and direct output only) stages of 16
        /// tokens (at 8 heads, d128: 64 KB each; at 4 heads 32 KB).
        stages: usize,
        merge: DecodeMerge,
        /// 0: as many CTAs per SM as fit; else the launch pads dynamic shared
        /// memory so that at most that many fit (as v6's): with 1, the CTAs of
        /// a programmatic dependent launch cannot double up on the SMs the
        /// previous launch still holds.
        ctas_per_sm: usize,
        launch: DecodeLaunch,
    },
}

/// v7's default KV heads per CTA (= warps per CTA): the largest divisor of
/// `hkv` up to 8, so that the CTAs of a (sequence, partition) split the
/// heads evenly.
pub fn v7_heads_per_cta(hkv: usize) -> usize {
    (1..=8.min(hkv.max(1)))
        .rev()
        .find(|h| hkv % h == 0)
        .unwrap_or(1)
}

/// v7's heads per CTA for a plan's `heads` (0: [`v7_heads_per_cta`]).
fn v7_heads(heads: usize, hkv: usize) -> usize {
    if heads == 0 {
        v7_heads_per_cta(hkv)
    } else {
        heads
    }
}

/// v7's dynamic shared memory (bytes) at `heads` per CTA (0: the default):
/// `stages` stages of 16 token rows of K and of V, each row the CTA's heads
/// side by side.
pub fn v7_smem(dims: &DecodeDims, heads: usize, stages: usize) -> usize {
    stages * 2 * 16 * v7_heads(heads, dims.hkv) * dims.d * 2
}

impl DecodeKernel {
    /// The default: the fastest measured (gpu/NOTES.md item 18,
    /// `bench/results/gpu-2026-12-01-s6-decode.md`): v6 with one partition per
    /// sequence (partition = max_len: 4096 at B64 ctx4096), the partition
    /// kernel writing out/lse itself (no merge kernel), 2 CTAs per SM (512
    /// CTAs = 1.9 waves of 264), eager block table. With one partition it
    /// needs batch x hkv >= ~1.2 x SMs, else split (then it launches the
    /// merge kernel): [`DecodeDims::plan`] picks the partition, and
    /// [`DecodeKernel::V7_DEFAULT`] instead where that is one wave of one CTA
    /// per SM (B64 GQA 32/8 on 132 SMs; gpu/NOTES.md item 26).
    pub const DEFAULT: DecodeKernel = DecodeKernel::V6 {
        opts: V6Opts::EAGER_DIRECT,
        warps: 4,
        stages: 2,
        ctas_per_sm: 2,
        launch: DecodeLaunch::Dependent,
    };
    /// The plan rule's kernel where one partition per sequence at 4 KV heads
    /// per CTA is one wave of one CTA per SM (B64 GQA 32/8 on 132 SMs: 128
    /// CTAs; [`DecodeDims::plan`]): v7 with 4 heads per CTA, 3 stages (96 KB
    /// at d128), padded to one CTA per SM, direct output, dependent launch
    /// (gpu/NOTES.md item 26: flushed 0.2492-0.2499 ms vs v6's 0.2523-0.2527
    /// in two calls; without the padding a dependent launch doubles CTAs up
    /// on some SMs and back to back it is 7 % slower).
    pub const V7_DEFAULT: DecodeKernel = DecodeKernel::V7 {
        heads: 4,
        stages: 3,
        merge: DecodeMerge::Direct,
        ctas_per_sm: 1,
        launch: DecodeLaunch::Dependent,
    };
    /// The previous default (items 11 and 16), at partition 1024 at B64
    /// ctx4096; benched as `v4 mma w4 s2 pdl`.
    pub const V4_DEFAULT: DecodeKernel = DecodeKernel::V4 {
        warps: 4,
        stages: 2,
        launch: DecodeLaunch::Dependent,
    };
    /// v6 with `opts`, `stages` and `ctas_per_sm` (0: as many as fit),
    /// launched as a programmatic dependent: how every v6 plan is swept.
    pub fn v6(opts: V6Opts, stages: usize, ctas_per_sm: usize) -> DecodeKernel {
        DecodeKernel::V6 {
            opts,
            warps: 4,
            stages,
            ctas_per_sm,
            launch: DecodeLaunch::Dependent,
        }
    }

    /// This kernel with its K/V copies under `hint` (v6; the others have no
    /// such option and are unchanged).
    pub fn with_hint(self, hint: KvHint) -> DecodeKernel {
        match self {
            DecodeKernel::V6 {
                opts,
                warps,
                stages,
                ctas_per_sm,
                launch,
            } => DecodeKernel::V6 {
                opts: V6Opts { hint, ..opts },
                warps,
                stages,
                ctas_per_sm,
                launch,
            },
            k => k,
        }
    }
    /// v6 with CTAs of `warps` (2) warps, eager table and direct output
    /// (the only options those kernels have), `stages` and `ctas_per_sm`,
    /// launched as a programmatic dependent.
    pub fn v6_narrow(warps: usize, stages: usize, ctas_per_sm: usize) -> DecodeKernel {
        DecodeKernel::V6 {
            opts: V6Opts::EAGER_DIRECT,
            warps,
            stages,
            ctas_per_sm,
            launch: DecodeLaunch::Dependent,
        }
    }
    /// v7 with `heads` per CTA (0: the default), `stages` and `merge`,
    /// launched as a programmatic dependent.
    pub fn v7(heads: usize, stages: usize, merge: DecodeMerge) -> DecodeKernel {
        DecodeKernel::V7 {
            heads,
            stages,
            merge,
            ctas_per_sm: 0,
            launch: DecodeLaunch::Dependent,
        }
    }
    /// The v7 merges that exist as kernels.
    pub const V7_MERGES: [DecodeMerge; 4] = [
        DecodeMerge::Direct,
        DecodeMerge::Cluster,
        DecodeMerge::LastCta,
        DecodeMerge::Kernel,
    ];
    /// The v6 plans (warps per CTA, stages) of fewer than 4 warps that exist
    /// as kernels (eager table, direct output only).
    pub const V6_NARROW_PLANS: [(usize, usize); 2] = [(2, 2), (2, 3)];
    /// The v4 plans (warps per CTA, stages) that exist as kernels.
    pub const V4_PLANS: [(usize, usize); 6] = [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (4, 2)];
    /// The v5 plans (warps per CTA, stages) that exist as kernels.
    pub const V5_PLANS: [(usize, usize); 4] = [(1, 4), (2, 2), (2, 3), (4, 2)];

    /// Every v2, v3 and plainly launched v4 plan at `partition`, in the order
    /// `gpu check` and `gpu bench` list them.
    pub fn split_plans(partition: usize) -> Vec<(usize, DecodeKernel)> {
        let mut kernels = Vec::new();
        for (unroll, stages) in [(2usize, 4usize), (4, 3)] {
            for q in [QPlace::Registers, QPlace::Shared] {
                kernels.push((partition, DecodeKernel::V2 { unroll, stages, q }));
            }
        }
        for stages in [2usize, 3] {
            kernels.push((partition, DecodeKernel::V3 { stages }));
        }
        for (warps, stages) in Self::V4_PLANS {
            kernels.push((
                partition,
                DecodeKernel::V4 {
                    warps,
                    stages,
                    launch: DecodeLaunch::Plain,
                },
            ));
        }
        kernels
    }

    /// Short name for tables: `b4`, `v2 u2 s4 qreg`, `v5 flat w4 s2 pdl`.
    pub fn label(&self) -> String {
        let pdl = |l: DecodeLaunch| {
            if l == DecodeLaunch::Dependent {
                " pdl"
            } else {
                ""
            }
        };
        match *self {
            DecodeKernel::V1 { min_blocks } => format!("b{min_blocks}"),
            DecodeKernel::V2 { unroll, stages, q } => format!(
                "v2 u{unroll} s{stages} {}",
                if q == QPlace::Shared { "qsmem" } else { "qreg" }
            ),
            DecodeKernel::V3 { stages } => format!("v3 mma s{stages}"),
            DecodeKernel::V4 {
                warps,
                stages,
                launch,
            } => format!("v4 mma w{warps} s{stages}{}", pdl(launch)),
            DecodeKernel::V5 {
                warps,
                stages,
                ctas,
                launch,
            } => {
                let c = if ctas > 0 {
                    format!(" c{ctas}")
                } else {
                    String::new()
                };
                format!("v5 flat w{warps} s{stages}{c}{}", pdl(launch))
            }
            DecodeKernel::V6 {
                opts,
                warps,
                stages,
                ctas_per_sm,
                launch,
            } => {
                let mut l = format!("v6 w{warps} s{stages}");
                if ctas_per_sm > 0 {
                    l += &format!(" occ{ctas_per_sm}");
                }
                if opts.table == TableLoad::Eager {
                    l += " eager";
                }
                if opts.hint == KvHint::EvictFirst {
                    l += " evict";
                }
                if opts.order == GridOrder::HeadsFirst {
                    l += " heads";
                }
                l += opts.merge.label();
                format!("{l}{}", pdl(launch))
            }
            DecodeKernel::V7 {
                heads,
                stages,
                merge,
                ctas_per_sm,
                launch,
            } => {
                let mut h = if heads > 0 {
                    format!(" h{heads}")
                } else {
                    String::new()
                };
                if ctas_per_sm > 0 {
                    h += &format!(" s{stages} occ{ctas_per_sm}");
                } else {
                    h += &format!(" s{stages}");
                }
                format!("v7{h}{}{}", merge.label(), pdl(launch))
            }
        }
    }
}

/// The shape of a paged decode launch ([`Decode::dims`]; a [`Decode`] is
/// this plus the plan: partition and kernel). [`DecodeDims::auto`] adds the
/// plan by the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeDims {
    pub batch: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_blocks: usize,
    pub max_len: usize,
}

/// The plan rule's constants (see [`DecodeDims::plan`]; fitted to the sweep
/// in `bench/results/gpu-2026-12-01-s7-decode-rule.md`).
mod plan_rule {
    /// CTAs that stream at the full rate together, per 10 SMs: a little more
    /// than one per SM (the sweep fits 11..13; the default kernel fits 2 per
    /// SM, but one CTA per SM already draws most of that SM's bandwidth).
    pub const STREAMS_PER_10_SMS: usize = 12;
    /// What one more partition costs, in tokens of partition length: the
    /// merge kernel walks a (sequence, head)'s partials one after the other
    /// (the sweep fits 16..28).
    pub const MERGE_TOKENS: usize = 20;
    /// Shortest partition considered (tokens): one 64-token tile per CTA.
    pub const MIN_PARTITION: usize = 64;
    /// Block ids a v6 CTA stages: its longest partition in blocks.
    pub const MAX_PARTITION_BLOCKS: usize = 256;
}

impl DecodeDims {
    /// This shape with an explicit plan.
    pub fn with_plan(self, partition: usize, kernel: DecodeKernel) -> Decode {
        Decode {
            dims: self,
            partition,
            kernel,
        }
    }

    /// This shape with the plan of [`DecodeDims::plan`] for a device of
    /// `sm_count` SMs (`Gpu::sm_count`).
    pub fn auto(self, sm_count: usize) -> Decode {
        let (partition, kernel) = self.plan(sm_count);
        self.with_plan(partition, kernel)
    }

    /// The plan rule: (partition, kernel) for this shape on `sm_count` SMs.
    ///
    /// The kernel is [`DecodeKernel::V7_DEFAULT`] where the split is one
    /// partition per sequence, the head dim is 128, queries are grouped (Hq >
    /// Hkv), Hkv is a multiple of 4 and batch x Hkv / 4 CTAs
    /// fill between 3/4 of the SMs and all of them (one wave of one CTA per
    /// SM: measured at B64 GQA 32/8 d128 on 132 SMs only, item 26); every
    /// other shape (Hkv not a multiple of 4, a split, more or fewer CTAs than
    /// one such wave) falls back to [`DecodeKernel::DEFAULT`] (v6, eager block table,
    /// 2 CTAs per SM, dependent launch): with one partition per sequence it
    /// writes out/lse itself (no merge kernel), with more it launches the merge
    /// kernel (at the best split it was within 1.5 % of every other kernel
    /// of the sweep: v4's body at 3 CTAs per SM wins by 1.1-1.4 % only at
    /// B64-128 ctx16384), so the rule only chooses the split.
    ///
    /// The number of partitions n is the power of two (n = 1, 2, 4, ...; a
    /// partition of at most 256 blocks and at least 64 tokens) that minimizes
    /// a cost in tokens of partition length:
    ///
    /// `partition(n) x max(1, batch x hkv x n / S) + (n > 1) x 20 x n`,
    ///
    /// with S = 1.2 x `sm_count` CTAs: the grid streams at the full rate once
    /// it has about one CTA per SM, so a partition's length is the time of one
    /// such wave and more CTAs add waves (fractionally: the block scheduler
    /// refills SMs as CTAs finish); each partition beyond the first costs the
    /// merge ~20 tokens (it walks a head's partials in turn). Large batches
    /// (batch x hkv >= S) so get one partition per sequence (no merge);
    /// small ones split until about one wave, but a batch of 1-2 short
    /// sequences stops early (the merge term). Powers of two: no other split
    /// was faster beyond noise (the best of n = 3, 5, 6, 12, 22, 24 per
    /// shape: 0-17 % slower). The partition is max_len / n rounded up to 32
    /// and to the block size.
    ///
    /// Fitted to `gpu bench --only decode-rule` (H200, 132 SMs, B 1..128 x
    /// ctx 1024..16384, GQA 32/8 d128 bs16, 17 splits x 4 kernels): within
    /// 1.4 % of the best plan (re-timed head to head) at every shape, in two
    /// passes; unchanged, within 1.3 % for MHA 32/32 and 6.5 % for 64/8 d64
    /// bs32 (small kernels; `bench/results/gpu-2026-12-01-s7-decode-rule.md`).
    pub fn plan(&self, sm_count: usize) -> (usize, DecodeKernel) {
        use plan_rule::*;
        let bs = self.block_size.max(1);
        let gran = 32 * bs / gcd(32, bs); // a multiple of 32 and of bs
        let max_part = (MAX_PARTITION_BLOCKS * bs / gran * gran).max(gran);
        let len = self.max_len.max(1);
        let s10 = STREAMS_PER_10_SMS * sm_count.max(1); // 10 x S
        let pairs = (self.batch * self.hkv).max(1);
        // (cost x 10 S, partition): first n with the least cost
        let mut best: Option<(usize, usize)> = None;
        let mut n = 1usize;
        loop {
            let part = len.div_ceil(n).next_multiple_of(gran);
            if part <= max_part {
                let merge = if n > 1 { MERGE_TOKENS * n * s10 } else { 0 };
                let cost = part * s10.max(10 * pairs * n) + merge;
                if best.is_none_or(|(c, _)| cost < c) {
                    best = Some((cost, part));
                }
            }
            if part <= MIN_PARTITION.max(gran) {
                break;
            }
            n *= 2;
        }
        let partition = best.map_or(gran, |(_, p)| p);
        // v7 at 4 heads per CTA where it makes one wave of one CTA per SM;
        // else (outside what was measured) v6
        // (d128 with grouped queries only: MHA 32/32 d128 at B16 measured
        // 0.7-1.2 % slower than v6 and 64/8 d64 bs32 at B64 ctx4096 3.3 %
        // slower, back to back; 32/8 d128 B64 ties back to back and wins
        // 1.3 % flushed: `gpu-2026-12-02-s10-final.md`, call 9)
        if partition >= len && self.hkv % 4 == 0 && self.d == 128 && self.hq > self.hkv {
            let ctas = self.batch * self.hkv / 4;
            let sms = sm_count.max(1);
            if 4 * ctas >= 3 * sms && ctas <= sms {
                return (partition, DecodeKernel::V7_DEFAULT);
            }
        }
        (partition, DecodeKernel::DEFAULT)
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Decode {
    /// `dims` with the plan rule's choice for `sm_count` SMs
    /// ([`DecodeDims::plan`]).
    pub fn auto(dims: DecodeDims, sm_count: usize) -> Decode {
        dims.auto(sm_count)
    }
    pub fn nparts(&self) -> usize {
        self.dims.max_len.div_ceil(self.partition).max(1)
    }
    fn maxg(&self) -> usize {
        if self.dims.hq / self.dims.hkv <= 4 {
            4
        } else {
            8
        }
    }
    /// Workspace sizes (f32 elements): partial accumulators, partial (max, sum)
    /// for v1..v4 (`nparts` rows per query head), or for v5 launched on
    /// `ctas` CTAs (ctas + batch x hkv pieces of 8 rows).
    pub fn workspace(&self, ctas: usize) -> (usize, usize) {
        let rows = match self.kernel {
            DecodeKernel::V5 { .. } => (ctas + self.dims.batch * self.dims.hkv) * 8,
            _ => self.dims.batch * self.dims.hq * self.nparts(),
        };
        (rows * self.dims.d, rows * 2)
    }
}

/// Decode workspace buffers: partials, and v5's arrival counters (one per
/// (sequence, KV head), zero between launches: the kernel resets them).
pub struct DecodeWs {
    pub acc: CudaSlice<f32>,
    pub ml: CudaSlice<f32>,
    pub counters: CudaSlice<u32>,
}

impl DecodeWs {
    pub fn new(gpu: &Gpu, p: &Decode) -> Result<Self> {
        // v5: room for the larger grid of the two element types' kernels
        let ctas = match p.kernel {
            DecodeKernel::V5 { .. } => v5_grid::<half::bf16>(gpu, p)?
                .0
                .max(v5_grid::<f16>(gpu, p)?.0),
            _ => 0,
        };
        let (a, m) = p.workspace(ctas);
        Ok(DecodeWs {
            acc: gpu.stream.alloc_zeros(a).drv("decode workspace")?,
            ml: gpu.stream.alloc_zeros(m).drv("decode workspace")?,
            counters: gpu
                .stream
                .alloc_zeros((p.dims.batch * p.dims.hkv).max(1))
                .drv("decode counters")?,
        })
    }
}

/// v5's kernel name, dynamic shared memory and CTA count (the plan's `ctas`,
/// or one wave: CTAs per SM by the occupancy calculator x SMs). The element
/// type only names the kernel; both types have the same resources.
fn v5_grid<T: Elem>(gpu: &Gpu, p: &Decode) -> Result<(usize, String, usize)> {
    let DecodeKernel::V5 {
        warps,
        stages,
        ctas,
        ..
    } = p.kernel
    else {
        return Err(Error::invalid("decode v5", "not a v5 plan".to_string()));
    };
    need(
        "decode v5 warps/stages",
        DecodeKernel::V5_PLANS.contains(&(warps, stages)),
        || format!("warps {warps}, stages {stages} ((1, 4), (2, 2), (2, 3) or (4, 2))"),
    )?;
    need("decode v5 ctas", ctas == 0 || ctas >= p.dims.hkv, || {
        format!(
            "{ctas} (0 for one wave, or at least one per KV head: {})",
            p.dims.hkv
        )
    })?;
    let name = format!("paged_decode5_{}_d{}_w{warps}_s{stages}", T::NAME, p.dims.d);
    let smem = stages * (2 * 16 * warps + 8) * p.dims.d * 2;
    if ctas > 0 {
        return Ok((ctas, name, smem));
    }
    let f = gpu.function(Module::Decode, &name, smem)?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(32 * warps as u32, smem, None)
        .drv("decode v5 occupancy")?
        .max(1) as usize;
    Ok((per_sm * gpu.sm_count.max(1) as usize, name, smem))
}

/// Dynamic shared memory for a v6 / v7 launch that needs `need_smem` bytes:
/// with `ctas_per_sm` > 0, padded so that at most that many CTAs fit on an
/// SM (per SM: the opt-in block limit + 1 KiB; per CTA 1 KiB reserved and up
/// to 1.1 KiB static (256 block ids): k CTAs fit, k + 1 do not).
fn padded_smem(gpu: &Gpu, need_smem: usize, ctas_per_sm: usize) -> usize {
    if ctas_per_sm > 0 {
        ((gpu.smem_optin + 1024) / ctas_per_sm)
            .saturating_sub(3072)
            .max(need_smem)
            .min(gpu.smem_optin.saturating_sub(2048))
    } else {
        need_smem
    }
}

/// A cluster merge (v6, v7) runs on sm_90+ with one cluster of at most 8
/// CTAs per (sequence, head group): at most 8 partitions.
fn need_cluster_merge(gpu: &Gpu, p: &Decode, what: &str) -> Result<()> {
    need(what, gpu.arch.major >= 9 && p.nparts() <= 8, || {
        format!(
            "{} partitions on {} (needs sm_90+ and at most 8 partitions)",
            p.nparts(),
            gpu.arch.target()
        )
    })
}

/// One launch through cuLaunchKernelEx, as a programmatic dependent launch
/// when `launch` asks for it and the device is sm_90+, in thread block
/// clusters of `cluster` CTAs when given (the caller checks sm_90+).
#[allow(clippy::too_many_arguments)]
fn decode_launch(
    gpu: &Gpu,
    name: &str,
    smem: usize,
    grid: (u32, u32, u32),
    threads: u32,
    launch: DecodeLaunch,
    cluster: Option<(u32, u32, u32)>,
    params: &mut [*mut std::ffi::c_void],
) -> Result<()> {
    let f = gpu.function(Module::Decode, name, smem)?;
    let dependent = launch == DecodeLaunch::Dependent && gpu.arch.major >= 9;
    // SAFETY: a zeroed attribute is a valid C struct; the one field set in
    // each is the union member its attribute id names.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut n = 0usize;
    if dependent {
        attrs[n].id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[n].value.programmaticStreamSerializationAllowed = 1;
        n += 1;
    }
    if let Some((x, y, z)) = cluster {
        attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attrs[n].value.clusterDim.x = x;
        attrs[n].value.clusterDim.y = y;
        attrs[n].value.clusterDim.z = z;
        n += 1;
    }
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: gpu.stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: n as u32,
    };
    // SAFETY: the caller's `params` point at one value per kernel parameter,
    // in the kernel's order and types, alive until this call returns.
    unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .drv(name)
}

/// A kernel parameter for [`decode_launch`].
fn arg<V>(v: &V) -> *mut std::ffi::c_void {
    v as *const V as *mut std::ffi::c_void
}

/// Act-order's `perm` as a raw kernel parameter: its device pointer (0, which
/// the kernels read as "no permutation", when there is none) and the guard
/// that orders the stream while the launch uses it.
fn perm_ptr<'a>(
    perm: Option<&'a CudaSlice<i32>>,
    st: &'a cudarc::driver::CudaStream,
) -> (sys::CUdeviceptr, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match perm {
        Some(pp) => {
            let (ptr, g) = pp.device_ptr(st);
            (ptr, Some(g))
        }
        None => (0, None),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn paged_decode<T: Elem>(
    gpu: &Gpu,
    p: &Decode,
    q: &CudaSlice<T>,
    k_cache: &CudaSlice<T>,
    v_cache: &CudaSlice<T>,
    block_tables: &CudaSlice<i32>,
    ctx_lens: &CudaSlice<i32>,
    ws: &mut DecodeWs,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    need("head_dim", p.dims.d == 64 || p.dims.d == 128, || {
        format!("{} (64 or 128)", p.dims.d)
    })?;
    need(
        "heads",
        p.dims.hkv > 0 && p.dims.hq % p.dims.hkv == 0 && p.dims.hq / p.dims.hkv <= 8,
        || format!("{} over {} (group of at most 8)", p.dims.hq, p.dims.hkv),
    )?;
    need(
        "block_size",
        p.dims.block_size == 16 || p.dims.block_size == 32,
        || format!("{}", p.dims.block_size),
    )?;
    // v6 stages up to 128 block ids per partition, the others 64
    let max_ids = if matches!(p.kernel, DecodeKernel::V6 { .. } | DecodeKernel::V7 { .. }) {
        256
    } else {
        64
    };
    need(
        "partition",
        p.partition >= 32 && p.partition % 32 == 0 && p.partition / p.dims.block_size <= max_ids,
        || {
            format!(
                "{} (a multiple of 32, at most {max_ids} blocks of {})",
                p.partition, p.dims.block_size
            )
        },
    )?;
    need(
        "max_blocks",
        p.dims.max_blocks * p.dims.block_size >= p.dims.max_len,
        || {
            format!(
                "{} blocks of {} < max_len {}",
                p.dims.max_blocks, p.dims.block_size, p.dims.max_len
            )
        },
    )?;
    len_is("q", q, p.dims.batch * p.dims.hq * p.dims.d)?;
    let cache = p.dims.num_blocks * p.dims.block_size * p.dims.hkv * p.dims.d;
    len_is("k_cache", k_cache, cache)?;
    len_is("v_cache", v_cache, cache)?;
    len_is(
        "block_tables",
        block_tables,
        p.dims.batch * p.dims.max_blocks,
    )?;
    len_is("ctx_lens", ctx_lens, p.dims.batch)?;
    len_is("out", out, p.dims.batch * p.dims.hq * p.dims.d)?;
    len_is("lse", lse, p.dims.batch * p.dims.hq)?;
    let scale_log2 = std::f32::consts::LOG2_E / (p.dims.d as f32).sqrt();
    let (mb, bs, hq, hkv, part, batch) = (
        p.dims.max_blocks as i32,
        p.dims.block_size as i32,
        p.dims.hq as i32,
        p.dims.hkv as i32,
        p.partition as i32,
        p.dims.batch as i32,
    );
    let st = &gpu.stream;
    if let DecodeKernel::V5 { warps, launch, .. } = p.kernel {
        let (ctas, name, smem) = v5_grid::<T>(gpu, p)?;
        let (wa, wm) = p.workspace(ctas);
        len_is("workspace", &ws.acc, wa)?;
        len_is("workspace", &ws.ml, wm)?;
        len_is("decode counters", &ws.counters, p.dims.batch * p.dims.hkv)?;
        let (qp, _g0) = q.device_ptr(st);
        let (kp, _g1) = k_cache.device_ptr(st);
        let (vp, _g2) = v_cache.device_ptr(st);
        let (btp, _g3) = block_tables.device_ptr(st);
        let (lp, _g4) = ctx_lens.device_ptr(st);
        let (pa, _g5) = ws.acc.device_ptr_mut(st);
        let (pm, _g6) = ws.ml.device_ptr_mut(st);
        let (cp, _g7) = ws.counters.device_ptr_mut(st);
        let (op, _g8) = out.device_ptr_mut(st);
        let (sp, _g9) = lse.device_ptr_mut(st);
        let mut params = [
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&btp),
            arg(&lp),
            arg(&batch),
            arg(&mb),
            arg(&bs),
            arg(&hq),
            arg(&hkv),
            arg(&scale_log2),
            arg(&pa),
            arg(&pm),
            arg(&cp),
            arg(&op),
            arg(&sp),
        ];
        // kernel contract: (ctas + batch x hkv) pieces of 8 rows in the
        // workspace, one zeroed counter per (sequence, KV head); sizes checked
        return decode_launch(
            gpu,
            &name,
            smem,
            (ctas as u32, 1, 1),
            32 * warps as u32,
            launch,
            None,
            &mut params,
        );
    }
    let (wa, wm) = p.workspace(0);
    len_is("workspace", &ws.acc, wa)?;
    len_is("workspace", &ws.ml, wm)?;
    let (name, smem, launch) = match p.kernel {
        DecodeKernel::V1 { min_blocks } => {
            need(
                "min_blocks",
                min_blocks == 4
                    || ((min_blocks == 6 || min_blocks == 8) && p.dims.d == 128 && p.maxg() == 4),
                || {
                    format!(
                        "{min_blocks} (4; 6 or 8 only for head_dim 128 and groups of at most 4)"
                    )
                },
            )?;
            (
                format!(
                    "paged_decode_{}_d{}_g{}_u4_b{min_blocks}",
                    T::NAME,
                    p.dims.d,
                    p.maxg()
                ),
                0,
                DecodeLaunch::Plain,
            )
        }
        DecodeKernel::V2 { unroll, stages, q } => {
            need(
                "decode v2 stages",
                matches!((unroll, stages), (2, 4) | (4, 3)),
                || format!("unroll {unroll}, stages {stages} ((2, 4) or (4, 3))"),
            )?;
            let qn = (q == QPlace::Shared) as usize;
            (
                format!(
                    "paged_decode2_{}_d{}_g{}_u{unroll}_s{stages}_q{qn}",
                    T::NAME,
                    p.dims.d,
                    p.maxg()
                ),
                stages * unroll * 2 * 128 * 16,
                DecodeLaunch::Plain,
            )
        }
        DecodeKernel::V3 { stages } => {
            need("decode v3 stages", stages == 2 || stages == 3, || {
                format!("{stages} (2 or 3)")
            })?;
            (
                format!("paged_decode3_{}_d{}_s{stages}", T::NAME, p.dims.d),
                stages * 2 * 64 * (p.dims.d + 8) * 2,
                DecodeLaunch::Plain,
            )
        }
        DecodeKernel::V4 {
            warps,
            stages,
            launch,
        } => {
            need(
                "decode v4 warps/stages",
                DecodeKernel::V4_PLANS.contains(&(warps, stages)),
                || format!("warps {warps}, stages {stages} ((1, 2..4), (2, 2..3) or (4, 2))"),
            )?;
            (
                format!("paged_decode4_{}_d{}_w{warps}_s{stages}", T::NAME, p.dims.d),
                stages * 2 * 16 * warps * p.dims.d * 2,
                launch,
            )
        }
        DecodeKernel::V6 {
            opts,
            warps,
            stages,
            ctas_per_sm,
            launch,
        } => {
            if warps == 4 {
                need(
                    "decode v6 stages",
                    stages == 2
                        || (stages == 3
                            && opts.merge != DecodeMerge::Cluster
                            && opts.order == GridOrder::PartitionsFirst),
                    || {
                        format!(
                            "{stages} (2; 3 only for the kernel or last-CTA merge, partitions first)"
                        )
                    },
                )?;
            } else {
                need(
                    "decode v6 warps/stages",
                    DecodeKernel::V6_NARROW_PLANS.contains(&(warps, stages))
                        && opts == V6Opts::EAGER_DIRECT,
                    || {
                        format!(
                            "warps {warps}, stages {stages}, options {opts:?} (4 warps; or \
                             (2, 2..3) with the eager table and direct output only)"
                        )
                    },
                )?;
            }
            if opts.merge == DecodeMerge::Cluster {
                need_cluster_merge(gpu, p, "decode v6 cluster merge")?;
            }
            if opts.merge == DecodeMerge::LastCta {
                len_is("decode counters", &ws.counters, p.dims.batch * p.dims.hkv)?;
            }
            let smem = padded_smem(gpu, stages * 2 * 16 * warps * p.dims.d * 2, ctas_per_sm);
            // w4 kernels keep their names (no `_w` part)
            let w = if warps == 4 {
                String::new()
            } else {
                format!("_w{warps}")
            };
            (
                format!(
                    "paged_decode6_{}_d{}{w}_s{stages}_o{}",
                    T::NAME,
                    p.dims.d,
                    opts.bits()
                ),
                smem,
                launch,
            )
        }
        DecodeKernel::V7 {
            heads,
            stages,
            merge,
            ctas_per_sm,
            launch,
        } => {
            need(
                "decode v7 stages",
                stages == 2
                    || stages == 3
                    || (stages == 4 && matches!(merge, DecodeMerge::Kernel | DecodeMerge::Direct)),
                || format!("{stages} (2 or 3; 4 for the kernel merge or direct output)"),
            )?;
            need(
                "decode v7 heads per CTA",
                heads <= 8 && (heads == 0 || p.dims.hkv % heads == 0),
                || format!("{heads} (0, or a divisor of {} up to 8)", p.dims.hkv),
            )?;
            if merge == DecodeMerge::LastCta {
                len_is("decode counters", &ws.counters, p.dims.batch * p.dims.hkv)?;
            }
            if merge == DecodeMerge::Cluster {
                need_cluster_merge(gpu, p, "decode v7 cluster merge")?;
            }
            let need_smem = v7_smem(&p.dims, heads, stages);
            need(
                "decode v7 shared memory",
                need_smem <= gpu.smem_optin,
                || {
                    format!(
                        "{need_smem} B for {stages} stages of {} heads x d{} (device: {} B)",
                        v7_heads(heads, p.dims.hkv),
                        p.dims.d,
                        gpu.smem_optin
                    )
                },
            )?;
            let smem = padded_smem(gpu, need_smem, ctas_per_sm);
            let o = 1 | merge.bits(); // eager block table (v6's DEC_EAGER), always
            (
                format!("paged_decode7_{}_d{}_s{stages}_o{o}", T::NAME, p.dims.d),
                smem,
                launch,
            )
        }
        DecodeKernel::V5 { .. } => unreachable!("v5 launched above"),
    };
    let threads = match p.kernel {
        DecodeKernel::V4 { warps, .. } | DecodeKernel::V6 { warps, .. } => 32 * warps as u32,
        DecodeKernel::V7 { heads, .. } => 32 * v7_heads(heads, p.dims.hkv) as u32,
        _ => 128,
    };
    let nparts = p.nparts() as i32;
    let (qp, _g0) = q.device_ptr(st);
    let (kp, _g1) = k_cache.device_ptr(st);
    let (vp, _g2) = v_cache.device_ptr(st);
    let (btp, _g3) = block_tables.device_ptr(st);
    let (lp, _g4) = ctx_lens.device_ptr(st);
    let (pa, _g5) = ws.acc.device_ptr_mut(st);
    let (pm, _g6) = ws.ml.device_ptr_mut(st);
    let (cp, _g7) = ws.counters.device_ptr_mut(st);
    let (op, _g8) = out.device_ptr_mut(st);
    let (sp, _g9) = lse.device_ptr_mut(st);
    let (np, nk, nb) = (nparts as u32, p.dims.hkv as u32, p.dims.batch as u32);
    // v1..v4 take the first 14 parameters; v6 also the merge counters and
    // out/lse (it may merge or write the output itself)
    let mut params = vec![
        arg(&qp),
        arg(&kp),
        arg(&vp),
        arg(&btp),
        arg(&lp),
        arg(&mb),
        arg(&bs),
        arg(&hq),
        arg(&hkv),
        arg(&scale_log2),
        arg(&part),
        arg(&nparts),
        arg(&pa),
        arg(&pm),
    ];
    // grid (partitions, KV heads, sequences) unless v6 orders heads first; the
    // workspace holds nparts rows per query head (checked above)
    let (mut grid, mut cluster, mut merged) = ((np, nk, nb), None, false);
    if let DecodeKernel::V6 { opts, .. } = p.kernel {
        params.extend([arg(&cp), arg(&op), arg(&sp)]);
        // kernel contract: the grid's partition axis is nparts long and a
        // cluster is exactly that axis (CTA rank = partition); the counters
        // (LastCta) are zero between launches (checked length above)
        let cdim = match opts.order {
            GridOrder::PartitionsFirst => (np, 1, 1),
            GridOrder::HeadsFirst => {
                grid = (nk, np, nb);
                (1, np, 1)
            }
        };
        cluster = (opts.merge == DecodeMerge::Cluster).then_some(cdim);
        merged = opts.merge.merges_in_kernel(nparts);
    }
    if let DecodeKernel::V7 { heads, merge, .. } = p.kernel {
        // same parameters as v6; kernel contract: grid (nparts, hkv / heads
        // per CTA, batch), blockDim = 32 x heads per CTA (a divisor of hkv,
        // checked), a cluster is exactly the partition axis (CTA rank =
        // partition), LastCta: one zeroed counter per (sequence, head group)
        // (batch x hkv of them, checked)
        params.extend([arg(&cp), arg(&op), arg(&sp)]);
        grid = (np, (p.dims.hkv / v7_heads(heads, p.dims.hkv)) as u32, nb);
        cluster = (merge == DecodeMerge::Cluster).then_some((np, 1, 1));
        merged = merge.merges_in_kernel(nparts);
    }
    decode_launch(
        gpu,
        &name,
        smem,
        grid,
        threads,
        launch,
        cluster,
        &mut params,
    )?;
    if merged {
        return Ok(());
    }
    let mname = format!("decode_merge_{}_d{}", T::NAME, p.dims.d);
    let mut params = [
        arg(&pa),
        arg(&pm),
        arg(&lp),
        arg(&hq),
        arg(&part),
        arg(&nparts),
        arg(&op),
        arg(&sp),
    ];
    // one CTA of d threads per (query head, sequence)
    decode_launch(
        gpu,
        &mname,
        0,
        (p.dims.hq as u32, p.dims.batch as u32, 1),
        p.dims.d as u32,
        launch,
        None,
        &mut params,
    )
}

/// The decode bench's read ceiling: reads every byte of `a` and `b` (16-bit
/// elements, equal lengths, a multiple of 8) once; `sink` (one u32) is written
/// only on an improbable xor value, so nothing is dead. One wave of 8 CTAs of
/// 256 threads per SM.
pub fn decode_read_ceiling<T: Elem>(
    gpu: &Gpu,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    sink: &mut CudaSlice<u32>,
) -> Result<()> {
    need(
        "read ceiling buffers",
        a.len() == b.len() && a.len() % 8 == 0,
        || {
            format!(
                "{} and {} elements (equal, a multiple of 8)",
                a.len(),
                b.len()
            )
        },
    )?;
    len_is("read ceiling sink", sink, 1)?;
    let st = &gpu.stream;
    let n16 = (a.len() / 8) as u64;
    let (ap, _g0) = a.device_ptr(st);
    let (bp, _g1) = b.device_ptr(st);
    let (sp, _g2) = sink.device_ptr_mut(st);
    let mut params = [arg(&ap), arg(&bp), arg(&n16), arg(&sp)];
    decode_launch(
        gpu,
        "decode_read_ceiling",
        0,
        (8 * gpu.sm_count.max(1) as u32, 1, 1),
        256,
        DecodeLaunch::Plain,
        None,
        &mut params,
    )
}

/// Write `key`/`value` [tokens, hkv, d] into the paged caches at `slots`
/// (slot = block * block_size + offset; negative = skip).
#[allow(clippy::too_many_arguments)]
pub fn reshape_and_cache<T: Elem>(
    gpu: &Gpu,
    tokens: usize,
    hkv: usize,
    d: usize,
    key: &CudaSlice<T>,
    value: &CudaSlice<T>,
    slots: &CudaSlice<i32>,
    k_cache: &mut CudaSlice<T>,
    v_cache: &mut CudaSlice<T>,
) -> Result<()> {
    need("head_dim", d % 8 == 0, || format!("{d} (multiple of 8)"))?;
    len_is("key", key, tokens * hkv * d)?;
    len_is("value", value, tokens * hkv * d)?;
    len_is("slots", slots, tokens)?;
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(Module::Decode, "reshape_and_cache", 0)?;
    let hd8 = (hkv * d / 8) as i32;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(key)
        .arg(value)
        .arg(k_cache)
        .arg(v_cache)
        .arg(slots)
        .arg(&hd8);
    // SAFETY: the caller's slots index inside the caches (checked by the caller's
    // block allocator; the check harness builds them in range).
    unsafe { b.launch(cfg) }.drv("reshape_and_cache")?;
    Ok(())
}

// ---------------------------------------------------------------- W4A16

/// Which packed layout the weights are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int4Layout {
    Gptq,
    Awq,
}

/// A W4A16 layer on the device. For GPTQ with act-order, `qweight` holds the
/// rows repacked in sorted-group order and `perm`/`gsort` say how to read x.
pub struct Int4Weights {
    pub layout: Int4Layout,
    pub k: usize,
    pub n: usize,
    pub group_size: usize,
    pub qweight: CudaSlice<i32>,
    pub qzeros: CudaSlice<i32>,
    pub scales: CudaSlice<f16>,
    pub perm: Option<(CudaSlice<i32>, CudaSlice<i32>)>,
    /// GPTQ without act-order (or AWQ, its codes in GPTQ's order), k % 32 == 0:
    /// the same words re-laid for the tensor-core kernel, [slab of 32 columns][step of 32 rows][lane][4], so
    /// each warp load is 512 contiguous bytes and a slab streams contiguously
    /// (the AutoGPTQ layout gives 128-byte pieces 57 KB apart at n = 14336).
    /// Costs a second copy of the packed weights on the device.
    pub tiles: Option<CudaSlice<i32>>,
    /// With `tiles` and group_size % 32 == 0: scales and zeros re-laid for the
    /// ring kernel ([`gptq_ring_meta`]), one 80-byte record per (slab, group).
    pub ring_meta: Option<CudaSlice<i32>>,
    /// With `ring_meta`: tiles and meta re-laid for the 64-column ring kernel
    /// ([`gptq_wide_tiles`], [`gptq_wide_meta`]); a third copy of the weights.
    pub wide: Option<(CudaSlice<i32>, CudaSlice<i32>)>,
    /// With `ring_meta`: tiles and meta re-laid for the swapped-operand ring
    /// kernel ([`gptq_swap_tiles`], [`gptq_swap_meta`]); a fourth copy.
    pub swap: Option<(CudaSlice<i32>, CudaSlice<i32>)>,
    /// AWQ with `tiles`: the zero points in GPTQ's word order (column `8c + i`
    /// in nibble `i`, the values themselves) for `gptq_mma`, which reads
    /// GPTQ's `qzeros` otherwise.
    pub mma_zeros: Option<CudaSlice<i32>>,
}

/// AWQ (AutoAWQ GEMM) qweight `[k, n/8]` and qzeros `[groups, n/8]`, packed
/// along the outputs with column `8c + ORDER[s]` in nibble `s` (ORDER = 0, 2,
/// 4, 6, 1, 3, 5, 7), re-packed as GPTQ orders its words: qweight `[k/8, n]`
/// with row `8w + i` in nibble `i`, and the zero nibbles `[groups, n/8]` with
/// column `8c + i` in nibble `i`. The values are unchanged (AWQ's zeros stay
/// true zeros, not GPTQ v1's zero minus one).
pub fn awq_to_gptq_order(
    qweight: &[i32],
    qzeros: &[i32],
    k: usize,
    n: usize,
    groups: usize,
) -> (Vec<i32>, Vec<i32>) {
    // nibble slot of column 8c + j in an AWQ word: the inverse of ORDER
    const SLOT: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
    let awq = |words: &[i32], row: usize, col: usize| {
        (words[row * (n / 8) + col / 8] as u32 >> (4 * SLOT[col % 8])) & 0xF
    };
    let mut gq = vec![0u32; k / 8 * n];
    for r in 0..k {
        for c in 0..n {
            gq[(r / 8) * n + c] |= awq(qweight, r, c) << (4 * (r % 8));
        }
    }
    let mut gz = vec![0u32; groups * n / 8];
    for g in 0..groups {
        for c in 0..n {
            gz[g * (n / 8) + c / 8] |= awq(qzeros, g, c) << (4 * (c % 8));
        }
    }
    let words = |v: Vec<u32>| v.into_iter().map(|x| x as i32).collect();
    (words(gq), words(gz))
}

/// [`gptq_mma_tiles`] output -> [pair of slabs][step][h = 0, 1][lane][4]: the
/// steps of slabs 2 pair and 2 pair + 1 side by side (zero past the last slab).
pub fn gptq_wide_tiles(tiles: &[i32], k: usize, n: usize) -> Vec<i32> {
    let (slabs, steps) = (n.div_ceil(32), k / 32);
    let pairs = n.div_ceil(64);
    let mut out = vec![0i32; pairs * steps * 256];
    for pair in 0..pairs {
        for step in 0..steps {
            for h in 0..2 {
                let slab = 2 * pair + h;
                if slab < slabs {
                    let src = &tiles[(slab * steps + step) * 128..][..128];
                    out[((pair * steps + step) * 2 + h) * 128..][..128].copy_from_slice(src);
                }
            }
        }
    }
    out
}

/// [`gptq_ring_meta`] output -> per (pair of slabs, group) the two slabs'
/// 20-word records side by side (zero past the last slab).
pub fn gptq_wide_meta(meta: &[i32], n: usize, groups: usize) -> Vec<i32> {
    let slabs = n.div_ceil(32);
    let pairs = n.div_ceil(64);
    let mut out = vec![0i32; pairs * groups * 40];
    for pair in 0..pairs {
        for g in 0..groups {
            for h in 0..2 {
                let slab = 2 * pair + h;
                if slab < slabs {
                    let src = &meta[(slab * groups + g) * 20..][..20];
                    out[(pair * groups + g) * 40 + 20 * h..][..20].copy_from_slice(src);
                }
            }
        }
    }
    out
}

/// A GPTQ word (k-rows 8kb + i at bits 4i) with its nibbles re-ordered for
/// `gptq_swap`: k-rows 2i and 2i + 1 at bits 4i and 16 + 4i, so that
/// (w >> 4i) & 0x000F000F is the pair (row 2i, row 2i + 1) in 16-bit halves.
pub fn swap_nibbles(w: i32) -> i32 {
    let w = w as u32;
    let mut o = 0u32;
    for i in 0..4 {
        o |= ((w >> (8 * i)) & 0xF) << (4 * i);
        o |= ((w >> (8 * i + 4)) & 0xF) << (16 + 4 * i);
    }
    o as i32
}

/// qweight [k/8, n] (AutoGPTQ) -> the `gptq_swap` tiles: per (pair of 64
/// columns, step of 32 k-rows) 256 words [h][lane][4]; lane (g, t), word q of
/// half h holds column 64 pair + 16 (2h + q/2) + 8 (q%2) + g, k-block
/// 4 step + t, nibbles re-ordered by [`swap_nibbles`] (zero past n).
pub fn gptq_swap_tiles(qweight: &[i32], k: usize, n: usize) -> Vec<i32> {
    let (pairs, steps) = (n.div_ceil(64), k / 32);
    let mut out = vec![0i32; pairs * steps * 256];
    for pair in 0..pairs {
        for step in 0..steps {
            for h in 0..2 {
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let kb = 4 * step + t;
                    for q in 0..4 {
                        let col = 64 * pair + 16 * (2 * h + q / 2) + 8 * (q % 2) + g;
                        if col < n {
                            out[(((pair * steps + step) * 2 + h) * 32 + lane) * 4 + q] =
                                swap_nibbles(qweight[kb * n + col]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Scales [groups, n] (f16) and qzeros [groups, n/8] -> the `gptq_swap`
/// records: per (pair of 64 columns, group) 40 words; words 4g .. 4g + 3 hold
/// the scales of columns 64 pair + 8i + g, i = 0..8 (i even in the low half),
/// word 32 + g the stored zero nibbles of those columns (nibble i). Zero past n.
pub fn gptq_swap_meta(qzeros: &[i32], scales: &[f16], n: usize, groups: usize) -> Vec<i32> {
    let pairs = n.div_ceil(64);
    let mut out = vec![0i32; pairs * groups * 40];
    for pair in 0..pairs {
        for grp in 0..groups {
            let rec = &mut out[(pair * groups + grp) * 40..][..40];
            for g in 0..8 {
                for i in 0..8 {
                    let col = 64 * pair + 8 * i + g;
                    if col >= n {
                        continue;
                    }
                    let bits = scales[grp * n + col].to_bits() as u32;
                    rec[4 * g + i / 2] |= (bits << (16 * (i % 2))) as i32;
                    let z = (qzeros[grp * (n / 8) + col / 8] as u32 >> (4 * (col % 8))) & 0xF;
                    rec[32 + g] |= (z << (4 * i)) as i32;
                }
            }
        }
    }
    out
}

/// Scales [groups, n] (f16) and qzeros [groups, n/8] -> one record of 20
/// words per (slab of 32 columns, group), slab-major: words 0..16 the 32
/// scales (column 2i in the low half of word i), words 16..20 the slab's 4
/// zero words (qzeros words 4 slab .. 4 slab + 3). Zero past n.
pub fn gptq_ring_meta(qzeros: &[i32], scales: &[f16], n: usize, groups: usize) -> Vec<i32> {
    let slabs = n.div_ceil(32);
    let mut out = vec![0i32; slabs * groups * 20];
    for slab in 0..slabs {
        for g in 0..groups {
            let rec = &mut out[(slab * groups + g) * 20..][..20];
            for c in 0..32 {
                let col = slab * 32 + c;
                if col < n {
                    let bits = scales[g * n + col].to_bits() as u32;
                    rec[c / 2] |= (bits << (16 * (c % 2))) as i32;
                }
            }
            for i in 0..4 {
                let wd = slab * 4 + i;
                if wd < n / 8 {
                    rec[16 + i] = qzeros[g * (n / 8) + wd];
                }
            }
        }
    }
    out
}

/// qweight [k/8, n] (AutoGPTQ) -> [ceil(n/32)][k/32][32 lanes][4 words]: lane
/// (g, t) of step s holds row-block 4s + t, columns 32 slab + 4g .. + 3
/// (zero past n).
pub fn gptq_mma_tiles(qweight: &[i32], k: usize, n: usize) -> Vec<i32> {
    let (slabs, steps) = (n.div_ceil(32), k / 32);
    let mut out = vec![0i32; slabs * steps * 32 * 4];
    for slab in 0..slabs {
        for step in 0..steps {
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let kb = step * 4 + t;
                for j in 0..4 {
                    let col = slab * 32 + 4 * g + j;
                    if col < n {
                        out[((slab * steps + step) * 32 + lane) * 4 + j] = qweight[kb * n + col];
                    }
                }
            }
        }
    }
    out
}

impl Int4Weights {
    /// Upload GPTQ tensors (AutoGPTQ v1 layout). If `g_idx` is not `k / group_size`
    /// (act-order), rows are sorted by group once here: qweight is unpacked,
    /// permuted and repacked, and the kernel gathers x through the permutation.
    #[allow(clippy::too_many_arguments)]
    pub fn gptq(
        gpu: &Gpu,
        k: usize,
        n: usize,
        group_size: usize,
        qweight: &[i32],
        qzeros: &[i32],
        scales: &[f16],
        g_idx: &[i32],
    ) -> Result<Self> {
        need("k", k % 8 == 0 && k > 0, || format!("{k} (multiple of 8)"))?;
        need("n", n % 8 == 0 && n > 0, || format!("{n} (multiple of 8)"))?;
        need("group_size", group_size > 0 && k % group_size == 0, || {
            format!("{group_size}")
        })?;
        let groups = k / group_size;
        if qweight.len() != k / 8 * n {
            return Err(Error::shape(
                "qweight",
                format!("[{}, {n}]", k / 8),
                qweight.len().to_string(),
            ));
        }
        if qzeros.len() != groups * n / 8 || scales.len() != groups * n || g_idx.len() != k {
            return Err(Error::shape(
                "qzeros/scales/g_idx",
                format!("groups {groups}, n {n}, k {k}"),
                "mismatch",
            ));
        }
        if let Some((i, &g)) = g_idx
            .iter()
            .enumerate()
            .find(|(_, &g)| g < 0 || g as usize >= groups)
        {
            return Err(Error::invalid(
                "g_idx",
                format!("row {i}: group {g} not in 0..{groups}"),
            ));
        }
        let trivial = g_idx
            .iter()
            .enumerate()
            .all(|(i, &g)| g as usize == i / group_size);
        let s = &gpu.stream;
        // The words the tensor-core kernels' tiles are built from: the
        // checkpoint's (no act-order), or with act-order the rows re-packed in
        // sorted-group order when that makes every group gs consecutive rows
        // (act-order's own g_idx does): those kernels then read x[:, perm]
        // (staged through their `perm` argument, or gathered first:
        // `ActOrderX`), a GPTQ layer without act-order.
        let mut fast_words: Option<Vec<i32>> = None;
        let (qw_dev, perm) = if trivial {
            (s.clone_htod(qweight).drv("upload qweight")?, None)
        } else {
            let mut perm: Vec<i32> = (0..k as i32).collect();
            perm.sort_by_key(|&i| (g_idx[i as usize], i));
            let nib =
                |row: usize, j: usize| (qweight[(row / 8) * n + j] as u32 >> (4 * (row % 8))) & 0xF;
            let mut re = vec![0u32; k / 8 * n];
            for (r, &src) in perm.iter().enumerate() {
                for j in 0..n {
                    re[(r / 8) * n + j] |= nib(src as usize, j) << (4 * (r % 8));
                }
            }
            let re: Vec<i32> = re.into_iter().map(|x| x as i32).collect();
            let gsort: Vec<i32> = perm.iter().map(|&i| g_idx[i as usize]).collect();
            let uploaded = (
                s.clone_htod(&re).drv("upload qweight")?,
                Some((
                    s.clone_htod(&perm).drv("upload perm")?,
                    s.clone_htod(&gsort).drv("upload gsort")?,
                )),
            );
            if gsort
                .iter()
                .enumerate()
                .all(|(i, &g)| g as usize == i / group_size)
            {
                fast_words = Some(re);
            }
            uploaded
        };
        let words = if trivial {
            Some(qweight)
        } else {
            fast_words.as_deref()
        };
        let tiles = words
            .filter(|_| k % 32 == 0)
            .map(|w| gptq_mma_tiles(w, k, n));
        let ring_meta = (tiles.is_some() && group_size % 32 == 0)
            .then(|| gptq_ring_meta(qzeros, scales, n, groups));
        Ok(Int4Weights {
            layout: Int4Layout::Gptq,
            k,
            n,
            group_size,
            tiles: tiles
                .as_ref()
                .map(|t| s.clone_htod(t))
                .transpose()
                .drv("upload qweight tiles")?,
            ring_meta: ring_meta
                .as_ref()
                .map(|m| s.clone_htod(m))
                .transpose()
                .drv("upload ring meta")?,
            wide: match (&tiles, &ring_meta) {
                (Some(t), Some(m)) => Some((
                    s.clone_htod(&gptq_wide_tiles(t, k, n))
                        .drv("upload wide tiles")?,
                    s.clone_htod(&gptq_wide_meta(m, n, groups))
                        .drv("upload wide meta")?,
                )),
                _ => None,
            },
            swap: match ring_meta {
                Some(_) => Some((
                    s.clone_htod(&gptq_swap_tiles(
                        words.expect("tiles come from words"),
                        k,
                        n,
                    ))
                    .drv("upload swap tiles")?,
                    s.clone_htod(&gptq_swap_meta(qzeros, scales, n, groups))
                        .drv("upload swap meta")?,
                )),
                None => None,
            },
            mma_zeros: None,
            qweight: qw_dev,
            qzeros: s.clone_htod(qzeros).drv("upload qzeros")?,
            scales: s.clone_htod(scales).drv("upload scales")?,
            perm,
        })
    }

    /// Upload AWQ (AutoAWQ GEMM) tensors.
    pub fn awq(
        gpu: &Gpu,
        k: usize,
        n: usize,
        group_size: usize,
        qweight: &[i32],
        qzeros: &[i32],
        scales: &[f16],
    ) -> Result<Self> {
        need("n", n % 8 == 0 && n > 0, || format!("{n} (multiple of 8)"))?;
        need("group_size", group_size > 0 && k % group_size == 0, || {
            format!("{group_size}")
        })?;
        let groups = k / group_size;
        if qweight.len() != k * n / 8
            || qzeros.len() != groups * n / 8
            || scales.len() != groups * n
        {
            return Err(Error::shape(
                "awq tensors",
                format!("k {k}, n {n}, groups {groups}"),
                "mismatch",
            ));
        }
        let s = &gpu.stream;
        // The swap kernels' tiles and records from the same codes (their
        // words hold codes and zero nibbles whatever the checkpoint's packing;
        // the kernels take AWQ's true zeros by a flag): the fast path for
        // m <= 16, as for GPTQ without act-order.
        // gptq_mma's tiles too (m > 16), with the zeros in GPTQ's order.
        let (swap, tiles, mma_zeros) = if k % 32 == 0 && group_size % 32 == 0 {
            let (gq, gz) = awq_to_gptq_order(qweight, qzeros, k, n, groups);
            (
                Some((
                    s.clone_htod(&gptq_swap_tiles(&gq, k, n))
                        .drv("upload swap tiles")?,
                    s.clone_htod(&gptq_swap_meta(&gz, scales, n, groups))
                        .drv("upload swap meta")?,
                )),
                Some(
                    s.clone_htod(&gptq_mma_tiles(&gq, k, n))
                        .drv("upload qweight tiles")?,
                ),
                Some(s.clone_htod(&gz).drv("upload zeros")?),
            )
        } else {
            (None, None, None)
        };
        Ok(Int4Weights {
            layout: Int4Layout::Awq,
            k,
            n,
            group_size,
            qweight: s.clone_htod(qweight).drv("upload qweight")?,
            tiles,
            ring_meta: None,
            wide: None,
            swap,
            mma_zeros,
            qzeros: s.clone_htod(qzeros).drv("upload qzeros")?,
            scales: s.clone_htod(scales).drv("upload scales")?,
            perm: None,
        })
    }

    /// Bytes the kernel must read (weights, zeros, scales).
    pub fn bytes(&self) -> usize {
        self.qweight.len() * 4 + self.qzeros.len() * 4 + self.scales.len() * 2
    }
}

/// Which W4A16 kernel runs. `Auto` is what callers want; the others force one
/// (the bench sweeps plans; the check runs both twins on the same inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W4Kernel {
    /// Tensor-core kernel where it applies (GPTQ, with act-order where its
    /// groups are runs of group_size sorted rows, or AWQ: m 9..=16 on sm_90+
    /// the cluster kernel, m <= 16 the swap kernel, else gptq_mma), else the
    /// CUDA-core kernel. Act-order layers at m <= [`ACT_ORDER_IN_KERNEL_MAX_M`]:
    /// a kernel that stages x and reads it through the permutation (the
    /// cluster kernel on sm_90+, else the swap kernel with staged x); above,
    /// the same choice as without act-order on x gathered first ([`ActOrderX`]).
    Auto,
    /// The CUDA-core kernels (GPTQ with or without act-order, AWQ): the slow twin.
    CudaCore,
    /// The tensor-core GPTQ kernel with this plan (GPTQ, or AWQ).
    Mma(W4Plan),
    /// The persistent cp.async-ring GPTQ kernel with this plan (GPTQ, m <= 16,
    /// group_size % 32 == 0).
    Ring(RingPlan),
    /// The ring kernel with swapped mma operands (`gptq_swap`: weights as A,
    /// x as B), same conditions as `Ring`, or AWQ (its codes re-laid at upload).
    Swap(SwapPlan),
    /// The swapped-operand kernel reduced on chip in a thread block cluster
    /// (`gptq_swapcl`, sm_90+), same conditions as `Swap`.
    Cluster(ClusterPlan),
}

impl W4Kernel {
    /// The ring-family plan `Auto` runs for `w` at `m` rows on `gpu` (the
    /// cluster kernel, else the swap kernel, else the ring kernel, each where
    /// it applies); `Auto` itself where none does (then `gptq_mma` or the
    /// CUDA-core kernel), and any other kernel unchanged.
    pub fn resolve(self, gpu: &Gpu, w: &Int4Weights, m: usize) -> W4Kernel {
        if self != W4Kernel::Auto {
            return self;
        }
        // act-order at m <= ACT_ORDER_IN_KERNEL_MAX_M: kernels that stage x
        // once per CTA, reading it through perm as they stage it
        let act = w.perm.is_some() && m <= ACT_ORDER_IN_KERNEL_MAX_M;
        let cluster = if act {
            ClusterPlan::auto_act_order(m, w.k, w.group_size, gpu.arch)
        } else {
            ClusterPlan::auto(m, w.k, w.group_size, gpu.arch)
        };
        if let Some(p) = cluster.filter(|p| w4a16_cluster_applies(gpu, w, m, p)) {
            return W4Kernel::Cluster(p);
        }
        let swap = if act {
            SwapPlan::auto_staged(m)
        } else {
            SwapPlan::auto(m, w.k, w.group_size)
        };
        if let Some(p) = swap.filter(|p| w4a16_swap_applies(gpu, w, m, p)) {
            return W4Kernel::Swap(p);
        }
        if let Some(p) = RingPlan::auto(m).filter(|p| w4a16_ring_applies(gpu, w, m, p)) {
            return W4Kernel::Ring(p);
        }
        W4Kernel::Auto
    }

    /// Whether the kernel can read an act-order layer's x through the
    /// permutation itself ([`ActOrderX::InKernel`]): those that stage x once
    /// per CTA (swap with staged x, cluster, ring). swapx copies x per step
    /// with cp.async (16 contiguous bytes), gptq_mma loads it per step.
    pub fn gathers_x(self) -> bool {
        match self {
            W4Kernel::Swap(p) => p.x == SwapX::Staged,
            W4Kernel::Cluster(_) | W4Kernel::Ring(_) => true,
            W4Kernel::Auto | W4Kernel::CudaCore | W4Kernel::Mma(_) => false,
        }
    }

    /// This kernel with its weight copies under L2 policy `l2` (the swap and
    /// cluster kernels; the others have no such option and are unchanged).
    pub fn with_l2(self, l2: WeightL2) -> W4Kernel {
        match self {
            W4Kernel::Swap(p) => W4Kernel::Swap(SwapPlan { l2, ..p }),
            W4Kernel::Cluster(p) => W4Kernel::Cluster(ClusterPlan { l2, ..p }),
            k => k,
        }
    }
}

/// Launch plan of the swapped-operand ring kernel (kernels/w4a16.cu, `gptq_swap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapPlan {
    /// Warps per CTA (each one worker with its own ring): see `variants`.
    pub warps: usize,
    /// Ring slots per warp (slots - 1 steps in flight).
    pub slots: usize,
    /// 32-k sub-steps per step (ring slot, `ksteps` KB of weights): 1, or 2
    /// with x in the ring (k and group_size multiples of 64): the per-step
    /// costs (ring wait, copy address math, loop control) paid once per 2 KB.
    pub ksteps: usize,
    /// Grid size in CTAs; 0 = `ctas_per_sm` x the SM count (one wave).
    pub ctas: usize,
    /// CTAs per SM when `ctas` is 0.
    pub ctas_per_sm: usize,
    /// How the launch is ordered against the stream's previous kernel.
    pub launch: SwapLaunch,
    /// Where the kernel keeps x.
    pub x: SwapX,
    /// L2 policy of the weight copies.
    pub l2: WeightL2,
}

/// Where `gptq_swap` keeps x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapX {
    /// Staged once per CTA in shared memory, all of K (`gptq_swap`): a CTA
    /// barrier and m x 2k bytes of shared memory before the first step.
    Staged,
    /// Streamed through each warp's ring with the weights, the step's 32-k
    /// slice of every row (`gptq_swapx`): no barrier, no staged copy.
    Ring,
}

/// Stream ordering of a `gptq_swap` launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapLaunch {
    /// An ordinary launch: starts when the previous kernel has finished.
    Plain,
    /// A programmatic dependent launch (sm_90+; plain elsewhere): the CTAs
    /// start as the previous kernel's CTAs exit and request their first
    /// weight tiles (constant data) at once; `griddepcontrol.wait` holds back
    /// everything that reads x or writes y and the scratch until the previous
    /// kernel has completed.
    Dependent,
}

/// The L2 cache policy of the swap and cluster kernels' weight (and scale /
/// zero) copies: weights are read once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightL2 {
    /// The default policy (evict_normal): the weight lines compete with
    /// whatever L2 holds (another kernel's outputs, dirty lines whose
    /// write-back then shares DRAM with the weight stream).
    Normal,
    /// `evict_first`: the weight lines are the first replaced, mostly by one
    /// another, so the lines L2 held before the call stay (and stay unwritten).
    EvictFirst,
}

/// The kernel's `flags` argument (kernels/w4a16.cu `W4F_PDL`, `W4F_EVICT`,
/// `W4F_TRUE_ZERO`): AWQ's zeros are the zero points themselves, GPTQ v1
/// stores them minus one.
/// `launch` is the launch as made (plain where the device has no dependent launch).
fn swap_flags(launch: SwapLaunch, l2: WeightL2, layout: Int4Layout) -> i32 {
    i32::from(launch == SwapLaunch::Dependent)
        | if l2 == WeightL2::EvictFirst { 2 } else { 0 }
        | if layout == Int4Layout::Awq { 4 } else { 0 }
}

impl SwapPlan {
    /// The plan `Auto` uses at `m` rows (m <= 16) of a layer with `k` inputs
    /// and `group_size` where `ClusterPlan::auto` does not apply (m <= 8, or
    /// no sm_90): the fastest measured on H200 at M = 1 and M = 16
    /// (bench/results/gpu-2026-12-01-s5-w4a16.md); two 32-k sub-steps per
    /// step where k and group_size allow it; weights under L2 evict_first
    /// (equal back to back, 7 % faster at M = 1 after an L2 flush:
    /// bench/results/gpu-2026-12-01-s7.md).
    pub fn auto(m: usize, k: usize, group_size: usize) -> Option<SwapPlan> {
        let two = k % 64 == 0 && group_size % 64 == 0;
        let (warps, slots, ksteps) = match (m, two) {
            (1..=8, true) => (16, 3, 2),
            (1..=8, false) => (16, 3, 1),
            (9..=16, true) => (8, 3, 2),
            (9..=16, false) => (8, 4, 1),
            _ => return None,
        };
        Some(SwapPlan {
            warps,
            slots,
            ksteps,
            ctas: 0,
            ctas_per_sm: 1,
            launch: SwapLaunch::Dependent,
            x: SwapX::Ring,
            l2: WeightL2::EvictFirst,
        })
    }

    /// The plan `Auto` uses for act-order layers at `m` rows (m <= 16) where
    /// the cluster kernel does not apply: x staged (gathered through the
    /// permutation once per CTA; swapx cannot gather), weights under L2
    /// evict_first.
    pub fn auto_staged(m: usize) -> Option<SwapPlan> {
        let (warps, slots) = match m {
            1..=8 => (16, 3),
            9..=16 => (8, 4),
            _ => return None,
        };
        Some(SwapPlan {
            warps,
            slots,
            ksteps: 1,
            ctas: 0,
            ctas_per_sm: 1,
            launch: SwapLaunch::Dependent,
            x: SwapX::Staged,
            l2: WeightL2::EvictFirst,
        })
    }

    /// n8 tiles of x rows the kernel takes for `m` rows.
    pub fn tiles(m: usize) -> usize {
        m.div_ceil(8)
    }

    /// CTAs per SM the register budget of variant (`nt`, (`warps`, `slots`,
    /// `ksteps`), `x`) guarantees (its `__launch_bounds__` minimum).
    pub fn min_blocks(nt: usize, (warps, slots, ksteps): (usize, usize, usize), x: SwapX) -> usize {
        match (x, nt, warps, slots, ksteps) {
            (SwapX::Staged, 1, 8, 4, 1) => 3,
            _ => 1,
        }
    }

    /// The (warps, slots, ksteps) compiled in kernels/w4a16.cu for `nt` tiles
    /// (the variants that lost everywhere in session 4 and 5 removed).
    pub fn variants(nt: usize, x: SwapX) -> &'static [(usize, usize, usize)] {
        match (x, nt) {
            (SwapX::Staged, 1) => &[(8, 4, 1), (16, 3, 1)],
            (SwapX::Staged, 2) => &[(8, 4, 1)],
            (SwapX::Ring, 1) => &[(16, 3, 1), (16, 4, 1), (16, 3, 2)],
            (SwapX::Ring, 2) => &[(8, 4, 1), (16, 3, 1), (8, 3, 2), (8, 4, 2)],
            _ => &[],
        }
    }

    /// The kernel's name for element type `elem` at `m` rows.
    pub fn kernel_name(&self, elem: &str, m: usize) -> String {
        let base = match self.x {
            SwapX::Staged => "gptq_swap",
            SwapX::Ring => "gptq_swapx",
        };
        format!(
            "{base}_{elem}_w{}_r{}_n{}{}",
            self.warps,
            self.slots,
            Self::tiles(m),
            if self.ksteps > 1 {
                format!("_k{}", self.ksteps)
            } else {
                String::new()
            }
        )
    }

    /// Dynamic shared memory of one CTA. Staged x: x rows (+ a zero row when
    /// m is not a multiple of 8 tiles) of 2k + 64 bytes and the warps'
    /// 1184-byte slots; x in the ring: slots of ksteps x (1024 + 512 x tiles)
    /// + 160 bytes.
    pub fn smem(&self, m: usize, k: usize) -> usize {
        match self.x {
            SwapX::Staged => {
                let rows = m + usize::from(m < 8 * Self::tiles(m));
                rows * (2 * k + 64) + self.warps * self.slots * 1184
            }
            SwapX::Ring => {
                self.warps * self.slots * (self.ksteps * (1024 + 512 * Self::tiles(m)) + 160)
            }
        }
    }
}

/// Whether the swapped-operand ring kernel can run `w` at `m` rows under `p`.
pub fn w4a16_swap_applies(gpu: &Gpu, w: &Int4Weights, m: usize, p: &SwapPlan) -> bool {
    w.swap.is_some()
        && (1..=16).contains(&m)
        && w.k % (32 * p.ksteps) == 0
        && w.group_size % (32 * p.ksteps) == 0
        && SwapPlan::variants(SwapPlan::tiles(m), p.x).contains(&(p.warps, p.slots, p.ksteps))
        && p.smem(m, w.k) <= gpu.smem_optin
}

/// Launch plan of the cluster-reduced swapped-operand kernel (kernels/w4a16.cu,
/// `gptq_swapcl`, sm_90+): a cluster of `size` CTAs takes a run of 64-column
/// pairs, its CTAs split K by groups, each CTA stages its k range of x once
/// for its warps, and the partial sums meet in shared memory (pieces per warp,
/// summed per CTA, then across the cluster through distributed shared memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterPlan {
    /// Warps per CTA (each one worker with its own weight ring): see `variants`.
    pub warps: usize,
    /// Ring slots per warp (slots - 1 steps in flight; 2 is allowed).
    pub slots: usize,
    /// 32-k sub-steps per step (1, 2 or 4; k and group_size multiples of 32 x ksteps).
    pub ksteps: usize,
    /// CTAs per cluster, 1..=8 (the K split).
    pub size: usize,
    /// Columns of a work unit: 64 (a pair of the swap tiles) or 32 (one half
    /// of a pair: twice the units, so clusters get more even shares; the x
    /// row sums are paid per 32 columns).
    pub cols: usize,
    /// Clusters in the grid; 0 = as many as fit the GPU at once (at most the
    /// pair count).
    pub clusters: usize,
    /// How the launch is ordered against the stream's previous kernel.
    pub launch: SwapLaunch,
    /// L2 policy of the weight copies.
    pub l2: WeightL2,
}

impl ClusterPlan {
    /// The plan `Auto` uses at `m` rows (9..=16) on sm_90+: the fastest
    /// measured on H200 (bench/results/gpu-2026-12-01-s6-w4a16.md): 16 warps,
    /// 2 slots, units of 32 columns, clusters of 2; 4 sub-steps per slot where
    /// k and group_size are multiples of 128, else 2 (multiples of 64), else
    /// none (the caller falls back to `SwapPlan::auto`); weights under L2
    /// evict_first (as `SwapPlan::auto`: 3 % faster at M = 16 after a flush).
    pub fn auto(m: usize, k: usize, group_size: usize, arch: Arch) -> Option<ClusterPlan> {
        let ksteps = if k % 128 == 0 && group_size % 128 == 0 {
            4
        } else if k % 64 == 0 && group_size % 64 == 0 {
            2
        } else {
            return None;
        };
        (arch.major >= 9 && (9..=16).contains(&m)).then_some(ClusterPlan {
            warps: 16,
            slots: 2,
            ksteps,
            size: 2,
            cols: 32,
            clusters: 0,
            launch: SwapLaunch::Dependent,
            l2: WeightL2::EvictFirst,
        })
    }

    /// The plan `Auto` uses for act-order layers at `m` rows (m <= 16) on
    /// sm_90+: `auto` at m 9..=16; at m <= 8 too (where plain layers take
    /// swapx, which cannot gather x through the permutation), 16 warps,
    /// 3 slots, 2 sub-steps, 64-column units, clusters of 2 (item 17 of
    /// gpu/NOTES.md: ties swapx at M = 1 on plain layers).
    pub fn auto_act_order(
        m: usize,
        k: usize,
        group_size: usize,
        arch: Arch,
    ) -> Option<ClusterPlan> {
        if (9..=16).contains(&m) {
            return ClusterPlan::auto(m, k, group_size, arch);
        }
        (arch.major >= 9 && (1..=8).contains(&m) && k % 64 == 0 && group_size % 64 == 0).then_some(
            ClusterPlan {
                warps: 16,
                slots: 3,
                ksteps: 2,
                size: 2,
                cols: 64,
                clusters: 0,
                launch: SwapLaunch::Dependent,
                l2: WeightL2::EvictFirst,
            },
        )
    }

    /// The (warps, slots, ksteps, cols) compiled in kernels/w4a16.cu for `nt` tiles.
    pub fn variants(nt: usize) -> &'static [(usize, usize, usize, usize)] {
        match nt {
            1 => &[
                (16, 3, 2, 64),
                (16, 3, 1, 64),
                (8, 4, 2, 64),
                (16, 3, 2, 32),
            ],
            2 => &[
                (8, 3, 2, 64),
                (8, 4, 2, 64),
                (8, 6, 2, 64),
                (8, 4, 1, 64),
                (12, 3, 2, 64),
                (10, 3, 2, 64),
                (16, 3, 2, 64),
                (8, 2, 2, 64),
                (12, 2, 2, 64),
                (8, 2, 4, 64),
                (8, 3, 4, 64),
                (16, 2, 2, 64),
                (16, 2, 2, 32),
                (16, 3, 2, 32),
                (16, 2, 4, 32),
                (12, 3, 2, 32),
            ],
            _ => &[],
        }
    }

    /// The kernel's name for element type `elem` at `m` rows.
    pub fn kernel_name(&self, elem: &str, m: usize) -> String {
        format!(
            "gptq_swapcl_{elem}_w{}_r{}_n{}_k{}{}",
            self.warps,
            self.slots,
            SwapPlan::tiles(m),
            self.ksteps,
            if self.cols == 32 { "_h32" } else { "" }
        )
    }

    /// Work units of a layer with `n` outputs (64 or 32 columns each).
    pub fn units(&self, n: usize) -> usize {
        n.div_ceil(64) * (64 / self.cols.clamp(32, 64))
    }

    /// Dynamic shared memory of one CTA on a grid of `clusters` clusters for
    /// a layer of `k` inputs, `n` outputs and `group_size`: the pieces
    /// (warps + units per cluster - 1 slots of 8 tiles x (cols + 4) f32), the
    /// warps' rings (slots of ksteps x 16 cols bytes + 160) and x (8 tiles
    /// rows of the CTA's k range in bytes rounded up to 128, + 64).
    pub fn smem(&self, m: usize, k: usize, n: usize, group_size: usize, clusters: usize) -> usize {
        let rows = 8 * SwapPlan::tiles(m);
        let np = self.units(n).div_ceil(clusters.max(1));
        let kr = (k / group_size).div_ceil(self.size.max(1)) * group_size;
        let xs = (2 * kr).div_ceil(128) * 128 + 64;
        (self.warps + np.max(1) - 1) * rows * (self.cols + 4) * 4
            + self.warps * self.slots * (16 * self.cols * self.ksteps + 160)
            + rows * xs
    }
}

/// Clusters the GPU holds at once for a kernel, by (name, cluster size, shared
/// memory): the occupancy query costs more than a launch.
static CLUSTER_FIT: std::sync::Mutex<Vec<((String, usize, usize), usize)>> =
    std::sync::Mutex::new(Vec::new());

/// The grid of plan `p` for `w` at `m` rows: (clusters, shared memory per CTA).
pub fn cluster_grid(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    p: &ClusterPlan,
    name: &str,
) -> Result<(usize, usize)> {
    let units = p.units(w.n);
    let smem = |c: usize| p.smem(m, w.k, w.n, w.group_size, c);
    if p.clusters > 0 {
        let c = p.clusters.min(units);
        return Ok((c, smem(c)));
    }
    let c0 = (gpu.sm_count.max(1) as usize / p.size).clamp(1, units);
    let s0 = smem(c0);
    let key = (name.to_string(), p.size, s0);
    let cached = CLUSTER_FIT
        .lock()
        .expect("cluster cache poisoned")
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v);
    let fit = match cached {
        Some(v) => v,
        None => {
            let f = gpu.function(Module::W4a16, name, s0)?;
            // SAFETY: a zeroed attribute is a valid C struct; the one field set
            // is the union member the attribute id names.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attr.value.clusterDim.x = p.size as u32;
            attr.value.clusterDim.y = 1;
            attr.value.clusterDim.z = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: (c0 * p.size) as u32,
                gridDimY: 1,
                gridDimZ: 1,
                blockDimX: 32 * p.warps as u32,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: s0 as u32,
                hStream: gpu.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            let mut n: std::ffi::c_int = 0;
            // SAFETY: `cfg` and `attr` are valid for the call; the function
            // allows `s0` bytes of dynamic shared memory.
            unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &cfg) }
                .result()
                .drv(name)?;
            let v = (n.max(1)) as usize;
            CLUSTER_FIT
                .lock()
                .expect("cluster cache poisoned")
                .push((key, v));
            v
        }
    };
    let c = c0.min(fit);
    Ok((c, smem(c)))
}

/// Whether the cluster kernel can run `w` at `m` rows under `p` on `gpu`.
pub fn w4a16_cluster_applies(gpu: &Gpu, w: &Int4Weights, m: usize, p: &ClusterPlan) -> bool {
    let ok = w.swap.is_some()
        && gpu.arch.major >= 9
        && (1..=16).contains(&m)
        && (1..=8).contains(&p.size)
        && w.k % (32 * p.ksteps) == 0
        && w.group_size % (32 * p.ksteps) == 0
        && ClusterPlan::variants(SwapPlan::tiles(m))
            .contains(&(p.warps, p.slots, p.ksteps, p.cols))
        && (p.units(w.n) as u64) * (w.k as u64 / (32 * p.ksteps) as u64) < 1 << 32;
    ok && cluster_grid(gpu, w, m, p, &p.kernel_name("bf16", m))
        .is_ok_and(|(_, smem)| smem <= gpu.smem_optin)
}

/// The cluster-reduced kernel under plan `p` (kernels/w4a16.cu, `gptq_swapcl`).
fn w4a16_cluster<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    p: ClusterPlan,
    perm: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let Some((tiles, meta)) = &w.swap else {
        return Err(Error::invalid(
            "w4a16",
            "no swap tiles / meta uploaded".to_string(),
        ));
    };
    let name = p.kernel_name(T::NAME, m);
    let (clusters, smem) = cluster_grid(gpu, w, m, &p, &name)?;
    need(
        "w4a16 cluster shared memory",
        smem <= gpu.smem_optin,
        || format!("{smem} bytes per CTA (at most {})", gpu.smem_optin),
    )?;
    let f = gpu.function(Module::W4a16, &name, smem)?;
    let launch = p.launch;
    let dependent = launch == SwapLaunch::Dependent;
    let (mm, k, n, gs, cs, flags) = (
        m as i32,
        w.k as i32,
        w.n as i32,
        w.group_size as i32,
        p.size as i32,
        swap_flags(launch, p.l2, w.layout),
    );
    let st = &gpu.stream;
    let (xp, _gx) = x.device_ptr(st);
    let (tp, _gt) = tiles.device_ptr(st);
    let (mp, _gm) = meta.device_ptr(st);
    let (yp, _gy) = y.device_ptr_mut(st);
    // act-order, in kernel: x staged through perm (null: x as it is)
    let (pp, _gp) = perm_ptr(perm, st);
    let mut params: [*mut std::ffi::c_void; 11] = [
        arg(&xp),
        arg(&tp),
        arg(&mp),
        arg(&yp),
        arg(&mm),
        arg(&k),
        arg(&n),
        arg(&gs),
        arg(&cs),
        arg(&flags),
        arg(&pp),
    ];
    // SAFETY: zeroed attributes are valid C structs; each sets the union member
    // its id names.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    attrs[0].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attrs[0].value.clusterDim.x = p.size as u32;
    attrs[0].value.clusterDim.y = 1;
    attrs[0].value.clusterDim.z = 1;
    attrs[1].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[1].value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: (clusters * p.size) as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: 32 * p.warps as u32,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: st.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: 1 + u32::from(dependent),
    };
    // SAFETY: `params` points at one value per kernel parameter, in the
    // kernel's order and types (device pointers as CUdeviceptr, ints as i32),
    // alive until the call returns; sizes checked by the caller and at upload;
    // the grid is a whole number of clusters.
    unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .drv(&name)
}

/// Launch plan of the ring GPTQ kernel (kernels/w4a16.cu, `gptq_ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPlan {
    /// Columns per step: 32 (`gptq_ring`) or 64 (`gptq_wide`).
    pub cols: usize,
    /// Warps per CTA (each one worker with its own ring): see `variants`.
    pub warps: usize,
    /// Ring slots per warp (slots - 1 steps of 512 weight bytes in flight).
    pub slots: usize,
    /// Grid size in CTAs; 0 = `ctas_per_sm` x the SM count (one wave).
    pub ctas: usize,
    /// CTAs per SM when `ctas` is 0.
    pub ctas_per_sm: usize,
}

impl RingPlan {
    /// The plan `Auto` uses at `m` rows, where it uses this kernel (m <= 8;
    /// above, gptq_mma measured faster on H200, gpu/NOTES.md item 9).
    pub fn auto(m: usize) -> Option<RingPlan> {
        (m <= 8).then_some(RingPlan {
            cols: 64,
            warps: 16,
            slots: 4,
            ctas: 0,
            ctas_per_sm: 1,
        })
    }

    /// The (warps, slots) pairs compiled in kernels/w4a16.cu for `cols`.
    pub fn variants(cols: usize) -> &'static [(usize, usize)] {
        match cols {
            32 => &[(4, 16), (8, 8), (8, 16), (16, 8)],
            64 => &[(4, 16), (8, 8), (8, 4), (16, 4)],
            _ => &[],
        }
    }

    /// Dynamic shared memory of one CTA: x staged and the warps' rings.
    /// 32 columns: (m + 1) rows of 2k + 64 bytes, slots of 640 bytes; 64
    /// columns: min(m, 8) row pairs (+ a zero pair when m < 8) of 4k + 16
    /// bytes, slots of 1184 bytes.
    pub fn smem(&self, m: usize, k: usize) -> usize {
        if self.cols == 64 {
            (m.min(8) + usize::from(m < 8)) * (4 * k + 16) + self.warps * self.slots * 1184
        } else {
            (m + 1) * (2 * k + 64) + self.warps * self.slots * 640
        }
    }
}

/// Whether the ring GPTQ kernel can run `w` at `m` rows under plan `p` on
/// `gpu` (its shared memory must fit one CTA).
pub fn w4a16_ring_applies(gpu: &Gpu, w: &Int4Weights, m: usize, p: &RingPlan) -> bool {
    w.layout == Int4Layout::Gptq
        && w.tiles.is_some()
        && w.ring_meta.is_some()
        && (1..=16).contains(&m)
        && w.k % 32 == 0
        && w.group_size % 32 == 0
        && RingPlan::variants(p.cols).contains(&(p.warps, p.slots))
        && (p.cols == 32 || w.wide.is_some())
        && p.smem(m, w.k) <= gpu.smem_optin
}

/// Launch plan of the tensor-core GPTQ kernel (kernels/w4a16.cu, `gptq_mma`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W4Plan {
    /// Warps per CTA, each a contiguous slice of the CTA's K range: 4 or 8 (8 only for m <= 16).
    pub warps: usize,
    /// 16-byte weight loads in flight per lane: 4 or 8.
    pub unroll: usize,
    /// CTAs splitting K (grid.y), reduced by the last CTA of each column slab; 0 = pick.
    pub splits: usize,
    /// When a lane loads its group's scales and zeros.
    pub scales: ScaleLoad,
}

/// When the tensor-core GPTQ kernel loads scales and zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLoad {
    /// When the group changes: a load that depends on nothing but waits its
    /// own latency inside the step loop.
    OnGroupChange,
    /// With every step's weights (cache hits within a group), so they arrive
    /// together: warps 4 only; unroll 8 only for m <= 16.
    WithWeights,
}

impl W4Plan {
    /// The plan `Auto` uses at `m` rows (best measured on H200, gpu/NOTES.md):
    /// up to 16 rows, split K until about 8 CTAs per SM; above, no split.
    pub fn auto(m: usize) -> W4Plan {
        W4Plan {
            warps: 4,
            unroll: 4,
            splits: if m <= 16 { 0 } else { 1 },
            scales: if m <= 16 {
                ScaleLoad::OnGroupChange
            } else {
                ScaleLoad::WithWeights
            },
        }
    }
}

/// Whether the tensor-core GPTQ kernel can run `w` at `m` rows.
pub fn w4a16_mma_applies(w: &Int4Weights, m: usize) -> bool {
    (w.layout == Int4Layout::Gptq || w.mma_zeros.is_some())
        && w.tiles.is_some()
        && (1..=64).contains(&m)
        && w.k % 32 == 0
        && w.group_size % 8 == 0
}

/// y [m, n] = x [m, k] * W, for m in 1..=64 (larger m is tiled too, just slower).
pub fn w4a16<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    w4a16_with(gpu, w, m, x, y, W4Kernel::Auto)
}

/// `x[:, perm]` of `x` `[m, k]` (kernels/w4a16.cu `w4_gather`): act-order
/// layers where the kernel does not gather x itself ([`ActOrderX::Gathered`]).
fn gather_columns<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    perm: &CudaSlice<i32>,
    m: usize,
    k: usize,
) -> Result<CudaSlice<T>> {
    len_is("perm", perm, k)?;
    // SAFETY: left unset here; the kernel below writes every one of its m x k
    // values (grid-stride over all of them) before anything reads it.
    let mut xp: CudaSlice<T> = unsafe { gpu.stream.alloc(m * k) }.drv("alloc gathered x")?;
    let name = format!("w4_gather_{}", T::NAME);
    let f = gpu.function(Module::W4a16, &name, 0)?;
    let total = m * k;
    let cfg = LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mm, kk) = (m as i32, k as i32);
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(perm).arg(&mut xp).arg(&mm).arg(&kk);
    // SAFETY: argument list matches the kernel; x and xp hold m x k values,
    // perm k indices below k (built at upload).
    unsafe { b.launch(cfg) }.drv(&name)?;
    Ok(xp)
}

/// How the W4A16 bench's read floor reads its bytes (kernels/w4a16.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFloor {
    /// `w4_read_floor`: 16-byte loads, one wave, every thread's loads in
    /// flight at once, under the given L2 policy.
    Loads(WeightL2),
    /// `w4_read_floor_bulk` (sm_90+): bulk copies of `chunk` bytes into a
    /// 4-slot shared ring, one issuing thread per CTA, `ctas_per_sm` CTAs per
    /// SM, L2 evict_first.
    Bulk { chunk: usize, ctas_per_sm: usize },
}

/// Reads every byte of `a` once and nothing else: the least time a kernel
/// that streams as many bytes can take. `sink` (one u32) is written only on
/// an improbable xor value, so no load is dead.
pub fn w4a16_read_floor(
    gpu: &Gpu,
    a: &CudaSlice<u8>,
    how: ReadFloor,
    sink: &mut CudaSlice<u32>,
) -> Result<()> {
    need(
        "read floor buffer",
        a.len() % 16 == 0 && !a.is_empty(),
        || format!("{} bytes (a positive multiple of 16)", a.len()),
    )?;
    len_is("read floor sink", sink, 1)?;
    let st = &gpu.stream;
    let sms = gpu.sm_count.max(1) as usize;
    match how {
        ReadFloor::Loads(l2) => {
            let n16 = (a.len() / 16) as u64;
            let flags = swap_flags(SwapLaunch::Plain, l2, Int4Layout::Gptq);
            let f = gpu.function(Module::W4a16, "w4_read_floor", 0)?;
            let ctas = (a.len() / 16).div_ceil(8 * 256).max(1);
            let cfg = LaunchConfig {
                grid_dim: (ctas as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = st.launch_builder(&f);
            b.arg(a).arg(&n16).arg(&flags).arg(sink);
            // SAFETY: argument list matches the kernel; a holds n16 chunks.
            unsafe { b.launch(cfg) }.drv("w4_read_floor")?;
        }
        ReadFloor::Bulk { chunk, ctas_per_sm } => {
            need(
                "bulk read floor",
                gpu.arch.major >= 9 && chunk % 16 == 0 && chunk > 0 && ctas_per_sm > 0,
                || {
                    format!("sm_{}{}, chunk {chunk}, {ctas_per_sm} CTAs per SM (needs sm_90+, chunk a positive multiple of 16)", gpu.arch.major, gpu.arch.minor)
                },
            )?;
            let smem = 4 * chunk;
            let f = gpu.function(Module::W4a16, "w4_read_floor_bulk", smem)?;
            let nbytes = a.len() as u64;
            let ch = chunk as i32;
            let cfg = LaunchConfig {
                grid_dim: ((sms * ctas_per_sm) as u32, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let mut b = st.launch_builder(&f);
            b.arg(a).arg(&nbytes).arg(&ch);
            // SAFETY: argument list matches the kernel; every copy stays inside a.
            unsafe { b.launch(cfg) }.drv("w4_read_floor_bulk")?;
        }
    }
    Ok(())
}

/// How an act-order layer's x reaches a tensor-core kernel (whose tiles hold
/// the rows in sorted-group order, so it must read x[:, perm]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActOrderX {
    /// The kernel reads x[m, perm[k]] as it stages x (kernels that stage x
    /// once per CTA: swap with staged x, cluster, ring): no gather launch, no
    /// gathered copy; but every CTA gathers its whole k range, a cost that
    /// grows with m (gpu/NOTES.md item 24).
    InKernel,
    /// `w4_gather` writes x[:, perm] to a buffer first (one small launch and
    /// an allocation), which the kernel reads as a layer without act-order.
    Gathered,
}

/// Rows up to which `Auto` lets act-order layers' kernels gather x
/// themselves ([`ActOrderX::InKernel`]); above, x is gathered first (measured
/// on H200 at 14336 x 4096: in-kernel M = 1 0.0135 ms against 0.0172
/// gathered first; M = 16 0.0235 against 0.0213; gpu/NOTES.md item 24).
pub const ACT_ORDER_IN_KERNEL_MAX_M: usize = 8;

impl ActOrderX {
    /// What `Auto` does for kernel `kernel` at `m` rows: in the kernel where
    /// it stages x and m <= [`ACT_ORDER_IN_KERNEL_MAX_M`].
    pub fn auto(kernel: W4Kernel, m: usize) -> ActOrderX {
        if m <= ACT_ORDER_IN_KERNEL_MAX_M && kernel.gathers_x() {
            ActOrderX::InKernel
        } else {
            ActOrderX::Gathered
        }
    }
}

/// [`w4a16`] with the kernel chosen by the caller (act-order layers: x as
/// [`ActOrderX::auto`] says).
pub fn w4a16_with<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    kernel: W4Kernel,
) -> Result<()> {
    let kernel = kernel.resolve(gpu, w, m);
    w4a16_act_order(gpu, w, m, x, y, kernel, ActOrderX::auto(kernel, m))
}

/// [`w4a16_with`] with an act-order layer's x passed as `how` says (ignored
/// for layers without act-order and for the CUDA-core kernel, which reads x
/// through the permutation itself). `InKernel` needs a kernel that gathers
/// ([`W4Kernel::gathers_x`]).
pub fn w4a16_act_order<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    kernel: W4Kernel,
    how: ActOrderX,
) -> Result<()> {
    need("m", m >= 1, || "0".into())?;
    len_is("x", x, m * w.k)?;
    len_is("y", y, m * w.n)?;
    let kernel = kernel.resolve(gpu, w, m);
    let tensor_core = match kernel {
        W4Kernel::CudaCore => false,
        W4Kernel::Auto => w4a16_mma_applies(w, m),
        _ => true,
    };
    let gathered;
    let (x, perm) = match (&w.perm, tensor_core, how) {
        (Some((p, _)), true, ActOrderX::InKernel) => {
            need("w4a16 act-order x", kernel.gathers_x(), || {
                format!("{kernel:?} cannot gather x itself (swapx, gptq_mma: ActOrderX::Gathered)")
            })?;
            (x, Some(p))
        }
        (Some((p, _)), true, ActOrderX::Gathered) => {
            gathered = gather_columns(gpu, x, p, m, w.k)?;
            (&gathered, None)
        }
        _ => (x, None),
    };
    let plan = match kernel {
        W4Kernel::Cluster(p) => {
            need("w4a16 kernel", w4a16_cluster_applies(gpu, w, m, &p), || {
                format!(
                    "the cluster kernel needs sm_90+, GPTQ or AWQ, m in 1..=16, \
                     k and group_size multiples of {}, a cluster of 1..=8 CTAs, a compiled \
                     (warps, slots, ksteps) and its shared memory within {} bytes \
                     (m {m}, k {}, n {}, group_size {}, {p:?})",
                    32 * p.ksteps,
                    gpu.smem_optin,
                    w.k,
                    w.n,
                    w.group_size
                )
            })?;
            return w4a16_cluster(gpu, w, m, x, y, p, perm);
        }
        W4Kernel::Swap(p) => {
            need("w4a16 kernel", w4a16_swap_applies(gpu, w, m, &p), || {
                format!(
                    "the swap kernel needs GPTQ or AWQ, m in 1..=16, \
                     k and group_size multiples of {}, a compiled (warps, slots, ksteps), \
                     x staged for act-order layers, and {} bytes of shared memory \
                     (m {m}, k {}, group_size {}, {p:?})",
                    32 * p.ksteps,
                    p.smem(m, w.k),
                    w.k,
                    w.group_size
                )
            })?;
            return w4a16_swap(gpu, w, m, x, y, p, perm);
        }
        W4Kernel::Ring(p) => {
            need("w4a16 kernel", w4a16_ring_applies(gpu, w, m, &p), || {
                format!(
                    "the ring kernel needs GPTQ, m in 1..=16, \
                     k % 32 == 0, group_size % 32 == 0, a compiled (warps, slots) \
                     and {} bytes of shared memory (m {m}, k {}, group_size {}, {p:?})",
                    p.smem(m, w.k),
                    w.k,
                    w.group_size
                )
            })?;
            return w4a16_ring(gpu, w, m, x, y, p, perm);
        }
        W4Kernel::Auto if w4a16_mma_applies(w, m) => Some(W4Plan::auto(m)),
        W4Kernel::Auto | W4Kernel::CudaCore => None,
        W4Kernel::Mma(p) => {
            need("w4a16 kernel", w4a16_mma_applies(w, m), || {
                format!(
                    "the tensor-core kernel needs GPTQ or AWQ, m in 1..=64, \
                     k % 32 == 0, group_size % 8 == 0 (m {m}, k {}, group_size {})",
                    w.k, w.group_size
                )
            })?;
            Some(p)
        }
    };
    if let Some(p) = plan {
        return w4a16_mma(gpu, w, m, x, y, p);
    }
    let mt = match m {
        1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    };
    let (k, n, gs) = (w.k as i32, w.n as i32, w.group_size as i32);
    let mm = m as i32;
    let (name, cols) = match w.layout {
        Int4Layout::Gptq => (format!("gptq_gemm_{}_m{mt}", T::NAME), 64),
        Int4Layout::Awq => (format!("awq_gemm_{}_m{mt}", T::NAME), 64),
    };
    let f = gpu.function(Module::W4a16, &name, 0)?;
    let cfg = LaunchConfig {
        grid_dim: (w.n.div_ceil(cols) as u32, 1, m.div_ceil(mt) as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(&w.qweight).arg(&w.qzeros).arg(&w.scales);
    let null = 0u64;
    if w.layout == Int4Layout::Gptq {
        match &w.perm {
            Some((p, g)) => {
                b.arg(p).arg(g);
            }
            None => {
                b.arg(&null).arg(&null);
            }
        }
    }
    b.arg(y).arg(&mm).arg(&k).arg(&n).arg(&gs);
    // SAFETY: argument list matches the kernel; sizes checked above and at upload.
    unsafe { b.launch(cfg) }.drv(&name)?;
    Ok(())
}

/// The tensor-core GPTQ kernel under plan `p` (see kernels/w4a16.cu).
fn w4a16_mma<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    p: W4Plan,
) -> Result<()> {
    let mtl = m.div_ceil(16).next_power_of_two();
    need(
        "plan warps",
        p.warps == 4 || (p.warps == 8 && mtl == 1),
        || format!("{} (4, or 8 for m <= 16)", p.warps),
    )?;
    need("plan unroll", p.unroll == 4 || p.unroll == 8, || {
        format!("{} (4 or 8)", p.unroll)
    })?;
    let Some(tiles) = &w.tiles else {
        return Err(Error::invalid(
            "w4a16",
            "no tensor-core tiles uploaded".to_string(),
        ));
    };
    let pf = p.scales == ScaleLoad::WithWeights;
    need(
        "plan scales",
        !pf || (p.warps == 4 && (p.unroll == 4 || mtl == 1)),
        || "scales with weights: warps 4, and unroll 4 unless m <= 16".into(),
    )?;
    let slabs = w.n.div_ceil(32);
    let nsteps = w.k / 32;
    // Split K over CTAs until about 8 CTAs per SM are in the grid (measured
    // best on H200, see gpu/NOTES.md), keeping at least one step per warp.
    let splits = if p.splits == 0 {
        let want = (8 * gpu.sm_count.max(1) as usize).div_ceil(slabs);
        want.next_power_of_two().min((nsteps / p.warps).max(1))
    } else {
        p.splits
    }
    .clamp(1, nsteps);
    let sps = nsteps.div_ceil(splits);
    let splits = nsteps.div_ceil(sps);
    let name = format!(
        "gptq_mma_{}_mt{mtl}_w{}_u{}_p{}",
        T::NAME,
        p.warps,
        p.unroll,
        pf as usize
    );
    let f = gpu.function(Module::W4a16, &name, 0)?;
    let cfg = LaunchConfig {
        grid_dim: (slabs as u32, splits as u32, 1),
        block_dim: (32 * p.warps as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mm, k, n, gs, sps) = (
        m as i32,
        w.k as i32,
        w.n as i32,
        w.group_size as i32,
        sps as i32,
    );
    // GPTQ v1 stores zero - 1 (the kernel adds 1); AWQ's zeros in GPTQ's order
    let (zeros, zoff) = match (&w.mma_zeros, w.layout) {
        (_, Int4Layout::Gptq) => (&w.qzeros, 1i32),
        (Some(z), Int4Layout::Awq) => (z, 0),
        (None, Int4Layout::Awq) => {
            return Err(Error::invalid(
                "w4a16",
                "AWQ layer without its zeros in GPTQ order".to_string(),
            ))
        }
    };
    let nf = if splits > 1 { splits * m * w.n } else { 0 };
    gpu.with_scratch(nf, slabs, |ws, ctr| {
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(x).arg(tiles).arg(zeros).arg(&w.scales).arg(&mut *y);
        b.arg(ws).arg(ctr);
        b.arg(&mm).arg(&k).arg(&n).arg(&gs).arg(&sps).arg(&zoff);
        // SAFETY: argument list matches the kernel; sizes checked above and at
        // upload; the scratch holds splits * m * n partials and `slabs` counters.
        unsafe { b.launch(cfg) }.drv(&name)?;
        Ok(())
    })
}

/// A persistent grid of `warps`-warp CTAs over `steps` work steps: `ctas` CTAs
/// if set, else `per_sm` per SM, cut so that every worker (warp) gets at least
/// one step. Returns (CTAs, workers).
fn persistent_grid(
    gpu: &Gpu,
    ctas: usize,
    per_sm: usize,
    warps: usize,
    steps: usize,
) -> (usize, usize) {
    let want = if ctas > 0 {
        ctas
    } else {
        per_sm * gpu.sm_count.max(1) as usize
    };
    let ctas = want.min(steps.div_ceil(warps)).max(1);
    (ctas, (ctas * warps).min(steps))
}

/// The persistent ring GPTQ kernel under plan `p` (see kernels/w4a16.cu, `gptq_ring`).
fn w4a16_ring<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    p: RingPlan,
    perm: Option<&CudaSlice<i32>>,
) -> Result<()> {
    need(
        "ring plan ctas_per_sm",
        p.ctas > 0 || p.ctas_per_sm > 0,
        || "0 with ctas 0".into(),
    )?;
    let (tiles, meta) = match (p.cols, &w.tiles, &w.ring_meta, &w.wide) {
        (32, Some(t), Some(m), _) => (t, m),
        (64, _, _, Some((t, m))) => (t, m),
        _ => {
            return Err(Error::invalid(
                "w4a16",
                "no ring tiles / meta uploaded".to_string(),
            ))
        }
    };
    let slabs = w.n.div_ceil(p.cols);
    let steps = slabs * (w.k / 32);
    let (ctas, nw) = persistent_grid(gpu, p.ctas, p.ctas_per_sm, p.warps, steps);
    let smem = p.smem(m, w.k);
    let mr = if m <= 8 { 8 } else { 16 };
    let name = if p.cols == 64 {
        format!("gptq_wide_{}_w{}_r{}", T::NAME, p.warps, p.slots)
    } else {
        format!("gptq_ring_{}_w{}_r{}_m{mr}", T::NAME, p.warps, p.slots)
    };
    let f = gpu.function(Module::W4a16, &name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (32 * p.warps as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (mm, k, n, gs, nwi) = (
        m as i32,
        w.k as i32,
        w.n as i32,
        w.group_size as i32,
        nw as i32,
    );
    gpu.with_scratch((nw + slabs) * m * p.cols, slabs, |ws, ctr| {
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(x).arg(tiles).arg(meta).arg(&mut *y);
        b.arg(ws).arg(ctr);
        b.arg(&mm).arg(&k).arg(&n).arg(&gs).arg(&nwi);
        // act-order, in kernel: x staged through perm (null: x as it is)
        let null = 0u64;
        match perm {
            Some(pp) => b.arg(pp),
            None => b.arg(&null),
        };
        // SAFETY: argument list matches the kernel; sizes checked above and at
        // upload (perm: k indices below k); the scratch holds (workers + slabs)
        // x m x 32 partials and `slabs` counters.
        unsafe { b.launch(cfg) }.drv(&name)?;
        Ok(())
    })
}

/// The swapped-operand ring GPTQ kernel under plan `p` (kernels/w4a16.cu, `gptq_swap`).
fn w4a16_swap<T: Elem>(
    gpu: &Gpu,
    w: &Int4Weights,
    m: usize,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    p: SwapPlan,
    perm: Option<&CudaSlice<i32>>,
) -> Result<()> {
    need(
        "swap plan ctas_per_sm",
        p.ctas > 0 || p.ctas_per_sm > 0,
        || "0 with ctas 0".into(),
    )?;
    let Some((tiles, meta)) = &w.swap else {
        return Err(Error::invalid(
            "w4a16",
            "no swap tiles / meta uploaded".to_string(),
        ));
    };
    let pairs = w.n.div_ceil(64);
    let steps = pairs * (w.k / (32 * p.ksteps));
    let smem = p.smem(m, w.k);
    // one wave: no more CTAs per SM than the SM's shared memory holds
    let fit = ((gpu.smem_optin + 1024) / (smem + 1024)).max(1);
    let (ctas, nw) = persistent_grid(gpu, p.ctas, p.ctas_per_sm.min(fit), p.warps, steps);
    // the kernel's work-line arithmetic is 32-bit: w x TS for w <= nw
    need(
        "w4a16 swap work line",
        (nw as u64) * (steps as u64) < 1 << 32,
        || format!("{nw} workers x {steps} steps (must stay below 2^32)"),
    )?;
    let name = p.kernel_name(T::NAME, m);
    let f = gpu.function(Module::W4a16, &name, smem)?;
    let launch = if gpu.arch.major >= 9 {
        p.launch
    } else {
        SwapLaunch::Plain
    };
    let dependent = launch == SwapLaunch::Dependent;
    let (mm, k, n, gs, nwi, flags) = (
        m as i32,
        w.k as i32,
        w.n as i32,
        w.group_size as i32,
        nw as i32,
        swap_flags(launch, p.l2, w.layout),
    );
    gpu.with_scratch((nw + pairs) * m * 64, pairs, |ws, ctr| {
        let st = &gpu.stream;
        let (xp, _gx) = x.device_ptr(st);
        let (tp, _gt) = tiles.device_ptr(st);
        let (mp, _gm) = meta.device_ptr(st);
        let (yp, _gy) = y.device_ptr_mut(st);
        let (wp, _gw) = ws.device_ptr_mut(st);
        let (cp, _gc) = ctr.device_ptr_mut(st);
        // act-order, in kernel: staged x through perm (null: x as it is; the
        // swapx kernels take no perm)
        let (pp, _gp) = perm_ptr(perm, st);
        let mut params: [*mut std::ffi::c_void; 13] = [
            &xp as *const _ as *mut _,
            &tp as *const _ as *mut _,
            &mp as *const _ as *mut _,
            &yp as *const _ as *mut _,
            &wp as *const _ as *mut _,
            &cp as *const _ as *mut _,
            &mm as *const _ as *mut _,
            &k as *const _ as *mut _,
            &n as *const _ as *mut _,
            &gs as *const _ as *mut _,
            &nwi as *const _ as *mut _,
            &flags as *const _ as *mut _,
            &pp as *const _ as *mut _,
        ];
        // SAFETY: a zeroed attribute is a valid C struct; the one field set is
        // the union member the attribute id names.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: ctas as u32,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: 32 * p.warps as u32,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem as u32,
            hStream: st.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(dependent),
        };
        // SAFETY: `params` points at one value per kernel parameter, in the
        // kernel's order and types (device pointers as CUdeviceptr, ints as
        // i32; the last, perm, is read only by the staged kernels: the swapx
        // kernels have 12 parameters), alive until the call returns; sizes
        // checked above and at upload (perm: k indices below k); the scratch
        // holds (workers + pairs) x m x 64 partials and `pairs` counters.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .drv(&name)?;
        Ok(())
    })
}

// ---------------------------------------------------------------- sampler

/// Batched rejection sampling (kernels/sampler.cu), the rule of
/// `reference::speculative::verify::rejection_sample`: writes tokens [b, k+1]
/// (-1 padded) and counts [b] (accepted + 1). One resample uniform per
/// sequence serves the corrected or the bonus token, as in the reference.
#[allow(clippy::too_many_arguments)]
pub fn rejection_sample(
    gpu: &Gpu,
    b: usize,
    k: usize,
    vocab: usize,
    draft: &CudaSlice<i32>,
    q: &CudaSlice<f32>,
    p: &CudaSlice<f32>,
    u_acc: &CudaSlice<f32>,
    u_res: &CudaSlice<f32>,
    out: &mut CudaSlice<i32>,
    n_out: &mut CudaSlice<i32>,
) -> Result<()> {
    len_is("draft", draft, b * k)?;
    len_is("q", q, b * k * vocab)?;
    len_is("p", p, b * (k + 1) * vocab)?;
    len_is("u_acc", u_acc, b * k)?;
    len_is("u_res", u_res, b)?;
    len_is("out", out, b * (k + 1))?;
    len_is("n_out", n_out, b)?;
    let f = gpu.function(Module::Sampler, "rejection_sample", 0)?;
    let cfg = LaunchConfig {
        grid_dim: (b.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (bb, kk, vv) = (b as i32, k as i32, vocab as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(draft)
        .arg(q)
        .arg(p)
        .arg(u_acc)
        .arg(u_res)
        .arg(out)
        .arg(n_out);
    l.arg(&bb).arg(&kk).arg(&vv);
    // SAFETY: sizes checked above; draft tokens are in 0..vocab (caller's contract,
    // validated by the check harness which builds them).
    unsafe { l.launch(cfg) }.drv("rejection_sample")?;
    Ok(())
}

// ---------------------------------------------------------------- elementwise

pub fn rmsnorm<T: Elem>(
    gpu: &Gpu,
    rows: usize,
    h: usize,
    eps: f32,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    len_is("x", x, rows * h)?;
    len_is("w", w, h)?;
    len_is("y", y, rows * h)?;
    let name = format!("rmsnorm_{}", T::NAME);
    let f = gpu.function(Module::Elementwise, &name, 0)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let hh = h as i32;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(w).arg(y).arg(&hh).arg(&eps);
    // SAFETY: sizes checked.
    unsafe { b.launch(cfg) }.drv(&name)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn rope<T: Elem>(
    gpu: &Gpu,
    tokens: usize,
    h: usize,
    d: usize,
    theta: f32,
    x: &CudaSlice<T>,
    pos: &CudaSlice<i32>,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    need("head_dim", d % 2 == 0, || format!("{d} (even)"))?;
    len_is("x", x, tokens * h * d)?;
    len_is("pos", pos, tokens)?;
    len_is("y", y, tokens * h * d)?;
    let name = format!("rope_{}", T::NAME);
    let f = gpu.function(Module::Elementwise, &name, 0)?;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (hh, dd, lt) = (h as i32, d as i32, theta.log2());
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(pos).arg(y).arg(&hh).arg(&dd).arg(&lt);
    // SAFETY: sizes checked.
    unsafe { b.launch(cfg) }.drv(&name)?;
    Ok(())
}

pub fn swiglu<T: Elem>(
    gpu: &Gpu,
    n: usize,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    len_is("gate", gate, n)?;
    len_is("up", up, n)?;
    len_is("y", y, n)?;
    let name = format!("swiglu_{}", T::NAME);
    let f = gpu.function(Module::Elementwise, &name, 0)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4 * 132 * 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let nn = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(gate).arg(up).arg(y).arg(&nn);
    // SAFETY: sizes checked.
    unsafe { b.launch(cfg) }.drv(&name)?;
    Ok(())
}

/// Device-to-device copy of `n16` 16-byte words (the bandwidth ceiling).
pub fn copy16(gpu: &Gpu, src: &CudaSlice<u8>, dst: &mut CudaSlice<u8>) -> Result<()> {
    need(
        "copy",
        src.len() % 16 == 0 && dst.len() >= src.len(),
        || "16-byte multiple".into(),
    )?;
    let f = gpu.function(Module::Elementwise, "copy16", 0)?;
    let cfg = LaunchConfig {
        grid_dim: (gpu.sm_count as u32 * 8, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = (src.len() / 16) as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(src).arg(dst).arg(&n);
    // SAFETY: sizes checked.
    unsafe { b.launch(cfg) }.drv("copy16")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gptq_mma_tiles;

    /// The 64-column layouts put slab 2p + h's step s (tiles) and group g
    /// (meta) at pair p, half h; halves past the last slab are zero.
    /// The swap and cluster kernels' flags word, one line per case: each bit
    /// is the kernel's constant of that name (kernels/w4a16.cu).
    #[test]
    fn swap_flags_match_the_kernel_constants() {
        let src = include_str!("../kernels/w4a16.cu");
        assert!(
            src.contains("constexpr int W4F_PDL = 1, W4F_EVICT = 2, W4F_TRUE_ZERO = 4;"),
            "kernels/w4a16.cu changed its flag bits"
        );
        use super::{swap_flags, Int4Layout as L, SwapLaunch as S, WeightL2 as W};
        let check = |launch, l2, layout, want: i32| {
            assert_eq!(
                swap_flags(launch, l2, layout),
                want,
                "{launch:?} {l2:?} {layout:?}"
            );
        };
        check(S::Plain, W::Normal, L::Gptq, 0);
        check(S::Dependent, W::Normal, L::Gptq, 1);
        check(S::Plain, W::EvictFirst, L::Gptq, 2);
        check(S::Plain, W::Normal, L::Awq, 4);
        check(S::Dependent, W::EvictFirst, L::Awq, 7);
    }

    #[test]
    fn wide_layouts_pair_the_slabs() {
        let (k, n, groups) = (64usize, 72usize, 2usize); // 3 slabs -> 2 pairs, 2 steps
        let steps = k / 32;
        let tiles: Vec<i32> = (0..3 * steps * 128).map(|i| i as i32 + 1).collect();
        let wt = super::gptq_wide_tiles(&tiles, k, n);
        assert_eq!(wt.len(), 2 * steps * 256);
        for pair in 0..2 {
            for step in 0..steps {
                for h in 0..2 {
                    let slab = 2 * pair + h;
                    for i in 0..128 {
                        let got = wt[((pair * steps + step) * 2 + h) * 128 + i];
                        let want = if slab < 3 {
                            tiles[(slab * steps + step) * 128 + i]
                        } else {
                            0
                        };
                        assert_eq!(got, want, "pair {pair} step {step} h {h} word {i}");
                    }
                }
            }
        }
        let meta: Vec<i32> = (0..3 * groups * 20).map(|i| i as i32 + 1).collect();
        let wm = super::gptq_wide_meta(&meta, n, groups);
        assert_eq!(wm.len(), 2 * groups * 40);
        for pair in 0..2 {
            for g in 0..groups {
                for h in 0..2 {
                    let slab = 2 * pair + h;
                    for i in 0..20 {
                        let got = wm[(pair * groups + g) * 40 + 20 * h + i];
                        let want = if slab < 3 {
                            meta[(slab * groups + g) * 20 + i]
                        } else {
                            0
                        };
                        assert_eq!(got, want, "pair {pair} group {g} h {h} word {i}");
                    }
                }
            }
        }
    }

    /// Each (slab, group) record holds that slab's 32 scales and 4 zero words
    /// where the ring kernel reads them; columns past n read as zero.
    #[test]
    fn ring_meta_records_hold_scales_and_zeros() {
        use half::f16;
        // n = 40: two slabs, the second with 8 real columns; 3 groups
        let (n, groups) = (40usize, 3usize);
        let scales: Vec<f16> = (0..groups * n).map(|i| f16::from_f32(i as f32)).collect();
        let qzeros: Vec<i32> = (0..groups * n / 8).map(|i| 1000 + i as i32).collect();
        let m = super::gptq_ring_meta(&qzeros, &scales, n, groups);
        assert_eq!(m.len(), 2 * groups * 20);
        for slab in 0..2 {
            for g in 0..groups {
                let rec = &m[(slab * groups + g) * 20..][..20];
                for c in 0..32 {
                    let col = slab * 32 + c;
                    let bits = (rec[c / 2] as u32 >> (16 * (c % 2))) & 0xffff;
                    let want = if col < n {
                        scales[g * n + col].to_bits() as u32
                    } else {
                        0
                    };
                    assert_eq!(bits, want, "slab {slab} group {g} column {c}");
                }
                for i in 0..4 {
                    let wd = slab * 4 + i;
                    let want = if wd < n / 8 {
                        qzeros[g * (n / 8) + wd]
                    } else {
                        0
                    };
                    assert_eq!(rec[16 + i], want, "slab {slab} group {g} zero word {i}");
                }
            }
        }
    }

    /// A CPU emulation of `gptq_swap`'s fragment arithmetic (lane (g, t)'s A
    /// registers from the tiles, B registers from raw x, C rows = columns,
    /// group flush with the meta records) reproduces the plain dequantized
    /// product: the layouts and the kernel's index conventions agree.
    #[test]
    fn swap_layout_emulation_matches_reference() {
        use half::f16;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (k, n, gs, m) in [(128usize, 80usize, 32usize, 3usize), (256, 136, 64, 11)] {
            let groups = k / gs;
            let q: Vec<u32> = (0..k * n).map(|_| rng.random_range(0..16u32)).collect();
            let z: Vec<u32> = (0..groups * n)
                .map(|_| rng.random_range(0..16u32))
                .collect();
            let sc: Vec<f16> = (0..groups * n)
                .map(|_| f16::from_f32(rng.random_range(0.01f32..0.03)))
                .collect();
            let x: Vec<f64> = (0..m * k).map(|_| rng.random_range(-1.0f64..1.0)).collect();
            let mut qweight = vec![0i32; k / 8 * n];
            for kk in 0..k {
                for c in 0..n {
                    qweight[(kk / 8) * n + c] |= (q[kk * n + c] << (4 * (kk % 8))) as i32;
                }
            }
            let mut qzeros = vec![0i32; groups * n / 8];
            for g in 0..groups {
                for c in 0..n {
                    qzeros[g * (n / 8) + c / 8] |= (z[g * n + c] << (4 * (c % 8))) as i32;
                }
            }
            let tiles = super::gptq_swap_tiles(&qweight, k, n);
            let meta = super::gptq_swap_meta(&qzeros, &sc, n, groups);
            let (pairs, steps, spg) = (n.div_ceil(64), k / 32, gs / 32);
            let magic = 128.0f64;
            let nt = m.div_ceil(8);
            let xv = |r: usize, kk: usize| if r < m { x[r * k + kk] } else { 0.0 };
            let mut y = vec![f64::NAN; m * n];
            for pair in 0..pairs {
                let mut out = vec![0.0f64; 64 * 8 * nt];
                for grp in 0..groups {
                    let mut acc = vec![0.0f64; 64 * 8 * nt];
                    let mut rs = vec![0.0f64; 8 * nt];
                    for step in grp * spg..(grp + 1) * spg {
                        let blk = &tiles[(pair * steps + step) * 256..][..256];
                        for j in 0..4 {
                            for mi in 0..2 {
                                let mut a = [[0.0f64; 16]; 16];
                                let mut b = vec![[0.0f64; 16]; 8 * nt];
                                for lane in 0..32 {
                                    let (g, t) = (lane / 4, lane % 4);
                                    let base = ((j / 2) * 32 + lane) * 4 + 2 * (j % 2);
                                    let (w0, w1) = (blk[base] as u32, blk[base + 1] as u32);
                                    let pr = |w: u32, i: usize| {
                                        (
                                            ((w >> (4 * i)) & 0xF) as f64,
                                            ((w >> (16 + 4 * i)) & 0xF) as f64,
                                        )
                                    };
                                    for (row, w) in [(g, w0), (g + 8, w1)] {
                                        let (l0, h0) = pr(w, 2 * mi);
                                        let (l1, h1) = pr(w, 2 * mi + 1);
                                        a[row][2 * t] = l0;
                                        a[row][2 * t + 1] = h0;
                                        a[row][2 * t + 8] = l1;
                                        a[row][2 * t + 9] = h1;
                                    }
                                    let kb = 4 * step + t;
                                    for tile in 0..nt {
                                        let r = 8 * tile + g;
                                        let xs: Vec<f64> =
                                            (0..4).map(|e| xv(r, 8 * kb + 4 * mi + e)).collect();
                                        b[r][2 * t] = xs[0];
                                        b[r][2 * t + 1] = xs[1];
                                        b[r][2 * t + 8] = xs[2];
                                        b[r][2 * t + 9] = xs[3];
                                    }
                                }
                                for r in 0..16 {
                                    for (mr, bc) in b.iter().enumerate() {
                                        let d: f64 =
                                            (0..16).map(|kk| (magic + a[r][kk]) * bc[kk]).sum();
                                        acc[(16 * j + r) * 8 * nt + mr] += d;
                                    }
                                }
                                if j == 0 {
                                    for (mr, bc) in b.iter().enumerate() {
                                        rs[mr] += bc.iter().sum::<f64>();
                                    }
                                }
                            }
                        }
                    }
                    let rec = &meta[(pair * groups + grp) * 40..][..40];
                    for c in 0..64 {
                        let (g, i) = (c % 8, c / 8);
                        let bits = (rec[4 * g + i / 2] as u32 >> (16 * (i % 2))) & 0xffff;
                        let s = f16::from_bits(bits as u16).to_f64();
                        let zz = ((rec[32 + g] as u32 >> (4 * i)) & 0xF) as f64;
                        for mr in 0..8 * nt {
                            let idx = c * 8 * nt + mr;
                            out[idx] += s * (acc[idx] - (magic + zz + 1.0) * rs[mr]);
                        }
                    }
                }
                for c in 0..64 {
                    let col = 64 * pair + c;
                    if col < n {
                        for mr in 0..m {
                            y[mr * n + col] = out[c * 8 * nt + mr];
                        }
                    }
                }
            }
            for mr in 0..m {
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|kk| {
                            let g = kk / gs;
                            let w = sc[g * n + c].to_f64()
                                * (q[kk * n + c] as f64 - (z[g * n + c] as f64 + 1.0));
                            x[mr * k + kk] * w
                        })
                        .sum();
                    let got = y[mr * n + c];
                    assert!(
                        (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                        "k {k} n {n} m {m}: y[{mr}][{c}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    /// The plans `Auto` takes for act-order layers are compiled variants that
    /// stage x (the kernels that read x through the permutation as they
    /// stage it), at every m <= 16 of a layer with k, group_size % 128 == 0.
    #[test]
    fn act_order_auto_plans_are_compiled_and_staged() {
        use super::{Arch, ClusterPlan, SwapPlan, SwapX};
        for m in 1..=16 {
            let nt = SwapPlan::tiles(m);
            let s = SwapPlan::auto_staged(m).expect("m <= 16");
            assert_eq!(s.x, SwapX::Staged, "m {m}");
            assert!(
                SwapPlan::variants(nt, SwapX::Staged).contains(&(s.warps, s.slots, s.ksteps)),
                "m {m}: {s:?}"
            );
            let c = ClusterPlan::auto_act_order(m, 4096, 128, Arch::SM90A).expect("sm_90a");
            assert!(
                ClusterPlan::variants(nt).contains(&(c.warps, c.slots, c.ksteps, c.cols)),
                "m {m}: {c:?}"
            );
            assert!(ClusterPlan::auto_act_order(m, 4096, 128, Arch::SM80).is_none());
        }
        assert!(SwapPlan::auto_staged(17).is_none());
        assert!(ClusterPlan::auto_act_order(17, 4096, 128, Arch::SM90A).is_none());
    }

    /// Nibble re-order: k-rows 2i, 2i + 1 land in the halves of pair i.
    #[test]
    fn swap_nibbles_pairs_rows() {
        let w = 0x7654_3210u32 as i32;
        let s = super::swap_nibbles(w) as u32;
        for i in 0..4 {
            assert_eq!((s >> (4 * i)) & 0xF, 2 * i as u32);
            assert_eq!((s >> (16 + 4 * i)) & 0xF, 2 * i as u32 + 1);
        }
    }

    /// Every word lands where the kernel's lane (g, t) of step s looks for it,
    /// once; columns past n read as zero.
    #[test]
    fn mma_tiles_place_every_word_once() {
        let (k, n) = (64usize, 40usize);
        let qw: Vec<i32> = (0..k / 8 * n).map(|i| i as i32 + 1).collect();
        let t = gptq_mma_tiles(&qw, k, n);
        assert_eq!(t.len(), 2 * 2 * 32 * 4);
        let mut seen = vec![0u8; qw.len()];
        for (i, &w) in t.iter().enumerate() {
            let (j, lane, step, slab) = (i % 4, (i / 4) % 32, (i / 128) % 2, i / 256);
            let col = slab * 32 + 4 * (lane / 4) + j;
            let kb = step * 4 + lane % 4;
            if col < n {
                assert_eq!(
                    w,
                    qw[kb * n + col],
                    "slab {slab} step {step} lane {lane} j {j}"
                );
                seen[kb * n + col] += 1;
            } else {
                assert_eq!(w, 0);
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }
}

#[cfg(test)]
mod prefill_tests {
    use super::*;

    /// Every kernel `all` lists is valid (has an instantiation), labels are
    /// unique, and the default is one of them, for both archs and head dims;
    /// v3 exists on sm_90a only.
    #[test]
    fn prefill_kernels_consistent() {
        for arch in [Arch::SM80, Arch::SM90A] {
            for d in [64, 128] {
                let all = PrefillKernel::all(d, arch);
                for k in &all {
                    assert!(k.valid(d, arch), "{k:?} d{d} {arch}");
                    assert!(
                        arch == Arch::SM90A
                            || !matches!(k, PrefillKernel::V3 { .. } | PrefillKernel::V4 { .. })
                    );
                }
                let mut labels: Vec<String> = all.iter().map(|k| k.label()).collect();
                labels.sort();
                labels.dedup();
                assert_eq!(labels.len(), all.len(), "duplicate labels: {labels:?}");
                let def = PrefillKernel::default_for(d, arch);
                assert!(all.contains(&def), "{def:?} not in all({d}, {arch})");
            }
        }
        assert!(!PrefillKernel::V3 {
            block_n: 128,
            overlap: false,
            warpgroups: 2
        }
        .valid(128, Arch::SM80));
        assert!(!PrefillKernel::V4 {
            schedule: WgSchedule::PingPong,
            grid: CtaGrid::Persistent
        }
        .valid(128, Arch::SM80));
    }
}

#[cfg(test)]
mod decode_plan_tests {
    use super::*;

    /// The rule's expected kernel at a case: the default kernel, direct (one
    /// partition, no merge kernel) or split (merge kernel); or v7's default
    /// (one partition, direct output).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        Direct,
        Split,
        WholeBlocks,
    }

    /// One case: (batch, hkv, max_len, block size) on `sms` SMs, with 4 query
    /// heads per KV head at d128, must give `partition` (and `expect`), a
    /// valid plan for `paged_decode`.
    #[track_caller]
    fn check(
        batch: usize,
        hkv: usize,
        max_len: usize,
        bs: usize,
        sms: usize,
        partition: usize,
        expect: Expect,
    ) {
        check_heads(
            batch,
            4 * hkv,
            hkv,
            128,
            max_len,
            bs,
            sms,
            partition,
            expect,
        );
    }

    /// [`check`] with the query heads and head dim given.
    #[allow(clippy::too_many_arguments)]
    #[track_caller]
    fn check_heads(
        batch: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        max_len: usize,
        bs: usize,
        sms: usize,
        partition: usize,
        expect: Expect,
    ) {
        let dims = DecodeDims {
            batch,
            hq,
            hkv,
            d,
            block_size: bs,
            num_blocks: batch * max_len.div_ceil(bs),
            max_blocks: max_len.div_ceil(bs),
            max_len,
        };
        let p = dims.auto(sms);
        let case = format!("B{batch} {hq}/{hkv} d{d} len{max_len} bs{bs} {sms} SMs");
        assert_eq!(p.partition, partition, "{case}");
        let got = if p.kernel == DecodeKernel::V7_DEFAULT {
            assert_eq!(p.nparts(), 1, "{case}");
            Expect::WholeBlocks
        } else if p.nparts() == 1 {
            assert_eq!(p.kernel, DecodeKernel::DEFAULT, "{case}");
            Expect::Direct
        } else {
            assert_eq!(p.kernel, DecodeKernel::DEFAULT, "{case}");
            Expect::Split
        };
        assert_eq!(got, expect, "{case}: {} partitions", p.nparts());
        // paged_decode's checks: a multiple of 32 and of the block size, at
        // most 256 blocks for v6; partitions cover max_len
        assert!(p.partition % 32 == 0 && p.partition % bs == 0, "{case}");
        assert!(p.partition / bs <= 256, "{case}");
        assert!(p.partition * p.nparts() >= max_len, "{case}");
    }

    /// The merges' `OPT` bits are the kernels' `DEC_*` constants, and every
    /// v7 (stages, merge) that `paged_decode` accepts names an instance of
    /// kernels/decode.cu (its name is `paged_decode7_.._s{stages}_o{1 | bits}`).
    #[test]
    fn v7_plans_name_instanced_kernels() {
        let src = include_str!("../kernels/decode.cu");
        for (name, m) in [
            ("DEC_CLUSTER", DecodeMerge::Cluster),
            ("DEC_LAST", DecodeMerge::LastCta),
            ("DEC_DIRECT", DecodeMerge::Direct),
        ] {
            let line = format!("#define {name} {}", m.bits());
            assert!(src.contains(&line), "decode.cu lacks `{line}`");
        }
        assert!(src.contains("#define DEC_EAGER 1"));
        for stages in 2..=4 {
            for merge in DecodeKernel::V7_MERGES {
                let accepted =
                    stages < 4 || matches!(merge, DecodeMerge::Kernel | DecodeMerge::Direct);
                let inst = format!("DECODE7_INST(SUF, T, D, {stages}, {})", 1 | merge.bits());
                assert_eq!(src.contains(&inst), accepted, "{inst}");
            }
        }
    }

    #[test]
    fn decode_plan_rule() {
        use Expect::*;
        // H200 (132 SMs), GQA 32/8, block 16: the swept shapes, as measured
        // best (or within 3 %) in bench/results/gpu-2026-12-01-s7-decode-rule.md
        check(1, 8, 1024, 16, 132, 128, Split);
        check(4, 8, 1024, 16, 132, 256, Split);
        check(16, 8, 1024, 16, 132, 512, Split);
        check(32, 8, 1024, 16, 132, 1024, Direct);
        check(1, 8, 4096, 16, 132, 256, Split);
        check(2, 8, 4096, 16, 132, 512, Split);
        check(8, 8, 4096, 16, 132, 1024, Split);
        check(16, 8, 4096, 16, 132, 2048, Split);
        check(32, 8, 4096, 16, 132, 4096, Direct);
        // 128 CTAs of 4 heads: one wave on 132 SMs, v7 (item 26)
        check(64, 8, 4096, 16, 132, 4096, WholeBlocks);
        check(64, 8, 1024, 16, 132, 1024, WholeBlocks);
        // 256 CTAs of 4 heads: more than one wave, v6
        check(128, 8, 4096, 16, 132, 4096, Direct);
        check(1, 8, 16384, 16, 132, 1024, Split);
        check(4, 8, 16384, 16, 132, 2048, Split);
        // past 256 blocks: never one partition; the 4096-token ones
        check(128, 8, 16384, 16, 132, 4096, Split);
        // block 32: up to 8192 tokens in one CTA
        check(128, 8, 8192, 32, 132, 8192, Direct);
        check(4, 8, 16384, 32, 132, 2048, Split);
        // odd lengths: max_len / n rounded up to 32
        check(1, 8, 1000, 16, 132, 128, Split);
        check(3, 8, 3000, 16, 132, 384, Split);
        check(5, 3, 1025, 16, 132, 160, Split);
        // fewer SMs: fewer partitions (a small device fills sooner)
        check(5, 3, 1025, 16, 16, 544, Split);
        check(5, 3, 1025, 16, 1, 1056, Direct);
        check(8, 8, 4096, 16, 16, 4096, WholeBlocks);
        check(6, 8, 4096, 16, 16, 4096, WholeBlocks);
        check(5, 8, 4096, 16, 16, 4096, Direct);
        check(2, 8, 4096, 16, 108, 512, Split);
        // a very long single sequence: 64 partitions, one wave of 1 head
        check(1, 1, 100000, 16, 132, 1568, Split);
        // one wave of 4-head CTAs but outside v7's measured wins: MHA d128,
        // GQA d64 (call 9 of gpu-2026-12-02-s10-final.md): v6
        check_heads(16, 32, 32, 128, 4096, 16, 132, 4096, Direct);
        check_heads(64, 64, 8, 64, 4096, 32, 132, 4096, Direct);
        check_heads(64, 32, 8, 128, 4096, 32, 132, 4096, WholeBlocks);
    }
}
