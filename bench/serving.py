"""Serving: Dynamic SplitFuse vs continuous batching on the real paged engine, and the engine
vs Hugging Face ``generate``.

    PYTHONPATH=lib:. python3 bench/serving.py --out bench/results/serving.json [--quick]

Model: a random-initialised OPT-125m-sized ``llmopt.gpt.GPT`` (12 layers, 12 heads, d = 768,
bf16 on a GPU), greedy decoding, ``llmopt.scheduler.run_engine`` over lab02's paged cache
(blocks of 16) with the Triton paged-attention kernel (one query row per token, so prompt
chunks and decodes share it).

1. ``splitfuse`` (token budget 512) vs ``continuous`` (prefill first, whole prompts,
   ``max_num_batched_tokens`` 2048) on a long-prompt workload (prompts 512-1536 tokens) and a
   short-prompt one (16-128), answers 32-128 tokens. Offline (every request at t = 0): output
   tokens / wall time. Online: the same requests arriving as a Poisson process at 0.8x the
   request rate continuous batching sustained offline, replayed on the wall clock; output
   tokens / wall time, TTFT and latency percentiles. The ratio splitfuse / continuous is the
   figure (FastGen reports up to 2.3x effective throughput on long prompts; goal >= 1.3x).
2. 256 requests of mixed lengths (prompts 16-512, answers 16-256): the engine (splitfuse,
   budget 2048, every request at t = 0) against transformers' ``OPTForCausalLM.generate``
   (same config, random weights, bf16, greedy) with static batches of 32 and of 256, left
   padding, each batch generating until its longest answer. Useful tokens = the answers'
   lengths for both; tokens / wall time (CUDA-synchronised). vLLM reported 14-24x over HF;
   goal >= 10x.

Timing: wall clock around whole runs after a warm-up run (the engine reads every pass's
argmax on the host, which synchronises the device; HF runs end with a synchronize).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from llmopt import scheduler as sch
from llmopt.bench import device_name, write_results
from llmopt.gpt import GPT, GPTConfig
from llmopt.paged_attention import paged_attention, paged_attention_triton

OPT_125M = dict(vocab_size=50272, max_position_embeddings=2048, n_layer=12, n_head=12, d_model=768,
                d_ff=3072)
TINY = dict(vocab_size=512, max_position_embeddings=256, n_layer=2, n_head=2, d_model=64, d_ff=128)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def workload(n, prompt_lens, new_tokens, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n,), generator=g).tolist()
    T = torch.randint(new_tokens[0], new_tokens[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (p,), generator=g) for p in P]
    return prompts, T


def engine_run(model, prompts, n_new, policy, budget, attention, arrivals=None, graphed=False):
    stats = {}
    sync()
    t0 = time.perf_counter()
    out = sch.run_engine(model, prompts, n_new, policy=policy, token_budget=budget, attention=attention,
                         arrivals=arrivals, stats=stats, graphed_decode=graphed)
    sync()
    wall = time.perf_counter() - t0
    m = sch.metrics(stats["requests"], stats["first_token"], stats["finish"]) if arrivals is not None else {}
    row = dict(policy=policy, token_budget=budget, graphed_decode=bool(graphed), requests=len(prompts), output_tokens=sum(n_new),
               prompt_tokens=sum(len(p) for p in prompts), passes=stats["passes"], wall_s=wall,
               tokens_per_s=sum(n_new) / wall)
    row.update({k: v for k, v in m.items() if k not in ("ttft", "latency", "throughput_tokens_per_s")})
    return row, out


GRAPH_ERRORS = []


def build_graphed(model, prompts, n_new, attention, max_batch, use_graph):
    """GraphedDecode with every bucket captured; if capturing fails, the eager fixed-shape path
    (the error is recorded in the results)."""
    blocks = sum(-(-(len(p) + t) // 16) for p, t in zip(prompts, n_new))
    try:
        return sch.GraphedDecode.build(model, blocks, 16, attention=attention, max_batch=max_batch,
                                       use_graph=use_graph)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on without graphs
        GRAPH_ERRORS.append(repr(e)[:300])
        print("CUDA graph capture failed, eager decode instead:", repr(e)[:300], flush=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return sch.GraphedDecode.build(model, blocks, 16, attention=attention, max_batch=0, use_graph=False)


def policy_rows(model, attention, quick, vocab, graphed):
    rows, ratios = [], {}
    if quick:
        shapes = {"long": ((48, 96), (4, 8), 6), "short": ((4, 16), (4, 8), 8)}
        budgets = {"splitfuse": 32, "continuous": 128}
    else:
        shapes = {"long": ((512, 1536), (32, 128), 64), "short": ((16, 128), (32, 128), 128)}
        budgets = {"splitfuse": 512, "continuous": 2048}
    for name, (pl, nl, n) in shapes.items():
        prompts, n_new = workload(n, pl, nl, vocab, seed=len(name))
        if graphed:   # one cache with every decode batch size captured, reused by every run
            graphed = build_graphed(model, prompts, n_new, attention, n, True)
        res = {}
        for policy in ("continuous", "splitfuse"):
            row, out = engine_run(model, prompts, n_new, policy, budgets[policy], attention, graphed=graphed)
            row.update(workload=name, mode="offline")
            rows.append(row)
            res[policy] = (row, out)
            print(f"{name:5s} offline {policy:10s} {row['tokens_per_s']:9.1f} tok/s  {row['passes']} passes "
                  f"{row['wall_s']:.2f} s", flush=True)
        same = all(torch.equal(a, b) for a, b in zip(res["continuous"][1], res["splitfuse"][1]))
        ratios[f"{name}_offline"] = res["splitfuse"][0]["tokens_per_s"] / res["continuous"][0]["tokens_per_s"]
        # online: Poisson arrivals at 0.8x the request rate continuous batching sustained offline
        rate = 0.8 * n / res["continuous"][0]["wall_s"]
        g = torch.Generator().manual_seed(7)
        gaps = torch.empty(n).exponential_(generator=g) / rate
        arrivals = (torch.cumsum(gaps, 0) - gaps[0]).tolist()
        online = {}
        for policy in ("continuous", "splitfuse"):
            row, _ = engine_run(model, prompts, n_new, policy, budgets[policy], attention, arrivals, graphed)
            row.update(workload=name, mode="online", rate_req_per_s=rate, outputs_equal_across_policies=same)
            rows.append(row)
            online[policy] = row
            print(f"{name:5s} online  {policy:10s} {row['tokens_per_s']:9.1f} tok/s  TTFT p50 "
                  f"{row['ttft_p50']:.3f} s  latency p50 {row['latency_p50']:.2f} p95 {row['latency_p95']:.2f} s",
                  flush=True)
        ratios[f"{name}_online"] = online["splitfuse"]["tokens_per_s"] / online["continuous"]["tokens_per_s"]
        ratios[f"{name}_online_latency_p95"] = online["continuous"]["latency_p95"] / online["splitfuse"]["latency_p95"]
    return rows, ratios


def hf_rows(model_cfg, prompts, n_new, batch_sizes, device, dtype):
    """transformers' generate, static batches, left padding; None if transformers is missing."""
    try:
        from transformers import OPTConfig, OPTForCausalLM
    except ImportError:
        return []
    cfg = OPTConfig(vocab_size=model_cfg["vocab_size"], hidden_size=model_cfg["d_model"],
                    num_hidden_layers=model_cfg["n_layer"], ffn_dim=model_cfg["d_ff"],
                    num_attention_heads=model_cfg["n_head"],
                    max_position_embeddings=model_cfg["max_position_embeddings"], word_embed_proj_dim=model_cfg["d_model"],
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    hf = OPTForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    rows = []

    def run(B, prompts=prompts, n_new=n_new):
        for i in range(0, len(prompts), B):
            ps, ns = prompts[i:i + B], n_new[i:i + B]
            T = max(len(p) for p in ps)
            ids = torch.full((len(ps), T), 1, dtype=torch.long)
            mask = torch.zeros((len(ps), T), dtype=torch.long)
            for j, p in enumerate(ps):
                ids[j, T - len(p):], mask[j, T - len(p):] = p, 1
            with torch.no_grad():
                hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(ns),
                            min_new_tokens=max(ns), do_sample=False, pad_token_id=1)
    run(2, prompts[:2], [2, 2])                      # warm-up
    for B in batch_sizes:
        sync()
        t0 = time.perf_counter()
        run(B)
        sync()
        wall = time.perf_counter() - t0
        rows.append(dict(system="transformers.generate", batch=B, requests=len(prompts),
                         output_tokens=sum(n_new), wall_s=wall, tokens_per_s=sum(n_new) / wall))
        print(f"HF generate, static batches of {B}: {rows[-1]['tokens_per_s']:.1f} tok/s ({wall:.2f} s)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="the JSON file to write (default bench/results/serving.json)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke run)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = OPT_125M if not args.quick else TINY
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).to(device=device, dtype=dtype).eval()
    attention = paged_attention_triton if cuda else paged_attention

    graphed = cuda                                   # CUDA-graph decode-only passes on a GPU
    # warm-up: compile the kernels, fill the allocator
    wp, wn = workload(4, (8, 40), (2, 4), cfg["vocab_size"], seed=99)
    for policy in ("continuous", "splitfuse"):
        for gr in {False, graphed}:
            sch.run_engine(model, wp, wn, policy=policy, token_budget=32, attention=attention, graphed_decode=gr)

    rows, ratios = policy_rows(model, attention, args.quick, cfg["vocab_size"], graphed)

    n = 16 if args.quick else 256
    prompts, n_new = workload(n, (16, 64) if args.quick else (16, 512), (4, 16) if args.quick else (16, 256),
                              cfg["vocab_size"], seed=256)
    budget = 128 if args.quick else 2048
    plain, ref_out = engine_run(model, prompts, n_new, "splitfuse", budget, attention, graphed=False)
    plain.update(workload="mixed-256", mode="offline", system="llmopt engine")
    rows.append(plain)
    gd = build_graphed(model, prompts, n_new, attention, n, cuda)
    erow, out = engine_run(model, prompts, n_new, "splitfuse", budget, attention, graphed=gd)
    erow.update(workload="mixed-256", mode="offline", system="llmopt engine",
                outputs_equal_without_graphs=all(torch.equal(a, b) for a, b in zip(out, ref_out)))
    rows.append(erow)
    ratios["graphed_vs_plain_engine"] = erow["tokens_per_s"] / plain["tokens_per_s"]
    for r in (plain, erow):
        print(f"engine (splitfuse, graphed decode {r['graphed_decode']}) on {n} mixed requests: "
              f"{r['tokens_per_s']:.1f} tok/s ({r['wall_s']:.2f} s)", flush=True)
    try:
        hf = hf_rows(cfg, prompts, n_new, [4, 16] if args.quick else [32, 256], device, dtype)
    except Exception as e:  # noqa: BLE001 - the engine's rows are still worth writing
        print("transformers baseline failed:", repr(e)[:300], flush=True)
        hf, GRAPH_ERRORS[:0] = [], [f"HF: {e!r}"[:300]]
    rows += hf
    for r in hf:
        ratios[f"engine_vs_hf_batch{r['batch']}"] = erow["tokens_per_s"] / r["tokens_per_s"]
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    out_dir, name = None, "serving"
    if args.out:
        out_dir, fname = os.path.split(args.out)
        name = os.path.splitext(fname)[0]
    path = write_results(name, rows, out_dir=out_dir or None, model="OPT-125m-sized, random init" if not args.quick
                         else "tiny (quick)", dtype=str(dtype), quick=args.quick, ratios=ratios,
                         errors=GRAPH_ERRORS)
    print("wrote", path)


if __name__ == "__main__":
    main()
