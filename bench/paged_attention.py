"""PagedAttention: decode attention through block tables, KV memory holding tokens, and
continuous vs static batching.

    PYTHONPATH=lib python bench/paged_attention.py [--out bench/results] [--quick]
    PYTHONPATH=lib python bench/paged_attention.py --sweep --only-attention --out DIR   # ~4 min

1. Decode attention (one query per sequence), batch 64, 32 heads of d = 128, bf16, contexts
   512-8k tokens in blocks of 16 at shuffled physical places: ``paged_attention_triton``'s
   kernel with the library's choice (``_config``) against ``F.scaled_dot_product_attention``
   on a contiguous (B, H, n, d) cache of the same tokens, in the same process; medians of
   CUDA events, three ways: each call captured in a CUDA graph and replayed (as an engine runs
   a decode step; the headline), eager single calls (Python's launch work counts whenever
   the GPU waits for it) and back to back (launch overhead hidden), plus the host's time per
   eager call. Bytes read / time gives the bandwidth. ``--sweep``: every config of ``SWEEP``
   (tokens per step, warps, split-KV slices, pipeline stages, heads per program, eviction
   hints, program order, TMA loads) at every context, a table of paged / SDPA, written to
   ``paged_attention_sweep.json`` (61 configs, ~4 min on an H200).
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
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmopt import paged_attention as pa
from llmopt.bench import gbps, time_ms, write_results
from llmopt.cuda_graph import capture
from llmopt.gpt import GPT, GPTConfig

OPT_125M = dict(vocab_size=50272, max_position_embeddings=2048, n_layer=12, n_head=12,
                d_model=768, d_ff=3072)


def _cfg(block_n, warps, splits, stages, heads, evict=True, heads_first=True, tma=False):
    return pa._Config(block_n, warps, splits, stages, heads, evict, heads_first, tma)


# The sweep (--sweep): tokens per step, warps, splits, loop pipeline stages (None: not
# pipelined), heads per program (G), eviction hints, program order. Tiles of BLOCK_N·G·d ≤
# 8,192 elements per K and per V keep the registers in bounds (one 64 KB tile at 8 warps);
# pipelined tiles sit in shared memory, ~2·(stages-1)·BLOCK_N·G·d·2 bytes per program;
# programs = 64 rows · 32/G groups · splits. TMA (tma=True) needs BLOCK_N = the block size.
SWEEP = [
    # not pipelined: the previous library choices (rows-first order, no hints), and a few others
    _cfg(32, 1, 4, None, 1, False, False),   # the previous library choice below 2k tokens
    _cfg(32, 1, 8, None, 1, False, False),   # ... and from 2k
    _cfg(32, 1, 4, None, 1), _cfg(16, 2, 8, None, 4), _cfg(8, 2, 16, None, 8), _cfg(4, 4, 16, None, 32),
    # G = 1: one head per program, the loop pipelined (cp.async, stages - 1 steps ahead)
    _cfg(32, 1, 4, 2, 1, False, False), _cfg(32, 1, 4, 3, 1, False, False),
    _cfg(32, 1, 4, 4, 1, False, False), _cfg(32, 1, 8, 3, 1, False, False),
    _cfg(32, 1, 4, 3, 1), _cfg(32, 1, 8, 3, 1), _cfg(16, 1, 8, 3, 1), _cfg(16, 1, 8, 5, 1),
    _cfg(64, 2, 8, 3, 1),
    # G = 2: 512 contiguous bytes per token
    _cfg(16, 1, 4, 3, 2), _cfg(16, 1, 8, 3, 2), _cfg(16, 1, 8, 4, 2), _cfg(32, 2, 8, 3, 2),
    # G = 4
    _cfg(8, 1, 8, 3, 4), _cfg(8, 1, 8, 4, 4), _cfg(16, 2, 4, 3, 4), _cfg(16, 2, 8, 3, 4),
    _cfg(16, 2, 16, 3, 4), _cfg(16, 2, 8, 2, 4), _cfg(16, 4, 8, 3, 4), _cfg(16, 2, 8, 3, 4, False, True),
    # G = 8: 2 KB per token
    _cfg(4, 1, 16, 3, 8), _cfg(4, 1, 16, 4, 8), _cfg(8, 2, 8, 3, 8), _cfg(8, 2, 16, 3, 8),
    _cfg(8, 2, 16, 2, 8), _cfg(8, 4, 32, 3, 8), _cfg(16, 4, 16, 3, 8),
    _cfg(8, 2, 16, 3, 8, True, False), _cfg(8, 2, 16, 3, 8, False, True),
    # G = 16
    _cfg(2, 1, 32, 3, 16), _cfg(4, 2, 16, 3, 16), _cfg(4, 2, 32, 3, 16), _cfg(8, 4, 16, 3, 16),
    _cfg(4, 2, 16, 4, 16),
    # G = 32 = all heads: a block of 16 tokens is one 128 KB contiguous stream
    _cfg(1, 1, 32, 3, 32), _cfg(2, 2, 16, 3, 32), _cfg(2, 2, 32, 3, 32), _cfg(2, 2, 16, 4, 32),
    _cfg(4, 4, 16, 3, 32), _cfg(4, 4, 32, 3, 32), _cfg(8, 8, 16, 2, 32),
    # one 16-token block per step, 2 stages: the picks of the graph-timed runs
    _cfg(16, 2, 4, 2, 4), _cfg(16, 4, 8, 2, 8), _cfg(16, 4, 4, 2, 8), _cfg(16, 4, 16, 2, 8),
    # TMA: the block's (16, G, d) box loaded by the copy engine
    _cfg(16, 1, 8, 2, 1, tma=True), _cfg(16, 1, 8, 3, 2, tma=True), _cfg(16, 2, 8, 2, 4, tma=True),
    _cfg(16, 2, 4, 2, 4, tma=True), _cfg(16, 4, 8, 2, 4, tma=True), _cfg(16, 4, 8, 2, 8, tma=True),
    _cfg(16, 4, 4, 2, 8, tma=True), _cfg(16, 2, 16, 2, 4, tma=True), _cfg(16, 4, 16, 2, 8, tma=True),
]


def config_spec(c) -> str:
    """The --configs form of a config: 'block_n,warps,splits,stages,heads,evict,heads_first,tma'."""
    return (f"{c.block_n},{c.num_warps},{c.splits},{c.num_stages},{c.heads},{int(c.evict)},"
            f"{int(c.heads_first)},{int(c.tma)}")


def compile_only(spec: str) -> int:
    """(In a subprocess) compile and run one config at the sweep's shapes; 0 if it is right."""
    torch.manual_seed(0)
    (cfg,) = parse_configs(spec)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    S, H, d, B, n = 16, 32, 128, 16, 256          # the sweep's specialisations (S, strides % 16 == 0)
    tables = torch.randperm(S * n // B, device=dev).view(S, n // B).int()
    kc = torch.randn(S * n // B, B, H, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(S, H, d, device=dev, dtype=torch.bfloat16)
    lens = torch.randint(1, n + 1, (S,), device=dev, dtype=torch.int32)
    o = torch.empty_like(q)
    pa._launch(q, kc, vc, o, tables, lens, d ** -0.5, **cfg._asdict())
    err = (o.float() - pa.paged_attention(q, kc, vc, tables, lens).float()).abs().max().item()
    print(f"{spec}: max err {err:.3g}")
    return 0 if err < 0.05 else 1


def precompile(configs, workers: int = 8, timeout: float = 300.0):
    """Compile every config in its own subprocess, several at a time, into Triton's on-disk
    cache (the sweep then loads them); a config that fails, is wrong or crashes the compiler is
    dropped with its message instead of ending the sweep. Returns (ok, [(config, message)])."""
    def one(cfg):
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-only", config_spec(cfg)],
                               capture_output=True, text=True, timeout=timeout)
            return cfg, r.returncode, (r.stdout + r.stderr).strip()[-400:]
        except subprocess.TimeoutExpired:
            return cfg, -1, f"compile timed out after {timeout:.0f} s"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(one, configs))
    ok = [c for c, rc, _ in results if rc == 0]
    failed = [(c, msg) for c, rc, msg in results if rc != 0]
    print(f"precompiled {len(ok)}/{len(configs)} configs in {time.perf_counter() - t0:.0f} s "
          f"({workers} at a time)", flush=True)
    for c, msg in failed:
        print(f"  dropped {config_name(c)}: {msg}", flush=True)
    return ok, failed


def parse_configs(text: str) -> list:
    """'block_n,warps,splits,stages,heads,evict,heads_first[,tma];...' -> [pa._Config, ...]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        f = [x.strip() for x in item.split(",")]
        out.append(pa._Config(int(f[0]), int(f[1]), int(f[2]), None if f[3] == "None" else int(f[3]),
                              int(f[4]), bool(int(f[5])), bool(int(f[6])), len(f) > 7 and bool(int(f[7]))))
    return out


def config_name(c) -> str:
    return (f"BLOCK_N={c.block_n}, warps={c.num_warps}, splits={c.splits}, stages={c.num_stages}, "
            f"G={c.heads}, evict={int(c.evict)}, order={'heads' if c.heads_first else 'rows'}"
            + (", TMA" if c.tma else ""))


def attention_rows(contexts, configs=None, S=64, H=32, d=128, B=16, dtype=torch.bfloat16, device="cuda",
                   reps=(5, 50), b2b=10, budget_s=None, save=None):
    """SDPA on a contiguous cache vs paged_attention_triton's kernel per config and context.

    ``configs`` None: only the library's choice (``_config``) per context; otherwise every
    config (plus the library's). ``ms``: median of single calls (CUDA events, as
    ``time_ms``: the host's launch time counts when the GPU is idle); ``ms_graph``: single
    replays of the call captured in a CUDA graph (as an engine runs its decode step: the
    host's launch work gone, the launch latency kept); ``ms_b2b``: ``b2b`` calls back to back
    per timing / b2b (launch overhead hidden, the device time); ``host_us``: the host's time
    per eager call (``host_us()``). The best config per context is the fastest in ``ms_graph``
    (on a GPU).
    ``budget_s``: past it, the remaining configs are timed with fewer reps and no b2b.
    """
    rows = []
    t_start = time.perf_counter()
    meta = dict(part="attention", batch=S, heads=H, head_dim=d, block_size=B, dtype=str(dtype)[6:])
    for n in contexts:
        nb = S * (n // B)
        g = torch.Generator(device=device).manual_seed(n)
        tables = torch.randperm(nb, device=device, generator=g).view(S, n // B).int()
        kc = torch.randn(nb, B, H, d, device=device, dtype=dtype, generator=g)
        vc = torch.randn(nb, B, H, d, device=device, dtype=dtype, generator=g)
        q = torch.randn(S, H, d, device=device, dtype=dtype, generator=g)
        lens = torch.full((S,), n, dtype=torch.int32, device=device)
        k = kc[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()   # (S, H, n, d)
        v = vc[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v)  # noqa: E731
        expected = sdpa()[:, :, 0].float()
        nbytes = 2 * S * n * H * d * kc.element_size()

        def timed(fn, fast=False):
            rep = reps[1] if not fast else max(3, reps[1] // 5)
            ms = time_ms(fn, warmup=reps[0], rep=rep)
            ms_graph = time_ms(capture(fn).replay, warmup=reps[0], rep=rep) if device == "cuda" else None
            if not b2b or fast:
                return ms, None, ms_graph, None
            many = lambda: [fn() for _ in range(b2b)]  # noqa: E731
            return ms, time_ms(many, warmup=1, rep=max(2, reps[1] // 5)) / b2b, ms_graph, host_us(fn)

        if device == "cuda":    # the bandwidth roof: the same bytes read once by a kernel doing nothing else
            ms_roof = time_ms(capture(lambda: (read_all(kc), read_all(vc))).replay, warmup=reps[0], rep=reps[1])
            rows.append(dict(meta, context=n, impl="read roof (K and V read once)", ms_graph=ms_roof,
                             gbps_graph=gbps(nbytes, ms_roof)))
        ms_sdpa, b2b_sdpa, graph_sdpa, host_sdpa = timed(sdpa)
        rows.append(dict(meta, context=n, impl="sdpa contiguous", ms=ms_sdpa, ms_b2b=b2b_sdpa,
                         ms_graph=graph_sdpa, host_us=host_sdpa, gbps=gbps(nbytes, ms_sdpa),
                         gbps_graph=graph_sdpa and gbps(nbytes, graph_sdpa)))
        library = pa._config(n)
        todo = list(configs or []) + ([library] if library not in (configs or []) else [])
        per_ctx = []
        for cfg in todo:
            o = torch.empty_like(q)
            run = lambda: pa._launch(q, kc, vc, o, tables, lens, d ** -0.5, **cfg._asdict())  # noqa: E731
            try:  # a config that does not compile (registers, shared memory) is recorded, not fatal
                run()
                err = (o.float() - expected).abs().max().item()
                fast = budget_s is not None and time.perf_counter() - t_start > budget_s
                ms, ms_b2b, ms_graph, host = timed(run, fast)
            except Exception as e:  # noqa: BLE001
                print(f"context {n}: {config_name(cfg)} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append(dict(meta, context=n, impl=f"triton paged ({config_name(cfg)})",
                                 config=cfg._asdict(), error=f"{type(e).__name__}: {str(e)[:500]}"))
                continue
            groups = -(-H // min(cfg.heads, 1 << (H - 1).bit_length()))
            row = dict(meta, context=n, impl=f"triton paged ({config_name(cfg)})", config=cfg._asdict(),
                       library=cfg == library, programs=S * groups * cfg.splits,
                       ms=ms, ms_b2b=ms_b2b, ms_graph=ms_graph, host_us=host, max_abs_err=err,
                       gbps=gbps(nbytes, ms),
                       gbps_graph=ms_graph and gbps(nbytes, ms_graph),
                       speedup_vs_sdpa=ms_sdpa / ms,
                       speedup_vs_sdpa_b2b=None if ms_b2b is None else b2b_sdpa / ms_b2b,
                       speedup_vs_sdpa_graph=ms_graph and graph_sdpa / ms_graph)
            rows.append(row)
            per_ctx.append(row)
        right = [r for r in per_ctx if r["max_abs_err"] < 0.05]
        if not right:
            continue
        best = min(right, key=lambda r: r["ms_graph"] or r["ms"])
        lib = next((r for r in per_ctx if r["library"]), best)
        keep = ("ms", "ms_b2b", "ms_graph", "host_us", "config", "max_abs_err", "gbps", "gbps_graph",
                "speedup_vs_sdpa", "speedup_vs_sdpa_b2b", "speedup_vs_sdpa_graph")
        for name, r in (("best", best), ("library", lib)):
            rows.append(dict(meta, context=n, impl=f"triton paged ({name})", **{k: r[k] for k in keep}))
        wrong = [r["impl"] for r in per_ctx if not r["max_abs_err"] < 0.05]
        graph = (f"; graphed: roof {gbps(nbytes, ms_roof):.0f} GB/s, sdpa {graph_sdpa:.3f} ms, best {best['ms_graph']:.3f} ms = "
                 f"{best['speedup_vs_sdpa_graph']:.2f}x, library {lib['speedup_vs_sdpa_graph']:.2f}x"
                 if graph_sdpa else "")
        print(f"context {n:5d}: sdpa {ms_sdpa:.3f} ms ({gbps(nbytes, ms_sdpa):.0f} GB/s); best "
              f"{best['ms']:.3f} ms = {best['speedup_vs_sdpa']:.2f}x, {best['gbps']:.0f} GB/s "
              f"[{best['impl']}]; library {lib['speedup_vs_sdpa']:.2f}x{graph}; "
              f"{time.perf_counter() - t_start:.0f} s" + (f"; WRONG: {wrong}" if wrong else ""), flush=True)
        del k, v, kc, vc
        if device == "cuda":
            torch.cuda.empty_cache()
        if save:
            save(rows)  # kept if a later context runs out of time
    return rows


def print_sweep(rows):
    """A table of paged / SDPA per config (rows) and context (columns): CUDA-graph replays (on
    a GPU; the pick of _CONFIGS, best marked with *), eager single calls and back to back."""
    att = [r for r in rows if r.get("part") == "attention" and "programs" in r and r["max_abs_err"] < 0.05]
    contexts = sorted({r["context"] for r in att})
    names = list(dict.fromkeys(r["impl"] for r in att))
    cell = {(r["impl"], r["context"]): r for r in att}
    main = lambda r: r.get("speedup_vs_sdpa_graph") or r["speedup_vs_sdpa"]  # noqa: E731
    best = {n: max((r for r in att if r["context"] == n), key=main)["impl"] for n in contexts}
    print("\npaged / SDPA: graph replays | eager single calls | back to back (launch overhead "
          "hidden); * best per context")
    print(f"{'config':84s}" + "".join(f"{n:>20d}" for n in contexts) + f"{'geo-mean':>10s}")
    for name in names:
        cells, logs = [], []
        for n in contexts:
            r = cell.get((name, n))
            if r is None:
                cells.append(f"{'-':>20s}")
                continue
            star = "*" if best[n] == name else " "
            parts = [main(r), r["speedup_vs_sdpa"], r["speedup_vs_sdpa_b2b"]]
            cells.append(f"{parts[0]:6.2f}{star}" + "".join(f"{x:6.2f}" if x else "     -" for x in parts[1:]))
            logs.append(math.log(main(r)))
        geo = math.exp(sum(logs) / len(logs)) if logs else float("nan")
        lib = " [library]" if any(cell.get((name, n), {}).get("library") for n in contexts) else ""
        print(f"{(name[len('triton paged ('):-1] + lib):84s}" + "".join(cells) + f"{geo:10.3f}")
    print("\nbest per context (paste into _CONFIGS):")
    for n in contexts:
        r = cell[(best[n], n)]
        args = ", ".join(f"{k}={v!r}" for k, v in r["config"].items())
        print(f"    ({n}, _Config({args})),  # {main(r):.2f}x, {r.get('gbps_graph') or r['gbps']:.0f} GB/s")


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr):
    # each program sums BLOCK elements: every byte read once, one float written per 16 KB
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0, eviction_policy="evict_first")
    tl.store(Out + pid, tl.sum(x.to(tl.float32), axis=0))


def read_all(x, block: int = 8192):
    """Read every element of ``x`` once (partial sums per block): the bandwidth roof."""
    out = torch.empty(triton.cdiv(x.numel(), block), device=x.device, dtype=torch.float32)
    _read_kernel[(out.numel(),)](x, out, x.numel(), BLOCK=block, num_warps=8)
    return out


def host_us(fn, calls: int = 50) -> float:
    """The host's time per call in us: ``calls`` calls queued without waiting for the GPU
    (Python, argument binding, launches), then one sync."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t0
    sync()
    return t / calls * 1e6


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
    ap.add_argument("--out", default=None, help="directory of the JSON (default bench/results)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--sweep", action="store_true",
                    help="time every config of SWEEP at every context; writes paged_attention_sweep.json")
    ap.add_argument("--only-attention", action="store_true", help="skip the memory and serve parts")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="sweep: past this many seconds, fewer reps and no back-to-back timing")
    ap.add_argument("--configs", default=None,
                    help="sweep these instead of SWEEP: 'block_n,warps,splits,stages,heads,evict,heads_first;...' "
                         "(stages may be None; evict, heads_first 0/1), e.g. '16,2,8,4,4,1,1;8,2,16,4,8,1,1'")
    ap.add_argument("--contexts", default=None, help="comma-separated contexts (default 512,...,8192)")
    ap.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)  # precompile's subprocesses
    ap.add_argument("--workers", type=int, default=8, help="sweep: configs compiled at a time")
    args = ap.parse_args()
    if args.compile_only:
        sys.exit(compile_only(args.compile_only))
    if args.configs:
        args.sweep = True
    name = "paged_attention_sweep" if args.sweep else "paged_attention"
    note = ("decode attention batch 64, 32 heads, d=128, bf16, blocks of 16; serve on a random "
            "OPT-125m-sized model, bf16, the Triton kernel, at most 64 running")
    rows = [] if args.only_attention else memory_rows()
    save = lambda rows: write_results(name, rows, out_dir=args.out, note=note)  # noqa: E731
    path = save(rows)
    configs = (parse_configs(args.configs) if args.configs else SWEEP) if args.sweep else None
    if torch.cuda.is_available():
        contexts = [1024, 8192] if args.quick else [512, 1024, 2048, 4096, 8192]
        if args.contexts:
            contexts = [int(n) for n in args.contexts.split(",")]
        if configs:
            library = list(dict.fromkeys(pa._config(n) for n in contexts))
            ok, failed = precompile(list(dict.fromkeys(configs + library)), workers=args.workers)
            rows += [dict(part="attention_dropped", impl=f"triton paged ({config_name(c)})",
                          config=c._asdict(), error=msg) for c, msg in failed]
            configs = [c for c in configs if c in ok]
        rows += attention_rows(contexts, configs, budget_s=args.budget_s if args.sweep else None,
                               save=lambda r: save(rows + r))
        path = save(rows)
        if args.sweep:
            print_sweep(rows)
        if not args.only_attention:
            rows += serve_rows("cuda", torch.bfloat16, 64 if args.quick else args.requests, 64, args.quick)
            path = save(rows)
    elif args.quick:  # the attention part at toy sizes through the Triton interpreter
        rows += attention_rows([32, 64], configs and configs[::10], S=2, H=4, d=16, B=4,
                               dtype=torch.float32, device="cpu", reps=(0, 1), b2b=2)
        path = save(rows)
        if args.sweep:
            print_sweep(rows)
    else:
        print("no GPU: only the memory part runs (--quick: the attention part at toy sizes)")
    print("wrote", path)


if __name__ == "__main__":
    main()
