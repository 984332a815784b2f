// elementwise.cu: RMSNorm, RoPE (rotate-half, as Llama/NeoX in HF), SwiGLU, and
// the device-to-device copy used to measure the bandwidth ceiling.
// All math in f32, one rounding to the 16-bit type at the end.

// rmsnorm: x [rows, H], w [H]; y = x / sqrt(mean(x^2) + eps) * w. One CTA per row.
template <class T>
__device__ __forceinline__ void rmsnorm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                        int H, float eps) {
    __shared__ float red[32];
    const T* xr = x + (size_t)blockIdx.x * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) { float v = to_f(xr[i]); ss = fmaf(v, v, ss); }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / (float)H + eps);
    T* yr = y + (size_t)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) yr[i] = from_f<T>(to_f(xr[i]) * inv * to_f(w[i]));
}

// rope: x [T, H, D] -> y, rotate-half pairs (i, i + D/2), angle = pos[t] * theta^(-2i/D).
template <class T>
__device__ __forceinline__ void rope(const T* __restrict__ x, const int* __restrict__ pos, T* __restrict__ y,
                                     int H, int D, float log2_theta) {
    const int t = blockIdx.x;
    const int half = D / 2;
    for (int j = threadIdx.x; j < H * half; j += blockDim.x) {
        int h = j / half, i = j % half;
        float inv_freq = exp2f(-(2.f * i / (float)D) * log2_theta);
        float s, c;
        sincosf((float)pos[t] * inv_freq, &s, &c);
        const T* xr = x + ((size_t)t * H + h) * D;
        T* yr = y + ((size_t)t * H + h) * D;
        float a = to_f(xr[i]), b = to_f(xr[i + half]);
        yr[i] = from_f<T>(a * c - b * s);
        yr[i + half] = from_f<T>(b * c + a * s);
    }
}

// swiglu: gate, up [N, F] -> silu(gate) * up.
template <class T>
__device__ __forceinline__ void swiglu(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                                       size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = to_f(gate[i]);
        y[i] = from_f<T>(g / (1.f + expf(-g)) * to_f(up[i]));
    }
}

#define EW_INST(SUF, T)                                                                               \
    extern "C" __global__ void rmsnorm_##SUF(const T* x, const T* w, T* y, int H, float eps) {        \
        rmsnorm<T>(x, w, y, H, eps);                                                                  \
    }                                                                                                 \
    extern "C" __global__ void rope_##SUF(const T* x, const int* pos, T* y, int H, int D, float lt) { \
        rope<T>(x, pos, y, H, D, lt);                                                                 \
    }                                                                                                 \
    extern "C" __global__ void swiglu_##SUF(const T* g, const T* u, T* y, unsigned long long n) {     \
        swiglu<T>(g, u, y, (size_t)n);                                                                \
    }
EW_INST(bf16, bf16_t)
EW_INST(f16, f16_t)

// copy: the bandwidth ceiling (16-byte loads and stores, grid-stride).
extern "C" __global__ void copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned long long n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
