"""Generation throughput with and without the KV cache, beside transformers' ``generate``.

    PYTHONPATH=lib python bench/kv_cache.py [--out bench/results]

For tiny-opt and a random-initialised OPT-125m-sized model (bf16 on a GPU): greedy decoding
of 128 new tokens for a batch of 8 after a 512-token prompt and after an 896-token prompt
(1,024 tokens in all), with ``llmopt.kv_cache.generate`` (cache / no cache),
``llmopt.kv_cache.generate_static`` (fixed-shape decode steps replayed as one CUDA graph) and
with ``transformers`` ``generate`` on the same weights (``GPT.to_hf()``), in the same process.
tokens/s = batch × new tokens / median wall time (CUDA events), prompt phase included.
"""
from __future__ import annotations

import argparse

import torch

from llmopt.bench import device_name, time_ms, write_results
from llmopt.gpt import GPT, GPTConfig, load_model
from llmopt.kv_cache import generate, generate_static

OPT_125M = dict(vocab_size=50272, max_position_embeddings=2048, n_layer=12, n_head=12,
                d_model=768, d_ff=3072)


def models(device, dtype):
    tiny, _ = load_model("tiny-opt", device=device, dtype=dtype)
    yield "tiny-opt", tiny
    torch.manual_seed(0)
    yield "opt-125m-sized (random)", GPT(GPTConfig(**OPT_125M)).to(device=device, dtype=dtype).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 896])
    ap.add_argument("--rep", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:  # a smoke run on a CPU: small, so it finishes
        args.batch, args.new, args.prompts, args.rep = 1, 8, [64], 1
    rows = []
    for name, model in models(device, dtype):
        hf = model.to_hf().to(device=device, dtype=dtype).eval()
        for T in args.prompts:
            ids = torch.randint(3, model.config.vocab_size, (args.batch, T), device=device)
            n = args.new
            runs = {
                "llmopt, KV cache + CUDA graph": lambda: generate_static(model, ids, n),
                "llmopt, KV cache": lambda: generate(model, ids, n, use_cache=True),
                "llmopt, no cache": lambda: generate(model, ids, n, use_cache=False),
                "transformers, KV cache": lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                              do_sample=False, use_cache=True),
                "transformers, no cache": lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                              do_sample=False, use_cache=False),
            }
            same = torch.equal(runs["llmopt, KV cache"](), runs["llmopt, no cache"]())
            graphed = runs["llmopt, KV cache + CUDA graph"]()
            same_graph = torch.equal(graphed, runs["llmopt, KV cache"]())
            for impl, fn in runs.items():
                with torch.no_grad():
                    ms = time_ms(fn, warmup=1, rep=args.rep)
                rows.append({"model": name, "impl": impl, "batch": args.batch, "prompt": T,
                             "new_tokens": n, "ms": round(ms, 2),
                             "tokens_per_s": round(args.batch * n / (ms / 1e3), 1),
                             "cache_equals_no_cache": same, "graph_equals_cache": same_graph})
                print(f"{name:26s} prompt {T:4d} {impl:24s} {ms:9.1f} ms "
                      f"{rows[-1]['tokens_per_s']:9.1f} tok/s", flush=True)
    for r in rows:  # the speed-up of each implementation over transformers' cached generate
        base = next(b for b in rows if b["model"] == r["model"] and b["prompt"] == r["prompt"]
                    and b["impl"] == "transformers, KV cache")
        r["x_transformers_cache"] = round(base["ms"] / r["ms"], 2)
    path = write_results("kv_cache_generate", rows, args.out, dtype=str(dtype),
                         note="tokens/s = batch x new tokens / median time; greedy decoding")
    print(f"wrote {path} on {device_name()}")


if __name__ == "__main__":
    main()
