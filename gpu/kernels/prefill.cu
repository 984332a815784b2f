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
