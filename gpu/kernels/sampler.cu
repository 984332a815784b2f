// sampler.cu: batched speculative rejection sampling, bit-identical to the
// reference rule on the same uniforms (one thread per sequence):
//   accept draft x_i iff u_i * q_i(x_i) < p_i(x_i);
//   at the first rejection i: r = max(p_i - q_i, 0), total = sum r in index order,
//     token = first j with cumsum_j > u_resample * total (f32, sequential);
//   all accepted: bonus token from p_k the same way with u_bonus.
//   If rounding leaves no index over the threshold, the last j with r_j > 0 is taken.
// Every sum is a sequential f32 loop over 0..V, so the rounding is the CPU's.
// This module is compiled with --fmad=false: no contraction may change a bit.
//
// draft [B,k] i32; q [B,k,V] f32; p [B,k+1,V] f32; u_acc [B,k]; u_res [B]; u_bonus [B]
// out_tokens [B,k+1] i32 (-1 past the end); n_out [B] i32 (accepted + 1).

__device__ int scan_pick(const float* __restrict__ p, const float* __restrict__ q, int V, float u) {
    float total = 0.f;
    for (int j = 0; j < V; ++j) {
        float r = q ? fmaxf(p[j] - q[j], 0.f) : p[j];
        total = total + r;
    }
    const float thr = u * total;
    float cum = 0.f;
    int last = -1;
    for (int j = 0; j < V; ++j) {
        float r = q ? fmaxf(p[j] - q[j], 0.f) : p[j];
        cum = cum + r;
        if (r > 0.f) last = j;
        if (cum > thr) return j;
    }
    return last < 0 ? 0 : last;
}

extern "C" __global__ void rejection_sample(const int* __restrict__ draft, const float* __restrict__ q,
                                            const float* __restrict__ p, const float* __restrict__ u_acc,
                                            const float* __restrict__ u_res, const float* __restrict__ u_bonus,
                                            int* __restrict__ out, int* __restrict__ n_out, int B, int k, int V) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    int* o = out + (size_t)b * (k + 1);
    for (int i = 0; i <= k; ++i) o[i] = -1;
    for (int i = 0; i < k; ++i) {
        const int x = draft[(size_t)b * k + i];
        const float* qi = q + ((size_t)b * k + i) * V;
        const float* pi = p + ((size_t)b * (k + 1) + i) * V;
        if (u_acc[(size_t)b * k + i] * qi[x] < pi[x]) {
            o[i] = x;
        } else {
            o[i] = scan_pick(pi, qi, V, u_res[b]);
            n_out[b] = i + 1;
            return;
        }
    }
    o[k] = scan_pick(p + ((size_t)b * (k + 1) + k) * V, nullptr, V, u_bonus[b]);
    n_out[b] = k + 1;
}
