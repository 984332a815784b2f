// decode.cu: paged decode attention (split-KV + LSE merge) and reshape_and_cache.
//
// paged_decode: grid (partitions, Hkv, B), 128 threads. One CTA owns one KV head
// of one sequence over one partition of `part` tokens and serves ALL G = Hq/Hkv
// query heads of that group, so each KV block is read from memory exactly once
// per KV head (GQA-aware, like FlashInfer's decode and vLLM v2).
//   each 16-byte K/V chunk is loaded once; LPT = D/8 lanes cover a token; the
//   G dot products are reduced over those lanes by shuffles; an online softmax
//   per thread, merged across threads at the end (log2 domain).
// Partials (unnormalized acc, running max, running sum) go to a workspace that
// `paged_decode_merge` combines with the log-sum-exp rule:
//   M = max_p m_p;  L = sum_p l_p 2^(m_p - M);  out = sum_p 2^(m_p - M) acc_p / L.
//
// Cache layout (vLLM's reference layout, same as reference::attention::PagedKv):
//   k_cache, v_cache: [num_blocks, block_size, Hkv, D]
//   block_tables: [B, max_blocks] i32; ctx_lens: [B] i32; q, out: [B, Hq, D]
//   part_acc: [B, Hq, nparts, D] f32; part_ml: [B, Hq, nparts, 2] f32

template <class T, int D, int MAXG, int UNR>
__device__ __forceinline__ void paged_decode(const T* __restrict__ q, const T* __restrict__ kc,
                                             const T* __restrict__ vc,
                                             const int* __restrict__ block_tables,
                                             const int* __restrict__ ctx_lens, int max_blocks,
                                             int bs, int hq, int hkv, float scale_log2, int part,
                                             int nparts, float* __restrict__ part_acc,
                                             float* __restrict__ part_ml) {
    // Single pass: every thread keeps its own online softmax (m, l, acc) over the
    // tokens of its slot (K and V chunks of a token are loaded together, UNR
    // tokens in flight per thread), then slots merge by the LSE rule: first by
    // shuffles inside the warp, then across warps through shared memory.
    constexpr int NT = 128, NW = NT / 32, LPT = D / 8, TPI = NT / LPT;  // tokens per iteration
    __shared__ __align__(16) float qs[MAXG * D];
    __shared__ float red[NW][MAXG][D];
    __shared__ float redml[NW][MAXG][2];
    __shared__ int sbt[64];  // block ids of this partition (part / bs <= 64)

    const int p = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int len = ctx_lens[b];
    const int t0 = p * part;
    if (t0 >= len) return;
    const int n = min(len, t0 + part) - t0;
    const int G = hq / hkv;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int sub = tid % LPT, slot = tid / LPT;
    const int* bt = block_tables + (size_t)b * max_blocks + t0 / bs;
    const int nblk = (n + bs - 1) / bs;

    for (int i = tid; i < nblk; i += NT) sbt[i] = bt[i];
    for (int i = tid; i < MAXG * D; i += NT) {
        int gg = i / D;
        qs[i] = gg < G ? to_f(q[((size_t)b * hq + hk * G + gg) * D + i % D]) * scale_log2 : 0.f;
    }
    __syncthreads();
    float qr[MAXG][8];
#pragma unroll
    for (int gg = 0; gg < MAXG; ++gg)
#pragma unroll
        for (int i = 0; i < 8; ++i) qr[gg][i] = qs[gg * D + sub * 8 + i];

    float m[MAXG], l[MAXG], acc[MAXG][8];
#pragma unroll
    for (int gg = 0; gg < MAXG; ++gg) {
        m[gg] = NEG_INF;
        l[gg] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[gg][i] = 0.f;
    }
    const size_t tok_stride = (size_t)hkv * D;
    const size_t head_off = (size_t)hk * D + sub * 8;
    for (int base = 0; base < n; base += TPI * UNR) {
        uint4 kv[UNR], vv[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            int tt = base + u * TPI + slot;
            if (tt < n) {
                size_t off = ((size_t)sbt[tt / bs] * bs + (tt + t0) % bs) * tok_stride + head_off;
                kv[u] = ldg16(kc + off);
                vv[u] = ldg16(vc + off);
            } else {
                kv[u] = make_uint4(0, 0, 0, 0);
                vv[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const bool valid = base + u * TPI + slot < n;
            float kf[8], vf[8];
            unpack8<T>(kv[u], kf);
            unpack8<T>(vv[u], vf);
#pragma unroll
            for (int gg = 0; gg < MAXG; ++gg) {
                if (gg >= G) break;
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) d = fmaf(qr[gg][i], kf[i], d);
#pragma unroll
                for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffff, d, o);
                if (valid) {
                    if (d > m[gg]) {
                        float sc = exp2f(m[gg] - d);  // 0 when m was -inf
                        l[gg] *= sc;
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[gg][i] *= sc;
                        m[gg] = d;
                    }
                    float pw = exp2f(d - m[gg]);
                    l[gg] += pw;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[gg][i] = fmaf(pw, vf[i], acc[gg][i]);
                }
            }
        }
    }
    // merge the slots of this warp (lanes that differ by multiples of LPT)
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
#pragma unroll
        for (int gg = 0; gg < MAXG; ++gg) {
            float m2 = __shfl_xor_sync(0xffffffff, m[gg], o);
            float l2 = __shfl_xor_sync(0xffffffff, l[gg], o);
            float M = fmaxf(m[gg], m2);
            float Mu = M == NEG_INF ? 0.f : M;
            float a = exp2f(m[gg] - Mu), c = exp2f(m2 - Mu);
            l[gg] = l[gg] * a + l2 * c;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float a2 = __shfl_xor_sync(0xffffffff, acc[gg][i], o);
                acc[gg][i] = acc[gg][i] * a + a2 * c;
            }
            m[gg] = M;
        }
    }
    if (lane < LPT) {
#pragma unroll
        for (int gg = 0; gg < MAXG; ++gg) {
#pragma unroll
            for (int i = 0; i < 8; ++i) red[warp][gg][sub * 8 + i] = acc[gg][i];
            if (sub == 0) { redml[warp][gg][0] = m[gg]; redml[warp][gg][1] = l[gg]; }
        }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += NT) {
        int gg = i / D, d = i % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, redml[w][gg][0]);
        float Mu = M == NEG_INF ? 0.f : M;
        float s = 0.f, L = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            float a = exp2f(redml[w][gg][0] - Mu);
            s += a * red[w][gg][d];
            L += a * redml[w][gg][1];
        }
        size_t row = ((size_t)b * hq + hk * G + gg) * nparts + p;
        part_acc[row * D + d] = s;
        if (d == 0) { part_ml[row * 2] = M; part_ml[row * 2 + 1] = L; }
    }
}

// Version 2 of the partition kernel: the same work split and online softmax,
// but K/V chunks travel by cp.async into shared memory, NS stages of UNR tokens
// per slot, so NS - 1 stages are in flight while one is computed and no
// registers hold loads in flight (v1's UNR uint4 pairs). Each thread reads back
// only the chunks it copied itself, so a cp.async.wait_group is the only
// synchronization. QSM keeps q in shared memory (read per token) instead of
// MAXG x 8 registers. Dynamic shared memory: NS * UNR * 2 * 128 * 16 bytes.
template <class T, int D, int MAXG, int UNR, int NS, bool QSM>
__device__ __forceinline__ void paged_decode_v2(const T* __restrict__ q, const T* __restrict__ kc,
                                                const T* __restrict__ vc,
                                                const int* __restrict__ block_tables,
                                                const int* __restrict__ ctx_lens, int max_blocks,
                                                int bs, int hq, int hkv, float scale_log2, int part,
                                                int nparts, float* __restrict__ part_acc,
                                                float* __restrict__ part_ml) {
    constexpr int NT = 128, NW = NT / 32, LPT = D / 8, TPI = NT / LPT;
    extern __shared__ uint4 stage_buf[];  // [NS][UNR][2][NT]
    __shared__ __align__(16) float qs[MAXG * D];
    __shared__ float red[NW][MAXG][D];
    __shared__ float redml[NW][MAXG][2];
    __shared__ int sbt[64];

    const int p = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int len = ctx_lens[b];
    const int t0 = p * part;
    if (t0 >= len) return;
    const int n = min(len, t0 + part) - t0;
    const int G = hq / hkv;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int sub = tid % LPT, slot = tid / LPT;
    const int* bt = block_tables + (size_t)b * max_blocks + t0 / bs;
    const int nblk = (n + bs - 1) / bs;

    for (int i = tid; i < nblk; i += NT) sbt[i] = bt[i];
    for (int i = tid; i < MAXG * D; i += NT) {
        int gg = i / D;
        qs[i] = gg < G ? to_f(q[((size_t)b * hq + hk * G + gg) * D + i % D]) * scale_log2 : 0.f;
    }
    __syncthreads();
    float qr[QSM ? 1 : MAXG][8];
    if (!QSM) {
#pragma unroll
        for (int gg = 0; gg < (QSM ? 1 : MAXG); ++gg)
#pragma unroll
            for (int i = 0; i < 8; ++i) qr[gg][i] = qs[gg * D + sub * 8 + i];
    }

    float m[MAXG], l[MAXG], acc[MAXG][8];
#pragma unroll
    for (int gg = 0; gg < MAXG; ++gg) {
        m[gg] = NEG_INF;
        l[gg] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[gg][i] = 0.f;
    }
    const size_t tok_stride = (size_t)hkv * D;
    const size_t head_off = (size_t)hk * D + sub * 8;
    const int iters = (n + TPI * UNR - 1) / (TPI * UNR);
    auto issue = [&](int it) {
        if (it < iters) {
            uint4* st = stage_buf + (size_t)(it % NS) * UNR * 2 * NT;
#pragma unroll
            for (int u = 0; u < UNR; ++u) {
                const int tt = it * TPI * UNR + u * TPI + slot;
                const bool ok = tt < n;
                const size_t off = ok ? ((size_t)sbt[tt / bs] * bs + (tt + t0) % bs) * tok_stride + head_off : 0;
                cp_async16(st + (u * 2) * NT + tid, kc + off, ok ? 16 : 0);
                cp_async16(st + (u * 2 + 1) * NT + tid, vc + off, ok ? 16 : 0);
            }
        }
        cp_async_commit();  // possibly empty: keeps the group count = iterations
    };
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) issue(s);
    for (int it = 0; it < iters; ++it) {
        issue(it + NS - 1);  // refills the stage consumed in iteration it - 1
        cp_async_wait<NS - 1>();
        const uint4* st = stage_buf + (size_t)(it % NS) * UNR * 2 * NT;
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const bool valid = it * TPI * UNR + u * TPI + slot < n;
            float kf[8], vf[8];
            unpack8<T>(st[(u * 2) * NT + tid], kf);
            unpack8<T>(st[(u * 2 + 1) * NT + tid], vf);
#pragma unroll
            for (int gg = 0; gg < MAXG; ++gg) {
                if (gg >= G) break;
                float d = 0.f;
                if (QSM) {
                    const float4 qa = *(const float4*)(qs + gg * D + sub * 8);
                    const float4 qb = *(const float4*)(qs + gg * D + sub * 8 + 4);
                    d = fmaf(qa.x, kf[0], d); d = fmaf(qa.y, kf[1], d);
                    d = fmaf(qa.z, kf[2], d); d = fmaf(qa.w, kf[3], d);
                    d = fmaf(qb.x, kf[4], d); d = fmaf(qb.y, kf[5], d);
                    d = fmaf(qb.z, kf[6], d); d = fmaf(qb.w, kf[7], d);
                } else {
#pragma unroll
                    for (int i = 0; i < 8; ++i) d = fmaf(qr[QSM ? 0 : gg][i], kf[i], d);
                }
#pragma unroll
                for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffff, d, o);
                if (valid) {
                    if (d > m[gg]) {
                        float sc = exp2f(m[gg] - d);  // 0 when m was -inf
                        l[gg] *= sc;
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[gg][i] *= sc;
                        m[gg] = d;
                    }
                    float pw = exp2f(d - m[gg]);
                    l[gg] += pw;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[gg][i] = fmaf(pw, vf[i], acc[gg][i]);
                }
            }
        }
    }
    cp_async_wait<0>();
    // merge the slots of this warp, then across warps (as in v1)
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
#pragma unroll
        for (int gg = 0; gg < MAXG; ++gg) {
            float m2 = __shfl_xor_sync(0xffffffff, m[gg], o);
            float l2 = __shfl_xor_sync(0xffffffff, l[gg], o);
            float M = fmaxf(m[gg], m2);
            float Mu = M == NEG_INF ? 0.f : M;
            float a = exp2f(m[gg] - Mu), c = exp2f(m2 - Mu);
            l[gg] = l[gg] * a + l2 * c;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float a2 = __shfl_xor_sync(0xffffffff, acc[gg][i], o);
                acc[gg][i] = acc[gg][i] * a + a2 * c;
            }
            m[gg] = M;
        }
    }
    if (lane < LPT) {
#pragma unroll
        for (int gg = 0; gg < MAXG; ++gg) {
#pragma unroll
            for (int i = 0; i < 8; ++i) red[warp][gg][sub * 8 + i] = acc[gg][i];
            if (sub == 0) { redml[warp][gg][0] = m[gg]; redml[warp][gg][1] = l[gg]; }
        }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += NT) {
        int gg = i / D, d = i % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, redml[w][gg][0]);
        float Mu = M == NEG_INF ? 0.f : M;
        float s = 0.f, L = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            float a = exp2f(redml[w][gg][0] - Mu);
            s += a * red[w][gg][d];
            L += a * redml[w][gg][1];
        }
        size_t row = ((size_t)b * hq + hk * G + gg) * nparts + p;
        part_acc[row * D + d] = s;
        if (d == 0) { part_ml[row * 2] = M; part_ml[row * 2 + 1] = L; }
    }
}

// Version 3: tensor cores, as in prefill.cu. The G query heads of a KV head
// are the rows of one m16 tile (rows G..15 are zero), so S = Q K^T and
// O += P V are mma.m16n8k16 with K fragments from ldmatrix and V fragments
// from ldmatrix.trans; the softmax needs 2 shuffles per 16 tokens per row
// instead of v1/v2's 4 per token per head (v1 was bound by shuffle issue).
// The CTA's 4 warps share 64-token tiles staged by cp.async in NS stages; warp
// w takes tokens 16w..16w+15 of each tile and keeps its own (m, l, O); the
// warps merge through shared memory at the end (LSE rule), then the partition
// result goes to the workspace like v1. P is rounded to 16 bits for the PV mma
// (as in prefill). Dynamic shared memory: NS * 2 * 64 * (D + 8) * 2 bytes.
template <class T, int D, int NS>
__device__ __forceinline__ void paged_decode_v3(const T* __restrict__ q, const T* __restrict__ kc,
                                                const T* __restrict__ vc,
                                                const int* __restrict__ block_tables,
                                                const int* __restrict__ ctx_lens, int max_blocks,
                                                int bs, int hq, int hkv, float scale_log2, int part,
                                                int nparts, float* __restrict__ part_acc,
                                                float* __restrict__ part_ml) {
    constexpr int NW = 4, NT = 32 * NW, BN = 64, LD = D + 8, MAXG = 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = (T*)smem_raw;           // [NS][BN][LD]
    T* sV = sK + NS * BN * LD;      // [NS][BN][LD]
    __shared__ int sbt[64];

    const int p = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int len = ctx_lens[b];
    const int t0 = p * part;
    if (t0 >= len) return;
    const int n = min(len, t0 + part) - t0;
    const int G = hq / hkv;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int* bt = block_tables + (size_t)b * max_blocks + t0 / bs;
    const int nblk = (n + bs - 1) / bs;
    for (int i = tid; i < nblk; i += NT) sbt[i] = bt[i];

    // Q fragments: row g = query head hk * G + g (rows >= G and g + 8 are zero)
    u32 qf[D / 16][2];
    const T* qrow = q + ((size_t)b * hq + hk * G + g) * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        qf[kk][0] = g < G ? *(const u32*)(qrow + kk * 16 + 2 * t) : 0u;
        qf[kk][1] = g < G ? *(const u32*)(qrow + kk * 16 + 2 * t + 8) : 0u;
    }
    __syncthreads();  // sbt

    float acc[D / 8][2];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = 0.f;
    float m_run = NEG_INF, l_run = 0.f;
    const int ntiles = (n + BN - 1) / BN;
    const size_t tok_stride = (size_t)hkv * D;

    auto load_tile = [&](int j) {
        T* dk = sK + (j % NS) * BN * LD;
        T* dv = sV + (j % NS) * BN * LD;
#pragma unroll
        for (int c = tid; c < BN * D / 8; c += NT) {
            const int key = c / (D / 8), c8 = c % (D / 8);
            const int tt = j * BN + key;
            const bool ok = tt < n;
            const size_t off =
                ok ? ((size_t)sbt[tt / bs] * bs + (tt + t0) % bs) * tok_stride + (size_t)hk * D + c8 * 8 : 0;
            cp_async16(dk + key * LD + c8 * 8, kc + off, ok ? 16 : 0);
            cp_async16(dv + key * LD + c8 * 8, vc + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
        if (s < ntiles) load_tile(s);
        cp_async_commit();
    }
    for (int j = 0; j < ntiles; ++j) {
        if (j + NS - 1 < ntiles) load_tile(j + NS - 1);
        cp_async_commit();
        cp_async_wait<NS - 1>();
        __syncthreads();
        const T* Ks = sK + (j % NS) * BN * LD + warp * 16 * LD;
        const T* Vs = sV + (j % NS) * BN * LD + warp * 16 * LD;
        float s[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 bk[4];
            const int mi = lane >> 3;
            ldmatrix_x4(bk, Ks + ((mi >> 1) * 8 + (lane & 7)) * LD + kk * 16 + (mi & 1) * 8);
            const u32 a[4] = {qf[kk][0], 0u, qf[kk][1], 0u};
            mma16816<T>(s[0], a, bk[0], bk[1]);
            mma16816<T>(s[1], a, bk[2], bk[3]);
        }
        // row g only (c0, c1); tokens j*BN + 16 warp + 8 nt + 2t + r
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int tt = j * BN + warp * 16 + nt * 8 + 2 * t + r;
                const float x = tt < n ? s[nt][r] * scale_log2 : NEG_INF;
                s[nt][r] = x;
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_new = fmaxf(m_run, mx);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;
        const float alpha = exp2f(m_run - m_use);
        m_run = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float pw = exp2f(s[nt][r] - m_use);
                s[nt][r] = pw;
                rs += pw;
            }
        l_run = l_run * alpha + rs;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) { acc[i][0] *= alpha; acc[i][1] *= alpha; }
        // O += P V (rows g + 8 of P are zero)
        const u32 a[4] = {pack2<T>(s[0][0], s[0][1]), 0u, pack2<T>(s[1][0], s[1][1]), 0u};
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
            u32 bv[4];
            const int key = (lane & 7) + ((lane >> 3) & 1) * 8;
            const int dim = n2 * 16 + (lane >> 4) * 8;
            ldmatrix_x4_trans(bv, Vs + key * LD + dim);
            float c0[4] = {acc[2 * n2][0], acc[2 * n2][1], 0.f, 0.f};
            float c1[4] = {acc[2 * n2 + 1][0], acc[2 * n2 + 1][1], 0.f, 0.f};
            mma16816<T>(c0, a, bv[0], bv[1]);
            mma16816<T>(c1, a, bv[2], bv[3]);
            acc[2 * n2][0] = c0[0]; acc[2 * n2][1] = c0[1];
            acc[2 * n2 + 1][0] = c1[0]; acc[2 * n2 + 1][1] = c1[1];
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();
    l_run += __shfl_xor_sync(0xffffffff, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffff, l_run, 2);
    // merge the 4 warps through shared memory (reusing the stage buffers)
    float* red = (float*)smem_raw;      // [NW][MAXG][D]
    float* redml = red + NW * MAXG * D; // [NW][MAXG][2]
    if (g < G) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            red[(warp * MAXG + g) * D + i * 8 + 2 * t] = acc[i][0];
            red[(warp * MAXG + g) * D + i * 8 + 2 * t + 1] = acc[i][1];
        }
        if (t == 0) { redml[(warp * MAXG + g) * 2] = m_run; redml[(warp * MAXG + g) * 2 + 1] = l_run; }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += NT) {
        const int gg = i / D, d = i % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, redml[(w * MAXG + gg) * 2]);
        const float Mu = M == NEG_INF ? 0.f : M;
        float sum = 0.f, L = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float a = exp2f(redml[(w * MAXG + gg) * 2] - Mu);
            sum += a * red[(w * MAXG + gg) * D + d];
            L += a * redml[(w * MAXG + gg) * 2 + 1];
        }
        const size_t row = ((size_t)b * hq + hk * G + gg) * nparts + p;
        part_acc[row * D + d] = sum;
        if (d == 0) { part_ml[row * 2] = M; part_ml[row * 2 + 1] = L; }
    }
}

template <class T, int D>
__device__ __forceinline__ void decode_merge(const float* __restrict__ part_acc,
                                             const float* __restrict__ part_ml,
                                             const int* __restrict__ ctx_lens, int hq, int part,
                                             int nparts, T* __restrict__ out, float* __restrict__ lse) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const int len = ctx_lens[b];
    const int np = (len + part - 1) / part;
    const size_t row = (size_t)b * hq + h;
    float M = NEG_INF;
    for (int p = 0; p < np; ++p) M = fmaxf(M, part_ml[(row * nparts + p) * 2]);
    float L = 0.f, a = 0.f;
    for (int p = 0; p < np; ++p) {
        float w = exp2f(part_ml[(row * nparts + p) * 2] - M);
        L += w * part_ml[(row * nparts + p) * 2 + 1];
        a += w * part_acc[(row * nparts + p) * D + d];
    }
    out[row * D + d] = from_f<T>(L > 0.f ? a / L : 0.f);
    if (d == 0) lse[row] = L > 0.f ? (M + log2f(L)) * LN2 : NEG_INF;
}

// MINB: the CTAs per SM the register allocation must allow. ncu showed 121
// registers -> 4 CTAs -> 25% occupancy, latency-bound at 57% of DRAM peak; but
// capping registers spills (b6: 500 B, b8: 1 KB of spill stores) and measured
// 0.96 / 0.66 TB/s against 1.96 TB/s for b4 on H100, so b4 is the default.
#define DECODE_INST(SUF, T, D, MAXG, UNR, MINB)                                                       \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                           \
        paged_decode_##SUF##_d##D##_g##MAXG##_u##UNR##_b##MINB(                                       \
            const T* q, const T* kc, const T* vc, const int* bt, const int* lens, int max_blocks,     \
            int bs, int hq, int hkv, float scale_log2, int part, int nparts, float* pa, float* pml) { \
        paged_decode<T, D, MAXG, UNR>(q, kc, vc, bt, lens, max_blocks, bs, hq, hkv, scale_log2, part, \
                                      nparts, pa, pml);                                               \
    }
DECODE_INST(bf16, bf16_t, 64, 4, 4, 4)
DECODE_INST(bf16, bf16_t, 64, 8, 4, 4)
DECODE_INST(bf16, bf16_t, 128, 4, 4, 4)
DECODE_INST(bf16, bf16_t, 128, 4, 4, 6)
DECODE_INST(bf16, bf16_t, 128, 4, 4, 8)
DECODE_INST(bf16, bf16_t, 128, 8, 4, 4)
DECODE_INST(f16, f16_t, 64, 4, 4, 4)
DECODE_INST(f16, f16_t, 64, 8, 4, 4)
DECODE_INST(f16, f16_t, 128, 4, 4, 4)
DECODE_INST(f16, f16_t, 128, 4, 4, 6)
DECODE_INST(f16, f16_t, 128, 4, 4, 8)
DECODE_INST(f16, f16_t, 128, 8, 4, 4)

// v2 instances: u = tokens per slot per stage, s = stages, q = q in shared memory.
#define DECODE2_INST(SUF, T, D, MAXG, UNR, NS, QSM, QN)                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        paged_decode2_##SUF##_d##D##_g##MAXG##_u##UNR##_s##NS##_q##QN(                                \
            const T* q, const T* kc, const T* vc, const int* bt, const int* lens, int max_blocks,     \
            int bs, int hq, int hkv, float scale_log2, int part, int nparts, float* pa, float* pml) { \
        paged_decode_v2<T, D, MAXG, UNR, NS, QSM>(q, kc, vc, bt, lens, max_blocks, bs, hq, hkv,       \
                                                  scale_log2, part, nparts, pa, pml);                 \
    }
#define DECODE2_SET(SUF, T, D, MAXG)                   \
    DECODE2_INST(SUF, T, D, MAXG, 2, 4, false, 0)      \
    DECODE2_INST(SUF, T, D, MAXG, 2, 4, true, 1)       \
    DECODE2_INST(SUF, T, D, MAXG, 4, 3, false, 0)      \
    DECODE2_INST(SUF, T, D, MAXG, 4, 3, true, 1)
DECODE2_SET(bf16, bf16_t, 64, 4)
DECODE2_SET(bf16, bf16_t, 64, 8)
DECODE2_SET(bf16, bf16_t, 128, 4)
DECODE2_SET(bf16, bf16_t, 128, 8)
DECODE2_SET(f16, f16_t, 64, 4)
DECODE2_SET(f16, f16_t, 64, 8)
DECODE2_SET(f16, f16_t, 128, 4)
DECODE2_SET(f16, f16_t, 128, 8)

// v3 instances (tensor cores): s = cp.async stages of 64 tokens.
#define DECODE3_INST(SUF, T, D, NS)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) paged_decode3_##SUF##_d##D##_s##NS(            \
        const T* q, const T* kc, const T* vc, const int* bt, const int* lens, int max_blocks, int bs, \
        int hq, int hkv, float scale_log2, int part, int nparts, float* pa, float* pml) {             \
        paged_decode_v3<T, D, NS>(q, kc, vc, bt, lens, max_blocks, bs, hq, hkv, scale_log2, part,     \
                                  nparts, pa, pml);                                                   \
    }
DECODE3_INST(bf16, bf16_t, 64, 2)
DECODE3_INST(bf16, bf16_t, 64, 3)
DECODE3_INST(bf16, bf16_t, 128, 2)
DECODE3_INST(bf16, bf16_t, 128, 3)
DECODE3_INST(f16, f16_t, 64, 2)
DECODE3_INST(f16, f16_t, 64, 3)
DECODE3_INST(f16, f16_t, 128, 2)
DECODE3_INST(f16, f16_t, 128, 3)

// Version 4: v3's tensor-core body with a finer pipeline (gpu/NOTES.md item 11).
// A CTA is NW warps (1, 2 or 4); a stage is BN = 16 NW tokens (16 per warp), NS
// stages deep, so smem = NS * NW * 2 * 16 * D * 2 bytes and a fraction (NS-1)/NS
// of it is in flight; 1-warp CTAs need no CTA barrier and many of them fit an SM,
// so one CTA's start-up (block table, q, first tile) is hidden by the others.
// Shared rows are unpadded, 16-byte chunks XOR-swizzled by (row & 7) so ldmatrix
// stays conflict-free; block ids by shift/mask (block_size is 16 or 32, and a
// partition starts on a block boundary: part % 32 == 0); the QK mma chain is
// split in two (even / odd k-steps) to halve its latency.
template <class T, int D, int NW, int NS>
__device__ __forceinline__ void paged_decode_v4(const T* __restrict__ q, const T* __restrict__ kc,
                                                const T* __restrict__ vc,
                                                const int* __restrict__ block_tables,
                                                const int* __restrict__ ctx_lens, int max_blocks,
                                                int bs, int hq, int hkv, float scale_log2, int part,
                                                int nparts, float* __restrict__ part_acc,
                                                float* __restrict__ part_ml) {
    constexpr int NT = 32 * NW, BN = 16 * NW, MAXG = 8, CPR = D / 8, RPP = NT / CPR, PASSES = BN / RPP;
    static_assert(NT % CPR == 0 && BN % RPP == 0, "tile shape");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = (T*)smem_raw;           // [NS][BN][D], chunks swizzled
    T* sV = sK + NS * BN * D;       // [NS][BN][D]
    __shared__ int sbt[64];

    const int p = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int len = ctx_lens[b];
    const int t0 = p * part;
    if (t0 >= len) return;
    const int n = min(len, t0 + part) - t0;
    const int G = hq / hkv;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int lbs = __ffs(bs) - 1, bmask = bs - 1;
    const int* bt = block_tables + (size_t)b * max_blocks + (t0 >> lbs);
    const int nblk = (n + bs - 1) >> lbs;
    for (int i = tid; i < nblk; i += NT) sbt[i] = bt[i];

    u32 qf[D / 16][2];
    const T* qrow = q + ((size_t)b * hq + hk * G + g) * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        qf[kk][0] = g < G ? *(const u32*)(qrow + kk * 16 + 2 * t) : 0u;
        qf[kk][1] = g < G ? *(const u32*)(qrow + kk * 16 + 2 * t + 8) : 0u;
    }
    __syncthreads();  // sbt

    float acc[D / 8][2];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = 0.f;
    float m_run = NEG_INF, l_run = 0.f;
    const int ntiles = (n + BN - 1) / BN;
    const size_t tok_stride = (size_t)hkv * D;
    const int c8 = tid % CPR, r0 = tid / CPR;
    const T* kbase = kc + (size_t)hk * D + c8 * 8;
    const T* vbase = vc + (size_t)hk * D + c8 * 8;

    auto load_tile = [&](int j) {
        T* dk = sK + (j % NS) * BN * D;
        T* dv = sV + (j % NS) * BN * D;
#pragma unroll
        for (int i = 0; i < PASSES; ++i) {
            const int key = r0 + i * RPP;
            const int tt = j * BN + key;
            const bool ok = tt < n;
            const size_t off = ok ? (((size_t)sbt[tt >> lbs] << lbs) + (tt & bmask)) * tok_stride : 0;
            const int so = key * D + ((c8 ^ (key & 7)) << 3);
            cp_async16(dk + so, kbase + off, ok ? 16 : 0);
            cp_async16(dv + so, vbase + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
        if (s < ntiles) load_tile(s);
        cp_async_commit();
    }
    const int mi = lane >> 3, l7 = lane & 7;
    for (int j = 0; j < ntiles; ++j) {
        if (j + NS - 1 < ntiles) load_tile(j + NS - 1);
        cp_async_commit();
        cp_async_wait<NS - 1>();
        __syncthreads();
        const T* Ks = sK + (j % NS) * BN * D + warp * 16 * D;
        const T* Vs = sV + (j % NS) * BN * D + warp * 16 * D;
        float s[2][2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) s[h][nt][0] = s[h][nt][1] = s[h][nt][2] = s[h][nt][3] = 0.f;
        // K rows (mi >> 1) * 8 + l7, chunk 2 kk + (mi & 1); row & 7 == l7
        const T* krow = Ks + ((mi >> 1) * 8 + l7) * D;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 bk[4];
            ldmatrix_x4(bk, krow + (((kk * 2 + (mi & 1)) ^ l7) << 3));
            const u32 a[4] = {qf[kk][0], 0u, qf[kk][1], 0u};
            mma16816<T>(s[kk & 1][0], a, bk[0], bk[1]);
            mma16816<T>(s[kk & 1][1], a, bk[2], bk[3]);
        }
        // row g only (c0, c1); tokens j*BN + 16 warp + 8 nt + 2t + r
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int tt = j * BN + warp * 16 + nt * 8 + 2 * t + r;
                const float x = tt < n ? (s[0][nt][r] + s[1][nt][r]) * scale_log2 : NEG_INF;
                s[0][nt][r] = x;
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_new = fmaxf(m_run, mx);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;
        const float alpha = exp2f(m_run - m_use);
        m_run = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float pw = exp2f(s[0][nt][r] - m_use);
                s[0][nt][r] = pw;
                rs += pw;
            }
        l_run = l_run * alpha + rs;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) { acc[i][0] *= alpha; acc[i][1] *= alpha; }
        // O += P V (rows g + 8 of P are zero); V rows key = l7 + ((lane >> 3) & 1) * 8
        const u32 a[4] = {pack2<T>(s[0][0][0], s[0][0][1]), 0u, pack2<T>(s[0][1][0], s[0][1][1]), 0u};
        const T* vrow = Vs + (l7 + ((lane >> 3) & 1) * 8) * D;
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
            u32 bv[4];
            ldmatrix_x4_trans(bv, vrow + (((n2 * 2 + (lane >> 4)) ^ l7) << 3));
            float c0[4] = {acc[2 * n2][0], acc[2 * n2][1], 0.f, 0.f};
            float c1[4] = {acc[2 * n2 + 1][0], acc[2 * n2 + 1][1], 0.f, 0.f};
            mma16816<T>(c0, a, bv[0], bv[1]);
            mma16816<T>(c1, a, bv[2], bv[3]);
            acc[2 * n2][0] = c0[0]; acc[2 * n2][1] = c0[1];
            acc[2 * n2 + 1][0] = c1[0]; acc[2 * n2 + 1][1] = c1[1];
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();
    l_run += __shfl_xor_sync(0xffffffff, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffff, l_run, 2);
    // merge the NW warps through shared memory (reusing the stage buffers:
    // NW * 8 * D * 4 bytes < NS * NW * 64 * D)
    float* red = (float*)smem_raw;      // [NW][MAXG][D]
    float* redml = red + NW * MAXG * D; // [NW][MAXG][2]
    if (g < G) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            red[(warp * MAXG + g) * D + i * 8 + 2 * t] = acc[i][0];
            red[(warp * MAXG + g) * D + i * 8 + 2 * t + 1] = acc[i][1];
        }
        if (t == 0) { redml[(warp * MAXG + g) * 2] = m_run; redml[(warp * MAXG + g) * 2 + 1] = l_run; }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += NT) {
        const int gg = i / D, d = i % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, redml[(w * MAXG + gg) * 2]);
        const float Mu = M == NEG_INF ? 0.f : M;
        float sum = 0.f, L = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float a = exp2f(redml[(w * MAXG + gg) * 2] - Mu);
            sum += a * red[(w * MAXG + gg) * D + d];
            L += a * redml[(w * MAXG + gg) * 2 + 1];
        }
        const size_t row = ((size_t)b * hq + hk * G + gg) * nparts + p;
        part_acc[row * D + d] = sum;
        if (d == 0) { part_ml[row * 2] = M; part_ml[row * 2 + 1] = L; }
    }
}

// v4 instances: w = warps per CTA (16 tokens each per stage), s = stages.
#define DECODE4_INST(SUF, T, D, NW, NS)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * NW) paged_decode4_##SUF##_d##D##_w##NW##_s##NS( \
        const T* q, const T* kc, const T* vc, const int* bt, const int* lens, int max_blocks, int bs, \
        int hq, int hkv, float scale_log2, int part, int nparts, float* pa, float* pml) {             \
        paged_decode_v4<T, D, NW, NS>(q, kc, vc, bt, lens, max_blocks, bs, hq, hkv, scale_log2, part, \
                                      nparts, pa, pml);                                               \
    }
#define DECODE4_SET(SUF, T, D)          \
    DECODE4_INST(SUF, T, D, 1, 2)       \
    DECODE4_INST(SUF, T, D, 1, 3)       \
    DECODE4_INST(SUF, T, D, 1, 4)       \
    DECODE4_INST(SUF, T, D, 2, 2)       \
    DECODE4_INST(SUF, T, D, 2, 3)       \
    DECODE4_INST(SUF, T, D, 4, 2)
DECODE4_SET(bf16, bf16_t, 64)
DECODE4_SET(bf16, bf16_t, 128)
DECODE4_SET(f16, f16_t, 64)
DECODE4_SET(f16, f16_t, 128)

#define MERGE_INST(SUF, T, D)                                                                         \
    extern "C" __global__ void decode_merge_##SUF##_d##D(const float* pa, const float* pml,          \
                                                         const int* lens, int hq, int part,          \
                                                         int nparts, T* out, float* lse) {            \
        decode_merge<T, D>(pa, pml, lens, hq, part, nparts, out, lse);                                \
    }
MERGE_INST(bf16, bf16_t, 64)
MERGE_INST(bf16, bf16_t, 128)
MERGE_INST(f16, f16_t, 64)
MERGE_INST(f16, f16_t, 128)

// reshape_and_cache: key/value [T, Hkv, D] -> caches at slot_mapping[t] (slot =
// block * block_size + offset; a negative slot is a padding token and is skipped).
// One CTA per token, one thread per 16-byte chunk. 16-bit types of either kind.
extern "C" __global__ void reshape_and_cache(const uint4* __restrict__ key, const uint4* __restrict__ value,
                                             uint4* __restrict__ kc, uint4* __restrict__ vc,
                                             const int* __restrict__ slots, int hkv_d8) {
    const int t = blockIdx.x;
    const int slot = slots[t];
    if (slot < 0) return;
    for (int i = threadIdx.x; i < hkv_d8; i += blockDim.x) {
        kc[(size_t)slot * hkv_d8 + i] = key[(size_t)t * hkv_d8 + i];
        vc[(size_t)slot * hkv_d8 + i] = value[(size_t)t * hkv_d8 + i];
    }
}
