"""Hidden-check cases of lab03_serving (run in the student's kernel; no answers here).

Fresh inputs per seed: cost models in both regimes (memory- and compute-bound), ragged
batches, request queues with prompts much longer than the token budget, staggered arrivals,
and small random OPT models for the real engine. The composer checks drive the student's
composer step by step with a small public driver and record every pass it composed; the
trusted side replays the recorded passes against the inputs it draws itself.
"""
from __future__ import annotations

from collections import namedtuple

import torch

from llmopt.gpt import GPT, GPTConfig

from .lab02_paged_attention import record_passes  # the same pass spy as lab02's serve

Cost = namedtuple("Cost", "weights_ms token_ms pair_ms kv_ms")
Req = namedtuple("Req", "id prompt_len max_new_tokens arrival_time")
MAX_STEPS = 400
ENGINE_VOCAB = 61


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(g, lo, hi) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def _uniform(g, lo, hi) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


def _cost(g) -> Cost:
    return Cost(weights_ms=_uniform(g, 5, 60), token_ms=_uniform(g, 0.05, 0.4),
                pair_ms=_uniform(g, 1e-5, 1e-4), kv_ms=_uniform(g, 5e-4, 3e-3))


# --- pass_time(cost, batch) -> (linear_ms, attention_ms) ------------------------------------

def inputs_pass_time(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for kind in ("decode", "prefill", "mixed", "mixed", "chunk"):
        cost = _cost(g)
        batch = []
        if kind in ("decode", "mixed"):
            batch += [(i, _randint(g, 1, 900), 1) for i in range(_randint(g, 1, 9))]
        if kind in ("prefill", "mixed"):
            batch += [(100 + i, 0, _randint(g, 50, 900)) for i in range(_randint(g, 1, 3))]
        if kind == "chunk":   # later chunks of prompts: they attend to the cached part too
            batch += [(200 + i, _randint(g, 64, 700), _randint(g, 16, 300)) for i in range(3)]
        cases.append(dict(cost=tuple(cost), batch=batch))
    return cases


def run_pass_time(fn, case: dict) -> dict:
    linear, attn = fn(Cost(*case["cost"]), [tuple(e) for e in case["batch"]])
    return {"linear_ms": float(linear), "attention_ms": float(attn)}


# --- the composers: splitfuse_batch / continuous_batch(decoding, prefilling, budget) --------

def _queue(g, n, budget, long_prompts: bool):
    reqs = []
    for i in range(n):
        long = long_prompts and _randint(g, 0, 2) == 0
        P = _randint(g, budget + 1, 4 * budget) if long else _randint(g, 1, max(2, budget // 2))
        reqs.append((i, P, _randint(g, 1, 12), _randint(g, 0, 3 * n)))   # arrival: a step number
    return reqs


def inputs_composer(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for n, budget, long in ((6, 16, True), (10, 32, True), (8, 24, False), (12, 20, True)):
        reqs = _queue(g, n, budget, long)
        if long and all(p <= budget for _, p, _, _ in reqs):
            i, _, t, a = reqs[0]
            reqs[0] = (i, 3 * budget + 1, t, a)      # at least one prompt longer than the budget
        cases.append(dict(requests=reqs, token_budget=budget))
    return cases


def drive(fn, requests, budget, max_steps=MAX_STEPS):
    """Run ``fn`` as the composer until every request has finished (or ``max_steps``).

    A request arrives at its step; arrived requests are admitted in (arrival, id) order; an
    entry (rid, start, n) of a prefilling request caches n prompt tokens, of a decoding one
    produces a token. Returns the entries of every pass: rows (step, rid, start, n)."""
    req = {r[0]: r for r in requests}
    order = sorted(requests, key=lambda r: (r[3], r[0]))
    active, done, gen, rows = [], {r[0]: 0 for r in requests}, {r[0]: 0 for r in requests}, []
    for step in range(max_steps):
        while order and order[0][3] <= step:
            active.append(order.pop(0)[0])
        if not active and not order:
            break
        dec = [(i, req[i][1] + gen[i] - 1) for i in active if done[i] >= req[i][1]]
        pre = [(i, req[i][1], done[i]) for i in active if done[i] < req[i][1]]
        if not dec and not pre:
            continue
        batch = fn(list(dec), list(pre), budget)
        for e in batch:
            rid, start, n = (int(x) for x in e)
            rows.append((step, rid, start, n))
            if rid not in active:
                continue
            if done[rid] < req[rid][1]:
                done[rid] += max(n, 0)
                if done[rid] < req[rid][1]:
                    continue
            gen[rid] += 1
            if gen[rid] >= req[rid][2]:
                active.remove(rid)
    return rows


def _run_composer(fn, case: dict) -> dict:
    rows = drive(fn, [tuple(r) for r in case["requests"]], case["token_budget"])
    return {"entries": torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)}


inputs_splitfuse_batch = inputs_composer
run_splitfuse_batch = _run_composer


def inputs_continuous_batch(seed: int) -> list[dict]:
    return inputs_composer(seed + 7919)


run_continuous_batch = _run_composer


# --- simulate(requests, policy, token_budget, cost_model) -> metrics -------------------------

METRICS = ("throughput_tokens_per_s", "ttft_p50", "ttft_p95", "latency_p50", "latency_p95")


def inputs_simulate(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for policy, budget, n in (("splitfuse", 256, 14), ("continuous", 256, 14), ("static", 512, 10),
                              ("splitfuse", 128, 10)):
        t, reqs = 0.0, []
        for i in range(n):
            t += _uniform(g, 0.0, 0.4)
            reqs.append((i, _randint(g, 16, 700), _randint(g, 2, 40), t if i else 0.0))
        if policy == "static":    # a burst: the next batch waits for the whole previous one
            reqs = [(i, p, m, 0.05 * i) for i, p, m, _ in reqs]
        cases.append(dict(requests=reqs, policy=policy, token_budget=budget, cost=tuple(_cost(g))))
    return cases


def run_simulate(fn, case: dict) -> dict:
    reqs = [Req(*r) for r in case["requests"]]
    out = fn(reqs, case["policy"], case["token_budget"], Cost(*case["cost"]))
    rec = {k: float(out[k]) for k in METRICS}
    rec.update({k: torch.as_tensor([float(x) for x in out[k]], dtype=torch.float64) for k in ("ttft", "latency")})
    return rec


# --- run_engine(model, prompts, max_new_tokens, policy, token_budget, block_size) ------------

def engine_model(case: dict) -> GPT:
    torch.manual_seed(case["model_seed"])
    return GPT(GPTConfig(vocab_size=ENGINE_VOCAB, max_position_embeddings=96, n_layer=2, n_head=2,
                         d_model=32, d_ff=64)).eval()


def inputs_run_engine(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for policy, budget, bs in (("splitfuse", 12, 4), ("continuous", 24, 8), ("static", 40, 4),
                               ("splitfuse", 20, 8)):
        n = 5
        first = torch.randperm(ENGINE_VOCAB - 3, generator=g)[:n] + 3        # distinct first tokens
        lens = [_randint(g, 2, 8) for _ in range(n)]
        lens[_randint(g, 0, n)] = _randint(g, budget + 3, min(2 * budget + 4, 60))  # one long prompt
        prompts = [torch.cat([first[i:i + 1], torch.randint(3, ENGINE_VOCAB, (lens[i] - 1,), generator=g)])
                   for i in range(n)]
        cases.append(dict(model_seed=seed + len(cases) + 1, prompts=prompts, policy=policy,
                          max_new_tokens=[_randint(g, 1, 10) for _ in range(n)], token_budget=budget,
                          block_size=bs))
    return cases


def run_run_engine(fn, case: dict) -> dict:
    model = engine_model(case)
    return record_passes(model, lambda: fn(
        model, [p.clone() for p in case["prompts"]], list(case["max_new_tokens"]),
        policy=case["policy"], token_budget=case["token_budget"], block_size=case["block_size"]))
