"""PagedAttention: decode attention through block tables, KV memory holding tokens, and
continuous vs static batching.

    PYTHONPATH=lib python bench/paged_attention.py [--out bench/results] [--quick]

1. Decode attention (one query per sequence), batch 64, 32 heads of d = 128, bf16, contexts
   1k-8k tokens in blocks of 16 at shuffled physical places: ``paged_attention_triton``
   (several tokens-per-step / warps configurations, the best one reported) against
   ``F.scaled_dot_product_attention`` on a contiguous (B, H, n, d) cache of the same tokens,
   in the same process; medians of CUDA events. Bytes read / time gives the bandwidth.
2. KV memory holding tokens: a ShareGPT-like spread of request lengths (lognormal, mean
   ≈ 460 tokens), contiguous reservation of 2,048 tokens per request vs blocks of 16; and,
   while ``serve`` runs, the utilization of the blocks in use at every step.
3. ``serve`` on a random-initialised OPT-125m-sized model (bf16, the Triton kernel):
   continuous batching (at most 64 running) against static batching (batches of 64, each run
   until its longest request ends: ``serve`` on each batch), the same requests, the same
   number of output tokens; tokens/s = output tokens / wall time (CUDA-synchronised).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmopt import paged_attention as pa
from llmopt.bench import gbps, time_ms, write_results
from llmopt.gpt import GPT, GPTConfig

OPT_125M = dict(vocab_size=50272, max_position_embeddings=2048, n_layer=12, n_head=12,
                d_model=768, d_ff=3072)


def attention_rows(contexts, S=64, H=32, d=128, B=16, dtype=torch.bfloat16, device="cuda"):
    rows = []
    configs = [(64, 4, 1), (128, 4, 1), (128, 4, 2), (64, 2, 8), (32, 2, 8), (32, 1, 8),
               (32, 1, 16), (16, 1, 16)]
    configs = [(*c, None) for c in configs] + [
        (64, 2, 8, 4), (32, 1, 8, 4), (32, 1, 8, 3), (32, 1, 8, 5), (32, 1, 4, 4), (32, 1, 16, 4),
        (16, 1, 8, 4), (16, 1, 16, 4), (64, 1, 8, 4)]
    for n in contexts:
        nb = S * (n // B)
        g = torch.Generator(device=device).manual_seed(n)
        tables = torch.randperm(nb, device=device, generator=g).view(S, n // B).int()
        kc = torch.randn(nb, B, H, d, device=device, dtype=dtype)
        vc = torch.randn(nb, B, H, d, device=device, dtype=dtype)
        q = torch.randn(S, H, d, device=device, dtype=dtype)
        lens = torch.full((S,), n, dtype=torch.int32, device=device)
        k = kc[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()   # (S, H, n, d)
        v = vc[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v)  # noqa: E731
        expected = sdpa()[:, :, 0]
        ms_sdpa = time_ms(sdpa, warmup=5, rep=50)
        best = None
        for block_n, warps, splits, stages in configs:
            o = torch.empty_like(q)
            run = lambda: pa._launch(q, kc, vc, o, tables, lens, d ** -0.5, block_n, warps, splits,  # noqa: E731
                                     stages)
            run()
            err = (o.float() - expected.float()).abs().max().item()
            ms = time_ms(run, warmup=5, rep=50)
            rows.append(dict(part="attention", context=n, batch=S, heads=H, head_dim=d, block_size=B,
                             dtype=str(dtype)[6:], ms=ms, max_abs_err=err,
                             impl=f"triton paged (BLOCK_N={block_n}, warps={warps}, splits={splits}"
                                  + ("" if stages is None else f", stages={stages}") + ")"))
            if best is None or ms < best[0]:
                best = (ms, (block_n, warps, splits, stages), err)
        nbytes = 2 * S * n * H * d * kc.element_size()
        rows.append(dict(part="attention", context=n, batch=S, heads=H, head_dim=d, block_size=B,
                         dtype=str(dtype)[6:], impl="sdpa contiguous", ms=ms_sdpa,
                         gbps=gbps(nbytes, ms_sdpa)))
        rows.append(dict(part="attention", context=n, batch=S, heads=H, head_dim=d, block_size=B,
                         dtype=str(dtype)[6:], impl="triton paged (best)", ms=best[0],
                         config=list(best[1]), max_abs_err=best[2], gbps=gbps(nbytes, best[0]),
                         speedup_vs_sdpa=ms_sdpa / best[0]))
        bn, w, sp, st = pa._config(n)
        default = [r for r in rows if r["context"] == n and r["impl"] == (
            f"triton paged (BLOCK_N={bn}, warps={w}, splits={sp}" + ("" if st is None else f", stages={st}") + ")")]
        print(f"context {n:5d}: sdpa {ms_sdpa:.3f} ms, triton paged {best[0]:.3f} ms "
              f"(BLOCK_N, warps, splits, stages = {best[1]}) = {ms_sdpa / best[0]:.2f}x, "
              f"{gbps(nbytes, best[0]):.0f} GB/s, max err {best[2]:.3g}; library default {pa._config(n)}: "
              f"{ms_sdpa / default[0]['ms']:.2f}x", flush=True)
        del k, v, kc, vc
        torch.cuda.empty_cache()
    return rows


def workload(n_req, seed=0, max_len=2048):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.distributions.LogNormal(4.6, 0.9).sample((n_req,)).clamp(4, 1024).int()
    out = torch.distributions.LogNormal(5.4, 0.9).sample((n_req,)).clamp(1, 1024).int()
    prompts = [torch.randint(3, 50000, (int(p),), generator=g) for p in prompt]
    return prompts, [int(min(o, max_len - int(p))) for o, p in zip(out, prompt)]


class RecordingCache(pa.PagedKVCache):
    """Samples utilization() after every forward pass (the length advances after the last layer)."""
    samples: list = []

    def advance(self, seq_id, n_new):
        super().advance(seq_id, n_new)
        if seq_id == next(reversed(self.tables)):  # once per pass: after the last sequence
            RecordingCache.samples.append(self.utilization())


def memory_rows(n_req=2000):
    prompts, outs = workload(n_req, seed=1)
    lens = [len(p) + o for p, o in zip(prompts, outs)]
    rows = []
    for bs in (1, 8, 16, 32, 64, 128, 256):
        c, p = pa.kv_memory_usage(lens, 2048, bs)
        rows.append(dict(part="memory", requests=n_req, mean_len=sum(lens) / n_req, block_size=bs,
                         contiguous_2048=c, paged=p))
    print(f"KV memory holding tokens: contiguous(2048) {rows[0]['contiguous_2048']:.1%}, "
          f"paged(16) {rows[2]['paged']:.1%}", flush=True)
    return rows


def serve_rows(device, dtype, n_req, max_batch, quick=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**OPT_125M)).to(device=device, dtype=dtype).eval()
    prompts, n_new = workload(n_req, seed=2)
    prompts = [p.to(device) for p in prompts]
    attn = pa.paged_attention_triton
    # warm-up: compile the kernels for every shape class
    pa.serve(model, prompts[:4], [4] * 4, attention=attn)
    rows = []

    def timed(fn):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    cont, t_cont = timed(lambda: pa.serve(model, prompts, n_new, max_batch=max_batch, attention=attn))
    static = []

    def run_static():
        for i in range(0, n_req, max_batch):
            static.extend(pa.serve(model, prompts[i:i + max_batch], n_new[i:i + max_batch], attention=attn))
        return static
    _, t_static = timed(run_static)
    tokens = sum(n_new)
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(cont, static))
    for name, t in (("continuous batching", t_cont), ("static batching", t_static)):
        rows.append(dict(part="serve", impl=name, requests=n_req, max_batch=max_batch,
                         output_tokens=tokens, seconds=t, tokens_per_s=tokens / t))
    rows[-2]["speedup_vs_static"] = t_static / t_cont
    rows[-2]["same_tokens_as_static"] = same
    print(f"serve {n_req} requests, {tokens} output tokens: continuous {tokens / t_cont:.0f} tok/s, "
          f"static {tokens / t_static:.0f} tok/s = {t_static / t_cont:.2f}x (same tokens: {same})",
          flush=True)
    # equal KV memory (the vLLM paper's setting): static batching reserves max_len = 2,048
    # token slots per sequence, so a KV budget of max_batch × 2,048 slots runs max_batch
    # sequences at a time; the paged cache gives the same budget as blocks of 16 and admits
    # as many sequences as their real tokens fit (no cap on the batch).
    budget_blocks = max_batch * 2048 // 16
    paged, t_paged = timed(lambda: pa.serve(model, prompts, n_new, num_blocks=budget_blocks,
                                             attention=attn))
    same_mem = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(paged, static))
    rows.append(dict(part="serve_equal_memory", impl="continuous batching, paged, batch not capped",
                     requests=n_req, kv_token_slots=max_batch * 2048, output_tokens=tokens,
                     seconds=t_paged, tokens_per_s=tokens / t_paged,
                     speedup_vs_static=t_static / t_paged, same_tokens_as_static=same_mem))
    rows.append(dict(part="serve_equal_memory", impl=f"static batching, {max_batch} x 2048 reserved",
                     requests=n_req, kv_token_slots=max_batch * 2048, output_tokens=tokens,
                     seconds=t_static, tokens_per_s=tokens / t_static))
    print(f"equal KV memory ({max_batch} x 2048 slots): continuous+paged {tokens / t_paged:.0f} tok/s "
          f"= {t_static / t_paged:.2f}x static (same tokens: {same_mem})", flush=True)
    # utilization of the blocks in use, sampled at every pass of a continuous run (not timed)
    RecordingCache.samples = []
    saved, pa.PagedKVCache = pa.PagedKVCache, RecordingCache
    try:
        k = min(n_req, 64 if quick else 128)
        pa.serve(model, prompts[:k], n_new[:k], max_batch=max_batch, attention=attn)
    finally:
        pa.PagedKVCache = saved
    u = RecordingCache.samples
    rows.append(dict(part="serve_memory", requests=k, block_size=16, steps=len(u),
                     mean_utilization=sum(u) / len(u), min_utilization=min(u)))
    print(f"blocks in use holding tokens while serving: mean {sum(u) / len(u):.1%}, min {min(u):.1%}",
          flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=512)
    args = ap.parse_args()
    note = ("decode attention batch 64, 32 heads, d=128, bf16, blocks of 16; serve on a random "
            "OPT-125m-sized model, bf16, the Triton kernel, at most 64 running")
    rows = memory_rows()
    path = write_results("paged_attention", rows, out_dir=args.out, note=note)
    if torch.cuda.is_available():
        contexts = [1024, 8192] if args.quick else [512, 1024, 2048, 4096, 8192]
        rows += attention_rows(contexts)
        path = write_results("paged_attention", rows, out_dir=args.out, note=note)  # kept if serve runs out of time
        rows += serve_rows("cuda", torch.bfloat16, 64 if args.quick else args.requests, 64, args.quick)
        path = write_results("paged_attention", rows, out_dir=args.out, note=note)
    else:
        print("no GPU: only the memory part runs")
    print("wrote", path)


if __name__ == "__main__":
    main()
