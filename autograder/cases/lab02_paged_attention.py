"""Hidden-check cases of lab02_paged_attention (run in the student's kernel; no answers here).

Fresh inputs per seed: shuffled physical blocks, ragged lengths with partly filled last
blocks (their unused slots hold large junk), block sizes that do not divide the lengths,
scripts of allocations, appends, forks and frees, and small random OPT models.
"""
from __future__ import annotations

import torch

from llmopt.gpt import GPT, GPTConfig

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(g, lo, hi) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def tiny_model(seed: int, vocab_size: int = 97, n_layer: int = 2, pre_ln: bool = True) -> GPT:
    """A small randomly initialised OPT-style model, the same for the same seed."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, max_position_embeddings=96, n_layer=n_layer,
                         n_head=2, d_model=32, d_ff=64, do_layer_norm_before=pre_ln)).eval()


# --- kv_memory_usage(context_lens, max_seq_len, block_size) -> (contiguous, paged) ---------

def inputs_kv_memory_usage(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for S, max_len, bs in ((5, 64, 8), (40, 2048, 16), (12, 500, 7)):
        lens = [_randint(g, 1, max_len + 1) for _ in range(S)]
        cases.append(dict(context_lens=lens, max_seq_len=max_len, block_size=bs))
    return cases


def run_kv_memory_usage(fn, case: dict) -> dict:
    contiguous, paged = fn(list(case["context_lens"]), case["max_seq_len"], case["block_size"])
    return {"contiguous": float(contiguous), "paged": float(paged)}


# --- BlockAllocator(num_blocks): allocate / incref / free / ref_count / num_free ----------

def inputs_BlockAllocator(seed: int) -> list[dict]:
    """Scripts over handles: ("alloc",) gives the next handle; ("incref", h), ("free", h)."""
    g = _gen(seed)
    cases = []
    for n in (3, 5, 8):
        ops = []
        for _ in range(n + 1):  # one more than fits: the last must raise
            ops.append(("alloc",))
        live = [[h, 1] for h in range(n)]  # [handle, references]
        handles = n
        for _ in range(4 * n):
            r = _randint(g, 0, 3)
            if r == 0 and live:
                h = live[_randint(g, 0, len(live))]
                ops.append(("incref", h[0]))
                h[1] += 1
            elif r == 1 and live:
                h = live[_randint(g, 0, len(live))]
                ops.append(("free", h[0]))
                h[1] -= 1
                if h[1] == 0:
                    live.remove(h)
            else:
                ops.append(("alloc",))
                if len(live) < n:
                    live.append([handles, 1])
                    handles += 1
        cases.append(dict(num_blocks=n, ops=ops))
    return cases


def run_BlockAllocator(cls, case: dict) -> dict:
    alloc = cls(case["num_blocks"])
    handles, got, errors, free_after, refs = [], [], [], [], []
    for op in case["ops"]:
        block, error = -1, 0
        try:
            if op[0] == "alloc":
                block = int(alloc.allocate())
                handles.append(block)
            elif op[0] == "incref":
                alloc.incref(handles[op[1]])
            else:
                alloc.free(handles[op[1]])
        except RuntimeError:
            error = 1
        except Exception:  # noqa: BLE001 - recorded, the verifier says what was expected
            error = 2
        got.append(block)
        errors.append(error)
        free_after.append(int(alloc.num_free()))
        refs.append([int(alloc.ref_count(b)) for b in range(case["num_blocks"])])
    return {"blocks": torch.tensor(got), "errors": torch.tensor(errors),
            "num_free": torch.tensor(free_after), "ref_counts": torch.tensor(refs)}


# --- PagedKVCache: add_sequence / append per layer / free / block_table / utilization ------

def _kv(g, L, T, H, d):
    return torch.randn(L, 2, T, H, d, generator=g)


def inputs_PagedKVCache(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for bs, tight in ((4, False), (3, False), (5, True)):
        L, H, d = 2, 2, 4
        script = []
        lens = {}
        for sid in range(3):
            script.append(("add", sid))
            lens[sid] = 0
        for sid in range(3):  # ragged prompts
            T = _randint(g, 1, 3 * bs)
            script.append(("append", sid, _kv(g, L, T, H, d)))
            lens[sid] += T
        for _ in range(bs + 1):  # decode steps for everyone, crossing block boundaries
            for sid in range(3):
                script.append(("append", sid, _kv(g, L, 1, H, d)))
                lens[sid] += 1
        peak = sum(-(-n // bs) for n in lens.values())
        freed = -(-lens[1] // bs)
        script.append(("free", 1))
        del lens[1]
        script.append(("add", 3))
        T = _randint(g, (freed - 1) * bs + 1, freed * bs + 1)
        script.append(("append", 3, _kv(g, L, T, H, d)))
        # tight: sequence 3 fits only if the blocks of sequence 1 were freed and reused
        cases.append(dict(n_layer=L, n_head=H, head_dim=d, block_size=bs,
                          num_blocks=peak if tight else peak + 6, script=script))
    return cases


def run_PagedKVCache(cls, case: dict) -> dict:
    L = case["n_layer"]
    cache = cls(L, case["n_head"], case["head_dim"], case["num_blocks"],
                block_size=case["block_size"], dtype=torch.float32)
    mid = []
    for step in case["script"]:
        if step[0] == "add":
            cache.add_sequence(step[1])
        elif step[0] == "free":
            cache.free(step[1])
        else:
            sid, kv = step[1], step[2]
            for layer in range(L):
                cache.append(sid, layer, kv[layer, 0].clone(), kv[layer, 1].clone())
                if layer == 0:
                    mid.append(int(cache.context_len(sid)))
    live = [0, 2, 3]
    tables = [list(cache.block_table(s)) for s in live]
    width = max(len(t) for t in tables)
    return {"k": cache.k, "v": cache.v,
            "tables": torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int64),
            "lens": torch.tensor([int(cache.context_len(s)) for s in live]),
            "len_after_first_layer": torch.tensor(mid),
            "utilization": float(cache.utilization()),
            "num_free": int(cache.allocator.num_free())}


# --- PagedKVCache.fork: sharing and copy-on-write ----------------------------------------

def inputs_fork(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for bs in (4, 8):
        L, H, d = 2, 2, 4
        n_prefix = _randint(g, 2 * bs + 1, 3 * bs)            # the last block is partly filled
        n_child = _randint(g, 1, bs - (n_prefix % bs) + 1)    # stays inside that block ...
        n_child += bs                                          # ... then needs one more
        n_x = _randint(g, bs, 2 * bs)
        blocks = 3 + 2 + 2 + (-(-n_x // bs))                   # generous: eager copies still fit
        cases.append(dict(n_layer=L, n_head=H, head_dim=d, block_size=bs, num_blocks=blocks + 3,
                          prefix=_kv(g, L, n_prefix, H, d),
                          child=[_kv(g, L, 1, H, d) for _ in range(n_child)],
                          parent=[_kv(g, L, 1, H, d) for _ in range(2)],
                          x=_kv(g, L, n_x, H, d)))
    return cases


def run_fork(cls, case: dict) -> dict:
    L = case["n_layer"]
    cache = cls(L, case["n_head"], case["head_dim"], case["num_blocks"],
                block_size=case["block_size"], dtype=torch.float32)

    def put(sid, kv):
        for layer in range(L):
            cache.append(sid, layer, kv[layer, 0].clone(), kv[layer, 1].clone())

    def snap(tag):
        child = list(cache.block_table("child")) if tag != "before_fork" else []
        tables[tag] = [list(cache.block_table("parent")), child]
        free[tag] = int(cache.allocator.num_free())

    tables, free = {}, {}
    cache.add_sequence("parent")
    put("parent", case["prefix"])
    snap("before_fork")
    cache.fork("parent", "child")
    snap("after_fork")
    put("child", case["child"][0])
    snap("after_child_write")
    put("parent", case["parent"][0])
    snap("after_parent_write")
    for kv in case["child"][1:]:
        put("child", kv)
    put("parent", case["parent"][1])
    out = {}
    for tag in tables:
        p, c = tables[tag]
        width = max(len(p), len(c))
        out[f"tables_{tag}"] = torch.tensor([p + [-1] * (width - len(p)), c + [-1] * (width - len(c))])
        out[f"free_{tag}"] = free[tag]
    out["k_before_free"], out["v_before_free"] = cache.k.clone(), cache.v.clone()
    out["tables_end"] = _pad([cache.block_table("parent"), cache.block_table("child")])
    out["lens_end"] = torch.tensor([int(cache.context_len("parent")), int(cache.context_len("child"))])
    cache.free("parent")  # the blocks still shared with the child must stay
    cache.add_sequence("x")
    put("x", case["x"])
    out["k"], out["v"] = cache.k, cache.v
    out["tables_after_free"] = _pad([cache.block_table("child"), cache.block_table("x")])
    out["free_after_free"] = int(cache.allocator.num_free())
    return out


def _pad(tables):
    width = max(len(t) for t in tables)
    return torch.tensor([list(t) + [-1] * (width - len(t)) for t in tables])


# --- paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None) ----------

def _paged_case(g, S, H, d, bs, dtype, scale=None, extra_blocks=5):
    lens = [_randint(g, 1, 6 * bs) for _ in range(S)]
    lens[0] = 5 * bs + _randint(g, 1, bs)            # a partly filled last block, always
    if S > 2:
        lens[1] = 1                                  # a single token
    nb = [-(-n // bs) for n in lens]
    num_blocks = sum(nb) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    width = max(nb) + 1                              # one padding column
    tables = torch.zeros(S, width, dtype=torch.int32)
    used = 0
    for s, n in enumerate(nb):
        tables[s, :n] = perm[used:used + n].int()
        used += n
    # junk: every slot holds large values; the verifier reads only the context's slots
    k_cache = (torch.randn(num_blocks, bs, H, d, generator=g) * 4).to(_DTYPES[dtype])
    v_cache = (torch.randn(num_blocks, bs, H, d, generator=g) * 4).to(_DTYPES[dtype])
    q = torch.randn(S, H, d, generator=g).to(_DTYPES[dtype])
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                context_lens=torch.tensor(lens, dtype=torch.int32), scale=scale, dtype=dtype)


def inputs_paged_attention(seed: int) -> list[dict]:
    g = _gen(seed)
    return [_paged_case(g, 4, 2, 16, 4, "float32"),
            _paged_case(g, 3, 3, 8, 3, "float32", scale=0.2),
            _paged_case(g, 5, 2, 32, 16, "float32"),
            _paged_case(g, 2, 2, 16, 8, "float16")]


def run_paged_attention(fn, case: dict) -> dict:
    return {"o": fn(case["q"].clone(), case["k_cache"].clone(), case["v_cache"].clone(),
                    case["block_tables"].clone(), case["context_lens"].clone(), scale=case["scale"])}


# --- paged_attention_triton: the same, as the student's own Triton kernel ------------------

def inputs_paged_attention_triton(seed: int) -> list[dict]:
    g = _gen(seed)
    return [_paged_case(g, 3, 2, 16, 4, "float32"),
            _paged_case(g, 3, 2, 32, 16, "float16"),
            _paged_case(g, 2, 2, 16, 8, "bfloat16", scale=0.3),
            _paged_case(g, 3, 2, 24, 5, "float32")]


run_paged_attention_triton = run_paged_attention


# --- paged_forward(model, cache, seq_ids, chunks) -> (S, V) logits -------------------------

def inputs_paged_forward(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for i, (bs, pre_ln) in enumerate(((4, True), (3, True), (8, False))):
        prompts = [torch.randint(3, 97, (_randint(g, 1, 12),), generator=g) for _ in range(3)]
        steps = [prompts,
                 [torch.randint(3, 97, (1,), generator=g) for _ in range(3)],
                 [torch.randint(3, 97, (n,), generator=g) for n in (1, 3, 1)]]
        cases.append(dict(model_seed=seed * 7 + i, pre_ln=pre_ln, block_size=bs, steps=steps))
    return cases


def run_paged_forward(fns, case: dict) -> dict:
    """``fns`` = (paged_forward, PagedKVCache): the forward runs over the student's cache."""
    paged_forward, cache_cls = fns
    model = tiny_model(case["model_seed"], pre_ln=case["pre_ln"])
    cfg = model.config
    cache = cache_cls(cfg.n_layer, cfg.n_head, cfg.d_model // cfg.n_head, 40,
                      block_size=case["block_size"], dtype=torch.float32)
    ids = [0, 1, 2]
    for s in ids:
        cache.add_sequence(s)
    out = {}
    with torch.no_grad():
        for t, chunks in enumerate(case["steps"]):
            out[f"logits_{t}"] = paged_forward(model, cache, list(ids), [c.clone() for c in chunks])
    return out


# --- serve(model, prompts, max_new_tokens, block_size, num_blocks, eos_id) ------------------

SERVE_VOCAB = 2048


def inputs_serve(seed: int) -> list[dict]:
    g = _gen(seed)

    def prompts(n, lo, hi):
        first = torch.randperm(SERVE_VOCAB - 3, generator=g)[:n] + 3   # distinct first tokens
        return [torch.cat([first[i:i + 1], torch.randint(3, SERVE_VOCAB, (_randint(g, lo, hi) - 1,),
                                                          generator=g)]) for i in range(n)]

    cases = []
    # all requests fit at once: they must share forward passes
    cases.append(dict(model_seed=seed + 1, prompts=prompts(5, 2, 12),
                      max_new_tokens=[_randint(g, 5, 13) for _ in range(5)], block_size=4,
                      num_blocks=None, eos_id=None))
    # memory for about two requests: finished ones leave, waiting ones join, blocks are reused
    ps = prompts(6, 6, 13)
    n_new = [14, 3, 5, 12, 2, 9]
    full = sorted((-(-(len(p) + n) // 4) for p, n in zip(ps, n_new)), reverse=True)
    cases.append(dict(model_seed=seed + 2, prompts=ps, max_new_tokens=n_new, block_size=4,
                      num_blocks=full[0] + full[1] + 1, eos_id=None))
    # one max_new_tokens for all, and a stop token
    ps = prompts(3, 3, 8)
    cases.append(dict(model_seed=seed + 3, prompts=ps, max_new_tokens=8, block_size=8,
                      num_blocks=None, eos_id="first"))
    return cases


def serve_model(case: dict) -> GPT:
    return tiny_model(case["model_seed"], vocab_size=SERVE_VOCAB)


def serve_eos(case: dict, model=None):
    """The stop token of the eos case: the greedy first token of request 0."""
    if case["eos_id"] != "first":
        return None
    model = model or serve_model(case)
    with torch.no_grad():
        return int(model(case["prompts"][0][None])[0, -1].argmax())


def record_passes(model, run) -> dict:
    """``run()``'s outputs (a list of 1-D token tensors) and what every forward pass fed the
    model (token ids, positions, tokens per pass), seen by pre-hooks on the embeddings."""
    ids, pos, lens = [], [], []

    def spy_tokens(module, args):        # what every forward pass feeds the model
        ids.append(args[0].detach().reshape(-1).clone())

    def spy_positions(module, args):
        pos.append(args[0].detach().reshape(-1).clone())
        lens.append(int(args[0].numel()))

    hooks = [model.embed_tokens.register_forward_pre_hook(spy_tokens),
             model.embed_positions.register_forward_pre_hook(spy_positions)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    rec = {f"out_{i}": torch.as_tensor(o).reshape(-1).to(torch.int64) for i, o in enumerate(out)}
    rec["n_out"] = len(out)
    rec["pass_ids"] = torch.cat(ids).to(torch.int64) if ids else torch.zeros(0, dtype=torch.int64)
    rec["pass_pos"] = torch.cat(pos).to(torch.int64) if pos else torch.zeros(0, dtype=torch.int64)
    rec["pass_lens"] = torch.tensor(lens, dtype=torch.int64)
    return rec


def run_serve(fn, case: dict) -> dict:
    model = serve_model(case)
    eos = serve_eos(case, model)
    return record_passes(model, lambda: fn(
        model, [p.clone() for p in case["prompts"]], case["max_new_tokens"],
        block_size=case["block_size"], num_blocks=case["num_blocks"], eos_id=eos))
