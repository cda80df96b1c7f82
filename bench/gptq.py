"""GPTQ vs RTN: the lecture's perplexity table for tiny-opt, and GPTQ's quantization time.

    PYTHONPATH=lib python bench/gptq.py                    # CPU: tiny-opt table + time
    PYTHONPATH=lib python3 bench/gptq.py --out $OUT        # GPU: also a random OPT-125m-sized model

1. tiny-opt (``llmopt.gpt.load_model("tiny-opt")``): test perplexity at fp32, RTN and GPTQ at
   4 and 3 bits, per row and with groups of 128; calibration windows of the train split
   (``calibration_batches``); the time ``quantize_model`` takes (wall clock; on a GPU every
   layer ends with ``torch.cuda.synchronize``) and the process's CPU time (on a shared CPU
   machine the wall clock depends on the other load; the CPU seconds do not, much).
2. On a GPU: a randomly initialised OPT-125m-sized ``OPTForCausalLM`` (768 wide, 12 layers,
   FFN 3072, fp16) quantized by GPTQ at 4 bits with 128 × 2048 calibration tokens (the paper's
   setting): seconds per decoder layer (its two forward passes included) and in total.
   Random weights make the perplexity meaningless there; only the time is reported.

Writes ``gptq_tiny_opt_<cpu|gpu>.json`` and, on a GPU, ``gptq_opt125m_time.json`` with
``llmopt.bench.write_results`` (which records the card's name).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt.bench import device_name, write_results  # noqa: E402
from llmopt.data import calibration_batches, perplexity  # noqa: E402
from llmopt.gpt import load_model  # noqa: E402
from llmopt.gptq import quantize_model  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def tiny_opt_table(device, max_tokens, n_calib, seq_len):
    model, _ = load_model("tiny-opt", device=device)
    calib = calibration_batches(n_calib, seq_len, seed=0)
    rows = [{"method": "fp32", "bits": 32, "group_size": -1,
             "ppl": perplexity(model, max_tokens=max_tokens), "quantize_s": None}]
    print(rows[-1], flush=True)
    for bits in (4, 3):
        for group_size in (-1, 128):
            for method in ("rtn", "gptq"):
                m = copy.deepcopy(model)
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                quantize_model(m, method, calib, bits, group_size)
                _sync(device)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                rows.append({"method": method, "bits": bits, "group_size": group_size,
                             "ppl": perplexity(m, max_tokens=max_tokens), "quantize_s": dt,
                             "quantize_cpu_s": cpu})
                print(rows[-1], flush=True)
                del m
    n_params = sum(p.numel() for p in model.parameters())
    from llmopt.data import load_tokens
    n_test = len(load_tokens("test")) if max_tokens is None else min(max_tokens, len(load_tokens("test")))
    return rows, {"model": "tiny-opt", "params": n_params, "test_tokens": n_test,
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
    p.add_argument("--max-tokens", type=int, default=None, help="test tokens (default: all on GPU, 65536 on CPU)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    max_tokens = args.max_tokens or (None if gpu else 65536)
    print("device:", device_name(), flush=True)
    if gpu:
        rows, meta = opt125m_time()
        write_results("gptq_opt125m_time", rows, out_dir=args.out, **meta)
    n_calib, seq_len = (128, 512) if gpu else (32, 256)
    rows, meta = tiny_opt_table(device, max_tokens, n_calib, seq_len)
    meta["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_results(f"gptq_tiny_opt_{'gpu' if gpu else 'cpu'}", rows, out_dir=args.out, **meta)


if __name__ == "__main__":
    main()
