"""Serving schedulers: static batching, continuous batching and Dynamic SplitFuse.

Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative Models"
(OSDI 2022, iteration-level scheduling); Kwon et al., "Efficient Memory Management for Large
Language Model Serving with PagedAttention" (SOSP 2023, vLLM: continuous batching, prefill
first); Holmes et al., "DeepSpeed-FastGen: High-throughput Text Generation for LLMs via MII
and DeepSpeed-Inference" (2024, Dynamic SplitFuse) and Agrawal et al., "SARATHI: Efficient
LLM Inference by Piggybacking Decodes with Chunked Prefills" (2023, the table below). The
lecture's section «DeepSpeed: FastGen» (lab03_serving).

A forward pass costs the time to read the weights once (memory-bound, nearly constant for
a few tokens) or to multiply them with N tokens (compute-bound, ∝ N), whichever is larger,
plus attention. The lecture's table (SARATHI, LLaMA-13B on an A6000, sequences of 1024):

    batching scheme   Linear  Attn   Total   per-token prefill   per-token decode
    prefill-only      224.8   10     234.8   0.229               -
    decode-only        44.28   5.68   49.96  -                   12.49
    decode-maximal    223.2   15.2   238.4   0.229               1.2

A decode token alone costs 12.49 ms; fused into a pass that is compute-bound anyway, 1.2 ms.
Dynamic SplitFuse therefore composes every forward pass from (1) ALL running decodes, then
(2) chunks of waiting prompts, first come first served, split so that the pass holds exactly
``token_budget`` tokens. Continuous batching (vLLM) runs whole prompts in prefill-only
passes first and decode-only passes otherwise; static batching admits a new batch only when
the previous one has finished.

- ``Request(id, prompt_len, max_new_tokens, arrival_time)``.
- A forward pass (a *batch*) is a list of ``(rid, start, n)``: request ``rid`` feeds n tokens
  at positions start..start+n-1 (start = the tokens it has in the KV cache): a prompt chunk,
  or one decode token (n = 1).
- ``splitfuse_batch``, ``continuous_batch``: the composers (queue + budget -> the next pass);
  ``Scheduler``: request states and the policy, shared by the simulator and the engine.
- ``CostModel``, ``pass_time``: the roofline cost of a pass, ``fit_cost_model`` to rows like
  the lecture's table, ``lecture_cost_model()``, ``measure_cost_model(model)`` (this machine).
- ``simulate(requests, policy, token_budget, cost_model)``: a discrete-event simulation; the
  metrics throughput (tokens/s), TTFT (time to first token) and latency percentiles.
- ``effective_throughput``: FastGen's metric, requests per second that meet an SLA on the time
  to first token and on the pace of generation.
- ``run_engine``: the same scheduler driving the real paged engine
  (``llmopt.paged_attention.paged_forward``); greedy outputs equal ``generate`` per prompt.
  ``EnginePasses``: the engine's passes at fixed shapes, replayed as CUDA graphs (prompt
  chunks through ``llmopt.chunked_prefill``) -- what a fixed token budget makes cheap.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .cuda_graph import capture
from .paged_attention import PagedKVCache, forward_tokens, paged_forward

POLICIES = ("static", "continuous", "splitfuse")


@dataclasses.dataclass(frozen=True)
class Request:
    id: int
    prompt_len: int
    max_new_tokens: int
    arrival_time: float = 0.0   # seconds


# --------------------------------------------------------------------------------------
# The cost of a forward pass: a roofline for the linear layers and for attention
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CostModel:
    """Milliseconds of one forward pass.

    linear    = max(weights_ms, token_ms · N)                  N = tokens in the pass
    attention = Σ_chunks max(pair_ms · n (start + (n+1)/2),   the chunk's (query, key) pairs
                             kv_ms · (start + n))               its keys and values read once
    """
    weights_ms: float   # read every weight once: the floor of a memory-bound pass
    token_ms: float     # 2·P FLOPs per token: the slope of a compute-bound pass
    pair_ms: float      # attention arithmetic per (query, key) pair
    kv_ms: float        # attention memory traffic per cached token read


def pass_time(cost: CostModel, batch) -> tuple[float, float]:
    """(linear_ms, attention_ms) of one forward pass over ``batch`` = [(rid, start, n), ...]."""
    N = sum(n for _, _, n in batch)
    linear = max(cost.weights_ms, cost.token_ms * N) if N else 0.0
    attn = sum(max(cost.pair_ms * n * (start + (n + 1) / 2), cost.kv_ms * (start + n))
               for _, start, n in batch)
    return linear, attn


# the lecture's table as batches: prompts of 1024 tokens; decodes at context 1024
LECTURE_TABLE = [
    dict(name="prefill-only", batch=[(0, 0, 1024)], linear_ms=224.8, attn_ms=10.0,
         prefill_tokens=1024, decode_tokens=0, per_token_prefill=0.229, per_token_decode=None),
    dict(name="decode-only", batch=[(i, 1023, 1) for i in range(4)], linear_ms=44.28, attn_ms=5.68,
         prefill_tokens=0, decode_tokens=4, per_token_prefill=None, per_token_decode=12.49),
    dict(name="decode-maximal", batch=[(0, 0, 1020)] + [(i, 1023, 1) for i in range(1, 5)],
         linear_ms=223.2, attn_ms=15.2, prefill_tokens=1020, decode_tokens=4,
         per_token_prefill=0.229, per_token_decode=1.2),
]


def fit_cost_model(rows) -> CostModel:
    """Fit ``CostModel`` to rows ``{batch, linear_ms, attn_ms}`` (like ``LECTURE_TABLE``).

    weights_ms: the smallest linear time (the smallest pass is memory-bound); token_ms: least
    squares of linear ≈ token_ms · N over the compute-bound rows; kv_ms: decode-only rows'
    attention per key read; pair_ms: least squares over rows with prompt chunks of what is
    left of their attention after the decodes.
    """
    N = [sum(n for _, _, n in r["batch"]) for r in rows]
    lin = [r["linear_ms"] for r in rows]
    weights = min(lin)
    big = [(n, t) for n, t in zip(N, lin) if t > 2 * weights] or list(zip(N, lin))
    token = sum(n * t for n, t in big) / sum(n * n for n, _ in big)
    dec = [r for r in rows if all(n == 1 for _, _, n in r["batch"])]
    kv = sum(r["attn_ms"] for r in dec) / sum(s + 1 for r in dec for _, s, _ in r["batch"])
    xs, ys = [], []
    for r in rows:
        if any(n > 1 for _, _, n in r["batch"]):
            xs.append(sum(n * (s + (n + 1) / 2) for _, s, n in r["batch"] if n > 1))
            ys.append(r["attn_ms"] - kv * sum(s + 1 for _, s, n in r["batch"] if n == 1))
    pair = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return CostModel(weights_ms=weights, token_ms=token, pair_ms=pair, kv_ms=kv)


def lecture_cost_model() -> CostModel:
    """The cost model fitted to the lecture's table (LLaMA-13B, A6000)."""
    return fit_cost_model(LECTURE_TABLE)


def table_from_cost_model(cost: CostModel, rows=LECTURE_TABLE) -> list[dict]:
    """The lecture's table recomputed from ``cost``: linear, attention, total and per-token
    times (per-token decode in a mixed pass = what the decodes add to the prefill's cost)."""
    out = []
    per_prefill = None
    for r in rows:
        lin, attn = pass_time(cost, r["batch"])
        total = lin + attn
        row = dict(name=r["name"], linear_ms=lin, attn_ms=attn, total_ms=total,
                   per_token_prefill=None, per_token_decode=None)
        if r["prefill_tokens"] and not r["decode_tokens"]:
            per_prefill = row["per_token_prefill"] = total / r["prefill_tokens"]
        elif r["decode_tokens"] and not r["prefill_tokens"]:
            row["per_token_decode"] = total / r["decode_tokens"]
        else:
            row["per_token_prefill"] = per_prefill
            row["per_token_decode"] = (total - per_prefill * r["prefill_tokens"]) / r["decode_tokens"]
        out.append(row)
    return out


@torch.no_grad()
def measure_cost_model(model, prompt_len: int = 256, n_decode: int = 4, rep: int = 3,
                       attention=None) -> tuple[CostModel, list[dict]]:
    """Time the lecture's three batching schemes (scaled to ``prompt_len``) on ``model`` with
    the paged engine, split into linear and attention time (a second run with attention
    replaced by the identity), and fit ``CostModel``. Returns (cost, rows)."""
    from .bench import time_ms
    p = next(model.parameters())
    cfg = model.config
    C = prompt_len
    schemes = [("prefill-only", [C], []), ("decode-only", [], [C - 1] * n_decode),
               ("decode-maximal", [C - n_decode], [C - 1] * n_decode)]
    rows = []
    for name, prompts, decodes in schemes:
        def one(attn_fn, prompts=prompts, decodes=decodes):
            nb = sum(-(-(x + 1) // 16) for x in prompts) + len(decodes) * (-(-(C + 1) // 16))
            cache = PagedKVCache.for_model(cfg, nb + 1, 16, dtype=p.dtype, device=p.device)
            ids, chunks, batch = [], [], []
            for i, c in enumerate(decodes):   # decodes need c tokens already cached
                cache.add_sequence(("d", i))
                cache.advance(("d", i), c)
                for j in range(-(-(c + 1) // 16)):
                    cache.tables[("d", i)].append(cache.allocator.allocate())
            for i, n in enumerate(prompts):
                cache.add_sequence(("p", i))
                ids.append(("p", i))
                chunks.append(torch.randint(3, cfg.vocab_size, (n,)))
                batch.append((i, 0, n))
            for i, c in enumerate(decodes):
                ids.append(("d", i))
                chunks.append(torch.randint(3, cfg.vocab_size, (1,)))
                batch.append((100 + i, c, 1))
            saved = dict(cache.lens)

            def fn():
                cache.lens.update(saved)                      # the same pass again
                return paged_forward(model, cache, ids, chunks, attn_fn)
            return fn, batch
        fn, batch = one(attention)
        total = time_ms(fn, warmup=1, rep=rep)
        fn_lin, _ = one(lambda q, k, v, t, c: q)
        linear = time_ms(fn_lin, warmup=1, rep=rep)
        rows.append(dict(name=name, batch=batch, linear_ms=linear, attn_ms=max(total - linear, 1e-6),
                         prefill_tokens=sum(prompts), decode_tokens=len(decodes)))
    return fit_cost_model(rows), rows


# --------------------------------------------------------------------------------------
# The composers: queue + budget -> the next forward pass
# --------------------------------------------------------------------------------------

def splitfuse_batch(decoding, prefilling, token_budget: int):
    """Dynamic SplitFuse: the next forward pass of at most ``token_budget`` tokens.

    ``decoding``: [(rid, context_len)] of requests whose next step is one decode token;
    ``prefilling``: [(rid, prompt_len, done)] of admitted prompts, first come first served
    (``done`` tokens already cached). Returns [(rid, start, n)]: every decode first (one
    token at its context length), then prompt chunks in queue order, the last one split so
    that the pass holds exactly the budget (or everything there is).
    """
    batch = [(rid, ctx, 1) for rid, ctx in decoding[:token_budget]]   # decodes never wait
    room = token_budget - len(batch)
    for rid, prompt_len, done in prefilling:                          # FCFS: no starvation
        if room <= 0:
            break
        n = min(room, prompt_len - done)                              # split the long prompt
        if n > 0:
            batch.append((rid, done, n))                              # its next chunk, in order
            room -= n
    return batch


def continuous_batch(decoding, prefilling, token_budget: int):
    """vLLM's continuous batching, prefill first: whole waiting prompts (FCFS, while they
    fit in ``token_budget``; a first prompt longer than the budget runs alone) in a
    prefill-only pass; when no prompt waits, one decode-only pass over the running requests."""
    batch, room = [], token_budget
    for rid, prompt_len, done in prefilling:
        n = prompt_len - done
        if n <= 0:
            continue
        if n > room and batch:
            break
        batch.append((rid, done, n))
        room -= n
    if batch:
        return batch
    return [(rid, ctx, 1) for rid, ctx in decoding[:token_budget]]


class Scheduler:
    """Request states for one policy: arrived -> prefilling -> decoding -> finished.

    ``admit(now)`` lets arrived requests in (static: only when the previous batch has
    finished, then every request that has arrived); ``next_batch()`` composes the next
    pass; ``complete(batch, now)`` advances the requests it fed and returns the rids that
    produced a token (a finished prompt or a decode).
    """

    def __init__(self, requests, policy: str, token_budget: int, composers=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.budget = policy, token_budget
        self.req = {r.id: r for r in requests}
        self.pending = sorted(requests, key=lambda r: (r.arrival_time, r.id))
        self.active: list = []                      # admitted, unfinished, in admission order
        self.done = {r.id: 0 for r in requests}     # prompt tokens cached
        self.generated = {r.id: 0 for r in requests}
        self.first_token, self.finish = {}, {}
        composers = composers or {}
        self.compose = composers.get(policy) or (splitfuse_batch if policy == "splitfuse" else continuous_batch)

    def finished(self) -> bool:
        return not self.pending and not self.active

    def next_arrival(self):
        return self.pending[0].arrival_time if self.pending else None

    def admit(self, now: float, can_admit=lambda r: True) -> None:
        if self.policy == "static":
            if self.active:                           # the batch runs until its last request ends
                return
        while self.pending and self.pending[0].arrival_time <= now and can_admit(self.pending[0]):
            self.active.append(self.pending.pop(0).id)

    def queues(self):
        dec = [(i, self.req[i].prompt_len + self.generated[i] - 1) for i in self.active
               if self.done[i] == self.req[i].prompt_len]
        pre = [(i, self.req[i].prompt_len, self.done[i]) for i in self.active
               if self.done[i] < self.req[i].prompt_len]
        return dec, pre

    def next_batch(self):
        dec, pre = self.queues()
        if not dec and not pre:
            return []
        return [tuple(int(x) for x in e) for e in self.compose(dec, pre, self.budget)]

    def complete(self, batch, now: float) -> list:
        produced = []
        for rid, start, n in batch:
            r = self.req[rid]
            if self.done[rid] < r.prompt_len:
                self.done[rid] += n
                if self.done[rid] < r.prompt_len:
                    continue
                self.first_token[rid] = now
            produced.append(rid)
            self.generated[rid] += 1
            if self.generated[rid] >= r.max_new_tokens:
                self.finish[rid] = now
                self.active.remove(rid)
        return produced


# --------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------

def _percentile(xs, q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def metrics(requests, first_token, finish) -> dict:
    """Throughput (generated tokens per second from the first arrival to the last finish),
    the p50/p95 of TTFT and latency (seconds, from each request's arrival), and ``ttft``,
    ``latency``: the lists per request, in the order given."""
    t0 = min(r.arrival_time for r in requests)
    t1 = max(finish[r.id] for r in requests)
    ttft = [first_token[r.id] - r.arrival_time for r in requests]
    lat = [finish[r.id] - r.arrival_time for r in requests]
    return dict(throughput_tokens_per_s=sum(r.max_new_tokens for r in requests) / max(t1 - t0, 1e-12),
                ttft_p50=_percentile(ttft, 50), ttft_p95=_percentile(ttft, 95),
                latency_p50=_percentile(lat, 50), latency_p95=_percentile(lat, 95),
                ttft=ttft, latency=lat)


def effective_throughput(requests, first_token, finish, prompt_rate: float, gen_rate: float,
                         token_times=None, ema: float = 0.1) -> dict:
    """DeepSpeed-FastGen's effective throughput: requests per second that meet the service
    level agreement (SLA), over the run (first arrival to last finish).

    A request meets it when its prompt latency (time to first token, from its arrival) is at
    most prompt_len / ``prompt_rate`` (prompt tokens per second) and it generates at least
    ``gen_rate`` tokens per second (FastGen: 512 prompt tokens/s; 2, 4 or 6 generated tokens/s,
    a reader's pace). With ``token_times`` (per request, when each new token came out) the
    generation rate is FastGen's: an exponential moving average of the gaps between tokens,
    g <- ema * gap + (1 - ema) * g, must stay at most 1 / gen_rate after every token, so a
    stall counts even when the average rate is fine; without, the average rate (tokens after
    the first over the time they took). Returns ``effective_rps``, ``met`` and ``fraction``."""
    t0 = min(r.arrival_time for r in requests)
    t1 = max(finish[r.id] for r in requests)
    met = 0
    for r in requests:
        ttft = first_token[r.id] - r.arrival_time
        if token_times is not None:
            times, g, gen_ok = token_times[r.id], None, True
            for a, b in zip(times, times[1:]):
                g = (b - a) if g is None else ema * (b - a) + (1 - ema) * g
                gen_ok &= g <= 1 / gen_rate
        else:
            gen_time = finish[r.id] - first_token[r.id]
            gen_ok = r.max_new_tokens <= 1 or (r.max_new_tokens - 1) / max(gen_time, 1e-12) >= gen_rate
        met += int(ttft <= r.prompt_len / prompt_rate and gen_ok)
    return dict(effective_rps=met / max(t1 - t0, 1e-12), met=met, fraction=met / len(requests))


def simulate(requests, policy: str, token_budget: int, cost_model: CostModel | None = None,
             return_schedule: bool = False) -> dict:
    """Serve ``requests`` under ``policy`` on a clock driven by ``cost_model`` (None: the
    lecture's). Each step: admit arrivals, compose one pass, advance the clock by its cost;
    a request's first token comes with the pass that finishes its prompt. Returns
    ``metrics(...)``: the five numbers and the per-request lists (plus ``schedule``: [(start_s, end_s, batch)] if asked)."""
    cost = cost_model or lecture_cost_model()
    sched = Scheduler(requests, policy, token_budget)
    now, schedule = 0.0, []
    while not sched.finished():
        sched.admit(now)
        batch = sched.next_batch()
        if not batch:
            now = max(now, sched.next_arrival())     # idle until the next request arrives
            continue
        dt = sum(pass_time(cost, batch)) / 1e3
        schedule.append((now, now + dt, batch))
        now += dt
        sched.complete(batch, now)
    out = metrics(requests, sched.first_token, sched.finish)
    if return_schedule:
        out["schedule"] = schedule
    return out


def poisson_workload(n: int, rate: float, prompt_lens=(64, 1024), new_tokens=(16, 256),
                     seed: int = 0) -> list[Request]:
    """n requests arriving as a Poisson process of ``rate`` per second; prompt and answer
    lengths uniform in the given ranges (inclusive)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(generator=g) / rate
    arrivals = torch.cumsum(gaps, 0) - gaps[0]
    P = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n,), generator=g)
    T = torch.randint(new_tokens[0], new_tokens[1] + 1, (n,), generator=g)
    return [Request(i, int(P[i]), int(T[i]), float(arrivals[i])) for i in range(n)]


# --------------------------------------------------------------------------------------
# The real engine
# --------------------------------------------------------------------------------------

class EnginePasses:
    """The engine's forward passes at fixed shapes over the paged cache, replayed as CUDA graphs.

    A pass holds N token slots (prompt chunks and decode tokens, sequence after sequence) and
    S sequence slots. Rounded up to powers of two, (N, S) is one of a few **buckets**; one
    graph per bucket captures the whole forward (embeddings, every layer's projections, the
    cache write at device-side slots, attention through device-side block tables, the head
    and the argmax) and replays it: one launch instead of hundreds of kernel launches and
    Python steps. Slots beyond the real pass are padding: their tokens write into a scratch
    block and no query attends to them; padding sequences own no tokens.

    Two kinds of pass: decode-only (N = S, one token per sequence: the split-KV decode
    kernel, ``attention``) and mixed (prompt chunks too: ``llmopt.chunked_prefill``'s
    tile kernel, ``chunked``). ``mode="decode"`` replays graphs for decode-only passes and
    runs the others eagerly at their exact size (vLLM's choice: prefill passes vary in
    size); ``mode="all"`` replays a graph for every pass -- cheap when every pass has the
    same size, as Dynamic SplitFuse's token budget makes them. Without CUDA
    (``use_graph=False``) every pass runs the same fixed-shape step eagerly: the CPU path.
    """

    def __init__(self, model, cache: PagedKVCache, max_blocks: int, scratch_block: int,
                 mode: str = "decode", attention=None, chunked=None, use_graph: bool = True):
        from .chunked_prefill import chunked_attention, chunked_attention_triton
        from .paged_attention import paged_attention
        if mode not in ("decode", "all"):
            raise ValueError(f"mode must be 'decode' or 'all', got {mode!r}")
        self.model, self.cache, self.M, self.scratch, self.mode = model, cache, max_blocks, scratch_block, mode
        self.attention = attention or paged_attention
        self.chunked = chunked or (chunked_attention_triton if cache.k.is_cuda else chunked_attention)
        self.use_graph = use_graph and cache.k.is_cuda
        self.graphs: dict = {}
        self._rows: dict = {}                       # seq_id -> (its row of table_host, its table)
        self.table_host = torch.full((64, max_blocks), scratch_block, dtype=torch.long)

    @classmethod
    def build(cls, model, num_blocks: int, block_size: int = 16, max_blocks: int | None = None,
              mode: str = "decode", max_seqs: int = 0, max_tokens: int = 0, attention=None,
              chunked=None, use_graph: bool = True):
        """A cache of ``num_blocks`` (+ the scratch block) for ``run_engine(graphed=...)``, with
        the graphs of every bucket up to ``max_seqs`` sequences (and, in mode "all", passes of up
        to ``max_tokens`` tokens) captured now, not while timing."""
        p = next(model.parameters())
        cache = PagedKVCache.for_model(model.config, num_blocks + 1, block_size, dtype=p.dtype, device=p.device)
        M = max_blocks or -(-model.config.max_position_embeddings // block_size)
        self = cls(model, cache, M, cache.allocator.allocate(), mode, attention, chunked, use_graph)
        if self.use_graph:
            for S in _powers(max_seqs):
                self._graph(S, S, "decode")
            if mode == "all":
                for N in _powers(max_tokens):
                    for S in _powers(min(N, max_seqs or N)):
                        self._graph(N, S, "mixed")
        return self

    def _buffers(self, N, S, pinned=False):
        """One int64 staging tensor per shape, on the host and on the device, holding every
        input of a pass (one copy per pass), and views of it by name:
        ids, pos, slots (N,) | ctx, last (S,) | cu (S + 1,) | tables (S, M)."""
        M, dev = self.M, self.cache.k.device
        size = 3 * N + 3 * S + 1 + S * M
        host = torch.empty(size, dtype=torch.long, pin_memory=pinned and dev.type == "cuda")
        stage = torch.zeros(size, dtype=torch.long, device=dev)

        def views(t):
            tok = t[:3 * N].view(3, N)
            seq = t[3 * N:3 * N + 2 * S].view(2, S)
            return dict(tok=tok, ids=tok[0], pos=tok[1], slots=tok[2], seq=seq, ctx=seq[0], last=seq[1],
                        cu=t[3 * N + 2 * S:3 * N + 3 * S + 1], tables=t[3 * N + 3 * S + 1:].view(S, M))
        b = views(stage)
        b.update(host=views(host), host_flat=host, stage=stage, out=torch.zeros(S, dtype=torch.long, device=dev))
        self._fill(b["host"], 0, 0)
        stage.copy_(host)
        return b

    def _fill(self, h, n, s):
        """Padding past n tokens and s sequences: tokens write the scratch block, sequences own
        no tokens and read the scratch block."""
        h["tok"][:, n:] = 0
        h["slots"][n:] = self.scratch * self.cache.block_size
        h["ctx"][s:] = 1
        h["last"][s:] = 0
        h["cu"][s + 1:] = n
        h["tables"][s:] = self.scratch

    def _row(self, x, first_block: int) -> int:
        """Sequence x's row of ``table_host`` (its block table, M entries), updated from
        ``first_block`` on: the blocks this pass may have added or copied on write. A row
        belongs to one table object: a sequence added again under the same id gets a new one."""
        table = self.cache.tables[x]
        row, known = self._rows.get(x, (None, None))
        if known is not table:
            live = {r for y, (r, t) in self._rows.items() if y != x and self.cache.tables.get(y) is t}
            self._rows = {y: v for y, v in self._rows.items() if v[0] in live}   # forget freed ones
            free = [r for r in range(len(self.table_host)) if r not in live]
            if not free:
                free = [len(self.table_host)]
                self.table_host = torch.cat([self.table_host, torch.full_like(self.table_host, self.scratch)])
            row = free[0]
            self._rows[x] = (row, table)
            self.table_host[row] = self.scratch
            first_block = 0
        if len(table) > first_block:
            self.table_host[row, first_block:len(table)] = torch.tensor(table[first_block:])
        return row

    def _step(self, b, kind):
        cache = self.cache

        def attend(i, q):                                                           # q (N, H, d)
            if kind == "decode":                                                    # row s = sequence s
                return self.attention(q, cache.k[i], cache.v[i], b["tables"], b["ctx"])
            return self.chunked(q, cache.k[i], cache.v[i], b["tables"], b["ctx"], b["cu"])
        logits = forward_tokens(self.model, cache, b["ids"], b["pos"], b["slots"], attend,
                                None if kind == "decode" else b["last"])           # (S, V)
        b["out"].copy_(logits.argmax(-1))

    def _graph(self, N, S, kind):
        key = (N, S, kind)
        if key not in self.graphs:
            b = self._buffers(N, S, pinned=True)
            self.graphs[key] = (b, capture(lambda: self._step(b, kind)))
        return self.graphs[key]

    def __call__(self, seq_ids, chunks) -> list[int]:
        """One pass: ``chunks[s]`` (token ids, a list or 1-D tensor) are the new tokens of
        ``seq_ids[s]``; returns the greedy next token after each sequence's last new token."""
        cache, B = self.cache, self.cache.block_size
        chunks = [c.reshape(-1).tolist() if torch.is_tensor(c) else list(c) for c in chunks]
        counts = [len(c) for c in chunks]
        n, s = sum(counts), len(seq_ids)
        kind = "decode" if n == s else "mixed"
        graph = None
        if self.use_graph and (kind == "decode" or self.mode == "all"):
            N, S = (1 << (n - 1).bit_length()), (1 << (s - 1).bit_length())
            b, graph = self._graph(N if kind == "mixed" else S, S, kind)
        else:
            b = self._buffers(n, s)                    # eager, exact size
        lens = [cache.lens[x] for x in seq_ids]
        slots, rows, ref = [], [], cache.allocator.ref_count
        for x, l0, c in zip(seq_ids, lens, counts):
            table, (row, known) = cache.tables[x], self._rows.get(x, (None, None))
            if known is table and c == 1 and l0 % B and ref(table[l0 // B]) == 1:
                slots.append(table[l0 // B] * B + l0 % B)      # the common decode step: room in its last block
            else:
                slots += cache.reserve(x, c)                   # new blocks, copy on write
                row = self._row(x, l0 // B)
            rows.append(row)
        pos = [p for l0, c in zip(lens, counts) for p in range(l0, l0 + c)]
        cu = [0]
        for c in counts:
            cu.append(cu[-1] + c)
        h = b["host"]
        h["tok"][:, :n] = torch.tensor([[t for c in chunks for t in c], pos, slots])
        h["seq"][:, :s] = torch.tensor([[l0 + c for l0, c in zip(lens, counts)], cu[1:]]) - \
            torch.tensor([[0], [1]])                                               # ctx, last row
        h["cu"][:s + 1] = torch.tensor(cu)
        h["tables"][:s] = self.table_host[torch.tensor(rows)]
        self._fill(h, n, s)
        b["stage"].copy_(b["host_flat"], non_blocking=True)
        if graph is not None:
            graph.replay()
        else:
            self._step(b, kind)
        for x, c in zip(seq_ids, counts):
            cache.advance(x, c)
        return b["out"].tolist()[:s]


def _powers(n: int):
    """1, 2, 4, ... up to the first power of two >= n."""
    k = 1
    while k < 2 * n:
        yield k
        k *= 2


@torch.no_grad()
def run_engine(model, prompts, max_new_tokens, policy: str = "splitfuse", token_budget: int = 64,
               block_size: int = 16, num_blocks: int | None = None, attention=None,
               composers=None, step_hook=None, arrivals=None, stats: dict | None = None,
               graphed=False):
    """Greedy generation for ``prompts`` (all arrived at time 0) over a paged KV cache, one
    ``paged_forward`` per pass composed by ``policy``. Returns, per prompt, prompt + new
    tokens (1-D), exactly what greedy generation gives for that prompt alone.

    A prompt chunk writes its keys and values and discards the logits, except for its last
    chunk, whose logits give the first new token; a decode feeds the newest token. Requests
    are admitted while the blocks of their whole sequence (prompt + max_new_tokens) fit, so no
    pass ever runs out of blocks; a finished request frees its blocks at once.

    ``arrivals`` (seconds, per prompt) replays an online workload on the wall clock: a
    request joins once that much time has passed since the start. ``stats``, if given, gets
    ``first_token`` and ``finish`` (seconds since the start, per request), ``token_times``
    (per request, when each new token came out), ``requests`` and ``passes`` (for ``metrics``). ``graphed`` runs every pass through ``EnginePasses``
    (chunked-prefill attention for prompt chunks): ``"decode"`` (or True) replays CUDA graphs
    for decode-only passes, ``"all"`` for every pass (on a CPU the same fixed-shape steps run
    eagerly); pass an ``EnginePasses.build(...)`` to reuse its cache and captured graphs
    across runs. False: ``paged_forward``, the lab's engine.
    """
    model.eval()
    p = next(model.parameters())
    prompts = [torch.as_tensor(x, dtype=torch.long).reshape(-1).cpu() for x in prompts]
    n_new = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    need = [-(-(len(x) + n) // block_size) for x, n in zip(prompts, n_new)]
    if num_blocks is None:
        num_blocks = sum(need)
    engine = None
    if isinstance(graphed, EnginePasses):              # built (and captured) beforehand; reused
        engine, cache = graphed, graphed.cache
        num_blocks = cache.num_blocks - 1
        if cache.block_size != block_size or max(need + [1]) > engine.M or cache.tables:
            raise ValueError("the EnginePasses' cache has another block size, too narrow tables, "
                             "or sequences left in it")
    else:
        cache = PagedKVCache.for_model(model.config, max(num_blocks, 1) + int(bool(graphed)),
                                       block_size, dtype=p.dtype, device=p.device)
        if graphed:                                    # the padding slots' scratch block
            engine = EnginePasses(model, cache, max(need + [1]), cache.allocator.allocate(),
                                  "all" if graphed == "all" else "decode", attention)
    at = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    requests = [Request(i, len(x), n, float(at[i])) for i, (x, n) in enumerate(zip(prompts, n_new)) if n > 0]
    sched = Scheduler(requests, policy, token_budget, composers)
    tokens = [x.tolist() for x in prompts]
    token_times = {r.id: [] for r in requests}         # when each new token came out
    reserved = [0]

    def can_admit(r):
        if need[r.id] > num_blocks:
            raise RuntimeError(f"request {r.id} needs {need[r.id]} blocks, the cache has {num_blocks}")
        if reserved[0] + need[r.id] > num_blocks:
            return False
        reserved[0] += need[r.id]
        cache.add_sequence(r.id)
        return True

    t0, passes = time.perf_counter(), 0
    clock = (lambda: time.perf_counter() - t0) if arrivals is not None else (lambda: 0.0)
    while not sched.finished():
        sched.admit(clock(), can_admit)
        batch = sched.next_batch()
        if not batch:                                  # online: idle until the next arrival
            time.sleep(max(0.0, sched.next_arrival() - clock()))
            continue
        if step_hook is not None:
            step_hook(batch)
        ids = [rid for rid, _, _ in batch]
        chunks = [tokens[rid][start:start + n] for rid, start, n in batch]
        if engine is not None:
            nxt = dict(zip(ids, engine(ids, chunks)))
        else:
            chunks = [torch.tensor(c) for c in chunks]
            logits = paged_forward(model, cache, ids, chunks, attention)        # (S, V)
            nxt = dict(zip(ids, logits.argmax(-1).tolist()))                   # (syncs the device)
        passes += 1
        now = clock()
        for rid in sched.complete(batch, now):
            tokens[rid].append(nxt[rid])
            token_times[rid].append(now)
            if rid in sched.finish:
                cache.free(rid)
                reserved[0] -= need[rid]
    if stats is not None:
        stats.update(first_token=dict(sched.first_token), finish=dict(sched.finish),
                     requests=requests, passes=passes, token_times=token_times)
    return [torch.tensor(t, dtype=torch.long) for t in tokens]
