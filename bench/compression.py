"""Quality against bits per weight: quantization, sparsification and both (hw01_compression).

    PYTHONPATH=lib python bench/compression.py                 # CPU: the tiny-opt table (≤ 10 min)
    PYTHONPATH=lib python bench/compression.py --quick         # CPU smoke run (fewer tokens, recipes)
    PYTHONPATH=lib:. python3 bench/compression.py --out $OUT   # GPU: the same, more tokens, + OPT-125m/350m
                                                               # when they are in the local HF cache

For each recipe of ``RECIPES`` (RTN, GPTQ, int8, NF4; magnitude, Wanda, SparseGPT at 50% and 2:4;
combinations) ``llmopt.sparsity.compress_model`` compresses a fresh copy of tiny-opt layer by layer
(calibration windows of the train split, ``calibration_batches``), and ``evaluate`` measures, on
non-overlapping windows of the test split, the perplexity and the KL divergence (nats per token) to
the uncompressed model's next-token distribution, computed in the same process. Also recorded: bits
per weight of the decoder linears (``model_bits_per_weight``, overheads included), the mean relative
layer error ‖WX − C(W)X‖/‖WX‖ on the calibration inputs, the measured sparsity, and the compression
time (wall and CPU seconds: on a shared CPU the wall clock depends on the other load).

Writes ``compression_tiny_opt_<cpu|gpu>.json`` (and ``compression_opt125m.json`` /
``compression_opt350m.json`` when those checkpoints are present locally; nothing is downloaded) with
``llmopt.bench.write_results``, which records the device's name.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt.bench import write_results  # noqa: E402
from llmopt.data import calibration_batches, load_tokens  # noqa: E402
from llmopt.gpt import load_model  # noqa: E402
from llmopt import sparsity as sp  # noqa: E402

R = sp.make_recipe
RECIPES = [
    R(),
    R(quant="int8"), R(quant="nf4"),
    R(quant="rtn", bits=4), R(quant="gptq", bits=4), R(quant="rtn", bits=3), R(quant="gptq", bits=3),
    R(prune="magnitude", sparsity=0.5), R(prune="wanda", sparsity=0.5), R(prune="sparsegpt", sparsity=0.5),
    R(prune="magnitude", n=2, m=4), R(prune="wanda", n=2, m=4), R(prune="sparsegpt", n=2, m=4),
    R(prune="sparsegpt", sparsity=0.5, quant="gptq", bits=4), R(prune="sparsegpt", n=2, m=4, quant="gptq", bits=4),
    R(prune="wanda", sparsity=0.5, quant="gptq", bits=4), R(prune="sparsegpt", sparsity=0.5, quant="nf4"),
    R(prune="sparsegpt", sparsity=0.5, quant="int8"),
]
QUICK = [RECIPES[i] for i in (0, 2, 4, 7, 8, 9, 12, 13)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sweep(model, windows, calib, recipes, device, label):
    ref = sp.reference_logprobs(model, windows)
    rows = []
    for recipe in recipes:
        m = copy.deepcopy(model)
        log = []
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        sp.compress_model(m, recipe, calib, log=log)
        _sync(device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        ev = sp.evaluate(m, ref, windows)
        rows.append({"model": label, "method": sp.recipe_name(recipe), "recipe": recipe,
                     "bits_per_weight": sp.model_bits_per_weight(model, recipe),
                     "ppl": ev["ppl"], "kl": ev["kl"],
                     "layer_rel_err": sum(e["rel_err"] for e in log) / len(log) if log else 0.0,
                     "sparsity": sum(e["sparsity"] for e in log) / len(log) if log else 0.0,
                     "compress_s": dt, "compress_cpu_s": cpu})
        r = rows[-1]
        print(f"{label:10s} {r['method']:30s} {r['bits_per_weight']:6.2f} bits  ppl {r['ppl']:8.2f}  "
              f"KL {r['kl']:.4f}  layer err {r['layer_rel_err']:.3f}  {dt:6.1f} s", flush=True)
        del m
    return rows


def windows_of(ids, seq_len, max_tokens):
    return sp.eval_windows(ids, seq_len, max_tokens)


def hf_opt(name, device, seq_len, max_tokens, n_calib, recipes):
    """OPT-125m/350m from the local Hugging Face cache (never downloaded), or None."""
    try:
        model, tok = load_model(name, device=device)
    except OSError as err:
        print(f"{name}: not in the local cache — skipped ({str(err).splitlines()[0][:80]})")
        return None
    from llmopt.data import load_corpus
    ids = tok(load_corpus("test"))["input_ids"]
    tr = torch.tensor(tok(load_corpus("train")[:2_000_000])["input_ids"])
    starts = torch.randint(0, len(tr) - seq_len, (n_calib,), generator=torch.Generator().manual_seed(0))
    calib = torch.stack([tr[s:s + seq_len] for s in starts])
    return sweep(model, windows_of(ids, seq_len, max_tokens), calib, recipes, device, name.split("/")[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder, or a .json path (default bench/results)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 recipes, 2k tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="test tokens (default: 8192 on CPU, all on GPU, 2048 with --quick)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.device(device).type == "cuda"
    out_dir = args.out
    if out_dir and out_dir.endswith(".json"):
        out_dir = os.path.dirname(out_dir) or "."
    seq_len = 256 if gpu else 128
    max_tokens = args.max_tokens or (2048 if args.quick else (None if gpu else 8192))
    n_calib = 128 if gpu else (8 if args.quick else 16)
    recipes = QUICK if args.quick else RECIPES
    if not gpu:
        # GPTQ/SparseGPT sweep columns with thousands of tiny ops: on a 2-core CPU the
        # intra-op threads cost more than they save
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = load_model("tiny-opt", device=device)
    windows = windows_of(load_tokens("test"), seq_len, max_tokens)
    calib = calibration_batches(n_calib, seq_len, seed=0)
    t0 = time.perf_counter()
    rows = sweep(model, windows, calib, recipes, device, "tiny-opt")
    meta = dict(model="tiny-opt", eval_tokens=int(windows[:, 1:].numel()), calib_tokens=n_calib * seq_len,
                seq_len=seq_len, quick=args.quick, total_s=time.perf_counter() - t0,
                bits_note="decoder linears only; fp16 = 16; values of kept weights + scales + "
                          "positions (bitmask, or log2(m) bits per kept weight for n:m)")
    path = write_results(f"compression_tiny_opt_{'gpu' if gpu else 'cpu'}", rows, out_dir=out_dir, **meta)
    print("wrote", path)
    if gpu and not args.quick:
        for name in ("facebook/opt-125m", "facebook/opt-350m"):
            opt_rows = hf_opt(name, device, 512, 65536, 64, RECIPES[:13])
            if opt_rows:
                write_results(f"compression_opt{name.split('-')[-1]}", opt_rows, out_dir=out_dir,
                              model=name, seq_len=512)


if __name__ == "__main__":
    main()
