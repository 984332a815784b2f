// prefill.cu: FlashAttention-2 forward on tensor cores (mma.sync m16n8k16).
//
// One CTA = NW warps = a tile of BM = 16*NW query rows of one (sequence, query
// head); each warp owns 16 rows. Key/value tiles of BN = 64 rows stream through
// shared memory, double-buffered with cp.async (sm_80+). S = Q K^T and O += P V
// run on tensor cores with f32 accumulators; the online softmax (running max m,
// running sum l, rescale by exp2(m_old - m_new)) stays in registers in the
// accumulator layout, so P never leaves registers (FA2, Dao 2023, Alg. 1).
//
// Layouts (varlen, like flash_attn_varlen_func):
//   q, out: [total_q, Hq, D]   k, v: [total_k, Hkv, D]   lse: [total_q, Hq] f32 (natural log)
//   cu_q, cu_k: [B+1] prefix sums of the per-sequence lengths.
// Causal is bottom-right: row i of a sequence sees key j iff j <= Lk - Lq + i.
// GQA: query head h reads KV head h / (Hq / Hkv).
// Shared-memory rows are padded by 8 elements (16 B) so the 32-bit fragment
// loads and the ldmatrix phases hit 32 distinct banks.

template <class T, int D, int NW>
__device__ __forceinline__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, T* __restrict__ o,
                                          float* __restrict__ lse, const int* __restrict__ cu_q,
                                          const int* __restrict__ cu_k, int hq, int hkv,
                                          float scale_log2, int causal) {
    constexpr int BM = 16 * NW, BN = 64, LD = D + 8;
    constexpr int NTHR = 32 * NW;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = (T*)smem_raw;      // [2][BN][LD]
    T* sV = sK + 2 * BN * LD;  // [2][BN][LD]

    const int mb = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) tiles first
    const int h = blockIdx.y, b = blockIdx.z;
    const int q0 = cu_q[b], lq = cu_q[b + 1] - q0;
    const int k0 = cu_k[b], lk = cu_k[b + 1] - k0;
    if (mb * BM >= lq) return;
    const int hk = h / (hq / hkv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = mb * BM + warp * 16;

    // Q fragments (A operand), loaded once; rows past the end read as zero.
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = row0 + g + (r & 1) * 8;
            int col = kk * 16 + 2 * t + (r >> 1) * 8;
            qf[kk][r] = row < lq ? *(const u32*)(q + ((size_t)(q0 + row) * hq + h) * D + col) : 0u;
        }
    }

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

    int kend = lk;
    if (causal) kend = min(lk, lk - lq + mb * BM + BM);
    const int ntiles = kend > 0 ? (kend + BN - 1) / BN : 0;

    auto load_tile = [&](int j, int stage) {
        T* dk = sK + stage * BN * LD;
        T* dv = sV + stage * BN * LD;
#pragma unroll
        for (int c = threadIdx.x; c < BN * D / 8; c += NTHR) {
            int key = c / (D / 8), c8 = c % (D / 8);
            int kj = j * BN + key;
            bool ok = kj < lk;
            size_t off = ok ? ((size_t)(k0 + kj) * hkv + hk) * D + c8 * 8 : 0;
            cp_async16(dk + key * LD + c8 * 8, k + off, ok ? 16 : 0);
            cp_async16(dv + key * LD + c8 * 8, v + off, ok ? 16 : 0);
        }
    };

    if (ntiles > 0) load_tile(0, 0);
    cp_async_commit();
    for (int j = 0; j < ntiles; ++j) {
        if (j + 1 < ntiles) load_tile(j + 1, (j + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* Ks = sK + (j & 1) * BN * LD;
        const T* Vs = sV + (j & 1) * BN * LD;

        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt += 2) {
                // one ldmatrix.x4: B fragments (b0, b1) of key tiles nt and nt+1
                u32 bk[4];
                const int mi = lane >> 3;
                ldmatrix_x4(bk, Ks + ((nt + (mi >> 1)) * 8 + (lane & 7)) * LD + kk * 16 + (mi & 1) * 8);
                mma16816<T>(s[nt], qf[kk], bk[0], bk[1]);
                mma16816<T>(s[nt + 1], qf[kk], bk[2], bk[3]);
            }
        }
        // scale (log2 domain) and mask
        const bool need_mask = (j * BN + BN > lk) || (causal && j * BN + BN - 1 > lk - lq + row0);
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float x = s[nt][r] * scale_log2;
                if (need_mask) {
                    int i = row0 + g + (r >> 1) * 8;
                    int kj = j * BN + nt * 8 + 2 * t + (r & 1);
                    if (kj >= lk || (causal && kj > lk - lq + i)) x = NEG_INF;
                }
                s[nt][r] = x;
                mx[r >> 1] = fmaxf(mx[r >> 1], x);
            }
        }
        float alpha[2], m_use[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 1));
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 2));
            float m_new = fmaxf(m_run[rr], mx[rr]);
            m_use[rr] = m_new == NEG_INF ? 0.f : m_new;
            alpha[rr] = exp2f(m_run[rr] - m_use[rr]);
            m_run[rr] = m_new;
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float p = exp2f(s[nt][r] - m_use[r >> 1]);
                s[nt][r] = p;
                rs[r >> 1] += p;
            }
        }
        l_run[0] = l_run[0] * alpha[0] + rs[0];
        l_run[1] = l_run[1] * alpha[1] + rs[1];
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            acc[i][0] *= alpha[0]; acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1]; acc[i][3] *= alpha[1];
        }
        // O += P V
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                u32 bv[4];
                int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                int dim = n2 * 16 + (lane >> 4) * 8;
                ldmatrix_x4_trans(bv, Vs + key * LD + dim);
                mma16816<T>(acc[2 * n2], a, bv[0], bv[1]);
                mma16816<T>(acc[2 * n2 + 1], a, bv[2], bv[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    // finalize
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        l_run[rr] += __shfl_xor_sync(0xffffffff, l_run[rr], 1);
        l_run[rr] += __shfl_xor_sync(0xffffffff, l_run[rr], 2);
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        int row = row0 + g + rr * 8;
        if (row >= lq) continue;
        float inv = l_run[rr] > 0.f ? 1.f / l_run[rr] : 0.f;
        T* orow = o + ((size_t)(q0 + row) * hq + h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            *(u32*)(orow + i * 8 + 2 * t) = pack2<T>(acc[i][rr * 2] * inv, acc[i][rr * 2 + 1] * inv);
        }
        if (t == 0) {
            lse[(size_t)(q0 + row) * hq + h] =
                l_run[rr] > 0.f ? (m_run[rr] + log2f(l_run[rr])) * LN2 : NEG_INF;
        }
    }
}

#define FLASH_INST(NAME, T, D, NW)                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * NW) NAME(                                       \
        const T* q, const T* k, const T* v, T* o, float* lse, const int* cu_q, const int* cu_k,       \
        int hq, int hkv, float scale_log2, int causal) {                                              \
        flash_fwd<T, D, NW>(q, k, v, o, lse, cu_q, cu_k, hq, hkv, scale_log2, causal);                \
    }
FLASH_INST(flash_fwd_bf16_d64, bf16_t, 64, 4)
FLASH_INST(flash_fwd_f16_d64, f16_t, 64, 4)
FLASH_INST(flash_fwd_bf16_d128, bf16_t, 128, 4)
FLASH_INST(flash_fwd_f16_d128, f16_t, 128, 4)
FLASH_INST(flash_fwd_bf16_d128_w8, bf16_t, 128, 8)
FLASH_INST(flash_fwd_f16_d128_w8, f16_t, 128, 8)

// ---------------------------------------------------------------- v2
// flash2_*: FlashAttention-2's own sm80 plan (kBlockM 128, 4 warps). Each warp
// owns 32 query rows = two m16 tiles, and both tiles share every K / V
// B fragment an ldmatrix brings in, so one ldmatrix.x4 feeds 4 mma instead of
// 2 (v1: BM = 16 x warps, one tile per warp). Registers: O 2 x D/2 floats, S 2
// x BN/2 floats per lane; Q does not fit beside them and stays in shared memory
// (read by ldmatrix per tile, as FA2 does). Shared memory is unpadded with the
// 16-byte chunks of row r XOR-swizzled by (r & 7): every ldmatrix phase (8 rows,
// one logical chunk) and every cp.async phase hits 32 distinct banks.
// Per CTA: Q [128][D], K and V [2][BN][D] (double buffer); 96 KB at D 128, BN
// 64 -> 2 CTAs (8 warps) per SM with launch_bounds(128, 2).
// Pipeline, one barrier per key tile: wait for tile j, barrier (everyone is
// done with tile j+1, whose stage tile j-1 reuses), issue tile j-1's copies,
// compute tile j. Tiles run from the last (the causal diagonal, masked) down
// to the first; only tiles that hold a masked element (causal diagonal, keys
// past Lk) take the masking path, and a warp whose 32 rows see none of a
// diagonal tile's keys skips its math. Softmax in the log2 domain with the
// scale folded into one FFMA before ex2.approx; P becomes the bf16/f16 A
// operand of P V in registers. The output is staged through the warp's own Q
// rows (only that warp ever reads them) for 16-byte coalesced stores.
// Shared-memory operands as 32-bit shared-window addresses (one cvta for the
// whole buffer): ptxas folds the compile-time parts of an address into the
// instruction's immediate, so the unrolled loops need only a few base registers.
__device__ __forceinline__ void ldsm_x4(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void cp_async16a(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#define RESCALE_LOG2 8.0f

template <class T, int D, int BN>
__device__ __forceinline__ void flash_fwd2(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, T* __restrict__ o,
                                           float* __restrict__ lse, const int* __restrict__ cu_q,
                                           const int* __restrict__ cu_k, int hq, int hkv,
                                           float scale_log2, int causal) {
    constexpr int BM = 128, NTHR = 128, MT = 2;
    constexpr int CH = D / 8;        // 16-byte chunks per row (>= 8 for the swizzle)
    constexpr int RP = NTHR / CH;    // rows per copy pass (a multiple of 8)
    constexpr int RB = 2 * D;        // bytes per row
    static_assert(CH >= 8 && RP % 8 == 0 && BN % 16 == 0 && BN % RP == 0, "tile shape");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // byte addresses in the shared window: Q [BM][D], K [2][BN][D], V [2][BN][D]
    const u32 sQ = smem_u32(smem_raw);
    const u32 sK = sQ + BM * RB;
    const u32 sV = sK + 2 * BN * RB;

    const int mb = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) tiles first
    const int h = blockIdx.y, b = blockIdx.z;
    const int q0 = cu_q[b], lq = cu_q[b + 1] - q0;
    const int k0 = cu_k[b], lk = cu_k[b + 1] - k0;
    if (mb * BM >= lq) return;
    const int hk = h / (hq / hkv);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3, l7 = lane & 7;
    const int wrow = warp * 32;           // this warp's first row in the block
    const int row0 = mb * BM + wrow;      // ... in the sequence
    const int off = lk - lq;              // causal: row i sees key j iff j <= off + i

    int kend = lk;
    if (causal) kend = min(lk, off + mb * BM + BM);
    const int ntiles = kend > 0 ? (kend + BN - 1) / BN : 0;
    // tiles [0, nfull) hold no masked element for any row of the block
    int nfull = lk / BN;
    if (causal) nfull = min(nfull, max(0, off + mb * BM + 1) / BN);

    // copy roles: chunk column cc of rows cr + i * RP; (row & 7) == (cr & 7) for all i
    const int cc = tid % CH, cr = tid / CH;
    const u32 cdst = cr * RB + ((cc ^ (cr & 7)) << 4);
    const size_t kvs = (size_t)hkv * D;
    const T* kb = k + ((size_t)k0 * hkv + hk) * D + cc * 8;
    const T* vb = v + ((size_t)k0 * hkv + hk) * D + cc * 8;
    // tile j's copies; only the last tile (the first loaded) can hold keys past lk
    auto load_kv = [&](int j, int st, bool check) {
        const u32 dk = sK + st * BN * RB + cdst;
        const u32 dv = sV + st * BN * RB + cdst;
        const T* kt = kb + (size_t)(j * BN + cr) * kvs;
        const T* vt = vb + (size_t)(j * BN + cr) * kvs;
#pragma unroll
        for (int i = 0; i < BN / RP; ++i) {
            if (check) {
                const bool ok = j * BN + cr + i * RP < lk;
                cp_async16a(dk + i * RP * RB, ok ? kt + i * RP * kvs : kb, ok ? 16 : 0);
                cp_async16a(dv + i * RP * RB, ok ? vt + i * RP * kvs : vb, ok ? 16 : 0);
            } else {
                cp_async16a(dk + i * RP * RB, kt + i * RP * kvs, 16);
                cp_async16a(dv + i * RP * RB, vt + i * RP * kvs, 16);
            }
        }
    };
    if (ntiles > 0) {
        const T* qb = q + ((size_t)(q0 + mb * BM) * hq + h) * D + cc * 8;
#pragma unroll
        for (int i = 0; i < BM / RP; ++i) {
            const int r = cr + i * RP;
            const bool ok = mb * BM + r < lq;
            cp_async16a(sQ + cdst + i * RP * RB, ok ? qb + (size_t)r * hq * D : q, ok ? 16 : 0);
        }
        load_kv(ntiles - 1, (ntiles - 1) & 1, true);
    }
    cp_async_commit();

    // ldmatrix lane offsets. Logical chunk c of row r sits at chunk c ^ (r & 7). For a
    // k-step kk (16 columns = chunks 2kk, 2kk+1): 2kk + x == 2kk ^ x for x in {0,1}, and
    // chunk bit 3 (kk >= 4) is untouched by the 3-bit row swizzle, so
    //   byte offset = off[kk & 3] + (kk >> 2) * 128 with off[c] = row * RB + ((2c ^ y) << 4).
    // Q (A operand) and V (B operand, .trans): row = lane & 15, y = (lane >> 4) ^ (lane & 7).
    // K (B operand): row = (lane >> 4) * 8 + (lane & 7), y = ((lane >> 3) & 1) ^ (lane & 7).
    u32 offA[4], offK[4];
    {
        const int ya = (lane >> 4) ^ l7, yk = ((lane >> 3) & 1) ^ l7;
        const int rk = (lane >> 4) * 8 + l7;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            offA[c] = (lane & 15) * RB + (((2 * c) ^ ya) << 4);
            offK[c] = rk * RB + (((2 * c) ^ yk) << 4);
        }
    }
    const u32 qw = sQ + wrow * RB;  // this warp's Q rows

    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < D / 8; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m_run[mt][0] = m_run[mt][1] = NEG_INF, l_run[mt][0] = l_run[mt][1] = 0.f;

    // MASK is a literal at both call sites: each inlined copy keeps only its own path
    auto tile = [&](int j, bool MASK) {
        cp_async_wait<0>();
        __syncthreads();
        if (j > 0) load_kv(j - 1, (j - 1) & 1, false);
        cp_async_commit();
        // causal diagonal: every key of the tile comes after every row of this warp
        if (MASK && causal && j * BN > off + row0 + 31) return;
        const u32 Ks = sK + (j & 1) * BN * RB;
        const u32 Vs = sV + (j & 1) * BN * RB;

        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldsm_x4(qa[mt], qw + offA[kk & 3] + (kk >> 2) * 128 + mt * 16 * RB);
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt += 2) {
                // one ldmatrix.x4: B fragments (b0, b1) of key tiles nt and nt+1, for both m tiles
                u32 bk[4];
                ldsm_x4(bk, Ks + offK[kk & 3] + (kk >> 2) * 128 + nt * 8 * RB);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(s[mt][nt], qa[mt], bk[0], bk[1]);
                    mma16816<T>(s[mt][nt + 1], qa[mt], bk[2], bk[3]);
                }
            }
        }
        if (MASK) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const int i = row0 + mt * 16 + g + (r >> 1) * 8;
                        const int kj = j * BN + nt * 8 + 2 * t + (r & 1);
                        if (kj >= lk || (causal && kj > off + i)) s[mt][nt][r] = NEG_INF;
                    }
        }
        // Online softmax on raw scores, exponent = s * scale_log2 - m * scale_log2 (one FFMA).
        // The running max m moves only when a row's new max exceeds it by more than
        // RESCALE_LOG2 (in log2 units), and then for the whole warp (FlashAttention-4's
        // conditional rescale): otherwise P = 2^(s - m) <= 2^RESCALE_LOG2 in f32 and its
        // bf16/f16 rounding is as relative as ever, the row sum stays far from overflow, and
        // the 2 x D/2 O rescales and 4 ex2 of the tile are skipped. Exact: the final O / l
        // and lse = m + log2 l do not depend on which m was used.
        float mx[MT][2];
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float x = m_run[mt][rr];
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) x = fmaxf(x, fmaxf(s[mt][nt][2 * rr], s[mt][nt][2 * rr + 1]));
                x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
                mx[mt][rr] = x;
                // m_run = -inf: +inf if x is finite (grow), NaN if x is -inf too (no grow)
                grow |= (x - m_run[mt][rr]) * scale_log2 > RESCALE_LOG2;
            }
        }
        if (__any_sync(0xffffffff, grow)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const float mn = mx[mt][rr];
                    const float alpha = mn == NEG_INF ? 1.f : ex2((m_run[mt][rr] - mn) * scale_log2);
                    m_run[mt][rr] = mn;
                    l_run[mt][rr] *= alpha;
#pragma unroll
                    for (int n = 0; n < D / 8; ++n) {
                        acc[mt][n][2 * rr] *= alpha;
                        acc[mt][n][2 * rr + 1] *= alpha;
                    }
                }
            }
        }
        u32 pa[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const float ms = m_run[mt][rr] == NEG_INF ? 0.f : m_run[mt][rr] * scale_log2;
                float rs = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const float p0 = ex2(fmaf(s[mt][nt][2 * rr], scale_log2, -ms));
                    const float p1 = ex2(fmaf(s[mt][nt][2 * rr + 1], scale_log2, -ms));
                    rs += p0 + p1;
                    s[mt][nt][2 * rr] = p0;
                    s[mt][nt][2 * rr + 1] = p1;
                }
                l_run[mt][rr] += rs;
            }
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                pa[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
        }
        // O += P V: one ldmatrix.x4.trans = B fragments of dims n2*16 .. +15 (keys kk*16 ..
        // +15), for both m tiles; the lane's rows and chunks follow Q's pattern (offA)
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                u32 bv[4];
                ldsm_x4_t(bv, Vs + offA[n2 & 3] + (n2 >> 2) * 128 + kk * 16 * RB);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(acc[mt][2 * n2], pa[mt][kk], bv[0], bv[1]);
                    mma16816<T>(acc[mt][2 * n2 + 1], pa[mt][kk], bv[2], bv[3]);
                }
            }
        }
    };
    int j = ntiles - 1;
#pragma unroll 1
    for (; j >= nfull; --j) tile(j, true);
#pragma unroll 1
    for (; j >= 0; --j) tile(j, false);
    cp_async_wait<0>();

    // finalize: quad sums, normalize, stage the warp's 32 rows in its own Q rows
    // (only this warp ever read them), then 16-byte stores of whole rows
    __syncwarp();
    T* sQp = (T*)smem_raw;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float l = l_run[mt][rr];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int r = wrow + mt * 16 + g + rr * 8;  // r & 7 == g
            T* srow = sQp + r * D + 2 * t;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *(u32*)(srow + ((n ^ g) << 3)) = pack2<T>(acc[mt][n][2 * rr] * inv, acc[mt][n][2 * rr + 1] * inv);
            const int row = mb * BM + r;
            if (t == 0 && row < lq)
                lse[(size_t)(q0 + row) * hq + h] =
                    l > 0.f ? (m_run[mt][rr] * scale_log2 + log2f(l)) * LN2 : NEG_INF;
        }
    }
    __syncwarp();
#pragma unroll
    for (int c = lane; c < 32 * CH; c += 32) {
        const int r = wrow + c / CH, ch = c % CH;
        const int row = mb * BM + r;
        if (row < lq)
            *(uint4*)(o + ((size_t)(q0 + row) * hq + h) * D + ch * 8) =
                *(const uint4*)(sQp + r * D + ((ch ^ (r & 7)) << 3));
    }
}

#define FLASH2_INST(NAME, T, D, BN)                                                                   \
    extern "C" __global__ void __launch_bounds__(128, 2) NAME(                                        \
        const T* q, const T* k, const T* v, T* o, float* lse, const int* cu_q, const int* cu_k,       \
        int hq, int hkv, float scale_log2, int causal) {                                              \
        flash_fwd2<T, D, BN>(q, k, v, o, lse, cu_q, cu_k, hq, hkv, scale_log2, causal);               \
    }
FLASH2_INST(flash2_bf16_d128_n64, bf16_t, 128, 64)
FLASH2_INST(flash2_f16_d128_n64, f16_t, 128, 64)
FLASH2_INST(flash2_bf16_d128_n32, bf16_t, 128, 32)
FLASH2_INST(flash2_f16_d128_n32, f16_t, 128, 32)
FLASH2_INST(flash2_bf16_d64_n64, bf16_t, 64, 64)
FLASH2_INST(flash2_f16_d64_n64, f16_t, 64, 64)

// ---------------------------------------------------------------- v3 (sm_90a)
// flash3_*: the v2 algorithm on Hopper's warpgroup MMA (wgmma.mma_async), head_dim 128.
// One CTA = NWG warpgroups (2, or 1: `_g1`) of 64 query rows each; key tiles of BN = 128 or
// 64 rows. S = Q K^T with both operands read by the tensor cores straight from shared
// memory (descriptors); P stays in registers as the A operand of O += P V (V from shared
// memory, N-major). No ldmatrix: the register file only holds S, P and O.
// Shared memory (all 1024-byte aligned): Q [2][64 NWG][64], K and V [2 stages][2][BN][64]
// (bf16/f16): each 64-column half of a row is one 128-byte line whose 16-byte chunk c sits
// at c ^ (row & 7), the 128B-swizzle atom of wgmma (8 lines = 1024 bytes). Q and K are
// read K-major (rows = M / N, SBO = 1024 between 8-row groups); V is read N-major (lines =
// keys = the K dimension: SBO = 1024 between 8-key groups, LBO = BN * 128 between the two
// 64-dim halves). Loads are cp.async by all threads, double buffered, one CTA barrier per
// tile as in v2, plus fence.proxy.async so that the tensor cores' async proxy sees them.
// Softmax as v2 (conditional rescale per warp; a warp owns 16 rows of its warpgroup's 64).
// OVERLAP (`o`): FlashAttention-3's intra-warpgroup pipelining, S of tile j-1 is issued
// before the softmax of tile j and runs on the tensor cores meanwhile (K runs one tile
// ahead of V). With NWG = 2 the two warpgroups meet at every tile's barrier; NWG = 1 makes
// them separate CTAs (2 per SM, 80 KB each at BN 64) that drift freely instead.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_ss_bf16_n64(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_ss_bf16_n128(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_rs_bf16_n128(float* d, const u32* a, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_ss_f16_n64(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_ss_f16_n128(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_rs_f16_n128(float* d, const u32* a, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

template <class T, int N> __device__ __forceinline__ void wg_ss(float* d, u64 da, u64 db, int sd);
template <> __device__ __forceinline__ void wg_ss<bf16_t, 64>(float* d, u64 da, u64 db, int sd) { wgmma_ss_bf16_n64(d, da, db, sd); }
template <> __device__ __forceinline__ void wg_ss<bf16_t, 128>(float* d, u64 da, u64 db, int sd) { wgmma_ss_bf16_n128(d, da, db, sd); }
template <> __device__ __forceinline__ void wg_ss<f16_t, 64>(float* d, u64 da, u64 db, int sd) { wgmma_ss_f16_n64(d, da, db, sd); }
template <> __device__ __forceinline__ void wg_ss<f16_t, 128>(float* d, u64 da, u64 db, int sd) { wgmma_ss_f16_n128(d, da, db, sd); }
template <class T> __device__ __forceinline__ void wg_rs(float* d, const u32* a, u64 db);
template <> __device__ __forceinline__ void wg_rs<bf16_t>(float* d, const u32* a, u64 db) { wgmma_rs_bf16_n128(d, a, db); }
template <> __device__ __forceinline__ void wg_rs<f16_t>(float* d, const u32* a, u64 db) { wgmma_rs_f16_n128(d, a, db); }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// keep the compiler from moving register accesses across the async MMA boundaries
template <int NR> __device__ __forceinline__ void reg_fence(float* r) {
#pragma unroll
    for (int i = 0; i < NR; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// 128B-swizzle descriptor: start address, LBO, SBO (bytes)
__device__ __forceinline__ u64 gdesc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | (1ull << 62);
}

template <class T, int BN, bool OVERLAP, int NWG>
__device__ __forceinline__ void flash_fwd3(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, T* __restrict__ o,
                                           float* __restrict__ lse, const int* __restrict__ cu_q,
                                           const int* __restrict__ cu_k, int hq, int hkv,
                                           float scale_log2, int causal) {
    constexpr int D = 128, BM = 64 * NWG, NTHR = 128 * NWG, RP = NTHR / 16;  // RP rows per copy pass
    constexpr int HALF_Q = BM * 128, HALF_KV = BN * 128, STAGE = 2 * HALF_KV;  // bytes
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 sQ = (smem_u32(smem_raw) + 1023) & ~1023u;
    const u32 sK = sQ + 2 * HALF_Q;
    const u32 sV = sK + 2 * STAGE;

    const int mb = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) tiles first
    const int h = blockIdx.y, b = blockIdx.z;
    const int q0 = cu_q[b], lq = cu_q[b + 1] - q0;
    const int k0 = cu_k[b], lk = cu_k[b + 1] - k0;
    if (mb * BM >= lq) return;
    const int hk = h / (hq / hkv);
    const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wi = (tid >> 5) & 3;
    const int g = lane >> 2, t = lane & 3;
    const int rw = wg * 64 + wi * 16;     // this warp's first row in the block
    const int row0 = mb * BM + rw;        // ... in the sequence
    const int off = lk - lq;

    int kend = lk;
    if (causal) kend = min(lk, off + mb * BM + BM);
    const int ntiles = kend > 0 ? (kend + BN - 1) / BN : 0;
    int nfull = lk / BN;
    if (causal) nfull = min(nfull, max(0, off + mb * BM + 1) / BN);

    // copy roles: chunk cc (0..15) of rows cr + RP i; (row & 7) == (cr & 7)
    const int cc = tid & 15, cr = tid >> 4;
    const u32 cq = (cc >> 3) * HALF_Q + cr * 128 + (((cc & 7) ^ (cr & 7)) << 4);
    const u32 ckv = (cc >> 3) * HALF_KV + cr * 128 + (((cc & 7) ^ (cr & 7)) << 4);
    const int kvs = hkv * D;
    const size_t kvo = ((size_t)k0 * hkv + hk) * D + cc * 8;
    auto load_kv = [&](int j, int st, bool check) {
#pragma unroll
        for (int i = 0; i < BN / RP; ++i) {
            const int key = j * BN + cr + RP * i;
            const size_t e = kvo + (size_t)key * kvs;
            const u32 dst = st * STAGE + ckv + i * RP * 128;
            if (check) {
                const bool ok = key < lk;
                cp_async16a(sK + dst, k + (ok ? e : kvo), ok ? 16 : 0);
                cp_async16a(sV + dst, v + (ok ? e : kvo), ok ? 16 : 0);
            } else {
                cp_async16a(sK + dst, k + e, 16);
                cp_async16a(sV + dst, v + e, 16);
            }
        }
    };
    // one full tile of K or V (region base sK or sV)
    auto load_kv_one = [&](u32 base, int j, int st) {
        const T* src = base == sK ? k : v;
#pragma unroll
        for (int i = 0; i < BN / RP; ++i) {
            const int key = j * BN + cr + RP * i;
            cp_async16a(base + st * STAGE + ckv + i * RP * 128, src + kvo + (size_t)key * kvs, 16);
        }
    };
    if (ntiles > 0) {
        const T* qb = q + ((size_t)(q0 + mb * BM) * hq + h) * D + cc * 8;
#pragma unroll
        for (int i = 0; i < BM / RP; ++i) {
            const int r = cr + RP * i;
            const bool ok = mb * BM + r < lq;
            cp_async16a(sQ + cq + i * RP * 128, ok ? qb + (size_t)r * hq * D : q, ok ? 16 : 0);
        }
        load_kv(ntiles - 1, (ntiles - 1) & 1, true);
    }
    cp_async_commit();

    float acc[64];  // O: 16 n8 chunks x 4 (rows g, g+8 of this warp)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

    // softmax of tile j's S (mask if it holds masked keys), then issue O += P V (committed,
    // not waited)
    auto softmax_pv = [&](float (&s)[BN / 2], int j) {
        const u32 Vs = sV + (j & 1) * STAGE;
        if (j >= nfull) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int i = row0 + g + (r >> 1) * 8;
                    const int kj = j * BN + nt * 8 + 2 * t + (r & 1);
                    if (kj >= lk || (causal && kj > off + i)) s[nt * 4 + r] = NEG_INF;
                }
        }
        float mx[2];
        bool grow = false;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float x = m_run[rr];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) x = fmaxf(x, fmaxf(s[nt * 4 + 2 * rr], s[nt * 4 + 2 * rr + 1]));
            x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
            x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
            mx[rr] = x;
            grow |= (x - m_run[rr]) * scale_log2 > RESCALE_LOG2;
        }
        if (__any_sync(0xffffffff, grow)) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const float alpha = mx[rr] == NEG_INF ? 1.f : ex2((m_run[rr] - mx[rr]) * scale_log2);
                m_run[rr] = mx[rr];
                l_run[rr] *= alpha;
#pragma unroll
                for (int n = 0; n < 16; ++n) {
                    acc[n * 4 + 2 * rr] *= alpha;
                    acc[n * 4 + 2 * rr + 1] *= alpha;
                }
            }
        }
        u32 pa[BN / 16][4];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float ms = m_run[rr] == NEG_INF ? 0.f : m_run[rr] * scale_log2;
            float rs = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                const float e0 = ex2(fmaf(s[nt * 4 + 2 * rr], scale_log2, -ms));
                const float e1 = ex2(fmaf(s[nt * 4 + 2 * rr + 1], scale_log2, -ms));
                rs += e0 + e1;
                s[nt * 4 + 2 * rr] = e0;
                s[nt * 4 + 2 * rr + 1] = e1;
            }
            l_run[rr] += rs;
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            pa[kk][0] = pack2<T>(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
            pa[kk][1] = pack2<T>(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
            pa[kk][2] = pack2<T>(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
            pa[kk][3] = pack2<T>(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
        }
        reg_fence<64>(acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wg_rs<T>(acc, pa[kk], gdesc(Vs + kk * 16 * 128, HALF_KV, 1024));
        wg_commit();
    };
    // issue S = Q K_j^T (committed, not waited)
    auto qk = [&](float (&s)[BN / 2], int j) {
        const u32 Ks = sK + (j & 1) * STAGE;
        reg_fence<BN / 2>(s);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wg_ss<T, BN>(s, gdesc(sQ + (kk >> 2) * HALF_Q + wg * 64 * 128 + (kk & 3) * 32, 16, 1024),
                         gdesc(Ks + (kk >> 2) * HALF_KV + (kk & 3) * 32, 16, 1024), kk > 0);
        wg_commit();
    };
    auto top = [&]() {
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();
    };
    if constexpr (!OVERLAP) {
        // tile j: loads of tile j-1 in flight; S, softmax, P V one after the other
        float s[BN / 2];
#pragma unroll 1
        for (int j = ntiles - 1; j >= 0; --j) {
            top();
            if (j > 0) load_kv(j - 1, (j - 1) & 1, false);
            cp_async_commit();
            qk(s, j);
            wg_wait0();
            reg_fence<BN / 2>(s);
            softmax_pv(s, j);
            wg_wait0();
            reg_fence<64>(acc);
        }
    } else {
        // FA3's intra-warpgroup overlap: S of tile j-1 runs on the tensor cores while the
        // softmax of tile j runs; K runs one tile ahead of V (iteration j reads K_{j-1} and
        // V_j, and loads K_{j-2} and V_{j-1} into the stages the last iteration finished).
        // Two S register sets alternate (loop unrolled by 2).
        float sa[BN / 2], sb[BN / 2];
        if (ntiles > 1) load_kv_one(sK, ntiles - 2, (ntiles - 2) & 1);
        cp_async_commit();
        if (ntiles > 0) {
            top();
            qk(sa, ntiles - 1);
            wg_wait0();
            reg_fence<BN / 2>(sa);
        }
        auto step = [&](int j, float (&cur)[BN / 2], float (&nxt)[BN / 2]) {
            top();
            if (j >= 1) load_kv_one(sV, j - 1, (j - 1) & 1);
            if (j >= 2) load_kv_one(sK, j - 2, (j - 2) & 1);
            cp_async_commit();
            if (j >= 1) qk(nxt, j - 1);
            softmax_pv(cur, j);
            wg_wait0();
            reg_fence<64>(acc);
            reg_fence<BN / 2>(nxt);
        };
        int j = ntiles - 1;
#pragma unroll 1
        for (; j >= 1; j -= 2) {
            step(j, sa, sb);
            step(j - 1, sb, sa);
        }
        if (j == 0) step(0, sa, sb);
    }
    cp_async_wait<0>();

    // finalize: direct stores (each quad writes 16 contiguous bytes per 8 columns)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float l = l_run[rr];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = row0 + g + rr * 8;
        if (row < lq) {
            T* orow = o + ((size_t)(q0 + row) * hq + h) * D + 2 * t;
#pragma unroll
            for (int n = 0; n < 16; ++n)
                *(u32*)(orow + n * 8) = pack2<T>(acc[n * 4 + 2 * rr] * inv, acc[n * 4 + 2 * rr + 1] * inv);
            if (t == 0)
                lse[(size_t)(q0 + row) * hq + h] = l > 0.f ? (m_run[rr] * scale_log2 + log2f(l)) * LN2 : NEG_INF;
        }
    }
}
#define FLASH3_BODY(T, BN, OV, NWG) flash_fwd3<T, BN, OV, NWG>(q, k, v, o, lse, cu_q, cu_k, hq, hkv, scale_log2, causal);
#else
#define FLASH3_BODY(T, BN, OV, NWG) __trap();
#endif

#define FLASH3_INST(NAME, T, BN, OV, NWG)                                                             \
    extern "C" __global__ void __launch_bounds__(128 * NWG, 1) NAME(                                  \
        const T* q, const T* k, const T* v, T* o, float* lse, const int* cu_q, const int* cu_k,       \
        int hq, int hkv, float scale_log2, int causal) {                                              \
        FLASH3_BODY(T, BN, OV, NWG)                                                                   \
    }
FLASH3_INST(flash3_bf16_d128_n128, bf16_t, 128, false, 2)
FLASH3_INST(flash3_f16_d128_n128, f16_t, 128, false, 2)
FLASH3_INST(flash3_bf16_d128_n64, bf16_t, 64, false, 2)
FLASH3_INST(flash3_f16_d128_n64, f16_t, 64, false, 2)
FLASH3_INST(flash3_bf16_d128_n128o, bf16_t, 128, true, 2)
FLASH3_INST(flash3_f16_d128_n128o, f16_t, 128, true, 2)
// one warpgroup per CTA (64 rows): 80 KB of shared memory, 2 independent CTAs per SM
FLASH3_INST(flash3_bf16_d128_n64_g1, bf16_t, 64, false, 1)
FLASH3_INST(flash3_f16_d128_n64_g1, f16_t, 64, false, 1)
FLASH3_INST(flash3_bf16_d128_n64o_g1, bf16_t, 64, true, 1)
FLASH3_INST(flash3_f16_d128_n64o_g1, f16_t, 64, true, 1)

// ---------------------------------------------------------------- v4 (sm_90a)
// flash4_*: FlashAttention-3's warp-specialized plan (Shah et al. 2024, Alg. 1-2), head_dim 128.
// One CTA = 3 warpgroups for a 128-row query tile: warpgroup 0 is the producer (one thread
// issues every load with TMA, the rest idle), warpgroups 1 and 2 are consumers of 64 rows each.
// setmaxnreg moves registers from the producer (24) to the consumers (240).
// Loads: Q once, then K and V tiles of 128 keys, each 64-column half one TMA box of
// [128 rows][64] elements with the 128-byte swizzle: the same shared layout as v3 (chunk c of
// a row at c ^ (row & 7)), so v3's wgmma descriptors apply unchanged. A ring of STAGES K
// slots and STAGES V slots, each with a `full` mbarrier (the producer's arrive.expect_tx +
// the TMA's complete_tx bytes) and an `empty` mbarrier (one arrive per consumer warp once its
// wgmma that read the slot has completed). No CTA barrier after the start.
// Consumers: v3's intra-warpgroup overlap (S of tile i and O += P V of tile i-1 are issued
// together; the softmax of tile i runs while P V of tile i-1 is still on the tensor cores;
// O is rescaled only after that wgmma is waited for). PP (`pp`): FA3's ping-pong, the two
// consumer warpgroups take turns issuing their GEMMs through two named barriers (bar.sync on
// mine, bar.arrive on the other's, 256 threads each), so one's softmax runs under the other's
// GEMMs. Tensor maps (CUtensorMap, 128 bytes) come as __grid_constant__ parameters:
// q over [total_q][hq * 128], k and v over [total_k][hkv * 128] (2-D, rows = tokens), so a
// box never crosses heads; rows past the tensor read as zero, rows past a sequence's end
// within it are masked (keys) or not stored (queries).
struct __align__(128) Tmap {
    u64 v[16];
};
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred P1;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void tma_2d(u32 dst, const Tmap* tm, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
        "l"((u64)tm), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void nbar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void nbar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void wg_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
template <int NR> __device__ __forceinline__ void reg_fence_u(u32* r) {
#pragma unroll
    for (int i = 0; i < NR; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

__device__ __forceinline__ void st_shared(u32 a, int v) { asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(v) : "memory"); }
__device__ __forceinline__ int ld_shared(u32 a) {
    int v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory");
    return v;
}

// GRID: 0 one CTA per item; 1 persistent, static stride; 2 persistent, dynamic (ctr[0] hands
// out items after each CTA's first; ctr[1] counts finished CTAs; the last resets both to 0)
template <class T, int STAGES, bool PP, int GRID>
__device__ __forceinline__ void flash_fwd4(const Tmap* tq, const Tmap* tk, const Tmap* tv, T* __restrict__ o,
                                           float* __restrict__ lse, const int* __restrict__ cu_q,
                                           const int* __restrict__ cu_k, int hq, int hkv, float scale_log2,
                                           int causal, int nmb, int nbatch, unsigned* ctr) {
    constexpr bool PERSIST = GRID > 0;
    constexpr int D = 128, BM = 128, BN = 128;
    constexpr int HALF_Q = BM * 128, HALF_KV = BN * 128, TILE = 2 * HALF_KV;  // bytes
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 sQ = (smem_u32(smem_raw) + 1023) & ~1023u;
    const u32 sK = sQ + 2 * HALF_Q;
    const u32 sV = sK + STAGES * TILE;
    // mbarriers: Q full, Q empty, full K [S], full V [S], empty K [S], empty V [S], item full [2],
    // item empty [2]; then the 2 item slots (GRID 2)
    const u32 bars = sV + STAGES * TILE;
    const u32 barQ = bars, barQe = bars + 8;
    const u32 fullK = bars + 16, fullV = fullK + 8 * STAGES;
    const u32 emptyK = fullV + 8 * STAGES, emptyV = emptyK + 8 * STAGES;
    const u32 barW = emptyV + 8 * STAGES, barWe = barW + 16, slotW = barWe + 16;
    const int tid = threadIdx.x, wg = tid >> 7;

    // work items: (query block mb, head h, sequence b). Not persistent: this CTA's one item,
    // heaviest (causal) first. Persistent: items w = blockIdx.x + n * gridDim.x (GRID 1), or
    // blockIdx.x and then gridDim.x + the counter's next value (GRID 2: the producer thread
    // draws it and passes it to the consumers through an item slot pair with full / empty
    // mbarriers; the value >= nwork that ends the CTA is passed on too), in the order
    // of the per-item grid's launch: mb (descending) fastest, then h, then b, so the CTAs at
    // work together share a few heads' K/V in L2 (mb slowest measured 20% slower: 132 heads'
    // K/V streamed at once).
    struct Work {
        int mb, h, b, q0, lq, k0, lk, ntiles, nfull;
    };
    auto work = [&](int w) {
        Work x;
        if (PERSIST) {
            const int hb = w / nmb;
            x.mb = nmb - 1 - w % nmb;
            x.h = hb % hq;
            x.b = hb / hq;
        } else {
            x.mb = gridDim.x - 1 - blockIdx.x;
            x.h = blockIdx.y;
            x.b = blockIdx.z;
        }
        x.q0 = cu_q[x.b];
        x.lq = cu_q[x.b + 1] - x.q0;
        x.k0 = cu_k[x.b];
        x.lk = cu_k[x.b + 1] - x.k0;
        const int off = x.lk - x.lq;
        int kend = x.lk;
        if (causal) kend = min(x.lk, off + x.mb * BM + BM);
        x.ntiles = kend > 0 ? (kend + BN - 1) / BN : 0;
        x.nfull = x.lk / BN;
        if (causal) x.nfull = min(x.nfull, max(0, off + x.mb * BM + 1) / BN);
        return x;
    };
    const int nwork = PERSIST ? nmb * hq * nbatch : 1;
    const int w0 = PERSIST ? blockIdx.x : 0, wstep = PERSIST ? gridDim.x : 1;

    if (tid == 0) {
        mbar_init(barQ, 1);
        mbar_init(barQe, 8);  // one arrive per consumer warp
        mbar_init(barW, 1);
        mbar_init(barW + 8, 1);
        mbar_init(barWe, 8);
        mbar_init(barWe + 8, 8);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(fullK + 8 * s, 1);
            mbar_init(fullV + 8 * s, 1);
            mbar_init(emptyK + 8 * s, 8);
            mbar_init(emptyV + 8 * s, 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // producer: for each item Q, then K then V of each key tile in the consumers' order
        // (last first). The ring position (gi) and the Q uses (nq) run on across items.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            int gi = 0, nq = 0;
#pragma unroll 1
            for (int n = 0;; ++n) {
                int w = w0 + n * wstep;
                if (GRID == 2) {
                    // the next item to the consumers through slot n & 1
                    if (n > 0) w = gridDim.x + (int)atomicAdd(ctr, 1u);
                    if (n >= 2) mbar_wait(barWe + 8 * (n & 1), ((n >> 1) & 1) ^ 1);
                    st_shared(slotW + 4 * (n & 1), w);
                    mbar_arrive(barW + 8 * (n & 1));
                    if (w >= nwork) {
                        __threadfence();
                        if (atomicAdd(ctr + 1, 1u) == gridDim.x - 1) {
                            atomicExch(ctr, 0u);
                            atomicExch(ctr + 1, 0u);
                        }
                    }
                }
                if (w >= nwork) break;
                const Work x = work(w);
                if (x.mb * BM >= x.lq || x.ntiles == 0) continue;
                if (nq > 0) mbar_wait(barQe, (nq - 1) & 1);
                mbar_expect_tx(barQ, 2 * HALF_Q);
                tma_2d(sQ, tq, x.h * D, x.q0 + x.mb * BM, barQ);
                tma_2d(sQ + HALF_Q, tq, x.h * D + 64, x.q0 + x.mb * BM, barQ);
                ++nq;
                const int hk = x.h / (hq / hkv);
#pragma unroll 1
                for (int it = 0; it < x.ntiles; ++it, ++gi) {
                    const int j = x.ntiles - 1 - it, st = gi % STAGES;
                    const u32 ph = ((gi / STAGES) & 1) ^ 1;  // the previous round's release
                    const int row = x.k0 + j * BN;
                    if (gi >= STAGES) mbar_wait(emptyK + 8 * st, ph);
                    mbar_expect_tx(fullK + 8 * st, TILE);
                    tma_2d(sK + st * TILE, tk, hk * D, row, fullK + 8 * st);
                    tma_2d(sK + st * TILE + HALF_KV, tk, hk * D + 64, row, fullK + 8 * st);
                    if (gi >= STAGES) mbar_wait(emptyV + 8 * st, ph);
                    mbar_expect_tx(fullV + 8 * st, TILE);
                    tma_2d(sV + st * TILE, tv, hk * D, row, fullV + 8 * st);
                    tma_2d(sV + st * TILE + HALF_KV, tv, hk * D + 64, row, fullV + 8 * st);
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1;  // consumer 0 or 1: rows cw * 64 .. + 63 of the block
    const int lane = tid & 31, wi = (tid >> 5) & 3;
    const int g = lane >> 2, t = lane & 3;
    const int mine = 1 + cw, other = 2 - cw;  // named barrier ids (0 is __syncthreads)
    auto release = [&](u32 bar) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };
    int gi = 0, nq = 0;
#pragma unroll 1
    for (int n = 0;; ++n) {
        int w = w0 + n * wstep;
        if (GRID == 2) {
            mbar_wait(barW + 8 * (n & 1), (n >> 1) & 1);
            w = ld_shared(slotW + 4 * (n & 1));
            release(barWe + 8 * (n & 1));
        }
        if (w >= nwork) break;
        const Work x = work(w);
        if (x.mb * BM >= x.lq) continue;
        const int h = x.h, q0 = x.q0, lq = x.lq, lk = x.lk, ntiles = x.ntiles, nfull = x.nfull;
        const int off = lk - lq;
        const int row0 = x.mb * BM + cw * 64 + wi * 16;  // this warp's first row in the sequence

        float acc[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.f;
        float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

        auto qk = [&](float (&s)[64], u32 Ks) {
            reg_fence<64>(s);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss<T, BN>(s, gdesc(sQ + (kk >> 2) * HALF_Q + cw * 64 * 128 + (kk & 3) * 32, 16, 1024),
                             gdesc(Ks + (kk >> 2) * HALF_KV + (kk & 3) * 32, 16, 1024), kk > 0);
            wg_commit();
        };
        auto pv = [&](u32 (&p)[BN / 16][4], u32 Vs) {
            reg_fence<64>(acc);
            reg_fence_u<4 * BN / 16>(&p[0][0]);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) wg_rs<T>(acc, p[kk], gdesc(Vs + kk * 16 * 128, HALF_KV, 1024));
            wg_commit();
        };
        // mask, running max (conditional rescale as v3), exponentials in place, row sums.
        // Returns whether O must be multiplied by alpha (done by the caller once P V is waited for).
        auto softmax = [&](float (&s)[64], int j, float (&alpha)[2]) -> bool {
            if (j >= nfull) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const int i = row0 + g + (r >> 1) * 8;
                        const int kj = j * BN + nt * 8 + 2 * t + (r & 1);
                        if (kj >= lk || (causal && kj > off + i)) s[nt * 4 + r] = NEG_INF;
                    }
            }
            float mx[2];
            bool grow = false;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float v = m_run[rr];
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) v = fmaxf(v, fmaxf(s[nt * 4 + 2 * rr], s[nt * 4 + 2 * rr + 1]));
                v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
                v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
                mx[rr] = v;
                grow |= (v - m_run[rr]) * scale_log2 > RESCALE_LOG2;
            }
            const bool resc = __any_sync(0xffffffff, grow);
            if (resc) {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    alpha[rr] = mx[rr] == NEG_INF ? 1.f : ex2((m_run[rr] - mx[rr]) * scale_log2);
                    m_run[rr] = mx[rr];
                    l_run[rr] *= alpha[rr];
                }
            }
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const float ms = m_run[rr] == NEG_INF ? 0.f : m_run[rr] * scale_log2;
                float rs = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const float e0 = ex2(fmaf(s[nt * 4 + 2 * rr], scale_log2, -ms));
                    const float e1 = ex2(fmaf(s[nt * 4 + 2 * rr + 1], scale_log2, -ms));
                    rs += e0 + e1;
                    s[nt * 4 + 2 * rr] = e0;
                    s[nt * 4 + 2 * rr + 1] = e1;
                }
                l_run[rr] += rs;
            }
            return resc;
        };
        auto pack = [&](const float (&s)[64], u32 (&p)[BN / 16][4]) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                p[kk][0] = pack2<T>(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
                p[kk][1] = pack2<T>(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
                p[kk][2] = pack2<T>(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
                p[kk][3] = pack2<T>(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
            }
        };

        if (ntiles > 0) {
            mbar_wait(barQ, nq & 1);
            ++nq;
            if (PP && cw == 1) nbar_arrive(1, 256);  // consumer 0 goes first
            float s[64];
            u32 p[BN / 16][4];
            float alpha[2];
            // first key tile (j = ntiles - 1): S, softmax (O is zero: no rescale)
            {
                const int st = gi % STAGES;
                mbar_wait(fullK + 8 * st, (gi / STAGES) & 1);
                if (PP) nbar_sync(mine, 256);
                qk(s, sK + st * TILE);
                if (PP) nbar_arrive(other, 256);
                wg_wait0();
                reg_fence<64>(s);
                release(emptyK + 8 * st);
                softmax(s, ntiles - 1, alpha);
                pack(s, p);
            }
#pragma unroll 1
            for (int it = 1; it < ntiles; ++it) {
                const int j = ntiles - 1 - it, c = gi + it, st = c % STAGES, ps = (c - 1) % STAGES;
                mbar_wait(fullK + 8 * st, (c / STAGES) & 1);
                if (PP) nbar_sync(mine, 256);
                qk(s, sK + st * TILE);
                mbar_wait(fullV + 8 * ps, ((c - 1) / STAGES) & 1);
                pv(p, sV + ps * TILE);
                if (PP) nbar_arrive(other, 256);
                wg_wait1();  // S of tile it
                reg_fence<64>(s);
                release(emptyK + 8 * st);
                const bool resc = softmax(s, j, alpha);
                wg_wait0();  // P V of tile it - 1
                reg_fence<64>(acc);
                reg_fence_u<4 * BN / 16>(&p[0][0]);
                release(emptyV + 8 * ps);
                if (resc) {
#pragma unroll
                    for (int n = 0; n < 16; ++n) {
                        acc[n * 4 + 0] *= alpha[0];
                        acc[n * 4 + 1] *= alpha[0];
                        acc[n * 4 + 2] *= alpha[1];
                        acc[n * 4 + 3] *= alpha[1];
                    }
                }
                pack(s, p);
            }
            // every S of this item is done: Q may be overwritten by the next item's
            release(barQe);
            {
                const int c = gi + ntiles - 1, st = c % STAGES;
                mbar_wait(fullV + 8 * st, (c / STAGES) & 1);
                if (PP) nbar_sync(mine, 256);
                pv(p, sV + st * TILE);
                // consumer 1 skips its last arrive: consumer 0 syncs once fewer than it is arrived at
                if (PP && cw == 0) nbar_arrive(other, 256);
                wg_wait0();
                reg_fence<64>(acc);
                release(emptyV + 8 * st);
            }
            gi += ntiles;
        }

        // finalize: direct stores (each quad writes 16 contiguous bytes per 8 columns)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float l = l_run[rr];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = row0 + g + rr * 8;
            if (row < lq) {
                T* orow = o + ((size_t)(q0 + row) * hq + h) * D + 2 * t;
#pragma unroll
                for (int n = 0; n < 16; ++n)
                    *(u32*)(orow + n * 8) = pack2<T>(acc[n * 4 + 2 * rr] * inv, acc[n * 4 + 2 * rr + 1] * inv);
                if (t == 0)
                    lse[(size_t)(q0 + row) * hq + h] =
                        l > 0.f ? (m_run[rr] * scale_log2 + log2f(l)) * LN2 : NEG_INF;
            }
        }
    }
}
#define FLASH4_BODY(T, S, PP, PE) \
    flash_fwd4<T, S, PP, PE>(&tq, &tk, &tv, o, lse, cu_q, cu_k, hq, hkv, scale_log2, causal, nmb, nbatch, ctr);
#else
#define FLASH4_BODY(T, S, PP, PE) __trap();
#endif

#define FLASH4_INST(NAME, T, S, PP, PE)                                                               \
    extern "C" __global__ void __launch_bounds__(384, 1) NAME(                                        \
        const __grid_constant__ Tmap tq, const __grid_constant__ Tmap tk,                             \
        const __grid_constant__ Tmap tv, T* o, float* lse, const int* cu_q, const int* cu_k, int hq,  \
        int hkv, float scale_log2, int causal, int nmb, int nbatch, unsigned* ctr) {                  \
        FLASH4_BODY(T, S, PP, PE)                                                                     \
    }
FLASH4_INST(flash4_bf16_d128_s2p, bf16_t, 2, true, 0)
FLASH4_INST(flash4_f16_d128_s2p, f16_t, 2, true, 0)
FLASH4_INST(flash4_bf16_d128_s2, bf16_t, 2, false, 0)
FLASH4_INST(flash4_f16_d128_s2, f16_t, 2, false, 0)
// persistent: one CTA per SM walking the work items, static stride (pe) or dynamic (dyn)
FLASH4_INST(flash4_bf16_d128_s2p_pe, bf16_t, 2, true, 1)
FLASH4_INST(flash4_f16_d128_s2p_pe, f16_t, 2, true, 1)
FLASH4_INST(flash4_bf16_d128_s2_pe, bf16_t, 2, false, 1)
FLASH4_INST(flash4_f16_d128_s2_pe, f16_t, 2, false, 1)
FLASH4_INST(flash4_bf16_d128_s2p_dyn, bf16_t, 2, true, 2)
FLASH4_INST(flash4_f16_d128_s2p_dyn, f16_t, 2, true, 2)
FLASH4_INST(flash4_bf16_d128_s2_dyn, bf16_t, 2, false, 2)
FLASH4_INST(flash4_f16_d128_s2_dyn, f16_t, 2, false, 2)
