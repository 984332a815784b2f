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
