"""LLM.int8() and NF4: exact memory per format, perplexity, and the speed of dequantize + matmul.

    PYTHONPATH=lib python bench/int8_nf4.py --ppl                     # CPU: memory + tiny-opt table
    PYTHONPATH=lib python3 bench/int8_nf4.py --out $OUT               # GPU: memory + speed

1. Memory (computed, nothing downloaded): an OPT-125m-sized ``GPT`` (``GPTConfig`` with OPT-125m's
   sizes, built on the meta device) with the decoder layers' linear weights in fp16, int8
   (vector-wise, an fp32 scale per row), FP4, NF4 and NF4 + double quantization (blocks of 64;
   ``llmopt.nf4.bytes_4bit``), everything else in fp16: exact bytes, and the bits per weight the
   absmax cost (0.5 → 0.127 as in the QLoRA paper).
2. ``--ppl``: tiny-opt's test perplexity with its decoder linears replaced by ``llmopt.int8.Linear8bit``
   and ``llmopt.nf4.Linear4bit`` (FP4, NF4, NF4 + DQ), on ``--max-tokens`` test tokens.
3. On a GPU: one linear layer (out × in) at bf16: ``llmopt.nf4.dequantize_4bit`` + ``F.linear``
   (the plain-PyTorch path of the lab), the same under ``torch.compile``, and bitsandbytes'
   ``matmul_4bit`` (fused gemv for one token) when bitsandbytes imports, against the bf16 matmul,
   for 1, 16, 512 and 4096 tokens; medians with CUDA events (``llmopt.bench.time_ms``). Also
   ``llmopt.int8.int8_matmul`` (``torch._int_mm``) and, when available, how often bitsandbytes'
   CUDA ``quantize_4bit`` picks another nibble than ours (its kernel rounds on the GPU).

Writes ``int8_nf4_memory.json``, ``int8_nf4_tiny_opt_<cpu|gpu>.json`` (with ``--ppl``) and
``int8_nf4_speed.json`` (GPU) via ``llmopt.bench.write_results`` (which records the card's name).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt import int8, nf4  # noqa: E402
from llmopt.bench import device_name, time_ms, write_results  # noqa: E402
from llmopt.gpt import GPT, GPTConfig  # noqa: E402

OPT125 = GPTConfig(vocab_size=50272, max_position_embeddings=2048, n_layer=12, n_head=12,
                   d_model=768, d_ff=3072)


def memory_rows():
    with torch.device("meta"):
        model = GPT(OPT125)
    names = nf4.quantized_linear_names(model)
    n_lin = sum(model.get_submodule(n).weight.numel() for n in names)
    n_all = sum(p.numel() for p in model.parameters())
    rows = []
    for fmt in ("fp16", "int8", "fp4", "nf4", "nf4-dq"):
        total = nf4.model_bytes(model, fmt)
        lin = sum(nf4.weight_bytes(tuple(model.get_submodule(n).weight.shape), fmt) for n in names)
        packed = sum(-(-model.get_submodule(n).weight.numel() // 2) for n in names)
        row = {"format": fmt, "model_bytes": total, "model_MiB": total / 2 ** 20,
               "linear_bytes": lin, "bits_per_linear_weight": 8 * lin / n_lin}
        if fmt in ("fp4", "nf4", "nf4-dq"):
            row["absmax_bits_per_weight"] = 8 * (lin - packed) / n_lin
        rows.append(row)
        print(row, flush=True)
    return rows, {"params": n_all, "quantized_linear_params": n_lin, "config": "OPT-125m sizes"}


def tiny_opt_rows(device, max_tokens):
    from llmopt.data import perplexity
    from llmopt.gpt import load_model
    model, _ = load_model("tiny-opt", device=device)
    makers = {"fp32": None, "int8": lambda l: int8.Linear8bit(l),
              "int8-no-outliers": lambda l: int8.Linear8bit(l, threshold=0.0),
              "fp4": lambda l: nf4.Linear4bit(l, "fp4"), "nf4": lambda l: nf4.Linear4bit(l, "nf4"),
              "nf4-dq": lambda l: nf4.Linear4bit(l, "nf4", double_quant=True)}
    rows = []
    for fmt, make in makers.items():
        m = model if make is None else nf4.replace_linears(copy.deepcopy(model), make)
        t0 = time.perf_counter()
        ppl = perplexity(m, max_tokens=max_tokens)
        fmt_bytes = "int8" if fmt.startswith("int8") else fmt
        rows.append({"format": fmt, "ppl": ppl, "model_bytes": nf4.model_bytes(model, fmt_bytes),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def speed_rows():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as exc:  # noqa: BLE001 — reported, the rest still runs
        print("bitsandbytes unavailable:", exc)
        bnb = bnbF = None
    dev = "cuda"
    dq_compiled = torch.compile(nf4.dequantize_4bit)
    rows = []
    for out_f, in_f in ((3072, 768), (4096, 4096), (11008, 4096)):
        torch.manual_seed(0)
        W = (torch.randn(out_f, in_f, device=dev) * 0.02).to(torch.bfloat16)
        packed, state = nf4.quantize_4bit(W, 64, "nf4")
        W_hat = nf4.dequantize_4bit(packed, state)
        extra = {}
        if bnbF is not None:
            bp, bs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
            extra["bnb_packed_mismatch"] = float((bp.flatten() != packed).float().mean())
            extra["bnb_absmax_equal"] = bool(torch.equal(bs.absmax, state.absmax))
            extra["bnb_dequant_max_diff"] = float((bnbF.dequantize_4bit(bp, bs) - W_hat).abs().max())
        for tokens in (1, 16, 512, 4096):
            x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                t_bf16 = time_ms(lambda: F.linear(x, W))
                t_deq = time_ms(lambda: nf4.dequantize_4bit(packed, state))
                t_ours = time_ms(lambda: F.linear(x, nf4.dequantize_4bit(packed, state)))
                try:
                    t_comp = time_ms(lambda: F.linear(x, dq_compiled(packed, state)))
                except Exception as exc:  # noqa: BLE001
                    print("torch.compile failed:", exc)
                    t_comp = None
                t_bnb = time_ms(lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bs)) if bnb else None
                xi = x.float()
                t_int8 = time_ms(lambda: int8.int8_matmul(xi, W.float())) if tokens > 16 else None
            row = {"out": out_f, "in": in_f, "tokens": tokens, "bf16_ms": t_bf16,
                   "ours_dequant_ms": t_deq, "ours_dequant_matmul_ms": t_ours,
                   "ours_compiled_ms": t_comp, "bnb_matmul_4bit_ms": t_bnb,
                   "ours_vs_bf16": t_ours / t_bf16,
                   "bnb_vs_bf16": None if t_bnb is None else t_bnb / t_bf16,
                   "ours_vs_bnb": None if t_bnb is None else t_ours / t_bnb,
                   "int8_matmul_ms": t_int8, **extra}
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for the JSON results (default bench/results)")
    ap.add_argument("--ppl", action="store_true", help="also tiny-opt's perplexity per format")
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    print("device:", device_name())
    rows, meta = memory_rows()
    write_results("int8_nf4_memory", rows, out_dir=args.out, **meta)
    if args.ppl:
        max_tokens = args.max_tokens or (None if on_gpu else 16384)
        write_results(f"int8_nf4_tiny_opt_{'gpu' if on_gpu else 'cpu'}",
                      tiny_opt_rows("cuda" if on_gpu else "cpu", max_tokens), out_dir=args.out,
                      max_tokens=max_tokens)
    if on_gpu:
        write_results("int8_nf4_speed", speed_rows(), out_dir=args.out, dtype="bfloat16",
                      note="ours = llmopt.nf4.dequantize_4bit (plain PyTorch) + F.linear")


if __name__ == "__main__":
    main()
