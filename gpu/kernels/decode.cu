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
