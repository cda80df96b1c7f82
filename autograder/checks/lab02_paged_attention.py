"""How the hidden checks of lab02_paged_attention are judged (trusted side; never in the kernel).

References are recomputed here from the inputs that ``inputs_X(seed)`` draws again:
attention over blocks in float64, the allocator and the cache replayed as a model of what
must hold (ref counts, free counts, block counts, the tokens each table reaches), greedy
tokens by teacher forcing the student's own output through the model in float64. When an
output is wrong, the message tries the mistakes of course/mistakes.md and names the one
that fits. ``serve`` is also judged on what its forward passes fed the model (a spy on the
model's embeddings, in the kernel): running sequences must share passes, and a waiting
request must join while others still run (continuous batching).
"""
from __future__ import annotations

import ast

import torch

from llmopt.testing import compare, tolerance

from .. import static
from ..cases.lab02_paged_attention import serve_eos, serve_model, tiny_model

# The sandbox shows these llmopt modules (and what they import); paged_attention stays hidden.
# kv_cache (lab01) is the greedy generate the visible tests compare serve with.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "kv_cache", "viz.paged"]


# --- part 1: memory -----------------------------------------------------------------------

def verify_kv_memory_usage(case: dict, out: dict) -> str | None:
    lens, max_len, bs = case["context_lens"], case["max_seq_len"], case["block_size"]
    tokens = sum(lens)
    contiguous = tokens / (len(lens) * max_len)
    paged = tokens / (sum(-(-n // bs) for n in lens) * bs)
    where = f"({len(lens)} sequences, max_seq_len={max_len}, block_size={bs})"
    got_c, got_p = float(out["contiguous"]), float(out["paged"])
    if abs(got_c - contiguous) > 1e-9 * max(1.0, contiguous):
        return (f"contiguous fraction wrong {where} — every sequence reserves max_seq_len slots; "
                "the fraction is tokens held / slots reserved")
    if abs(got_p - paged) > 1e-9:
        hint = " — a sequence of n tokens holds ceil(n / B) whole blocks"
        if abs(got_p - 1.0) < 1e-12:
            hint = " — the last block is reserved whole even when it is partly empty"
        return f"paged fraction wrong {where}{hint}"
    return None


# --- part 2: the allocator and the cache ----------------------------------------------------

def verify_BlockAllocator(case: dict, out: dict) -> str | None:
    n = case["num_blocks"]
    in_use: dict[int, int] = {}
    handles: list[int] = []
    blocks, errors = out["blocks"].tolist(), out["errors"].tolist()
    free_after, refs = out["num_free"].tolist(), out["ref_counts"].tolist()
    for i, op in enumerate(case["ops"]):
        what = f"operation {i} ({op[0]}, {n} blocks, {len(in_use)} in use)"
        if op[0] == "alloc":
            if len(in_use) == n:
                if errors[i] == 0:
                    return (f"{what}: allocate() with no free block returned {blocks[i]} — raise a "
                            "clear error (a RuntimeError, e.g. class OutOfBlocks(RuntimeError)) "
                            "when every block is in use")
                if errors[i] == 2:
                    return f"{what}: out of blocks, allocate() must raise a RuntimeError (or a subclass)"
                continue
            if errors[i]:
                return (f"{what}: allocate() raised although {n - len(in_use)} blocks were free — "
                        "does free() return a block to the free list when its ref count reaches 0?")
            b = blocks[i]
            if not 0 <= b < n:
                return f"{what}: allocate() returned {b}, outside 0..{n - 1}"
            if b in in_use:
                return (f"{what}: allocate() returned block {b}, which is still in use — a block "
                        "that is shared or owned must not be on the free list")
            in_use[b] = 1
            handles.append(b)
        else:
            b = handles[op[1]]
            if errors[i]:
                return f"{what}: {op[0]}({b}) raised on a block in use"
            if op[0] == "incref":
                in_use[b] += 1
            else:
                in_use[b] -= 1
                shared = in_use[b] > 0
                if not shared:
                    del in_use[b]
                if free_after[i] != n - len(in_use):
                    if shared:
                        return (f"{what}: free({b}) of a block with {in_use[b] + 1} references: "
                                "the block must stay in use — decrement the ref count and return "
                                "the block to the free list only at zero")
                    return (f"{what}: after the last reference of block {b} was freed, num_free() "
                            f"was {free_after[i]} — the block goes back to the free list")
        if free_after[i] != n - len(in_use):
            return f"{what}: num_free() was {free_after[i]} — free blocks are those with ref count 0"
        for blk in range(n):
            if refs[i][blk] != in_use.get(blk, 0):
                return (f"{what}: ref_count({blk}) was {refs[i][blk]} — allocate() sets it to 1, "
                        "incref() adds one sharer, free() removes one")
    return None


def _replay_cache(case):
    """Expected tokens (k, v per layer) of every live sequence after the script."""
    seqs, mid = {}, []
    for step in case["script"]:
        if step[0] == "add":
            seqs[step[1]] = []
        elif step[0] == "free":
            del seqs[step[1]]
        else:
            mid.append(sum(kv.shape[2] for kv in seqs[step[1]]))
            seqs[step[1]].append(step[2])
    return {s: torch.cat(kvs, dim=2) for s, kvs in seqs.items()}, mid


def _gather(pool, layer, table, n, bs):
    """Tokens 0..n-1 reached through ``table`` (None if the table cannot hold them)."""
    rows = []
    for t in range(n):
        j = t // bs
        if j >= len(table) or not 0 <= table[j] < pool.shape[1]:
            return None
        rows.append(pool[layer, table[j], t % bs])
    return torch.stack(rows) if rows else pool.new_zeros((0,) + pool.shape[3:])


def _table(row) -> list[int]:
    return [int(b) for b in row.tolist() if b >= 0]


def _check_tokens(out_k, out_v, table, expected, bs, who) -> str | None:
    """expected: (L, 2, n, H, d); the student's pools read through their table."""
    L, n = expected.shape[0], expected.shape[2]
    for layer in range(L):
        for pool, idx, name in ((out_k, 0, "keys"), (out_v, 1, "values")):
            got = _gather(pool, layer, table, n, bs)
            if got is None:
                return f"{who}: its block table {table} cannot hold {n} tokens of block size {bs}"
            if not torch.equal(got, expected[layer, idx]):
                hint = ""
                logical = _gather(pool, layer, list(range(len(table))), n, bs)
                if logical is not None and torch.equal(logical, expected[layer, idx]):
                    hint = (" — the tokens sit in blocks 0, 1, 2, ... (the logical numbers): write "
                            "token t into the PHYSICAL block table[t // B] at slot t % B")
                return (f"{who}, layer {layer}: the {name} read through its block table are not the "
                        f"{name} appended{hint}")
    return None


def verify_PagedKVCache(case: dict, out: dict) -> str | None:
    bs, NB = case["block_size"], case["num_blocks"]
    seqs, mid = _replay_cache(case)
    live = [0, 2, 3]
    lens = [seqs[s].shape[2] for s in live]
    if out["len_after_first_layer"].tolist() != mid:
        return ("the length advanced in the middle of a forward pass: append() of every layer writes "
                "the same positions; advance the length after the LAST layer's append")
    if out["lens"].tolist() != lens:
        return (f"context lengths of the live sequences were {out['lens'].tolist()} — each append "
                "of T tokens (all layers) adds T")
    tables = [_table(r) for r in out["tables"]]
    for s, t, n in zip(live, tables, lens):
        if len(t) != -(-n // bs):
            return (f"sequence {s} ({n} tokens, block size {bs}) holds {len(t)} blocks — allocate a "
                    "new block only when the last one is full: ceil(n / B) blocks")
    seen = {}
    for s, t in zip(live, tables):
        for b in t:
            if b in seen and seen[b] != s:
                return (f"sequences {seen[b]} and {s} both use physical block {b} without a fork — "
                        "was a freed block still referenced, or handed out twice?")
            seen[b] = s
    for s, t in zip(live, tables):
        msg = _check_tokens(out["k"], out["v"], t, seqs[s], bs, f"sequence {s}")
        if msg:
            if "PHYSICAL" not in msg and any(   # the sequence written last survives at blocks 0, 1, ...
                    _check_tokens(out["k"], out["v"], list(range(len(t2))), seqs[s2], bs, "") is None
                    for s2, t2 in zip(live, tables)):
                msg += (" — the tokens sit in blocks 0, 1, 2, ... (the logical numbers): write token t "
                        "into the PHYSICAL block table[t // B] at slot t % B")
            return msg
    used = sum(len(t) for t in tables)
    if int(out["num_free"]) != NB - used:
        return (f"num_free() was {int(out['num_free'])} with {used} of {NB} blocks in use — free() "
                "must return every block of the sequence")
    util = sum(lens) / (used * bs)
    if abs(float(out["utilization"]) - util) > 1e-6:
        return ("utilization() is wrong — the fraction of the slots of the blocks in use that hold "
                "a token")
    return None


def verify_fork(case: dict, out: dict) -> str | None:
    bs = case["block_size"]
    before = [_table(r) for r in out["tables_before_fork"]]
    after = [_table(r) for r in out["tables_after_fork"]]
    f0, f1 = int(out["free_before_fork"]), int(out["free_after_fork"])
    if f1 != f0:
        return (f"fork changed the number of free blocks by {f0 - f1}: fork copies nothing, it only "
                "adds a reference to each of the parent's blocks (copy-on-write copies later)")
    if after[1] != after[0] or after[0] != before[0]:
        return ("after fork the child's block table must be the parent's: the same physical blocks "
                "(shared, ref count + 1), nothing copied yet")
    cw = [_table(r) for r in out["tables_after_child_write"]]
    f2 = int(out["free_after_child_write"])
    if f2 == f1 and cw[1] == cw[0]:
        return ("the child's first write went into the block it shares with the parent: copy that "
                "block first (copy-on-write), then write into the copy")
    changed = [j for j in range(min(len(cw[0]), len(cw[1]))) if cw[0][j] != cw[1][j]]
    if f1 - f2 != 1 or changed != [len(cw[0]) - 1] or cw[0] != after[0]:
        return (f"the child's first write into a shared block took {f1 - f2} new blocks and changed "
                f"{len(changed)} of {len(cw[0])} entries of its table: copy-on-write copies only the "
                "block being written (the partly filled last one), the rest stays shared")
    pw = [_table(r) for r in out["tables_after_parent_write"]]
    f3 = int(out["free_after_parent_write"])
    if f3 != f2 or pw[0] != cw[0]:
        return ("after the child's copy the parent is the only owner of its last block, so it writes "
                "in place: after copying, drop one reference of the shared block")
    # contents: the parent never sees the child's tokens, and the other way round
    parent = torch.cat([case["prefix"]] + case["parent"], dim=2)
    child = torch.cat([case["prefix"]] + case["child"], dim=2)
    ends = [_table(r) for r in out["tables_end"]]
    if out["lens_end"].tolist() != [parent.shape[2], child.shape[2]]:
        return f"context lengths after fork and appends were {out['lens_end'].tolist()}"
    for who, t, exp in (("the parent", ends[0], parent), ("the child", ends[1], child)):
        msg = _check_tokens(out["k_before_free"], out["v_before_free"], t, exp, bs, who)
        if msg:
            return msg + " (a write into a shared block must go to a private copy)"
    final = [_table(r) for r in out["tables_after_free"]]
    msg = _check_tokens(out["k"], out["v"], final[0], child, bs, "the child")
    in_use = len(set(final[0]) | set(final[1]))
    if msg or int(out["free_after_free"]) != case["num_blocks"] - in_use:
        return ("after free(parent) a new sequence overwrote the child's tokens: a block was freed "
                "while still shared — free() decrements the ref count and returns the block at zero")
    return _check_tokens(out["k"], out["v"], final[1], case["x"], bs, "a new sequence after free")


# --- part 3: attention over blocks ----------------------------------------------------------

def _blocks_ref(case, lens=None, tables=None, scale=None, per_block=False):
    """Attention over blocks in float64: (S, H, d)."""
    q, kc, vc = case["q"].double(), case["k_cache"].double(), case["v_cache"].double()
    tables = case["block_tables"].long() if tables is None else tables
    lens = case["context_lens"].long() if lens is None else lens
    S, H, d = q.shape
    B = kc.shape[1]
    scale = (d ** -0.5 if case["scale"] is None else case["scale"]) if scale is None else scale
    M = tables.shape[1]
    K, V = kc[tables], vc[tables]                                   # (S, M, B, H, d)
    s = torch.einsum("shd,smbhd->shmb", q, K) * scale
    pos = torch.arange(M * B).view(1, 1, M, B)
    s = s.masked_fill(pos >= lens.view(S, 1, 1, 1), float("-inf"))
    if per_block:  # each block normalised on its own, then summed
        a = torch.softmax(s, dim=-1).nan_to_num(0.0)
    else:
        a = torch.softmax(s.reshape(S, H, M * B), -1).view(S, H, M, B)
    return torch.einsum("shmb,smbhd->shd", a, V)


def _close(a, b, tol=2e-2):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def _verify_attention(case: dict, out: dict, triton: bool) -> str | None:
    q = case["q"]
    dtype = q.dtype
    expected = _blocks_ref(case)
    o = out["o"]
    S, H, d = q.shape
    where = (f"(S={S}, H={H}, d={d}, block size {case['k_cache'].shape[1]}, context lengths "
             f"{case['context_lens'].tolist()}, {case['dtype']})")
    if o.dtype != dtype:
        return f"o: dtype {o.dtype}, expected {dtype} (the dtype of q)"
    rtol, atol = tolerance(dtype)
    atol *= max(1.0, expected.abs().max().item())
    msg = compare(o.double(), expected.to(dtype).double(), rtol=rtol, atol=atol, name=f"o {where}",
                  check_dtype=False)
    if msg is None:
        return None
    B = case["k_cache"].shape[1]
    lens = case["context_lens"].long()
    full = -(-lens // B) * B
    M = case["block_tables"].shape[1]
    scale = d ** -0.5 if case["scale"] is None else case["scale"]
    hints = [
        (lambda: _blocks_ref(case, lens=full), "the tail of the last block is read beyond "
         "context_len: mask every position ≥ context_len (by the context length, not the block count)"),
        (lambda: _blocks_ref(case, lens=torch.full_like(lens, M * B)), "every column of the block "
         "table is read: mask positions ≥ context_len"),
        (lambda: _blocks_ref(case, tables=torch.arange(M).expand(S, M)), "the blocks are read at their "
         "logical numbers: the block table maps logical block j → physical block block_tables[s, j]"),
        (lambda: _blocks_ref(case, per_block=True), "softmax per block: A_ij is normalised over ALL "
         "blocks of the context — one softmax (one max and one sum) over the whole context"),
        (lambda: _blocks_ref(case, per_block=True) / (-(-lens // B)).view(S, 1, 1),
         "softmax per block, averaged: one softmax over the whole context"),
        (lambda: _blocks_ref(case, scale=1.0), "the scores are not scaled (scale = 1/√d by default)"),
        (lambda: _blocks_ref(case, scale=scale * scale), "the scale is applied twice"),
    ]
    for fn, hint in hints:
        if _close(o, fn()):
            return msg + " — " + hint
    if triton and dtype == torch.bfloat16:
        return msg + (" — bf16 arithmetic is wrong in Triton's CPU interpreter: convert the loaded "
                      "tiles to fp32 right after tl.load")
    return msg


def verify_paged_attention(case: dict, out: dict) -> str | None:
    return _verify_attention(case, out, triton=False)


def verify_paged_attention_triton(case: dict, out: dict) -> str | None:
    return _verify_attention(case, out, triton=True)


# --- part 5: the model over the paged cache, and the engine ---------------------------------

def verify_paged_forward(case: dict, out: dict) -> str | None:
    model = tiny_model(case["model_seed"], pre_ln=case["pre_ln"]).double()
    seqs = [torch.zeros(0, dtype=torch.long) for _ in range(3)]
    first_ok = True
    for t, chunks in enumerate(case["steps"]):
        seqs = [torch.cat([s, c]) for s, c in zip(seqs, chunks)]
        with torch.no_grad():
            expected = torch.stack([model(s[None])[0, -1] for s in seqs])   # (3, V)
        got = out[f"logits_{t}"]
        msg = compare(got.double(), expected, rtol=1e-3, atol=1e-4,
                      name=f"logits of pass {t} (new tokens per sequence: "
                           f"{[int(c.numel()) for c in chunks]})", check_dtype=False)
        if msg is None:
            continue
        if got.shape == expected.shape:
            with torch.no_grad():
                firsts = torch.stack([model(s[None])[0, len(s) - len(c)] for s, c in zip(seqs, chunks)])
            if _close(got, firsts, 1e-3):
                return msg + " — return the logits of each sequence's LAST new token"
        if t > 0 and first_ok:
            return msg + (" — the prompt pass was right, a later one not: token t of a sequence sits "
                          "at position len(sequence) + t (positions are per sequence, OPT's offset 2 "
                          "on top), and it attends to all of the sequence's cached tokens")
        return msg + (" — each sequence's tokens get their own positions (0..n-1 in the prompt pass, "
                      "OPT's offset 2 on top), are appended to the cache before attending, and "
                      "attend causally: token t sees the first len + t + 1 tokens")
    return None


def _greedy_check(model, prompt, got, n_new, eos, i) -> str | None:
    T = len(prompt)
    if got.dim() != 1 or len(got) < T or not torch.equal(got[:T], prompt):
        return f"request {i}: the output must be the prompt followed by the new tokens (1-D)"
    new = got[T:]
    if eos is None and len(new) != n_new:
        return f"request {i}: {len(new)} new tokens, expected max_new_tokens = {n_new}"
    if len(new) > n_new or len(new) == 0:
        return f"request {i}: {len(new)} new tokens for max_new_tokens = {n_new}"
    if eos is not None:
        stops = (new == eos).nonzero()
        if len(stops) and int(stops[0]) != len(new) - 1:
            return f"request {i}: generation must stop right after the stop token (eos_id)"
        if not len(stops) and len(new) != n_new:
            return f"request {i}: stopped after {len(new)} tokens without producing eos_id"
    with torch.no_grad():
        logits = model(got[None, :-1])[0]                              # (T + n - 1, V)
    for t in range(T, len(got)):
        row = logits[t - 1]
        if row[int(got[t])] < row.max() - 1e-4:
            return (f"request {i}, new token {t - T}: not the greedy (argmax) token given the tokens "
                    "before it — are positions per sequence, and is each step's new token appended "
                    "to its own sequence's blocks?")
    return None


def _spans(out):
    """[(positions, ids)] per forward pass, from the spy on the model's embeddings."""
    lens = out["pass_lens"].tolist()
    pos, ids = out["pass_pos"] - 2, out["pass_ids"]                    # OPT's offset 2
    passes, at = [], 0
    for n in lens:
        passes.append((pos[at:at + n].tolist(), ids[at:at + n].tolist()))
        at += n
    return passes


def verify_serve(case: dict, out: dict) -> str | None:
    model = serve_model(case).double()
    eos = serve_eos(case)
    prompts = case["prompts"]
    P = len(prompts)
    n_new = case["max_new_tokens"]
    n_new = [n_new] * P if isinstance(n_new, int) else list(n_new)
    if int(out["n_out"]) != P:
        return f"serve returned {int(out['n_out'])} outputs for {P} prompts: one per prompt, in order"
    outs = [out[f"out_{i}"] for i in range(P)]
    for i in range(P):
        msg = _greedy_check(model, prompts[i], outs[i], n_new[i], eos, i)
        if msg:
            return msg
    passes = _spans(out)
    if not passes or sum(out["pass_lens"].tolist()) != out["pass_ids"].numel():
        return ("the model's embeddings never ran (or ran unevenly): run each forward pass through the "
                "model's own modules — model.embed_tokens(ids), model.embed_positions(positions + 2), ...")
    sequential = sum(len(o) - len(p) for o, p in zip(outs, prompts))
    bound = P + max(len(o) - len(p) for o, p in zip(outs, prompts))
    if case["num_blocks"] is None and len(passes) > bound:
        return (f"serve ran {len(passes)} forward passes for {P} requests of at most "
                f"{bound - P} new tokens each, when all of them fit in memory: the running sequences "
                "must share forward passes (one pass per step over every running sequence), not be "
                "generated one after another")
    if case["num_blocks"] is not None:
        if len(passes) >= sequential:
            return (f"serve ran {len(passes)} forward passes for {sequential} new tokens: the "
                    "running sequences must share forward passes")
        joins, last = {i: [] for i in range(P)}, {}   # passes that start a prefill; the last fed token
        for p, (pos, ids) in enumerate(passes):
            rows = set(zip(pos, ids))
            for i, o in enumerate(outs):             # (prompts start with distinct tokens)
                if (0, int(o[0])) in rows:
                    joins[i].append(p)
                if (len(o) - 2, int(o[-2])) in rows:
                    last[i] = p
        if not all(joins.values()) or len(last) < P:
            return ("could not find every request's tokens in the forward passes: feed each "
                    "sequence's new tokens with their positions through the model's embeddings")
        joined_while_running = any(
            joins[r][0] <= last[gone] < j <= last[r]
            for r in range(P) for gone in range(P) for new in range(P) if len({r, gone, new}) == 3
            for j in joins[new])
        if not joined_while_running:
            return (f"with memory for a few requests at a time (num_blocks={case['num_blocks']} blocks "
                    f"of {case['block_size']}: the cache must not be larger), no request joined while "
                    "others were still running: continuous batching lets a waiting request in as soon "
                    "as a finished one leaves and frees its blocks (static batching waits for the "
                    "whole batch)")
    return None


# --- how the parts must be computed (read from the notebook's source, see static.py) ---------

_TORCH_ATTENTION = (
    "*attention*", "scaled_dot_product_attention", "*softmax*", "softmax", "log_softmax",
    "softmin", "*logsumexp*", "logsumexp", "logaddexp*", "*matmul*", "matmul", "mm", "bmm",
    "*addmm", "addmm", "baddbmm", "*mv", "mv", "einsum", "tensordot", "inner", "outer", "dot",
    "vdot", "linear", "bilinear", "exp", "exp_", "exp2", "exp2_", "expm1", "pow", "pow_",
    "sigmoid", "tanh", "softplus", "torch.nn", "torch.special", "torch.linalg", "torch.func",
    "torch.ops", "torch.library", "torch.compile", "torch.jit", "torch.utils", "torch.hub",
    "torch.load", "torch.sparse", "torch.nested", "torch.masked", "torch._C",
    "index_select", "gather", "take", "take_along_dim", "@", "**")
_WHY_TRITON = (": the Triton part computes scores, softmax and the sum over V inside your "
               "@triton.jit kernel, which reads each block through the block table; the host code "
               "only allocates the output and launches it")
_HOST_MODULES = ("torch", "math", "functools", "typing", "os.environ", "triton.jit",
                 "triton.cdiv", "triton.next_power_of_2", "triton.language", "llmopt.testing")


def _load_calls(code, fn_node):
    """tl.load calls in one @triton.jit def (tl under any alias)."""
    for node in ast.walk(fn_node):
        if isinstance(node, ast.Call):
            c = static._chain(node.func)
            if c and c[1] and [".".join([o] + c[1]) for o in code.origins(c[0])] == ["triton.language.load"]:
                yield node


def reads_through_block_table():
    """A launched @triton.jit kernel loads a value with tl.load and uses it (directly or through
    local assignments) in the address of another tl.load: the physical block number read from
    the block table, inside the kernel."""
    def names(node):
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    def indirect(code, fn_node) -> bool:
        loads = list(_load_calls(code, fn_node))
        tainted = set()
        changed = True
        while changed:  # names assigned from a tl.load, or from a tainted name
            changed = False
            for node in ast.walk(fn_node):
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    src = node.value
                    hit = any(ld is sub for sub in ast.walk(src) for ld in loads) or names(src) & tainted
                    if hit:
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        new = set().union(*(set(static._targets(t)) for t in targets)) - tainted
                        if new:
                            tainted |= new
                            changed = True
        for ld in loads:
            ptr = ld.args[0] if ld.args else next((k.value for k in ld.keywords if k.arg == "pointer"), None)
            if ptr is None:
                continue
            if names(ptr) & tainted or any(other is sub for sub in ast.walk(ptr) for other in loads):
                return True
        return False

    def rule(code, fn: str):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            for k in u.launches:
                for kname, kb, ku, kjit in code.reachable(k)[0]:
                    if kjit and indirect(code, kb.node):
                        return None
        return (f"{fn}'s Triton kernel never reads the block table: load the physical block number "
                "with tl.load(block_tables + ...) inside the kernel and use it in the address of "
                "the keys and values (no contiguous copy of the blocks)")
    return rule


def _triton_part(fn):
    return (fn, [static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.testing",)),
                 static.imports_only(*_HOST_MODULES), static.launches_triton_kernel(ops=("load", "store")),
                 static.forbids(*_TORCH_ATTENTION, why=_WHY_TRITON), reads_through_block_table()])


_SDPA = ("scaled_dot_product_attention", "flash_attn*", "*sdpa*", "torch.nn.attention")
_ENGINE_SHORTCUTS = ("generate", "transformers", "llmopt.kv_cache", "vllm")
METHOD = {
    "paged_attention": ("paged_attention", [
        static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.testing",)),
        static.forbids(*_SDPA, why=": this part asks for the lecture's per-block scores A_ij and "
                                   "o_i = Σ_j V_j A_ijᵀ")]),
    "paged_attention_triton": _triton_part("paged_attention_triton"),
    "paged_forward": ("paged_forward", [
        static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.gpt", "llmopt.testing")),
        static.forbids(*_ENGINE_SHORTCUTS, why=": the forward runs over YOUR paged cache")]),
    "serve": ("serve", [
        static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.gpt", "llmopt.testing")),
        static.forbids(*_ENGINE_SHORTCUTS, why=": serve batches the running requests through your "
                                               "paged forward, it does not call a generate loop")]),
}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----

def _cache_outputs(case):
    pool = ("float", (case["n_layer"], case["num_blocks"], case["block_size"], case["n_head"],
                      case["head_dim"]))
    n_appends = sum(1 for s in case["script"] if s[0] == "append")
    return {"k": pool, "v": pool, "tables": ("int", (3, None)), "lens": ("int", (3,)),
            "len_after_first_layer": ("int", (n_appends,)), "utilization": ("float", ()),
            "num_free": ("int", ())}


def _fork_outputs(case):
    pool = ("float", (case["n_layer"], case["num_blocks"], case["block_size"], case["n_head"],
                      case["head_dim"]))
    spec = {"k": pool, "v": pool, "k_before_free": pool, "v_before_free": pool,
            "tables_end": ("int", (2, None)), "lens_end": ("int", (2,)),
            "tables_after_free": ("int", (2, None)), "free_after_free": ("int", ())}
    for tag in ("before_fork", "after_fork", "after_child_write", "after_parent_write"):
        spec[f"tables_{tag}"] = ("int", (2, None))
        spec[f"free_{tag}"] = ("int", ())
    return spec


def _serve_outputs(case):
    spec = {f"out_{i}": ("int", (None,)) for i in range(len(case["prompts"]))}
    spec.update({"n_out": ("int", ()), "pass_ids": ("int", (None,)), "pass_pos": ("int", (None,)),
                 "pass_lens": ("int", (None,))})
    return spec


OUTPUTS = {
    "kv_memory_usage": lambda case: {"contiguous": ("float", ()), "paged": ("float", ())},
    "BlockAllocator": lambda case: {k: ("int", (len(case["ops"]),)) for k in ("blocks", "errors", "num_free")}
                                   | {"ref_counts": ("int", (len(case["ops"]), case["num_blocks"]))},
    "PagedKVCache": _cache_outputs,
    "fork": _fork_outputs,
    "paged_attention": lambda case: {"o": ("float", tuple(case["q"].shape))},
    "paged_attention_triton": lambda case: {"o": ("float", tuple(case["q"].shape))},
    "paged_forward": lambda case: {f"logits_{t}": ("float", (3, 97)) for t in range(len(case["steps"]))},
    "serve": _serve_outputs,
}
