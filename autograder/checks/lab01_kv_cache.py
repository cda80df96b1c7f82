"""How the hidden checks of lab01_kv_cache are judged (trusted side; never in the kernel)."""
from __future__ import annotations

import ast

import torch

from llmopt import kv_cache as ref
from llmopt.gpt import GPTConfig
from llmopt.testing import compare

from .. import static
from ..cases.lab01_kv_cache import _DTYPES, tiny_model

# The sandbox shows these llmopt modules (and what they import); kv_cache stays hidden.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "viz.kv_cache"]


def _kv_cache_outputs(case: dict) -> dict:
    B, H, d = case["batch"], case["n_head"], case["head_dim"]
    spec = {}
    for s in range(len(case["steps"])):
        for layer in range(case["n_layer"]):  # the length is free: verify_KVCache names the mistake
            spec[f"k_{s}_{layer}"] = spec[f"v_{s}_{layer}"] = ("float", (B, H, None, d))
    n = len(case["steps"])
    spec["seq_len_after_step"] = spec["seq_len_after_first_layer"] = ("int", (n,))
    return spec


def _passes_a_cache(code, fn: str) -> str | None:
    """``fn``'s own code builds a ``KVCache`` and calls something with ``kv_cache=``.

    Read from the notebook, outside the kernel: the call pattern ``run_generate`` records in
    the kernel fails the lazy shortcut (re-running the sequence), and this is what a patched
    recorder cannot change.
    """
    for b in code.definitions(fn):
        if b.kind != "def":
            continue
        passes = any(isinstance(n, ast.Call) and any(k.arg == "kv_cache" for k in n.keywords)
                     for n in ast.walk(b.node))
        if passes and "KVCache" in code.uses(b.node).globals:
            return None
    return (f"{fn} never builds your KVCache and passes it to the model "
            "(model(ids, kv_cache=cache)): with use_cache=True the cache is the point of the part")


# How the method is judged from the notebook's code (autograder/static.py)
METHOD = {"generate": [static.no_dynamic_access(), _passes_a_cache]}


# What each check's record must hold (keys, dtype kind, shape) before anything is computed.
OUTPUTS = {
    "kv_cache_bytes": lambda case: {"bytes": ("int", ())},
    "cached_attention": lambda case: {"o": ("float", tuple(case["q"].shape))},
    "KVCache": _kv_cache_outputs,
    "max_batch_size": lambda case: {"batch": ("int", ())},
    "reservation_waste": lambda case: {"waste": ("float", ())},
    "generate": lambda case: {"ids": ("int", (case["input_ids"].shape[0], None)),
                              "call_lens": ("int", (None,)), "call_cached": ("int", (None,))},
}


def verify_kv_cache_bytes(case: dict, out: dict) -> str | None:
    config = GPTConfig(vocab_size=128, max_position_embeddings=4096, n_layer=case["n_layer"],
                       n_head=case["n_head"], d_model=case["d_model"], d_ff=4 * case["d_model"])
    expected = ref.kv_cache_bytes(config, case["batch"], case["seq_len"], _DTYPES[case["dtype"]])
    got = int(out["bytes"])
    if got == expected:
        return None
    where = (f"n_layer={case['n_layer']}, n_head={case['n_head']}, d_model={case['d_model']}, "
             f"batch={case['batch']}, seq_len={case['seq_len']}, dtype={case['dtype']}")
    hint = ""
    if got * 2 == expected:
        hint = " — off by a factor of 2: the cache holds keys AND values"
    elif got * case["n_layer"] == expected:
        hint = " — every layer has its own cache"
    elif got * case["batch"] == expected:
        hint = " — every sequence of the batch has its own cache"
    elif expected % max(got, 1) == 0 or got % max(expected, 1) == 0:
        hint = " — check the bytes per element of the dtype"
    return f"wrong byte count for {where}{hint}"


def verify_KVCache(case: dict, out: dict) -> str | None:
    L = case["n_layer"]
    lens_after, lens_mid, total = [], [], 0
    for s, (k, v) in enumerate(case["steps"]):
        t = k.shape[3]
        lens_mid.append(total)
        total += t
        lens_after.append(total)
        for layer in range(L):
            k_exp = torch.cat([case["steps"][j][0][layer] for j in range(s + 1)], dim=2)
            v_exp = torch.cat([case["steps"][j][1][layer] for j in range(s + 1)], dim=2)
            for name, exp in ((f"k_{s}_{layer}", k_exp), (f"v_{s}_{layer}", v_exp)):
                got = out[name]
                if tuple(got.shape) != tuple(exp.shape):
                    hint = ""
                    if got.shape[2] == exp.shape[2] - t:
                        hint = " — the new k/v must be written BEFORE returning (attention needs them)"
                    elif got.shape[2] == case["max_seq_len"]:
                        hint = " — return the cache sliced to the current length, not the whole buffer"
                    elif got.shape[2] > exp.shape[2] and layer > 0:
                        hint = (" — did seq_len advance in the middle of a forward call? Advance it "
                                "only after the last layer's update")
                    return (f"step {s}, layer {layer}: update returned {name[0]} of shape "
                            f"{tuple(got.shape)}, expected {tuple(exp.shape)}{hint}")
                msg = compare(got, exp, name=f"step {s}, layer {layer}: {name[0]}_all")
                if msg:
                    what = "keys" if name[0] == "k" else "values"
                    return msg + f" — are the {what} stored at positions seq_len..seq_len+T_new?"
    if out["seq_len_after_first_layer"].tolist() != lens_mid:
        return ("seq_len changed in the middle of a forward call: it must count the tokens of "
                "COMPLETED calls, advancing after the last layer's update")
    if out["seq_len_after_step"].tolist() != lens_after:
        return (f"seq_len after each forward call was {out['seq_len_after_step'].tolist()}, "
                f"expected the number of tokens cached so far")
    return None


def verify_cached_attention(case: dict, out: dict) -> str | None:
    q, k, v = case["q"], case["k"], case["v"]
    expected = ref.cached_attention(q.double(), k.double(), v.double()).float()
    msg = compare(out["o"], expected, name="o")
    if msg is None:
        return None
    T, S = q.shape[2], k.shape[2]
    o = out["o"]
    if tuple(o.shape) == tuple(expected.shape) and T < S:
        scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
        no_mask = (torch.softmax(scores, -1) @ v.double()).float()
        if compare(o, no_mask) is None:
            return msg + " — the future is not masked: query i may see keys 0..S−T+i only"
        wrong_offset = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
        if compare(o, (torch.softmax(wrong_offset, -1) @ v.double()).float()) is None:
            return msg + " — the mask ignores the cache: query i sits at position S−T+i, not i"
    return msg + f" (T={T} new queries over S={S} keys)"


def verify_max_batch_size(case: dict, out: dict) -> str | None:
    config = GPTConfig(vocab_size=50272, max_position_embeddings=8192, n_layer=case["n_layer"],
                       n_head=case["n_head"], d_model=case["d_model"], d_ff=4 * case["d_model"])
    dtype = _DTYPES[case["dtype"]]
    expected = ref.max_batch_size(config, case["gpu_bytes"], case["seq_len"], case["weight_bytes"], dtype)
    got = int(out["batch"])
    if got == expected:
        return None
    where = f"{case['model']} in {case['dtype']} on {case['gpu']} at {case['seq_len']} tokens"
    per_seq = ref.kv_cache_bytes(config, 1, case["seq_len"], dtype)
    if expected == 0 and got != 0:
        return f"{where}: the weights alone do not fit, so no batch does (answer 0)"
    if got == case["gpu_bytes"] // per_seq:
        return f"{where}: the weights take memory too — subtract them before dividing"
    if got == (case["gpu_bytes"] - case["weight_bytes"]) // (per_seq // 2):
        return f"{where}: each sequence keeps keys AND values"
    if abs(got - expected) == 1:
        return f"{where}: off by one — a batch must fit entirely (round down)"
    return f"{where}: got {got} sequences, which is not the largest batch that fits"


def verify_reservation_waste(case: dict, out: dict) -> str | None:
    expected = ref.reservation_waste(case["lengths"], case["max_len"])
    got = float(out["waste"])
    if got == got and abs(got - expected) <= 1e-9:  # (got == got: NaN fails)
        return None
    n = len(case["lengths"])
    if abs(got - (1 - expected)) <= 1e-9:
        return f"{n} requests, max_len {case['max_len']}: that is the fraction USED; the waste is 1 − used"
    return f"{n} requests, max_len {case['max_len']}: wrong fraction (it must lie in [0, 1])"


def verify_generate(case: dict, out: dict) -> str | None:
    model = tiny_model(case["model_seed"]).double()
    prompt, n = case["input_ids"], case["max_new_tokens"]
    B, T = prompt.shape
    ids = out["ids"]
    if ids.dim() != 2 or ids.shape[0] != B:
        return f"returned ids of shape {tuple(ids.shape)}, expected ({B}, T + new tokens)"
    if ids.shape[1] > T + n or (case["eos_id"] is None and ids.shape[1] != T + n):
        return f"returned {ids.shape[1] - T} new tokens, expected {n}"
    if not torch.equal(ids[:, :T], prompt):
        return "the returned ids must start with the prompt"
    with torch.no_grad():
        logits = model(ids[:, :-1])  # (B, T+n-1, V): the logits that chose each new token
    eos = case["eos_id"]
    for b in range(B):
        finished = False
        for t in range(T, ids.shape[1]):
            tok = int(ids[b, t])
            if finished:
                if tok != eos:
                    return f"sequence {b}: after eos (id {eos}) keep emitting eos"
                continue
            row = logits[b, t - 1]
            if row[tok] < row.max() - 1e-4:  # greedy, up to a float tie
                hint = ""
                if case["use_cache"] and t > T:
                    hint = (" — the first token was right but a later one was not: are positions "
                            "continued from the cache (not restarted at 0), and does each step "
                            "feed only the newest token?")
                return f"sequence {b}, new token {t - T}: not the greedy (argmax) token{hint}"
            finished = eos is not None and tok == eos
    if eos is not None and ids.shape[1] < T + n:
        last = ids[:, -1]
        if not bool((last == eos).all()):
            return "stopped early although not every sequence had produced eos"
    steps = ids.shape[1] - T
    lens, cached = out["call_lens"].tolist(), out["call_cached"].tolist()
    if case["use_cache"]:
        # each token goes through the model once, with the cache (a prompt fed token by token is
        # slow, not wrong: the lab's timing question is about it; one spare call at the end is
        # harmless)
        decode = lens[len(lens) - (steps - 1):] if steps > 1 else []
        if not T + steps - 1 <= sum(lens) <= T + steps or not all(cached) or any(n != 1 for n in decode):
            return ("with use_cache=True every call passes the cache and each token goes through "
                    "the model once: the prompt, then only the newest token per step (your calls "
                    f"had lengths {lens[:12]}, cache passed: {[bool(c) for c in cached[:12]]})")
    else:
        if any(cached):
            return "with use_cache=False the model must be called without a cache"
    return None
