"""Train the shipped course model, tiny-opt (``make model``; README.md: the course model and data).

    python -m llmopt.data --tokens .cache/llmopt/tokens      # on the CPU machine
    python -m llmopt.train --tokens .cache/llmopt/tokens --out lib/llmopt/assets/tiny-opt

The defaults are the shipped run (assets/tiny-opt/TRAINING.md): 8,812 steps of 16 x 2048
tokens (120 passes over the 2.4M-token train split, dropout 0.3), about 6 minutes on one
H200.

A plain nanoGPT-style loop for ``llmopt.gpt.GPT`` (the OPT architecture, paper:
Zhang et al., 2022, https://arxiv.org/abs/2205.01068):
- data: random windows of ``seq_len + 1`` tokens from the train split's token array
  (uint16 ``.npy`` per split, written by ``python -m llmopt.data --tokens DIR``; the GPU
  machine gets the CPU-built arrays through ``--tokens`` so its own package versions
  cannot change the corpus);
- AdamW, linear warm-up then cosine decay to 10%, gradient clipping at 1.0, bf16 autocast
  on CUDA; the number of steps is ``--max-steps``, or fitted to ``--minutes`` from the
  speed of the first steps (printed, so the run can be repeated with ``--max-steps``) and
  capped at ``--max-epochs`` passes over the small train split;
- every ``--eval-every`` steps the val perplexity (``seq_len`` 256, as the labs measure
  it); the best weights are kept and saved in Hugging Face format (fp16 safetensors)
  with ``GPT.to_hf().save_pretrained``, next to the tokenizer and ``train_log.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from llmopt.data import TOKENIZER_DIR, perplexity_of_tokens
from llmopt.gpt import GPT, GPTConfig, config_dict


def load_token_arrays(directory: str | None) -> dict[str, np.ndarray]:
    if directory is None:  # build (or reuse) the arrays of this machine's corpus
        from llmopt.data import load_tokens
        return {s: np.asarray(load_tokens(s)) for s in ("train", "val", "test")}
    return {s: np.load(os.path.join(directory, f"{s}.npy")) for s in ("train", "val", "test")}


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``lr`` to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def save_hf(model: GPT, out: str, dtype=torch.float16) -> None:
    """Write ``model`` as an OPTForCausalLM checkpoint (weights in ``dtype``) plus the tokenizer."""
    os.makedirs(out, exist_ok=True)
    hf = model.to_hf().to(dtype)
    hf.config.dropout = 0.1  # OPT's default for whoever fine-tunes it (LoRA), not ours
    hf.generation_config.pad_token_id = model.config.pad_token_id
    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(TOKENIZER_DIR, f)
        if os.path.exists(src) and os.path.abspath(os.path.dirname(src)) != os.path.abspath(out):
            shutil.copy(src, out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="train tiny-opt")
    p.add_argument("--tokens", default=None, help="folder with train/val/test .npy (uint16)")
    p.add_argument("--out", default="tiny-opt-out", help="output folder (HF format)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget for the steps")
    p.add_argument("--max-steps", type=int, default=None, help="fixed number of steps")
    p.add_argument("--max-epochs", type=float, default=120.0,
                   help="cap on passes over the train split (it is small: more overfits)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=None, help="val tokens per evaluation")
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokens = load_token_arrays(args.tokens)
    train = torch.from_numpy(tokens["train"].astype(np.int64)).to(device)  # (N,)
    print(f"tokens: " + ", ".join(f"{s} {len(a):,}" for s, a in tokens.items()), flush=True)

    config = GPTConfig(vocab_size=8192, max_position_embeddings=args.max_positions,
                       n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                       d_ff=args.d_ff, dropout=args.dropout)
    model = GPT(config).to(device)
    print(f"model: {model.n_params():,} parameters, config {config_dict(config)}", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=cuda)
    fwd = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len
    offsets = torch.arange(T + 1, device=device)

    def batch():
        starts = torch.randint(0, len(train) - T - 1, (B,), device=device, generator=gen)
        return train[starts[:, None] + offsets]  # (B, T + 1)

    def evaluate(split, max_tokens=None, m=model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return perplexity_of_tokens(m, tokens[split], 256, max_tokens, batch_size=64)

    max_steps = args.max_steps
    best = (float("inf"), -1, None)
    log = []
    t_start = time.perf_counter()
    t_steps, tokens_seen, step = 0.0, 0, 0
    while max_steps is None or step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_steps or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = fwd(x[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == (max_steps or 0) - 1:
            loss_value = loss.item()  # synchronises: the timing below is honest
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= 5:  # skip warm-up steps (allocations, compilation) in the speed
            t_steps += dt
            tokens_seen += B * T
        step += 1
        if max_steps is None and step == 30:  # fit the step count to the time budget
            per_step = t_steps / (step - 5)
            max_steps = max(step + 1, min(int(args.minutes * 60 / per_step * 0.93),  # evals cost time
                                          int(args.max_epochs * len(train) / (B * T))))
            print(f"{per_step * 1e3:.1f} ms/step -> max_steps {max_steps} "
                  f"({max_steps * B * T / len(train):.1f} epochs)", flush=True)
        if step % 50 == 0:
            tps = tokens_seen / max(t_steps, 1e-9)
            print(f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.2e} | {tps:,.0f} tokens/s | "
                  f"{time.perf_counter() - t_start:.0f} s", flush=True)
        if step % args.eval_every == 0 or step == max_steps:
            val = evaluate("val", args.eval_tokens)
            log.append({"step": step, "train_loss": loss_value, "val_ppl": val,
                        "seconds": time.perf_counter() - t_start})
            mark = ""
            if val < best[0]:
                best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                mark = " (best)"
            print(f"eval step {step} | val ppl {val:.2f}{mark}", flush=True)
    train_seconds = time.perf_counter() - t_start

    model.load_state_dict(best[2])
    save_hf(model, args.out)
    # the shipped numbers: the fp16 weights as saved, evaluated in fp32
    from transformers import OPTForCausalLM
    hf = OPTForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    shipped = GPT.from_hf(hf).to(device).eval()
    val_ppl = perplexity_of_tokens(shipped, tokens["val"], 256, batch_size=64)
    test_ppl = perplexity_of_tokens(shipped, tokens["test"], 256, batch_size=64)
    counts = np.bincount(tokens["train"], minlength=config.vocab_size).astype(np.float64) + 1
    unigram = float(np.exp(-np.log(counts / counts.sum())[tokens["test"]].mean()))
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    result = {
        "params": shipped.n_params(), "model_safetensors_bytes": size,
        "config": config_dict(config), "args": vars(args), "steps": max_steps,
        "best_step": best[1], "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / max(t_steps, 1e-9)),
        "tokens_seen": max_steps * B * T, "epochs": round(max_steps * B * T / len(train), 2),
        "val_ppl": round(val_ppl, 3), "test_ppl": round(test_ppl, 3),
        "unigram_test_ppl": round(unigram, 1),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "log": log,
    }
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"done: {train_seconds:.0f} s, {result['tokens_per_second']:,} tokens/s, best step "
          f"{best[1]}, val ppl {val_ppl:.2f}, test ppl {test_ppl:.2f} (unigram {unigram:.0f}), "
          f"{result['params']:,} params, model.safetensors {size / 1e6:.1f} MB, "
          f"{result['device']}", flush=True)
    return result


if __name__ == "__main__":
    main()
