"""GPTQ against round-to-nearest and against explicit OBS: perplexity per bit width, bytes, time.

    PYTHONPATH=lib:. python3 bench/gptq.py --quick --out /tmp/gptq   # CPU: small sizes, seconds
    PYTHONPATH=lib:. python3 bench/gptq.py --out $OUT                # GPU: full sizes (~2 min)

1. OBS against GPTQ (``gptq_obs_vs_gptq_<cpu|gpu>``): square layers ``d × d`` with correlated
   inputs (``H = 2XᵀX/N``, N = 2d tokens), float32, 4 bits per row: ``obs_quantize_columns``
   (the explicit inverse Hessian updated after every column), ``gptq_quantize`` with
   ``block_size=1`` (Cholesky, no lazy blocks) and with ``block_size=128`` (Algorithm 1).
   d = 1024, 2048, 4096 on a GPU (medians of CUDA events, ``llmopt.bench.time_ms``), 128–512
   with ``--quick``. Also each result's layer error ½ tr(D H Dᵀ) against GPTQ's (OBS in float32
   drifts as d grows).
2. tiny-opt, perplexity against bits (``gptq_tiny_opt_<cpu|gpu>``): RTN and GPTQ at 2–8 bits,
   per row and with groups of 128; calibration windows of the train split
   (``calibration_batches``); for each point the bytes the decoder layers' linear weights take
   packed (codes, fp16 scales, packed zero points: ``llmopt.gptq.packed_bytes``) and the time
   ``quantize_model`` took. GPU: the whole test split, 128 × 512 calibration tokens, every bit
   width; ``--quick``: 2,048 test tokens, 8 × 256 calibration tokens, GPTQ at 2–4 bits.
3. On a GPU: a randomly initialised OPT-125m-sized ``OPTForCausalLM`` (768 wide, 12 layers,
   FFN 3072, fp16) quantized by GPTQ at 4 bits with 128 × 2048 calibration tokens (the paper's
   setting): seconds per decoder layer (its two forward passes included) and in total
   (``gptq_opt125m_time``). Random weights make the perplexity meaningless there.

Every file is written with ``llmopt.bench.write_results`` (which records the card's name).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt.bench import device_name, time_ms, write_results  # noqa: E402
from llmopt.data import calibration_batches, load_tokens, perplexity  # noqa: E402
from llmopt.gpt import load_model  # noqa: E402
from llmopt.gptq import (decoder_layers, gptq_quantize, layer_linears, obs_quantize_columns,  # noqa: E402
                         packed_bytes, quantize_model)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _layer_error(W, W_hat, H) -> float:
    D = W.double() - W_hat.double()
    return float(0.5 * ((D @ H.double()) * D).sum())


def obs_vs_gptq(device, sizes, warmup, rep, bits=4):
    """ms per d × d layer: explicit OBS, GPTQ with B = 1, GPTQ with B = 128."""
    variants = {"obs": lambda W, H: obs_quantize_columns(W, H, bits),
                "gptq_b1": lambda W, H: gptq_quantize(W, H, bits, block_size=1),
                "gptq_b128": lambda W, H: gptq_quantize(W, H, bits, block_size=128)}
    rows = []
    for d in sizes:
        g = torch.Generator(device=device).manual_seed(d)
        mix = torch.eye(d, device=device) + 0.9 * torch.randn(d, d, generator=g, device=device) / d ** 0.5
        X = torch.randn(2 * d, d, generator=g, device=device) @ mix        # (2d, d) correlated
        H = 2 * X.T @ X / X.shape[0]                                       # (d, d)
        W = torch.randn(d, d, generator=g, device=device)
        row = {"cols": d, "rows": d, "bits": bits, "dtype": "float32"}
        errors = {}
        for name, fn in variants.items():
            row[f"{name}_ms"] = time_ms(lambda: fn(W, H), warmup=warmup, rep=rep, device=device)
            errors[name] = _layer_error(W, fn(W, H)[0], H)
        row["obs_over_gptq_b128"] = row["obs_ms"] / row["gptq_b128_ms"]
        row["obs_over_gptq_b1"] = row["obs_ms"] / row["gptq_b1_ms"]
        row["gptq_b1_over_b128"] = row["gptq_b1_ms"] / row["gptq_b128_ms"]
        for name in ("obs", "gptq_b1"):
            row[f"{name}_error_vs_gptq"] = errors[name] / errors["gptq_b128"]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def linear_bytes(model, bits, group_size) -> int:
    """Bytes of the decoder layers' linear weights, packed (codes, fp16 scales, packed zeros)."""
    return sum(packed_bytes(*lin.weight.shape, bits, group_size)
               for layer in decoder_layers(model) for lin in layer_linears(layer).values())


def tiny_opt_curve(device, max_tokens, n_calib, seq_len, bits_rtn, bits_gptq):
    model, _ = load_model("tiny-opt", device=device)
    calib = calibration_batches(n_calib, seq_len, seed=0)
    n_linear = sum(lin.weight.numel() for layer in decoder_layers(model)
                   for lin in layer_linears(layer).values())
    rows = [{"method": "fp32", "bits": 32, "group_size": -1, "ppl": perplexity(model, max_tokens=max_tokens),
             "linear_bytes": 4 * n_linear, "quantize_s": None}]
    print(rows[-1], flush=True)
    for group_size in (-1, 128):
        for method, bits_list in (("rtn", bits_rtn), ("gptq", bits_gptq)):
            for bits in bits_list:
                m = copy.deepcopy(model)
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                quantize_model(m, method, calib, bits, group_size)
                _sync(device)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                nbytes = linear_bytes(model, bits, group_size)
                rows.append({"method": method, "bits": bits, "group_size": group_size,
                             "ppl": perplexity(m, max_tokens=max_tokens),
                             "linear_bytes": nbytes, "bits_per_weight": 8 * nbytes / n_linear,
                             "quantize_s": dt, "quantize_cpu_s": cpu})
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
                del m
    n_test = len(load_tokens("test")) if max_tokens is None else min(max_tokens, len(load_tokens("test")))
    return rows, {"model": "tiny-opt", "params": sum(p.numel() for p in model.parameters()),
                  "linear_params": n_linear, "fp16_linear_bytes": 2 * n_linear, "test_tokens": n_test,
                  "calibration": f"{n_calib} x {seq_len} tokens of train"}


def opt125m_time(n_calib=128, seq_len=2048, bits=4):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig()                                        # the defaults are OPT-125m's shape
    model = OPTForCausalLM(cfg).to("cuda", torch.float16).eval()
    calib = torch.randint(4, cfg.vocab_size, (n_calib, seq_len))
    log = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    quantize_model(model, "gptq", calib, bits, -1, log=log)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    layers = [e for e in log if e["name"] == "*"]
    per_linear = {}
    for e in log:
        if e["name"] != "*":
            per_linear.setdefault(e["name"], []).append(e["seconds"])
    rows = [{"layer": e["layer"], "seconds": e["seconds"]} for e in layers]
    meta = {"model": "random OPT-125m-sized (OPTConfig defaults), fp16", "bits": bits,
            "calibration": f"{n_calib} x {seq_len} random tokens", "total_s": total,
            "mean_layer_s": sum(r["seconds"] for r in rows) / len(rows),
            "mean_gptq_s_per_linear": {k: sum(v) / len(v) for k, v in per_linear.items()},
            "params": sum(p.numel() for p in model.parameters())}
    print(meta, flush=True)
    return rows, meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU run in well under a minute)")
    p.add_argument("--max-tokens", type=int, default=None, help="test tokens (default: all on a GPU)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(1)      # GPTQ's column loop is small ops: extra threads only spin
    tag = ("gpu" if gpu else "cpu") + ("_quick" if args.quick else "")
    print("device:", device_name(), flush=True)

    sizes = (128, 256, 512) if args.quick else ((1024, 2048, 4096) if gpu else (256, 512, 1024))
    reps = dict(warmup=1, rep=3) if gpu and not args.quick else dict(warmup=0, rep=1)
    rows = obs_vs_gptq(device, sizes, **reps)
    write_results(f"gptq_obs_vs_gptq_{tag}", rows, out_dir=args.out, **reps,
                  note="ms per d x d layer, float32, 4 bits per row; error = 0.5 tr(D H D^T) / GPTQ's")

    if args.quick:
        max_tokens, (n_calib, seq_len), bits_gptq = args.max_tokens or 2048, (8, 256), (2, 3, 4)
    elif gpu:
        max_tokens, (n_calib, seq_len), bits_gptq = args.max_tokens, (128, 512), tuple(range(2, 9))
    else:
        max_tokens, (n_calib, seq_len), bits_gptq = args.max_tokens or 16384, (32, 256), (2, 3, 4)
    rows, meta = tiny_opt_curve(device, max_tokens, n_calib, seq_len, tuple(range(2, 9)), bits_gptq)
    meta["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_results(f"gptq_tiny_opt_{tag}", rows, out_dir=args.out, **meta)

    if gpu and not args.quick:
        rows, meta = opt125m_time()
        write_results("gptq_opt125m_time", rows, out_dir=args.out, **meta)


if __name__ == "__main__":
    main()
