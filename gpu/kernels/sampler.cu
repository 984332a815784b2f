// sampler.cu: batched speculative rejection sampling, bit-identical to
// reference::speculative::verify::rejection_sample (T = f32) on the same
// uniforms (one thread per sequence):
//   accept draft x_i iff p_i(x_i) >= q_i(x_i) or u_i * q_i(x_i) < p_i(x_i);
//   at the first rejection i: sample(r, u_res) with r = max(p_i - q_i, 0)
//     (if r has no mass: sample(p_i, u_res));
//   all accepted: bonus token sample(p_k, u_res).
//   sample(w, u): total = sum w in index order (f32); first j whose running
//     sum c_j > u * total; if none (rounding), the last j with w_j > 0.
// Every sum is a sequential f32 loop over 0..V, so the rounding is the CPU's.
// This module is compiled with --fmad=false: no contraction may change a bit.
//
// draft [B,k] i32; q [B,k,V] f32; p [B,k+1,V] f32; u_acc [B,k]; u_res [B]
// out_tokens [B,k+1] i32 (-1 past the end); n_out [B] i32 (accepted + 1).

__device__ __forceinline__ float resid(const float* p, const float* q, int j) {
    if (!q) return p[j];
    float a = p[j], b = q[j];
    return a > b ? a - b : 0.f;
}

// -1 when the weights have no positive mass
__device__ int scan_pick(const float* __restrict__ p, const float* __restrict__ q, int V, float u) {
    float total = 0.f;
    for (int j = 0; j < V; ++j) total = total + resid(p, q, j);
    if (!(total > 0.f)) return -1;
    const float thr = u * total;
    float cum = 0.f;
    int last = -1;
    for (int j = 0; j < V; ++j) {
        float w = resid(p, q, j);
        cum = cum + w;
        if (w > 0.f) last = j;
        if (cum > thr) return j;
    }
    return last;
}

extern "C" __global__ void rejection_sample(const int* __restrict__ draft, const float* __restrict__ q,
                                            const float* __restrict__ p, const float* __restrict__ u_acc,
                                            const float* __restrict__ u_res, int* __restrict__ out,
                                            int* __restrict__ n_out, int B, int k, int V) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    int* o = out + (size_t)b * (k + 1);
    for (int i = 0; i <= k; ++i) o[i] = -1;
    for (int i = 0; i < k; ++i) {
        const int x = draft[(size_t)b * k + i];
        const float* qi = q + ((size_t)b * k + i) * V;
        const float* pi = p + ((size_t)b * (k + 1) + i) * V;
        if (pi[x] >= qi[x] || u_acc[(size_t)b * k + i] * qi[x] < pi[x]) {
            o[i] = x;
        } else {
            int y = scan_pick(pi, qi, V, u_res[b]);
            if (y < 0) y = scan_pick(pi, nullptr, V, u_res[b]);
            o[i] = y;
            n_out[b] = i + 1;
            return;
        }
    }
    o[k] = scan_pick(p + ((size_t)b * (k + 1) + k) * V, nullptr, V, u_res[b]);
    n_out[b] = k + 1;
}
