#!/usr/bin/env python3
"""PyTorch peers for `inferlab gpu bench`, on the same shapes, in the same device call.

Writes a JSON list of {name, shape, ms, value, unit}; `inferlab gpu bench --peers`
joins it with our figures. Timing: triton.testing.do_bench (CUDA events, L2
flushed between runs, median). Inputs are random, never zeros.

Peers: SDPA with the FLASH (FlashAttention-2) and cuDNN backends for prefill and
contiguous decode (GQA decode as Lq = group rows per KV head, non-causal, so K/V
are read once); cuBLAS bf16 (torch.matmul) and tinygemm int4
(torch._weight_int4pack_mm, group 128) for W4A16.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

rows = []


def add(name, shape, ms, value, unit):
    rows.append(dict(name=name, shape=shape, ms=ms, value=value, unit=unit))
    print(f"{name:28s} {shape:32s} {ms:9.4f} ms {value:9.1f} {unit}", file=sys.stderr, flush=True)


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def prefill():
    B, H, L, D = 4, 32, 4096, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (True, False):
        flops = 4 * B * H * L * L * D / (2 if causal else 1)
        for backend, label in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
            try:
                with sdpa_kernel([backend]):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                add(f"{label} {'causal' if causal else 'full'}", f"B{B} L{L} H{H} d{D}", ms, flops / ms / 1e9, "TFLOP/s")
            except Exception as e:  # a backend may refuse the shape
                print(f"{label} failed: {e}", file=sys.stderr)


def decode():
    B, HQ, HKV, D, CTX = 64, 32, 8, 128, 4096
    G = HQ // HKV
    # query heads of a group as G query rows of the KV head: K/V read once
    q = torch.randn(B, HKV, G, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, HKV, CTX, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    nbytes = 2 * B * HKV * CTX * D * 2
    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "decode sdpa_cudnn"), (SDPBackend.FLASH_ATTENTION, "decode sdpa_flash")):
        try:
            with sdpa_kernel([backend]):
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            add(label, f"B{B} ctx{CTX} {HQ}/{HKV} d{D}", ms, nbytes / ms / 1e6, "GB/s")
        except Exception as e:
            print(f"{label} failed: {e}", file=sys.stderr)


def w4a16():
    N, K, GS = 14336, 4096, 128
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    q4 = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.int32)
    packed = None
    for attempt in ("uint8", "int32"):
        try:
            if attempt == "uint8":
                src = (q4[:, ::2] << 4 | q4[:, 1::2]).to(torch.uint8)
            else:
                src = q4
            packed = torch.ops.aten._convert_weight_to_int4pack(src, 8)
            break
        except Exception as e:
            print(f"int4pack ({attempt}) failed: {e}", file=sys.stderr)
    sz = torch.rand(K // GS, N, 2, device="cuda", dtype=torch.bfloat16)
    for M in (1, 16, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ms = bench(lambda: torch.matmul(x, w.t()))
        add(f"cublas bf16 M{M}", f"M{M} N{N} K{K}", ms, N * K * 2 / ms / 1e6, "GB/s")
        if packed is not None:
            try:
                ms = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GS, sz))
                add(f"tinygemm int4 M{M}", f"M{M} N{N} K{K} g{GS}", ms, N * K / 2 / ms / 1e6, "GB/s")
            except Exception as e:
                print(f"tinygemm failed: {e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["prefill", "decode", "w4a16"], help="one family")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", file=sys.stderr)
    for name, fn in (("prefill", prefill), ("decode", decode), ("w4a16", w4a16)):
        if a.only in (None, name):
            fn()
    with open(a.out + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    import os
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
