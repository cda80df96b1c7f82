"""Hidden-check cases of lab01_kv_cache (run in the student's kernel; no answers here)."""
from __future__ import annotations

import torch

from . import DTYPES as _DTYPES, gen as _gen

from llmopt.gpt import GPT, GPTConfig


def tiny_config(vocab_size=97, n_layer=2, n_head=2, d_model=32) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, max_position_embeddings=64, n_layer=n_layer,
                     n_head=n_head, d_model=d_model, d_ff=4 * d_model, dropout=0.0)


def tiny_model(seed: int, **config) -> GPT:
    """A small randomly initialised OPT-style model, the same for the same seed."""
    torch.manual_seed(seed)
    return GPT(tiny_config(**config)).eval()


# --- kv_cache_bytes(config, batch, seq_len, dtype) -------------------------------------

def inputs_kv_cache_bytes(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = [dict(n_layer=40, n_head=40, d_model=5120, batch=1, seq_len=2048, dtype="float16")]  # OPT-13B
    for dtype in ("float32", "bfloat16", "float16"):
        n_head = int(torch.randint(1, 9, (1,), generator=g))
        cases.append(dict(n_layer=int(torch.randint(1, 13, (1,), generator=g)), n_head=n_head,
                          d_model=n_head * 16 * int(torch.randint(1, 9, (1,), generator=g)),
                          batch=int(torch.randint(1, 9, (1,), generator=g)),
                          seq_len=int(torch.randint(1, 3000, (1,), generator=g)), dtype=dtype))
    return cases


def run_kv_cache_bytes(fn, case: dict) -> dict:
    config = GPTConfig(vocab_size=128, max_position_embeddings=4096, n_layer=case["n_layer"],
                       n_head=case["n_head"], d_model=case["d_model"], d_ff=4 * case["d_model"])
    return {"bytes": int(fn(config, case["batch"], case["seq_len"], _DTYPES[case["dtype"]]))}


# --- max_batch_size(config, gpu_bytes, seq_len, weight_bytes, dtype) ----------------------

_MODELS = {  # real sizes: (n_layer, n_head, d_model, parameters)
    "OPT-1.3B": (24, 32, 2048, 1.3e9), "OPT-6.7B": (32, 32, 4096, 6.7e9),
    "OPT-13B": (40, 40, 5120, 13e9), "OPT-30B": (48, 56, 7168, 30e9)}
_GPUS = {"A100-40GB": 40e9, "A100-80GB": 80e9, "H100-80GB": 80e9, "H200-141GB": 141e9}


def inputs_max_batch_size(seed: int) -> list[dict]:
    g = _gen(seed)
    names, gpus = sorted(_MODELS), sorted(_GPUS)
    cases = [dict(model="OPT-13B", gpu="A100-80GB", seq_len=2048, dtype="float16")]
    for _ in range(4):
        cases.append(dict(model=names[int(torch.randint(len(names), (1,), generator=g))],
                          gpu=gpus[int(torch.randint(len(gpus), (1,), generator=g))],
                          seq_len=int(torch.randint(256, 8193, (1,), generator=g)),
                          dtype=("float16", "bfloat16", "float32")[int(torch.randint(3, (1,), generator=g))]))
    cases.append(dict(model="OPT-30B", gpu="A100-40GB", seq_len=2048, dtype="float32"))  # weights alone overflow
    for c in cases:
        L, H, D, n = _MODELS[c["model"]]
        c.update(n_layer=L, n_head=H, d_model=D,
                 weight_bytes=int(n) * _DTYPES[c["dtype"]].itemsize, gpu_bytes=int(_GPUS[c["gpu"]]))
    return cases


def run_max_batch_size(fn, case: dict) -> dict:
    config = GPTConfig(vocab_size=50272, max_position_embeddings=8192, n_layer=case["n_layer"],
                       n_head=case["n_head"], d_model=case["d_model"], d_ff=4 * case["d_model"])
    return {"batch": int(fn(config, case["gpu_bytes"], case["seq_len"], case["weight_bytes"],
                            _DTYPES[case["dtype"]]))}


# --- reservation_waste(lengths, max_len) ---------------------------------------------------

def inputs_reservation_waste(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = [dict(lengths=[2048] * 4, max_len=2048), dict(lengths=[1, 2, 3], max_len=8)]
    for n in (5, 100, 1000):  # a realistic spread: most requests far shorter than the maximum
        max_len = int(torch.randint(512, 4097, (1,), generator=g))
        lengths = (torch.rand(n, generator=g) ** 3 * max_len).long().clamp(1, max_len)
        cases.append(dict(lengths=lengths.tolist(), max_len=max_len))
    return cases


def run_reservation_waste(fn, case: dict) -> dict:
    return {"waste": float(fn(list(case["lengths"]), case["max_len"]))}


# --- KVCache(n_layer, batch, n_head, max_seq_len, head_dim, dtype, device) ---------------

def inputs_KVCache(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for chunks in ([5, 1, 1, 1], [1, 1, 1], [4, 3, 1, 2]):
        L, B, H, d = 3, 2, 2, 4
        T_max = sum(chunks) + int(torch.randint(0, 4, (1,), generator=g))
        steps = [(torch.randn(L, B, H, t, d, generator=g), torch.randn(L, B, H, t, d, generator=g))
                 for t in chunks]
        cases.append(dict(n_layer=L, batch=B, n_head=H, head_dim=d, max_seq_len=T_max, steps=steps))
    return cases


def run_KVCache(cls, case: dict) -> dict:
    L = case["n_layer"]
    cache = cls(L, case["batch"], case["n_head"], case["max_seq_len"], case["head_dim"],
                dtype=torch.float32)
    out, seq_lens, mid_lens = {}, [], []
    for s, (k, v) in enumerate(case["steps"]):
        for layer in range(L):
            k_all, v_all = cache.update(layer, k[layer], v[layer])
            out[f"k_{s}_{layer}"], out[f"v_{s}_{layer}"] = k_all, v_all
            if layer == 0:
                mid_lens.append(int(cache.seq_len))
        seq_lens.append(int(cache.seq_len))
    out["seq_len_after_step"] = torch.tensor(seq_lens)
    out["seq_len_after_first_layer"] = torch.tensor(mid_lens)
    return out


# --- cached_attention(q, k, v) ------------------------------------------------------------

def inputs_cached_attention(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for T, S, d in ((7, 7, 16), (1, 9, 16), (3, 11, 32), (1, 1, 8)):
        cases.append(dict(q=torch.randn(2, 3, T, d, generator=g), k=torch.randn(2, 3, S, d, generator=g),
                          v=torch.randn(2, 3, S, d, generator=g)))
    return cases


def run_cached_attention(fn, case: dict) -> dict:
    return {"o": fn(case["q"].clone(), case["k"].clone(), case["v"].clone())}


# --- generate(model, input_ids, max_new_tokens, use_cache=True, eos_id=None) ---------------

def inputs_generate(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for i, (use_cache, B, T, n, with_eos) in enumerate(
            [(True, 2, 5, 8, False), (False, 2, 5, 8, False), (True, 1, 1, 10, False), (True, 3, 4, 6, True)]):
        model_seed = seed + i
        ids = torch.randint(3, 97, (B, T), generator=g)
        eos_id = None
        if with_eos:  # the greedy first token of sequence 0, so that it stops at once
            with torch.no_grad():
                eos_id = int(tiny_model(model_seed)(ids)[0, -1].argmax())
        cases.append(dict(model_seed=model_seed, input_ids=ids, max_new_tokens=n,
                          use_cache=use_cache, eos_id=eos_id))
    return cases


def run_generate(fn, case: dict) -> dict:
    model = tiny_model(case["model_seed"])
    calls = []

    def spy(module, args, kwargs):  # what each forward call was given
        ids = args[0] if args else kwargs.get("input_ids")
        calls.append((int(ids.shape[1]), int(kwargs.get("kv_cache") is not None)))

    model.register_forward_pre_hook(spy, with_kwargs=True)
    ids = fn(model, case["input_ids"].clone(), case["max_new_tokens"], use_cache=case["use_cache"],
             eos_id=case["eos_id"])
    return {"ids": ids, "call_lens": torch.tensor([c[0] for c in calls], dtype=torch.int64),
            "call_cached": torch.tensor([c[1] for c in calls], dtype=torch.int64)}
