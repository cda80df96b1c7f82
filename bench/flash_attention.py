"""FlashAttention benchmark: llmopt.flash_attention vs SDPA's flash and cuDNN backends.

    PYTHONPATH=lib:. python3 bench/flash_attention.py [--sweep] [--out DIR | --out FILE.json]
    PYTHONPATH=lib:. python3 bench/flash_attention.py --quick      # CPU: tiny sizes, interpreter

bf16, B·H·N = 256k tokens (B = 256k / (16·N): enough programs to fill 132 SMs), an N sweep
512, 1k, 2k, 4k, 8k, 16k (TFLOP/s against N, the plot of lab04's part 8), d ∈ {64, 128},
causal and not. TFLOP/s with

    FLOPs(forward)          = 4·B·H·N²·d      (QKᵀ and PV, 2 FLOPs per multiply-add)
    FLOPs(forward+backward) = 3.5 · FLOPs(forward)   (backward counted as 2.5× forward)

both halved when causal. All three run in one process, timed with CUDA events (median,
``llmopt.bench.time_ms``) on fresh random inputs. ``--sweep`` first times a few block
configurations of our kernels at N=4k and prints them (the defaults in
``_fwd_config``/``_bwd_config`` come from such a sweep).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "lib"))
from llmopt import bench  # noqa: E402
from llmopt.flash_attention import (  # noqa: E402
    _bwd_config,
    _fwd_config,
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
)

TOKENS = 256 * 1024
H = 16


def flops(B, H, N, d, causal, mode):
    f = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def inputs(B, N, d, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
            .requires_grad_(requires_grad) for _ in range(3)]


def sdpa(backend):
    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


IMPLS = {
    "llmopt": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
    "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
}


def time_impl(fn, B, N, d, causal):
    q, k, v = inputs(B, N, d, requires_grad=True)
    do = torch.randn_like(q)
    with torch.no_grad():
        fwd = bench.time_ms(lambda: fn(q, k, v, causal), warmup=5, rep=30)

    def step():
        o = fn(q, k, v, causal)
        o.backward(do)
        q.grad = k.grad = v.grad = None
    both = bench.time_ms(step, warmup=5, rep=30)
    return fwd, both


def check_against_sdpa(N=1000, d=128):
    """bf16 on the GPU vs SDPA's math in fp32: relative Frobenius errors."""
    errs = {}
    for causal in (False, True):
        q, k, v = inputs(2, N, d, requires_grad=True, seed=1)
        o = flash_attention(q, k, v, causal=causal)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, (q, k, v), do)
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            of = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
        gf = torch.autograd.grad(of, (qf, kf, vf), do.float())
        for name, a, b in zip(("o", "dq", "dk", "dv"), (o,) + g, (of,) + gf):
            errs[f"{name}_causal{int(causal)}"] = ((a.float() - b).norm() / b.norm()).item()
    return errs


def sweep(d, causal, N=4096):
    B = TOKENS // (H * N)
    q, k, v = inputs(B, N, d)
    do = torch.randn_like(q)
    out = {"fwd": [], "bwd": []}
    for cfg in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                (64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2)]:
        try:
            ms = bench.time_ms(lambda: flash_attention_fwd(q, k, v, causal, config=cfg), rep=20)
            out["fwd"].append((cfg, round(bench.tflops(flops(B, H, N, d, causal, "fwd"), ms), 1)))
        except Exception as e:  # out of shared memory, etc.
            out["fwd"].append((cfg, f"fail: {type(e).__name__}"))
    o, lse = flash_attention_fwd(q, k, v, causal)
    bwd_flops = flops(B, H, N, d, causal, "fwd") * 2.5
    for cfg in [((32, 128, 4, 3), (128, 32, 4, 3)), ((32, 128, 8, 2), (128, 32, 8, 2)),
                ((64, 64, 4, 3), (64, 64, 4, 3)), ((64, 128, 8, 2), (128, 64, 8, 2)),
                ((32, 64, 4, 3), (64, 32, 4, 3)), ((32, 128, 4, 2), (128, 32, 4, 2))]:
        try:
            ms = bench.time_ms(lambda: flash_attention_bwd(q, k, v, o, lse, do, causal, config=cfg),
                               rep=20)
            out["bwd"].append((cfg, round(bench.tflops(bwd_flops, ms), 1)))
        except Exception as e:
            out["bwd"].append((cfg, f"fail: {type(e).__name__}"))
    return out


def quick(out_dir, name):
    """CPU smoke run: the Triton kernels through the interpreter against SDPA (math) at tiny
    sizes, wall-clock medians (no CUDA events). Checks that the script runs, measures nothing."""
    rows = []
    for N in (64, 128):
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, N, 32, generator=g).requires_grad_() for _ in range(3))
            row = {"B": 1, "H": 2, "N": N, "d": 32, "causal": causal, "dtype": "float32"}
            impls = {"llmopt": lambda q, k, v, c: flash_attention(q, k, v, causal=c),
                     "sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)}
            outs = {}
            for impl, fn in impls.items():
                with torch.no_grad():
                    fwd = bench.time_ms(lambda: fn(q, k, v, causal), warmup=1, rep=3)
                both = bench.time_ms(lambda: fn(q, k, v, causal).sum().backward(), warmup=1, rep=3)
                row[f"{impl}_fwd_ms"], row[f"{impl}_fwd_bwd_ms"] = fwd, both
                row[f"{impl}_fwd_tflops"] = bench.tflops(flops(1, 2, N, 32, causal, "fwd"), fwd)
                row[f"{impl}_fwd_bwd_tflops"] = bench.tflops(flops(1, 2, N, 32, causal, "fwd_bwd"), both)
                outs[impl] = fn(q, k, v, causal).detach()
            row["max_abs_err"] = (outs["llmopt"] - outs["sdpa"]).abs().max().item()
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
    path = bench.write_results(name, rows, out_dir=out_dir, quick=True,
                               note="CPU interpreter smoke run: timings mean nothing")
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time block configurations at N=4k")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--out", default=None,
                    help="folder for the JSON, or a path ending in .json (default bench/results)")
    ap.add_argument("--name", default=None, help="file name without .json (default flash_attention)")
    ap.add_argument("--ns", default="512,1024,2048,4096,8192,16384")
    args = ap.parse_args()
    out_dir, name = args.out, args.name
    if out_dir and out_dir.endswith(".json"):
        out_dir, name = os.path.dirname(out_dir) or ".", name or os.path.basename(out_dir)[:-5]
    if args.quick or not torch.cuda.is_available():
        quick(out_dir or tempfile.gettempdir(), name or "flash_attention_quick")
        return
    name = name or "flash_attention"
    meta = {"tokens_per_batch": TOKENS, "heads": H, "dtype": "bfloat16",
            "flops": "fwd 4·B·H·N²·d, fwd+bwd 3.5× that, halved when causal",
            "default_configs": {f"d{d}": {"fwd": _fwd_config(d), "bwd": _bwd_config(d)}
                                for d in (64, 128)}}
    print("device:", bench.device_name(), flush=True)
    meta["errors_vs_fp32_math"] = check_against_sdpa()
    print("rel. errors vs fp32 math:", json.dumps(meta["errors_vs_fp32_math"]), flush=True)
    if args.sweep:
        meta["sweep_N4096"] = {}
        for d in (128, 64):
            for causal in (True, False):
                r = sweep(d, causal)
                meta["sweep_N4096"][f"d{d}_causal{int(causal)}"] = r
                print(f"sweep d={d} causal={causal}: {r}", flush=True)
    rows = []
    for N in (int(n) for n in args.ns.split(",")):
        B = TOKENS // (H * N)
        for d in (64, 128):
            for causal in (False, True):
                row = {"B": B, "H": H, "N": N, "d": d, "causal": causal}
                for impl, fn in IMPLS.items():
                    try:
                        fwd, both = time_impl(fn, B, N, d, causal)
                        row[f"{impl}_fwd_ms"], row[f"{impl}_fwd_bwd_ms"] = fwd, both
                        row[f"{impl}_fwd_tflops"] = bench.tflops(flops(B, H, N, d, causal, "fwd"), fwd)
                        row[f"{impl}_fwd_bwd_tflops"] = bench.tflops(
                            flops(B, H, N, d, causal, "fwd_bwd"), both)
                    except Exception as e:  # a backend not available for this shape
                        row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                  for k, v in row.items() if "ms" not in k}), flush=True)
                torch.cuda.empty_cache()
    path = bench.write_results(name, rows, out_dir=out_dir, **meta)
    print("wrote", path)
    print(f"\n{'N':>6} {'d':>4} {'causal':>6} | fwd TFLOP/s: llmopt  flash  cudnn | "
          f"fwd+bwd: llmopt  flash  cudnn")
    for r in rows:
        g = lambda k: r.get(k, float("nan"))  # noqa: E731
        print(f"{r['N']:>6} {r['d']:>4} {str(r['causal']):>6} | {g('llmopt_fwd_tflops'):13.0f} "
              f"{g('sdpa_flash_fwd_tflops'):6.0f} {g('sdpa_cudnn_fwd_tflops'):6.0f} | "
              f"{g('llmopt_fwd_bwd_tflops'):15.0f} {g('sdpa_flash_fwd_bwd_tflops'):6.0f} "
              f"{g('sdpa_cudnn_fwd_bwd_tflops'):6.0f}")


if __name__ == "__main__":
    main()
