"""Memory-efficient training: peak memory and step time of an OPT-125m-sized model (lab05).

    PYTHONPATH=lib:. python3 bench/memory_training.py --out $OUT          # GPU
    PYTHONPATH=lib:. python bench/memory_training.py --small              # CPU smoke test

One training step = ``llmopt.mixed_precision.train_step`` (forward + backward, gradients in
``.grad``) + ``AdamW.step()``, on ``GPTConfig`` with OPT-125m's sizes (12 layers, d 768, 12 heads,
d_ff 3072, vocabulary 50,272), randomly initialised (nothing downloaded), batch 8 × 1,024 tokens:

- plain fp32; gradient checkpointing (``checkpoint_sequential``, round(√12) = 3 segments);
  accumulation over k = 4 micro-batches; bf16 autocast; fp16 autocast with dynamic loss scaling
  (``llmopt.mixed_precision.GradScaler``); bf16 + checkpointing; bf16 + checkpointing + k = 4;
  bf16 weights with fp32 master weights (``MasterWeightOptimizer``, AdamW on the master copy).
- Peak: ``torch.cuda.max_memory_allocated`` over one step taken after a first one (so AdamW's
  state exists, as in training); time: median of CUDA-event timings (``llmopt.bench.time_ms``).
  Ratios against plain fp32 measured in the same process.
- Depth sweep: n = 4 … 36 layers of the same width (batch 2 × 1,024, fp32): peak memory above the
  static part (parameters, gradients, AdamW state) plain vs √n checkpointing, and the time ratio —
  the lecture's O(n) → O(√n) and ≈ 33% extra compute.

Writes ``memory_training.json`` (``--small``: ``memory_training_cpu_small.json``) via
``llmopt.bench.write_results``, which records the card's name.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt import mixed_precision as mp  # noqa: E402
from llmopt.bench import device_name, time_ms, write_results  # noqa: E402
from llmopt.gpt import GPT, GPTConfig  # noqa: E402

OPT125 = dict(vocab_size=50272, max_position_embeddings=2048, n_layer=12, n_head=12, d_model=768, d_ff=3072)
SMALL = dict(vocab_size=2048, max_position_embeddings=512, n_layer=12, n_head=4, d_model=64, d_ff=256)


def make_step(model, batch, kind: str, sw: dict):
    """(step function, optimizer) of one configuration."""
    if kind == "master":
        opt = mp.MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4)

        def step():
            mp.train_step(model, batch, **sw)
            opt.step()
            opt.zero_grad()
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if kind == "fp16-scaled":
        scaler = mp.GradScaler()
        dev = batch.device.type

        def step():
            for p in model.parameters():
                p.grad = None
            with torch.autocast(dev, dtype=torch.float16):
                logits = mp.forward(model, batch[:, :-1], sw.get("checkpoint", False))
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return step

    def step():
        mp.train_step(model, batch, **sw)
        opt.step()
    return step


CONFIGS = [
    ("plain fp32", "plain", {}),
    ("checkpoint (√n segments)", "plain", dict(checkpoint=True)),
    ("accumulate k=4", "plain", dict(accum_steps=4)),
    ("bf16 autocast", "plain", dict(dtype=torch.bfloat16)),
    ("fp16 autocast + GradScaler", "fp16-scaled", {}),
    ("bf16 + checkpoint", "plain", dict(dtype=torch.bfloat16, checkpoint=True)),
    ("bf16 + checkpoint + k=4", "plain", dict(dtype=torch.bfloat16, checkpoint=True, accum_steps=4)),
    ("bf16 weights + fp32 master", "master", {}),
]


def measure(cfg: GPTConfig, B: int, T: int, kind: str, sw: dict, device: str, reps: dict) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    if kind == "master":
        model = model.to(torch.bfloat16)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    step = make_step(model, batch, kind, sw)
    step()                                                     # AdamW's state exists from here on
    if device == "cuda":
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        from llmopt.viz.memory import record_step
        static, peak = 0, 0
        if kind == "plain":
            rec = record_step(mp.train_step, model, batch, torch.optim.AdamW(model.parameters(), lr=1e-4), **sw)
            peak = rec["peak"]
    ms = time_ms(step, **reps)
    del model, step
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"peak_bytes": peak, "static_bytes_after_step": static, "ms": ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="a tiny config on the CPU (smoke test)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    small = args.small or device == "cpu"
    cfg = GPTConfig(**(SMALL if small else OPT125))
    B, T = (2, 128) if small else (8, 1024)
    reps = dict(warmup=0, rep=1) if small else dict(warmup=2, rep=7)
    print(device_name(), f"B={B} T={T}", flush=True)
    rows = []
    for name, kind, sw in CONFIGS:
        r = measure(cfg, B, T, kind, sw, device, reps)
        row = {"config": name, "batch": B, "seq": T, **{k: (str(v) if k == "dtype" else v) for k, v in sw.items()}, **r}
        rows.append(row)
        print(f"{name:30s} peak {r['peak_bytes'] / 2**30:7.3f} GiB  {r['ms']:8.1f} ms", flush=True)
    base = rows[0]
    for row in rows:
        row["memory_saved"] = 1 - row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
        row["time_ratio"] = row["ms"] / base["ms"]

    sweep = []
    depths = (2, 4, 9) if small else (4, 9, 16, 25, 36)
    for n in depths:
        c = GPTConfig(**{**(SMALL if small else OPT125), "n_layer": n})
        out = {"n_layer": n, "segments": round(math.sqrt(n))}
        for label, sw in (("plain", {}), ("ckpt", dict(checkpoint=True))):
            r = measure(c, 1 if small else 2, T, "plain", sw, device, reps)
            out[f"{label}_peak_bytes"] = r["peak_bytes"]
            out[f"{label}_activation_bytes"] = r["peak_bytes"] - r["static_bytes_after_step"]
            out[f"{label}_ms"] = r["ms"]
        out["time_ratio"] = out["ckpt_ms"] / out["plain_ms"]
        s = out["segments"]
        out["recompute_fraction_formula"] = (n - math.ceil(n / s)) / (3 * n) if s > 1 else 0.0
        sweep.append(out)
        print(out, flush=True)

    path = write_results("memory_training_cpu_small" if small else "memory_training", rows,
                         out_dir=args.out, model="OPT-125m-sized GPTConfig (random init)",
                         config={k: v for k, v in (SMALL if small else OPT125).items()},
                         optimizer="AdamW", depth_sweep=sweep,
                         note="peak = torch.cuda.max_memory_allocated over one step after a first step "
                              "(AdamW state allocated); on CPU the peak is llmopt.viz.memory.record_step's")
    print("wrote", path)


if __name__ == "__main__":
    main()
