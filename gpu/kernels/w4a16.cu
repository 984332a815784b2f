// w4a16.cu: y[M,N] = x[M,K] * dequant(W)[K,N], 4-bit weights, 16-bit activations,
// dequantized in registers, f32 accumulation. M is tiled by MT rows (grid.z).
//
// GPTQ (AutoGPTQ v1): qweight i32 [K/8, N], row k at bits 4*(k%8) of word
//   (k/8, n); qzeros i32 [G, N/8] packed along N (LSB first), stored minus one;
//   scales f16 [G, N]; W[k,n] = s[g,n] * (q - (z + 1)), g = g_idx[k].
//   Act-order: the host sorts rows by g_idx once (perm) and repacks qweight in that
//   order; the kernel then reads x through perm and the groups are runs of rows
//   (`gsort[k]` = group of permuted row k). With perm == null, g = k / group_size.
// AWQ (AutoAWQ GEMM): qweight i32 [K, N/8] packed along N with nibble order
//   [0,2,4,6,1,3,5,7] (slot i holds column order[i]); qzeros i32 [K/gs, N/8] same
//   packing, no offset; scales f16 [K/gs, N]; W[k,n] = s * (q - z).
//
// Dequantization trick: float(0x4B000000 | q) = 2^23 + q exactly, so
// (2^23 + q) - (2^23 + z) = q - z is one FADD per weight, no int->float convert.
//
// Work split: CTA = 16 column groups x KS k-slices (256 threads); each k-slice
// walks a contiguous chunk of K, partial sums are reduced in shared memory.

__device__ __forceinline__ float magic_nib(u32 w, int shift) {
    return __uint_as_float(0x4B000000u | ((w >> shift) & 0xFu));
}
__device__ __forceinline__ float f16_to_f(u16 h) { f16_t t; t.x = h; return to_f(t); }

// GPTQ: a thread owns 4 adjacent columns (one 16-byte load = 4 words = 4 cols x 8 rows).
template <class T, int MT, int CG>
__device__ __forceinline__ void gptq_gemm(const T* __restrict__ x, const int* __restrict__ qw,
                                          const int* __restrict__ qz, const u16* __restrict__ sc,
                                          const int* __restrict__ perm, const int* __restrict__ gsort,
                                          T* __restrict__ y, int M, int K, int N, int gs) {
    constexpr int KS = 256 / CG, COLS = CG * 4;
    constexpr int NWARP = CG * KS / 32;
    __shared__ float red[NWARP][MT][COLS];
    const int cg = threadIdx.x % CG, ks = threadIdx.x / CG;
    const int n0 = blockIdx.x * COLS + cg * 4;
    const int m0 = blockIdx.z * MT;
    const int KB = K / 8;
    const int chunk = (KB + KS - 1) / KS;
    const int kb0 = ks * chunk, kb1 = min(KB, kb0 + chunk);
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
    const bool colok = n0 < N;
    int gcur = -1;
    float s[4], zb[4];
    constexpr int UNR = 8;  // 16-byte weight loads in flight per thread
    for (int kbb = kb0; kbb < kb1 && colok; kbb += UNR) {
      uint4 wv[UNR];
#pragma unroll
      for (int u = 0; u < UNR; ++u)
          wv[u] = kbb + u < kb1 ? ldg16(qw + (size_t)(kbb + u) * N + n0) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int kb = kbb + u;
        if (kb >= kb1) break;
        const uint4 w = wv[u];
        const int k = kb * 8;
        int g0 = perm ? gsort[k] : k / gs;
        int g7 = perm ? gsort[k + 7] : (k + 7) / gs;
        // x rows for these 8 k's
        float xf[MT][8];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m0 + m < M) {
                if (perm) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) xf[m][i] = to_f(x[(size_t)(m0 + m) * K + perm[k + i]]);
                } else {
                    uint4 xv = ldg16(x + (size_t)(m0 + m) * K + k);
                    unpack8<T>(xv, xf[m]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) xf[m][i] = 0.f;
            }
        }
        u32 wc[4] = {w.x, w.y, w.z, w.w};
        if (g0 == g7) {
            if (g0 != gcur) {
                gcur = g0;
                u32 zw = (u32)qz[(size_t)g0 * (N / 8) + n0 / 8];
                uint2 sv = *(const uint2*)(sc + (size_t)g0 * N + n0);
                s[0] = f16_to_f(sv.x & 0xffff); s[1] = f16_to_f(sv.x >> 16);
                s[2] = f16_to_f(sv.y & 0xffff); s[3] = f16_to_f(sv.y >> 16);
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    zb[c] = 8388608.f + (float)(((zw >> (4 * ((n0 % 8) + c))) & 0xF) + 1);
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float wq[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) wq[i] = magic_nib(wc[c], 4 * i) - zb[c];
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    float d = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; ++i) d = fmaf(xf[m][i], wq[i], d);
                    acc[m][c] = fmaf(s[c], d, acc[m][c]);
                }
            }
        } else {
            // a group boundary inside these 8 rows: per-row scales (rare path)
            gcur = -1;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                int gi = perm ? gsort[k + i] : (k + i) / gs;
                u32 zw = (u32)qz[(size_t)gi * (N / 8) + n0 / 8];
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    float si = f16_to_f(sc[(size_t)gi * N + n0 + c]);
                    float zi = 8388608.f + (float)(((zw >> (4 * ((n0 % 8) + c))) & 0xF) + 1);
                    float wv = si * (magic_nib(wc[c], 4 * i) - zi);
#pragma unroll
                    for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(xf[m][i], wv, acc[m][c]);
                }
            }
        }
    }
    }
    // the 32/CG k-slices inside a warp: shuffles; then across warps: shared memory
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int o = CG; o < 32; o <<= 1) acc[m][c] += __shfl_xor_sync(0xffffffff, acc[m][c], o);
            if ((threadIdx.x % 32) < CG) red[threadIdx.x / 32][m][cg * 4 + c] = acc[m][c];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < MT * COLS; i += CG * KS) {
        int m = i / COLS, c = i % COLS;
        int n = blockIdx.x * COLS + c;
        if (m0 + m >= M || n >= N) continue;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NWARP; ++j) sum += red[j][m][c];
        y[(size_t)(m0 + m) * N + n] = from_f<T>(sum);
    }
}

// AWQ: a thread owns one packed word column (8 output columns); rows one at a time.
template <class T, int MT>
__device__ __forceinline__ void awq_gemm(const T* __restrict__ x, const int* __restrict__ qw,
                                         const int* __restrict__ qz, const u16* __restrict__ sc,
                                         T* __restrict__ y, int M, int K, int N, int gs) {
    constexpr int WG = 8, KS = 32, COLS = WG * 8, UNR = 4;
    constexpr int NWARP = WG * KS / 32;
    __shared__ float red[NWARP][MT][COLS];
    const int wg = threadIdx.x % WG, ks = threadIdx.x / WG;
    const int nw = blockIdx.x * WG + wg;  // packed word column
    const int NW8 = N / 8;
    const int m0 = blockIdx.z * MT;
    const int chunk = (K + KS - 1) / KS;
    const int k0 = ks * chunk, k1 = min(K, k0 + chunk);
    // column c of the word sits in nibble slot inv[c] (inverse of [0,2,4,6,1,3,5,7])
    const int inv[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    float acc[MT][8];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[m][c] = 0.f;
    int gcur = -1;
    float s[8], zb[8];
    if (nw < NW8) {
        for (int kbase = k0; kbase < k1; kbase += UNR) {
            u32 w[UNR];
#pragma unroll
            for (int u = 0; u < UNR; ++u)
                w[u] = kbase + u < k1 ? (u32)__ldg(qw + (size_t)(kbase + u) * NW8 + nw) : 0u;
#pragma unroll
            for (int u = 0; u < UNR; ++u) {
                const int k = kbase + u;
                if (k >= k1) break;
                const int g = k / gs;
                if (g != gcur) {
                    gcur = g;
                    u32 zw = (u32)qz[(size_t)g * NW8 + nw];
                    uint4 sv = *(const uint4*)(sc + (size_t)g * N + nw * 8);
                    u32 sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        s[c] = f16_to_f((c & 1) ? (sw[c / 2] >> 16) : (sw[c / 2] & 0xffff));
                        zb[c] = 8388608.f + (float)((zw >> (4 * inv[c])) & 0xF);
                    }
                }
                float xm[MT];
#pragma unroll
                for (int m = 0; m < MT; ++m) xm[m] = m0 + m < M ? to_f(x[(size_t)(m0 + m) * K + k]) : 0.f;
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    float wv = s[c] * (magic_nib(w[u], 4 * inv[c]) - zb[c]);
#pragma unroll
                    for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(xm[m], wv, acc[m][c]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 8; ++c) {
#pragma unroll
            for (int o = WG; o < 32; o <<= 1) acc[m][c] += __shfl_xor_sync(0xffffffff, acc[m][c], o);
            if ((threadIdx.x % 32) < WG) red[threadIdx.x / 32][m][wg * 8 + c] = acc[m][c];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < MT * COLS; i += WG * KS) {
        int m = i / COLS, c = i % COLS;
        int n = blockIdx.x * COLS + c;
        if (m0 + m >= M || n >= N) continue;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NWARP; ++j) sum += red[j][m][c];
        y[(size_t)(m0 + m) * N + n] = from_f<T>(sum);
    }
}

#define W4_INST(SUF, T, MT)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) gptq_gemm_##SUF##_m##MT(                       \
        const T* x, const int* qw, const int* qz, const u16* sc, const int* perm, const int* gsort,   \
        T* y, int M, int K, int N, int gs) {                                                          \
        gptq_gemm<T, MT, 16>(x, qw, qz, sc, perm, gsort, y, M, K, N, gs);                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) awq_gemm_##SUF##_m##MT(                        \
        const T* x, const int* qw, const int* qz, const u16* sc, T* y, int M, int K, int N, int gs) { \
        awq_gemm<T, MT>(x, qw, qz, sc, y, M, K, N, gs);                                               \
    }
W4_INST(bf16, bf16_t, 1)
W4_INST(bf16, bf16_t, 2)
W4_INST(bf16, bf16_t, 4)
W4_INST(bf16, bf16_t, 8)
W4_INST(f16, f16_t, 1)
W4_INST(f16, f16_t, 2)
W4_INST(f16, f16_t, 4)
W4_INST(f16, f16_t, 8)

// GPTQ on tensor cores, for M > 4 (no act-order): each weight is dequantized
// once into a bf16/f16 B fragment of mma.m16n8k16 and multiplied against up to
// MTL 16-row tiles of x. CTA = NW warps over the same COLS = 8*NT columns, each
// warp a 1/NW slice of K; partial sums reduced through shared memory.
// B fragment of lane (g, t): column g, k rows {2t, 2t+1} (b0) and {2t+8, 2t+9}
// (b1) = nibbles 2t, 2t+1 of the words of k-blocks 2i and 2i+1.
// Needs K % (16 * NW) == 0 and group_size % 16 == 0.
template <class T, int NT, int MTL, int NW>
__device__ __forceinline__ void gptq_tc(const T* __restrict__ x, const int* __restrict__ qw,
                                        const int* __restrict__ qz, const u16* __restrict__ sc,
                                        T* __restrict__ y, int M, int K, int N, int gs) {
    constexpr int COLS = NT * 8;
    __shared__ float red[NW][MTL * 16][COLS + 1];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * COLS;
    const int kslice = K / NW;
    const int kbeg = warp * kslice, kend = kbeg + kslice;
    float acc[MTL][NT][4];
#pragma unroll
    for (int mt = 0; mt < MTL; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
    int gcur = -1;
    float s[NT], zb[NT];
#pragma unroll 2
    for (int k0 = kbeg; k0 < kend; k0 += 16) {
        u32 w0[NT], w1[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int col = n0 + j * 8 + g;
            const bool ok = col < N;
            w0[j] = ok ? (u32)__ldg(qw + (size_t)(k0 / 8) * N + col) : 0u;
            w1[j] = ok ? (u32)__ldg(qw + (size_t)(k0 / 8 + 1) * N + col) : 0u;
        }
        const int grp = k0 / gs;
        if (grp != gcur) {
            gcur = grp;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int col = n0 + j * 8 + g;
                if (col < N) {
                    u32 zw = (u32)__ldg(qz + (size_t)grp * (N / 8) + col / 8);
                    zb[j] = 8388608.f + (float)(((zw >> (4 * (col % 8))) & 0xF) + 1);
                    s[j] = f16_to_f(sc[(size_t)grp * N + col]);
                } else {
                    zb[j] = 8388608.f;
                    s[j] = 0.f;
                }
            }
        }
        u32 b0[NT], b1[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            b0[j] = pack2<T>((magic_nib(w0[j], 8 * t) - zb[j]) * s[j], (magic_nib(w0[j], 8 * t + 4) - zb[j]) * s[j]);
            b1[j] = pack2<T>((magic_nib(w1[j], 8 * t) - zb[j]) * s[j], (magic_nib(w1[j], 8 * t + 4) - zb[j]) * s[j]);
        }
#pragma unroll
        for (int mt = 0; mt < MTL; ++mt) {
            const int r0 = mt * 16 + g, r1 = r0 + 8;
            u32 a[4];
            a[0] = r0 < M ? *(const u32*)(x + (size_t)r0 * K + k0 + 2 * t) : 0u;
            a[1] = r1 < M ? *(const u32*)(x + (size_t)r1 * K + k0 + 2 * t) : 0u;
            a[2] = r0 < M ? *(const u32*)(x + (size_t)r0 * K + k0 + 2 * t + 8) : 0u;
            a[3] = r1 < M ? *(const u32*)(x + (size_t)r1 * K + k0 + 2 * t + 8) : 0u;
#pragma unroll
            for (int j = 0; j < NT; ++j) mma16816<T>(acc[mt][j], a, b0[j], b1[j]);
        }
    }
    // C fragment: rows g, g+8; columns 2t, 2t+1 of each n-tile
#pragma unroll
    for (int mt = 0; mt < MTL; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            red[warp][mt * 16 + g][j * 8 + 2 * t] = acc[mt][j][0];
            red[warp][mt * 16 + g][j * 8 + 2 * t + 1] = acc[mt][j][1];
            red[warp][mt * 16 + g + 8][j * 8 + 2 * t] = acc[mt][j][2];
            red[warp][mt * 16 + g + 8][j * 8 + 2 * t + 1] = acc[mt][j][3];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < MTL * 16 * COLS; i += NW * 32) {
        const int m = i / COLS, c = i % COLS, n = n0 + c;
        if (m >= M || n >= N) continue;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) sum += red[w][m][c];
        y[(size_t)m * N + n] = from_f<T>(sum);
    }
}

// NW warps per CTA, each a 1/NW slice of K. Measured on H100 (M = 16, 14336x4096):
// NW = 4 0.064 ms, NW = 8 0.071 ms (ncu had shown 0.6 waves and 21% occupancy
// at NW = 4, but the 8-warp version lost more to its longer reduction).
#define TC_INST(SUF, T, MTL, NW)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * NW) gptq_tc_##SUF##_mt##MTL(                   \
        const T* x, const int* qw, const int* qz, const u16* sc, T* y, int M, int K, int N, int gs) { \
        gptq_tc<T, 4, MTL, NW>(x, qw, qz, sc, y, M, K, N, gs);                                        \
    }
TC_INST(bf16, bf16_t, 1, 4)
TC_INST(bf16, bf16_t, 2, 4)
TC_INST(bf16, bf16_t, 4, 4)
TC_INST(f16, f16_t, 1, 4)
TC_INST(f16, f16_t, 2, 4)
TC_INST(f16, f16_t, 4, 4)
