"""How the hidden checks of lab03_serving are judged (trusted side; never in the kernel).

The inputs are drawn again here from ``inputs_X(seed)``; nothing the kernel reports is
trusted beyond its own outputs. The composer checks replay the recorded passes against a
trusted model of the request states (what is cached, what has been generated) and judge
each pass by the rules of its policy: the token budget, every decode first, a prompt's
chunks in order, the oldest waiting prompt first, the budget filled (a prompt that does not
fit is split). ``simulate`` is recomputed with the reference simulator on the very
workload drawn here, so metrics of any other workload fail. ``run_engine`` is judged by
teacher forcing its outputs through the model in float64 (greedy, token for token) and by
what its forward passes fed the model (a spy on the embeddings) against the policy's schedule.
"""
from __future__ import annotations

import torch

from llmopt import scheduler as ref
from llmopt.testing import compare

from .. import static
from ..cases.lab03_serving import METRICS, engine_model

# The sandbox shows these llmopt modules (and what they import); scheduler stays hidden.
# paged_attention (lab02) is the engine run_engine drives; kv_cache (lab01) the greedy
# generate the visible tests compare with.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "kv_cache", "paged_attention", "viz.serving"]


def _cost(case) -> ref.CostModel:
    return ref.CostModel(*case["cost"])


# --- part 1: the cost of a pass -------------------------------------------------------------

def verify_pass_time(case: dict, out: dict) -> str | None:
    cost, batch = _cost(case), [tuple(e) for e in case["batch"]]
    lin, attn = ref.pass_time(cost, batch)
    N = sum(n for _, _, n in batch)
    got_l, got_a = float(out["linear_ms"]), float(out["attention_ms"])
    where = f"(a pass of {N} tokens: {len(batch)} chunks, {sum(n == 1 for *_, n in batch)} of them decodes)"
    if not abs(got_l - lin) <= 1e-6 * max(1.0, abs(lin)):
        if abs(got_l - (cost.weights_ms + cost.token_ms * N)) <= 1e-6 * max(1.0, lin):
            return (f"linear_ms wrong {where} — the weights are read once AND multiplied: the pass "
                    "takes the LONGER of the two (a roofline: max), not their sum")
        if abs(got_l - cost.token_ms * N) <= 1e-6 * max(1.0, lin):
            return (f"linear_ms wrong {where} — a small pass is memory-bound: it still reads every "
                    "weight once (weights_ms is the floor)")
        return f"linear_ms wrong {where} — linear = max(weights_ms, token_ms · N), N = all tokens of the pass"
    if not abs(got_a - attn) <= 1e-6 * max(1.0, abs(attn)):
        summed = sum(cost.pair_ms * n * (s + (n + 1) / 2) + cost.kv_ms * (s + n) for _, s, n in batch)
        if abs(got_a - summed) <= 1e-6 * max(1.0, attn):
            return (f"attention_ms wrong {where} — per chunk the larger of arithmetic and memory "
                    "traffic (max), not their sum")
        no_start = sum(max(cost.pair_ms * n * (n + 1) / 2, cost.kv_ms * n) for _, s, n in batch)
        if abs(got_a - no_start) <= 1e-6 * max(1.0, attn):
            return (f"attention_ms wrong {where} — a chunk's queries also attend to the `start` tokens "
                    "already cached: pairs = n (start + (n + 1) / 2), keys read = start + n")
        return (f"attention_ms wrong {where} — per chunk max(pair_ms · n (start + (n+1)/2), "
                "kv_ms · (start + n)), summed over the chunks")
    return None


# --- parts 2 and 3: the composers, replayed -------------------------------------------------

def _replay(case: dict, out: dict, compose, policy: str) -> str | None:
    reqs = {r[0]: r for r in case["requests"]}
    budget = case["token_budget"]
    rows = out["entries"].tolist()
    by_step: dict = {}
    for step, rid, start, n in rows:
        by_step.setdefault(step, []).append((rid, start, n))
    order = sorted(case["requests"], key=lambda r: (r[3], r[0]))
    active, done, gen = [], {i: 0 for i in reqs}, {i: 0 for i in reqs}
    last_step = max(by_step, default=-1)
    for step in range(last_step + 1):
        while order and order[0][3] <= step:
            active.append(order.pop(0)[0])
        dec = [(i, reqs[i][1] + gen[i] - 1) for i in active if done[i] >= reqs[i][1]]
        pre = [(i, reqs[i][1], done[i]) for i in active if done[i] < reqs[i][1]]
        batch = by_step.get(step, [])
        where = (f"pass {step} (budget {budget}; {len(dec)} requests decoding, "
                 f"{len(pre)} prompts waiting)")
        if (dec or pre) and not batch:
            return (f"{where}: an empty pass while requests wait — every waiting request must make "
                    "progress (starvation)")
        total = sum(n for _, _, n in batch)
        ids = [rid for rid, _, _ in batch]
        if len(set(ids)) != len(ids):
            return f"{where}: a request appears twice in one pass — one chunk (or one decode) per request"
        for rid, start, n in batch:
            if rid not in active:
                return f"{where}: request {rid} is not running (not arrived yet, or finished)"
            if n < 1:
                return f"{where}: a chunk of {n} tokens for request {rid}"
        if policy == "splitfuse":
            if total > budget:
                return (f"{where}: the pass holds {total} tokens, over the token budget of {budget} — "
                        "a forward pass never exceeds the budget: split the prompt that does not fit")
        for rid, ctx in dec:
            if policy == "splitfuse" and rid not in ids and len(dec) <= budget:
                return (f"{where}: decode tokens dropped — request {rid} was decoding and got no "
                        "token; decodes go into the pass FIRST, prompt chunks fill what is left")
        for rid, start, n in batch:
            P = reqs[rid][1]
            if done[rid] < P:
                if start != done[rid]:
                    return (f"{where}: request {rid}'s chunk starts at token {start} but tokens "
                            f"0..{done[rid] - 1} are all that is cached — a prompt's chunks run in "
                            "order (the next chunk starts where the last one ended)")
                if start + n > P:
                    return f"{where}: request {rid}'s chunk runs past the end of its prompt"
            else:
                if n != 1 or start != P + gen[rid] - 1:
                    return (f"{where}: request {rid} is decoding: one token at its context length "
                            "(prompt + generated - 1)")
        expected = [tuple(e) for e in compose(dec, pre, budget)]
        if policy == "splitfuse":
            room = budget - total
            if pre and room > 0:
                rest = [i for i, p, d in pre if p - d - sum(n for r, s, n in batch if r == i) > 0]
                if pre[0][0] not in ids:
                    return (f"{where}: the oldest waiting prompt (request {pre[0][0]}) got no chunk "
                            "though the budget had room — starvation: prompts are served first "
                            "come, first served, a long one in chunks")
                if rest:
                    return (f"{where}: {room} tokens of the budget left unused while request "
                            f"{rest[0]}'s prompt waits — never leave room: split the prompt and "
                            "take the chunk that fits")
        if sorted(batch) != sorted(expected):
            if policy == "continuous":
                kinds = {done[rid] < reqs[rid][1] for rid in ids}
                if len(kinds) > 1:
                    return (f"{where}: the pass mixes prompts and decodes — vLLM's continuous "
                            "batching runs prefill-only passes first, decode-only passes otherwise")
                if pre and not any(done[rid] < reqs[rid][1] for rid in ids):
                    return (f"{where}: decodes ran while a prompt waited — prefill first")
                if any(done[rid] < reqs[rid][1] and start + n < reqs[rid][1] for rid, start, n in batch):
                    return (f"{where}: a prompt was split — continuous batching runs whole prompts "
                            "(first come, first served, while they fit in the budget)")
                return (f"{where}: not the pass prefill-first continuous batching composes — whole "
                        "prompts first come, first served while they fit in the budget (a first prompt "
                        "longer than the budget runs alone); with no prompt waiting, every decode")
            got = {rid: n for rid, s, n in batch if done[rid] < reqs[rid][1]}
            for k, (rid, P, d) in enumerate(pre):
                later = [r for r, _, _ in pre[k + 1:] if r in got]
                if later and got.get(rid, 0) < P - d:
                    return (f"{where}: request {later[0]}'s prompt got a chunk before the older "
                            f"request {rid}'s prompt was done — first come, first served, or an old "
                            "long prompt can wait forever (starvation)")
            return (f"{where}: not the pass Dynamic SplitFuse composes — all decodes, then chunks of "
                    "the waiting prompts in queue order until the budget is full")
        for rid, start, n in batch:          # advance the trusted state
            if done[rid] < reqs[rid][1]:
                done[rid] += n
                if done[rid] < reqs[rid][1]:
                    continue
            gen[rid] += 1
            if gen[rid] >= reqs[rid][2]:
                active.remove(rid)
    if order or active:
        left = sorted(set(active) | {r[0] for r in order})
        return (f"after {last_step + 1} passes requests {left[:5]} never finished — starvation: "
                "every waiting prompt must get chunks until it is done")
    return None


def verify_splitfuse_batch(case: dict, out: dict) -> str | None:
    return _replay(case, out, ref.splitfuse_batch, "splitfuse")


def verify_continuous_batch(case: dict, out: dict) -> str | None:
    return _replay(case, out, ref.continuous_batch, "continuous")


# --- part 4: the simulator ----------------------------------------------------------------

def _same(out, metrics) -> bool:
    return all(abs(float(out[k]) - metrics[k]) <= 1e-5 * max(1e-3, abs(metrics[k])) for k in METRICS)


def verify_simulate(case: dict, out: dict) -> str | None:
    reqs = [ref.Request(*r) for r in case["requests"]]
    expected = ref.simulate(reqs, case["policy"], case["token_budget"], _cost(case))
    where = (f"({len(reqs)} requests, policy {case['policy']!r}, token_budget "
             f"{case['token_budget']})")
    bad = [k for k in METRICS if not abs(float(out[k]) - expected[k]) <= 1e-5 * max(1e-3, abs(expected[k]))]
    for k in ("ttft", "latency"):
        if out[k].shape != (len(reqs),):
            return f"simulate {where}: {k} must hold one value per request, in the order given ({len(reqs)})"
        if compare(out[k].double(), torch.tensor(expected[k], dtype=torch.float64), rtol=1e-5, atol=1e-8,
                   name=k) is not None:
            bad.append(k)
    if not bad:
        return None
    if any(not bool(torch.isfinite(torch.as_tensor(out[k])).all()) for k in (*METRICS, "ttft", "latency")):
        return f"simulate {where}: a metric is NaN or infinite"
    at_zero = ref.simulate([ref.Request(r.id, r.prompt_len, r.max_new_tokens, 0.0) for r in reqs],
                           case["policy"], case["token_budget"], _cost(case))
    if _same(out, at_zero):
        return (f"simulate {where}: {', '.join(bad)} wrong — arrival times ignored: a request joins "
                "when the clock reaches its arrival_time, and TTFT and latency count from it")
    ms = ref.simulate(reqs, case["policy"], case["token_budget"], ref.CostModel(
        *(x * 1e3 for x in case["cost"])))
    if _same(out, ms):
        return (f"simulate {where}: {', '.join(bad)} wrong — pass_time is in milliseconds, the clock "
                "and the metrics in seconds")
    if "throughput_tokens_per_s" not in bad:
        return (f"simulate {where}: {', '.join(bad)} wrong — TTFT ends with the pass that finishes "
                "the prompt, latency with the pass of the last token, both from the arrival; "
                "percentiles interpolate linearly (torch.quantile)")
    return (f"simulate {where}: {', '.join(bad)} wrong — the metrics of exactly the requests given: "
            "the clock advances by pass_time of each pass the policy composes, idles until the next "
            "arrival; throughput = generated tokens / (last finish - first arrival)")


# --- part 5: the engine -----------------------------------------------------------------------

def _greedy_check(model, prompt, got, n_new, i) -> str | None:
    T = len(prompt)
    if got.dim() != 1 or len(got) < T or not torch.equal(got[:T], prompt):
        return f"request {i}: the output must be the prompt followed by the new tokens (1-D)"
    if len(got) - T != n_new:
        return f"request {i}: {len(got) - T} new tokens, expected max_new_tokens = {n_new}"
    if got.min() < 0 or got.max() >= model.config.vocab_size:
        return f"request {i}: token ids outside the vocabulary"
    with torch.no_grad():
        logits = model(got[None, :-1])[0]                              # (T + n - 1, V)
    for t in range(T, len(got)):
        row = logits[t - 1]
        if row[int(got[t])] < row.max() - 1e-4:
            return (f"request {i}, new token {t - T}: not the greedy (argmax) token given the tokens "
                    "before it — does the first token come from the logits of the pass with the "
                    "prompt's LAST chunk, and do the chunks feed the prompt's tokens in order?")
    return None


def verify_run_engine(case: dict, out: dict) -> str | None:
    model = engine_model(case).double()
    prompts, n_new = case["prompts"], case["max_new_tokens"]
    P = len(prompts)
    if int(out["n_out"]) != P:
        return f"run_engine returned {int(out['n_out'])} outputs for {P} prompts: one per prompt, in order"
    for i in range(P):
        msg = _greedy_check(model, prompts[i], out[f"out_{i}"], n_new[i], i)
        if msg:
            return msg
    lens = out["pass_lens"].tolist()
    if sum(lens) != out["pass_ids"].numel() or not lens:
        return ("the model's embeddings never ran (or ran unevenly): run each pass through "
                "paged_forward over your paged cache")
    sched = ref.Scheduler([ref.Request(i, len(p), n) for i, (p, n) in enumerate(zip(prompts, n_new))],
                          case["policy"], case["token_budget"])
    plan = []
    while not sched.finished():
        sched.admit(0.0)
        batch = sched.next_batch()
        plan.append(batch)
        sched.complete(batch, 0.0)
    budget, policy = case["token_budget"], case["policy"]
    where = f"(policy {policy!r}, token_budget {budget})"
    if policy == "splitfuse" and max(lens) > budget:
        return (f"a forward pass of {max(lens)} tokens {where}: over the token budget — split the "
                "long prompt into chunks")
    want = [sum(n for _, _, n in b) for b in plan]
    if lens != want:
        return (f"the forward passes fed {len(lens)} passes of {lens[:8]}{'...' if len(lens) > 8 else ''} "
                f"tokens {where}; the policy's schedule runs {len(want)} passes — compose each pass "
                "with the policy's composer over the running requests (a prompt's chunk, or one "
                "decode token each) and run it as ONE paged_forward")
    return None


# --- how the parts must be computed (read from the notebook's source, see static.py) ---------

def _reaches(name: str, why: str = ""):
    """The notebook's function ``name`` is reachable from the graded function."""
    def rule(code, fn: str):
        _, seen = code.reachable(fn)
        return None if name in seen else f"{fn} never uses {name}{why}"
    return rule


_ENGINE_SHORTCUTS = ("generate", "transformers", "llmopt.kv_cache", "vllm", "llmopt.paged_attention.serve")
_OWN = static.no_llmopt_imports(allowed=("llmopt.testing",))
METHOD = {
    "pass_time": ("pass_time", [static.no_dynamic_access(), _OWN]),
    "splitfuse_batch": ("splitfuse_batch", [
        static.no_dynamic_access(), _OWN,
        static.does_not_reach("continuous_batch", "simulate", "run_engine",
                              why=": the SplitFuse composer is a function of its own")]),
    "continuous_batch": ("continuous_batch", [
        static.no_dynamic_access(), _OWN,
        static.does_not_reach("splitfuse_batch", "simulate", "run_engine",
                              why=": the continuous composer is a function of its own")]),
    "simulate": ("simulate", [
        static.no_dynamic_access(), _OWN,
        _reaches("pass_time", why=": the clock advances by the cost model's time of each pass"),
        static.does_not_reach("run_engine", why=": the simulator runs no model")]),
    "run_engine": ("run_engine", [
        static.no_dynamic_access(),
        static.no_llmopt_imports(allowed=("llmopt.gpt", "llmopt.testing", "llmopt.paged_attention.paged_forward",
                                          "llmopt.paged_attention.PagedKVCache")),
        static.forbids(*_ENGINE_SHORTCUTS, why=": the engine runs your schedule through paged_forward"),
        static.calls("llmopt.paged_attention.paged_forward", what="paged_forward")]),
}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----

def _engine_outputs(case):
    spec = {f"out_{i}": ("int", (None,)) for i in range(len(case["prompts"]))}
    spec.update({"n_out": ("int", ()), "pass_ids": ("int", (None,)), "pass_pos": ("int", (None,)),
                 "pass_lens": ("int", (None,))})
    return spec


OUTPUTS = {
    "pass_time": lambda case: {"linear_ms": ("float", ()), "attention_ms": ("float", ())},
    "splitfuse_batch": lambda case: {"entries": ("int", (None, 4))},
    "continuous_batch": lambda case: {"entries": ("int", (None, 4))},
    "simulate": lambda case: {k: ("float", ()) for k in METRICS}
                             | {k: ("float", (None,)) for k in ("ttft", "latency")},
    "run_engine": _engine_outputs,
}
