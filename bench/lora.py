"""QLoRA fine-tuning of tiny-opt on the Russian instruction dataset (lab09): time, memory, accuracy.

    PYTHONPATH=lib:. python3 bench/lora.py --out bench/results/qlora_tiny_opt_cpu.json   # CPU, ≤ 2 min
    PYTHONPATH=lib:. python3 bench/lora.py --out $OUT/qlora_tiny_opt_gpu.json           # GPU (auto)
    PYTHONPATH=lib:. python3 bench/lora.py --quick                                      # smoke test

One process runs, on the same data and seeds: exact match of the base model on the test split
(the baseline), LoRA (fp32 base) and QLoRA (NF4 + double quantization) fine-tuning of every
linear with r = 16, α = 32 (and, as peft's ``modules_to_save``, the tied embedding / LM head: tiny-opt
never saw Cyrillic, and a frozen output layer cannot learn to emit it; ``--frozen-embeddings`` trains
the adapters alone), AdamW with 20 warm-up steps and a cosine over the budget, each under the same
wall-clock budget (``--seconds``), then exact match
on the held-out test split, the answer loss curve, seconds per step, the bytes of the base weights
(NF4 vs fp16) and, on a GPU, the peak memory (``torch.cuda.max_memory_allocated``) and the step
time from CUDA events. On a GPU the compute dtype of QLoRA is bf16.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llmopt import bench, instructions as I, lora
from llmopt.gpt import load_model


def step_ms(model, params, batch, tok, device) -> float:
    """Median ms of one training step (forward, backward, AdamW) on ``batch``."""
    opt = torch.optim.AdamW(params, lr=0.0)
    ids, tgt = I.collate(tok, batch)
    ids, tgt = ids.to(device), tgt.to(device)

    def step():
        loss = I.answer_loss(model, ids, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return bench.time_ms(step, warmup=2, rep=5, device=device)


def run(how: str, data, tok, device, seconds: float, steps: int, batch_size: int, lr: float, test,
        train_embeddings: bool = True):
    torch.manual_seed(0)
    model, _ = load_model("tiny-opt", device=device)
    fp16_base = sum(2 * m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}")
    if how == "lora":
        lora.apply_lora(model, lora.ALL_LINEAR, r=16, alpha=32)
        base_bytes = fp16_base  # the base in 16-bit (held in fp32 here on the CPU)
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        lora.prepare_qlora(model, lora.ALL_LINEAR, r=16, alpha=32, compute_dtype=dtype)
        base_bytes = lora.qlora_base_bytes(model)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if train_embeddings:  # peft's modules_to_save: the tied embedding / LM head trains too (full precision)
        model.embed_tokens.weight.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    log = I.finetune(model, params, data["train"], tok, steps=steps, batch_size=batch_size, lr=lr,
                     max_seconds=seconds, progress=True, device=device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    t0 = time.perf_counter()
    acc, per = I.exact_match(model, tok, test, by_task=True, device=device)
    eval_s = time.perf_counter() - t0
    ms = step_ms(model, params, data["train"][:batch_size], tok, device) if device == "cuda" else \
        1e3 * log["seconds"] / max(log["steps"], 1)
    return dict(method=how, steps=log["steps"], train_seconds=round(log["seconds"], 1),
                step_ms=round(ms, 2), exact_match=round(acc, 4), exact_match_by_task=per,
                trainable_params=sum(p.numel() for p in params), adapter_params=n_adapter,
                train_embeddings=train_embeddings, base_weight_bytes=int(base_bytes),
                base_vs_fp16=round(base_bytes / fp16_base, 4), peak_bytes=peak,
                final_loss=round(statistics.mean(log["loss"][-5:]), 4),
                loss_curve=[round(x, 4) for x in log["loss"][:: max(1, len(log["loss"]) // 50)]],
                eval_seconds=round(eval_s, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="result file (default bench/results/<name>.json)")
    ap.add_argument("--quick", action="store_true", help="a few steps on a few examples (smoke test)")
    ap.add_argument("--seconds", type=float, default=None, help="training budget per method")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="qlora,lora")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--frozen-embeddings", action="store_true",
                    help="train the adapters only (default: also the tied embedding / LM head)")
    args = ap.parse_args(argv)
    device = args.device
    if args.quick:
        seconds, steps, n_test = args.seconds or 10, 5, 16
    else:
        seconds, steps, n_test = args.seconds or (120 if device == "cpu" else 60), 100000, None
    if device == "cuda":
        steps = min(steps, 1500)
    data = I.make_dataset(seed=0)
    _, tok = load_model("tiny-opt")
    test = data["test"][:n_test] if n_test else data["test"]
    base, _ = load_model("tiny-opt", device=device)
    acc0, per0 = I.exact_match(base, tok, test, by_task=True, device=device)
    rows = [dict(method="base (no fine-tuning)", exact_match=round(acc0, 4), exact_match_by_task=per0)]
    print(f"base: exact match {acc0:.1%} {per0}")
    for how in args.methods.split(","):
        row = run(how, data, tok, device, seconds, steps, 16, args.lr, test, not args.frozen_embeddings)
        print({k: v for k, v in row.items() if k != "loss_curve"})
        rows.append(row)
    name = "qlora_tiny_opt_" + ("gpu" if device == "cuda" else "cpu")
    out_dir, fname = (os.path.dirname(args.out) or ".", os.path.basename(args.out)[:-5]) if args.out else (None, name)
    path = bench.write_results(fname, rows, out_dir=out_dir, quick=args.quick, seconds_per_method=seconds,
                               n_test=len(test), n_train=len(data["train"]), r=16, alpha=32, batch_size=16,
                               lr=args.lr, schedule="20 warm-up steps, cosine to lr/20 over the time budget",
                               train_embeddings=not args.frozen_embeddings, threads=torch.get_num_threads())
    print("wrote", path)


if __name__ == "__main__":
    main()
