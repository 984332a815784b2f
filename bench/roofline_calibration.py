"""Measure the roofline's efficiencies on the GPU at hand with PyTorch (cuBLAS).

Prints, for the cost model's defaults (docs/cost-model.md):
  memory_efficiency  : achieved / datasheet bandwidth for a streaming read (sum),
                       a copy, and Llama-3-8B decode GEMVs (batch 1, weights streamed);
  compute_efficiency : achieved / datasheet bf16 dense peak for large GEMMs;
  kernel_launch_ns   : per-kernel time of tiny kernels, eager and in a CUDA graph.
Usage: python3 bench/roofline_calibration.py PEAK_BF16_FLOPS BANDWIDTH_BYTES_PER_S
Timing: CUDA events, median of 20 runs after 5 warm-ups.
"""
import statistics
import sys

import torch

peak, bw = float(sys.argv[1]), float(sys.argv[2])
dev = torch.device("cuda")
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
free, total = torch.cuda.mem_get_info()
print(f"mem_get_info: total {total} B ({total / 2**30:.2f} GiB), free {free} B")


def timed(fn, reps=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(ts)


x = torch.empty(2 * 2**30, dtype=torch.bfloat16, device=dev).normal_()  # 4 GiB
t = timed(lambda: x.sum())
print(f"read  (sum of 4 GiB bf16):   {x.numel() * 2 / t / 1e12:.3f} TB/s = {x.numel() * 2 / t / bw:.3f} of datasheet")
y = torch.empty_like(x)
t = timed(lambda: y.copy_(x))
print(f"copy  (4 GiB -> 4 GiB):      {2 * x.numel() * 2 / t / 1e12:.3f} TB/s = {2 * x.numel() * 2 / t / bw:.3f} of datasheet")
del x, y

# Llama-3-8B decode GEMMs at batch 1 (weights [out, in], bf16): streamed bytes / time.
shapes = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}
for name, (n, k) in shapes.items():
    w = torch.empty(n, k, dtype=torch.bfloat16, device=dev).normal_()
    for m in (1, 16, 64):
        a = torch.empty(m, k, dtype=torch.bfloat16, device=dev).normal_()
        t = timed(lambda: torch.nn.functional.linear(a, w))
        byts = n * k * 2 + m * (n + k) * 2
        print(f"gemm {name:<8} m={m:<3} [{n}x{k}]: {byts / t / 1e12:.3f} TB/s = {byts / t / bw:.3f} of bandwidth, {2 * m * n * k / t / 1e12:.1f} TFLOP/s, {t * 1e6:.1f} us")
    del w

for m, n, k in [(8192, 8192, 8192), (4096, 14336, 4096), (8192, 28672, 4096), (2048, 4096, 14336)]:
    a = torch.empty(m, k, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty(k, n, dtype=torch.bfloat16, device=dev).normal_()
    t = timed(lambda: a @ b)
    f = 2 * m * n * k / t
    print(f"gemm bf16 {m}x{n}x{k}: {f / 1e12:.1f} TFLOP/s = {f / peak:.3f} of dense peak")

# Launch overhead: 1000 tiny kernels, eager and captured in a CUDA graph.
s = torch.zeros(16, device=dev)
def tiny():
    for _ in range(1000):
        s.add_(1.0)
t = timed(tiny, reps=10)
print(f"eager tiny kernel: {t / 1000 * 1e9:.0f} ns each")
g = torch.cuda.CUDAGraph()
st = torch.cuda.Stream()
st.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(st):
    tiny()
torch.cuda.current_stream().wait_stream(st)
with torch.cuda.graph(g):
    tiny()
t = timed(lambda: g.replay(), reps=10)
print(f"graph tiny kernel: {t / 1000 * 1e9:.0f} ns each")
