"""lab02's hidden checks, tested both ways: the reference passes; stubs, the mistakes of
course/mistakes.md and the lazy shortcuts fail, each with a message that points at it."""
import json
import pathlib
import re

import pytest
import torch

from autograder import grade_functions, static
from autograder.notebook import cell_source, grade_cells, nbgrader_meta
from llmopt import paged_attention as ref

LAB = "lab02_paged_attention"
CHECKS = {"kv_memory_usage": ref.kv_memory_usage, "BlockAllocator": ref.BlockAllocator,
          "PagedKVCache": ref.PagedKVCache, "fork": ref.PagedKVCache,
          "paged_attention": ref.paged_attention, "paged_attention_triton": ref.paged_attention_triton,
          "paged_forward": (ref.paged_forward, ref.PagedKVCache), "serve": ref.serve}


def stub(*args, **kwargs):
    raise NotImplementedError()


def grade(name, fn, seed=1):
    return grade_functions(LAB, {name: fn}, seed=seed)[name]


def failed_with(result, text):
    return not result.ok and any(text in m for m in result.messages)


@pytest.mark.parametrize("seed", [0, 12345])
def test_reference_passes(seed):
    results = grade_functions(LAB, CHECKS, seed=seed)
    for name, result in results.items():
        assert result.ok, result.summary()


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_stub_fails(name):
    fn = (stub, ref.PagedKVCache) if name == "paged_forward" else stub
    result = grade(name, fn)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0]


# --- part 1 ------------------------------------------------------------------------------------

def test_memory_usage_with_full_last_block_fails():
    result = grade("kv_memory_usage", lambda lens, m, b: (ref.kv_memory_usage(lens, m, b)[0], 1.0))
    assert failed_with(result, "partly empty")


def test_memory_usage_of_contiguous_without_max_len_fails():
    result = grade("kv_memory_usage", lambda lens, m, b: (1.0, ref.kv_memory_usage(lens, m, b)[1]))
    assert failed_with(result, "max_seq_len")


# --- the allocator ---------------------------------------------------------------------------

class FreesWhileShared(ref.BlockAllocator):
    def free(self, block):
        if self.ref_counts[block] == 0:
            raise ValueError("double free")
        self.ref_counts[block] = 0
        self.free_list.append(block)


class NoErrorWhenFull(ref.BlockAllocator):
    def allocate(self):
        return super().allocate() if self.free_list else 0


class ValueErrorWhenFull(ref.BlockAllocator):
    def allocate(self):
        if not self.free_list:
            raise ValueError("full")
        return super().allocate()


class NeverReuses(ref.BlockAllocator):
    def free(self, block):
        self.ref_counts[block] -= 1   # never back on the free list


@pytest.mark.parametrize("cls,hint", [
    (FreesWhileShared, "return the block to the free list only at zero"),
    (NoErrorWhenFull, "raise a clear error"), (ValueErrorWhenFull, "RuntimeError"),
    (NeverReuses, "free list")])
def test_broken_allocator_fails(cls, hint):
    assert failed_with(grade("BlockAllocator", cls), hint), grade("BlockAllocator", cls).summary()


# --- the cache ---------------------------------------------------------------------------------

class LogicalAsPhysical(ref.PagedKVCache):
    """Reserves blocks but writes token t into block t // B (the logical number)."""
    def write(self, layer, slots, k, v):
        raise AssertionError  # not used: append is overridden

    def append(self, seq_id, layer, k, v):
        t0 = self.lens[seq_id]
        self.reserve(seq_id, k.shape[0])
        B = self.block_size
        for i in range(k.shape[0]):
            t = t0 + i
            self.k[layer, t // B, t % B], self.v[layer, t // B, t % B] = k[i], v[i]
        if layer == self.n_layer - 1:
            self.lens[seq_id] += k.shape[0]


class NeverFrees(ref.PagedKVCache):
    def free(self, seq_id):
        del self.tables[seq_id], self.lens[seq_id]


class AdvancesEveryLayer(ref.PagedKVCache):
    def append(self, seq_id, layer, k, v):
        slots = self.reserve(seq_id, k.shape[0])
        self.write(layer, slots, k, v)
        if layer == 0:
            self.advance(seq_id, k.shape[0])


class BlockPerToken(ref.PagedKVCache):
    """Allocates a whole new block at every append."""
    def reserve(self, seq_id, n_new):
        if n_new and self.lens[seq_id] % self.block_size and len(self.tables[seq_id]) * self.block_size \
                < self.lens[seq_id] + n_new + self.block_size:
            self.tables[seq_id].append(self.allocator.allocate())
        return super().reserve(seq_id, n_new)


@pytest.mark.parametrize("cls,hint", [
    (LogicalAsPhysical, "PHYSICAL block table[t // B]"), (NeverFrees, "raised"),
    (AdvancesEveryLayer, "advance the length after the LAST layer"),
    (BlockPerToken, "only when the last one is full")])
def test_broken_cache_fails(cls, hint):
    result = grade("PagedKVCache", cls)
    assert failed_with(result, hint), result.summary()


def test_utilization_counting_reserved_blocks_fails():
    class WrongUtil(ref.PagedKVCache):
        def utilization(self):
            return 1.0
    assert failed_with(grade("PagedKVCache", WrongUtil), "utilization")


# --- fork and copy-on-write ------------------------------------------------------------------

class EagerFork(ref.PagedKVCache):
    def fork(self, parent_id, child_id):
        self.tables[child_id], self.lens[child_id] = [], self.lens[parent_id]
        for b in self.tables[parent_id]:
            new = self.allocator.allocate()
            self.k[:, new], self.v[:, new] = self.k[:, b], self.v[:, b]
            self.tables[child_id].append(new)


class CopiesWholeTable(ref.PagedKVCache):
    """Copy-on-write that copies every shared block of the writer's table."""
    def reserve(self, seq_id, n_new):
        table = self.tables[seq_id]
        if n_new and any(self.allocator.ref_count(b) > 1 for b in table):
            for j, b in enumerate(table):
                if self.allocator.ref_count(b) > 1:
                    new = self.allocator.allocate()
                    self.k[:, new], self.v[:, new] = self.k[:, b], self.v[:, b]
                    self.allocator.free(b)
                    table[j] = new
        return super().reserve(seq_id, n_new)


class NoCopyOnWrite(ref.PagedKVCache):
    def reserve(self, seq_id, n_new):
        t0, t1, B = self.lens[seq_id], self.lens[seq_id] + n_new, self.block_size
        table = self.tables[seq_id]
        while len(table) < -(-t1 // B):
            table.append(self.allocator.allocate())
        return [table[t // B] * B + t % B for t in range(t0, t1)]


class CopyWithoutDecref(ref.PagedKVCache):
    """Copies the shared block but keeps the reference on the old one: the parent copies too."""
    def reserve(self, seq_id, n_new):
        t0, B = self.lens[seq_id], self.block_size
        table = self.tables[seq_id]
        j = t0 // B
        if n_new and j < len(table) and self.allocator.ref_count(table[j]) > 1:
            new = self.allocator.allocate()
            self.k[:, new], self.v[:, new] = self.k[:, table[j]], self.v[:, table[j]]
            table[j] = new           # the old block keeps its count
        return super().reserve(seq_id, n_new)


class FreeWhileSharedCache(ref.PagedKVCache):
    def free(self, seq_id):
        for b in self.tables.pop(seq_id):
            while self.allocator.ref_count(b) > 0:
                self.allocator.free(b)
        del self.lens[seq_id]


@pytest.mark.parametrize("cls,hint", [
    (EagerFork, "fork copies nothing"), (CopiesWholeTable, "copies only the block being written"),
    (NoCopyOnWrite, "copy-on-write"), (CopyWithoutDecref, "drop one reference"),
    (FreeWhileSharedCache, "freed while still shared")])
def test_broken_fork_fails(cls, hint):
    result = grade("fork", cls)
    assert result.passed == 0 and failed_with(result, hint), result.summary()


# --- attention over blocks ---------------------------------------------------------------------

def tail_unmasked(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    B = k_cache.shape[1]
    return ref.paged_attention(q, k_cache, v_cache, block_tables, -(-context_lens // B) * B, scale)


def logical_blocks(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    S, M = block_tables.shape
    return ref.paged_attention(q, k_cache, v_cache, torch.arange(M).expand(S, M).int(), context_lens, scale)


def softmax_per_block(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    S, H, d = q.shape
    B = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    K, V = k_cache[block_tables.long()].float(), v_cache[block_tables.long()].float()
    s = torch.einsum("shd,smbhd->shmb", q.float(), K) * scale
    pos = torch.arange(K.shape[1] * B).view(1, 1, -1, B)
    s = s.masked_fill(pos >= context_lens.view(S, 1, 1, 1), float("-inf"))
    a = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("shmb,smbhd->shd", a, V).to(q.dtype)


def no_scale(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    return ref.paged_attention(q, k_cache, v_cache, block_tables, context_lens, 1.0)


@pytest.mark.parametrize("name", ["paged_attention", "paged_attention_triton"])
@pytest.mark.parametrize("fn,hint", [(tail_unmasked, "mask every position ≥ context_len"),
                                     (logical_blocks, "logical block j → physical block"),
                                     (softmax_per_block, "over the whole context"),
                                     (no_scale, "not scaled")])
def test_broken_attention_fails(name, fn, hint):
    result = grade(name, fn)
    assert failed_with(result, hint), result.summary()


def test_wrong_dtype_fails():
    result = grade("paged_attention", lambda *a, **kw: ref.paged_attention(*a, **kw).float())
    assert failed_with(result, "expected torch.float16")


# --- the paged forward pass ------------------------------------------------------------------

def forward_positions_from_zero(model, cache, seq_ids, chunks, attention=None):
    """Positions restart at 0 in every pass (the lab01 mistake, per sequence)."""
    saved = {s: cache.lens[s] for s in seq_ids}
    real = model.embed_positions

    class Shifted(torch.nn.Module):
        def forward(self, pos):
            starts = torch.cat([torch.full((int(c.numel()),), saved[s]) for s, c in zip(seq_ids, chunks)])
            return real(pos - starts[None])
    model.embed_positions = Shifted()
    try:
        return ref.paged_forward(model, cache, seq_ids, chunks, attention)
    finally:
        model.embed_positions = real


def forward_first_token(model, cache, seq_ids, chunks, attention=None):
    """The prompt pass returns the logits of each prompt's FIRST token, not its last."""
    first_pass = all(cache.context_len(s) == 0 for s in seq_ids)
    logits = ref.paged_forward(model, cache, seq_ids, chunks, attention)
    if first_pass:
        with torch.no_grad():
            return torch.stack([model(c[None])[0, 0] for c in chunks])
    return logits


@pytest.mark.parametrize("fn,hint", [(forward_positions_from_zero, "positions"),
                                     (forward_first_token, "LAST new token")])
def test_broken_paged_forward_fails(fn, hint):
    result = grade("paged_forward", (fn, ref.PagedKVCache))
    assert failed_with(result, hint), result.summary()


# --- serve: batching and continuous batching -----------------------------------------------------

def serve_one_after_another(model, prompts, max_new_tokens, block_size=16, num_blocks=None, eos_id=None,
                            **kw):
    """Right tokens, but each prompt generated alone (the lazy engine)."""
    n = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    return [ref.serve(model, [p], [k], block_size, None, eos_id)[0] for p, k in zip(prompts, n)]


def serve_static_batches(model, prompts, max_new_tokens, block_size=16, num_blocks=None, eos_id=None,
                         **kw):
    """Static batching: batches of two requests, each run until its longest request ends."""
    n = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out = []
    for i in range(0, len(prompts), 2):
        out += ref.serve(model, prompts[i:i + 2], n[i:i + 2], block_size, num_blocks, eos_id)
    return out


def serve_off_by_one(model, prompts, max_new_tokens, block_size=16, num_blocks=None, eos_id=None, **kw):
    out = ref.serve(model, prompts, max_new_tokens, block_size, num_blocks, eos_id)
    return [o[:-1] for o in out]


def serve_shared_positions(model, prompts, max_new_tokens, block_size=16, num_blocks=None, eos_id=None,
                           **kw):
    """Every token's position counted from the batch start: wrong with ragged lengths."""
    real = model.embed_positions

    class FromBatch(torch.nn.Module):
        def forward(self, pos):
            return real(torch.arange(pos.shape[-1]).view_as(pos) + 2)
    model.embed_positions = FromBatch()
    try:
        return ref.serve(model, prompts, max_new_tokens, block_size, num_blocks, eos_id)
    finally:
        model.embed_positions = real


def serve_ignores_eos(model, prompts, max_new_tokens, block_size=16, num_blocks=None, eos_id=None, **kw):
    return ref.serve(model, prompts, max_new_tokens, block_size, num_blocks, None)


@pytest.mark.parametrize("fn,hint", [
    (serve_one_after_another, "must share forward passes"),
    (serve_static_batches, "no request joined while others were still running"),
    (serve_off_by_one, "new tokens"),
    (serve_shared_positions, "not the greedy"),
    (serve_ignores_eos, "stop")])
def test_broken_serve_fails(fn, hint):
    result = grade("serve", fn)
    assert failed_with(result, hint), result.summary()


def test_serve_outside_the_model_modules_is_named():
    """Running the embeddings without their modules (hooks never fire) leaves the spy blind:
    the message says why."""
    def no_hooks(model, *a, **kw):
        hooks = (model.embed_tokens._forward_pre_hooks, model.embed_positions._forward_pre_hooks)
        saved = [dict(h) for h in hooks]
        for h in hooks:
            h.clear()
        try:
            return ref.serve(model, *a, **kw)
        finally:
            for h, s in zip(hooks, saved):
                h.update(s)
    assert failed_with(grade("serve", no_hooks), "embeddings never ran")


# --- the method: read from the notebook's code (autograder/static.py) -----------------------------

SOLUTION = pathlib.Path(__file__).parents[2] / "solutions" / LAB / f"{LAB}.ipynb"


def solution_nb():
    return json.loads(SOLUTION.read_text())


def edit(nb, grade_id, fn):
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("grade_id") == grade_id:
            cell["source"] = fn(cell_source(cell))
            return nb
    raise KeyError(grade_id)


def body(nb, grade_id, new):
    return edit(nb, grade_id, lambda src: re.sub(
        r"[ \t]*### BEGIN SOLUTION.*### END SOLUTION", lambda m: new.strip("\n"), src, flags=re.S))


def add_cell(nb, source, before):
    i = next(i for i, c in enumerate(nb["cells"]) if nbgrader_meta(c).get("grade_id") == before)
    nb["cells"].insert(i, {"cell_type": "code", "metadata": {}, "source": source})
    return nb


def stubbed(nb):
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("solution") and cell["cell_type"] == "code":
            cell["source"] = re.sub(r"( *)### BEGIN SOLUTION.*?### END SOLUTION",
                                    r"\1raise NotImplementedError()", cell_source(cell), flags=re.S)
    return nb


def verdicts(nb):
    return static.method_verdicts(LAB, nb)


def test_solution_follows_the_method():
    assert verdicts(solution_nb()) == {}


def test_grade_cells_and_points():
    cells = grade_cells(solution_nb())
    auto = sum(gc.points for gc in cells if gc.checks)
    assert auto == 19 and len([gc for gc in cells if gc.checks]) >= 5
    assert max(gc.points for gc in cells if gc.checks) <= auto / 3


def test_release_stub_fails_the_triton_part():
    out = verdicts(stubbed(solution_nb()))
    assert "launches no Triton kernel of your own" in out["paged_attention_triton"], out


GATHER_SDPA = """
    import torch.nn.functional as G
    k = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    v = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    return G.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
"""


def test_triton_part_gathering_blocks_for_sdpa_fails():
    out = verdicts(body(solution_nb(), "paged_attention_triton_impl", GATHER_SDPA))
    assert "launches no Triton kernel" in out["paged_attention_triton"], out


def test_triton_part_launching_a_kernel_then_sdpa_fails():
    launch = """
    o = torch.empty_like(q)
    _paged_attention_kernel[(q.shape[0], q.shape[1])](
        q, k_cache, v_cache, o, block_tables, context_lens, 1.0, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), o.stride(0),
        o.stride(1), BLOCK_SIZE=k_cache.shape[1], BLOCK_T=16, HEAD_DIM=q.shape[2], BLOCK_D=32)
""" + GATHER_SDPA
    out = verdicts(body(solution_nb(), "paged_attention_triton_impl", launch))
    assert "scaled_dot_product_attention" in out["paged_attention_triton"], out


def test_triton_part_gathering_on_the_host_fails():
    """A kernel of one's own over a contiguous copy made on the host: no table read in the kernel."""
    nb = add_cell(solution_nb(), (
        "@triton.jit\n"
        "def _contiguous_kernel(Q, K, V, O, N, stride, BLOCK: tl.constexpr, D: tl.constexpr):\n"
        "    s = tl.program_id(0)\n"
        "    t = tl.arange(0, BLOCK)\n"
        "    d = tl.arange(0, D)\n"
        "    q = tl.load(Q + s * D + d)\n"
        "    k = tl.load(K + s * stride + t[:, None] * D + d[None, :])\n"
        "    v = tl.load(V + s * stride + t[:, None] * D + d[None, :])\n"
        "    x = tl.sum(k * q[None, :], 1)\n"
        "    p = tl.exp(x - tl.max(x, 0))\n"
        "    tl.store(O + s * D + d, tl.sum(p[:, None] * v, 0) / tl.sum(p, 0))\n"),
        before="paged_attention_triton_impl")
    nb = body(nb, "paged_attention_triton_impl", """
    k = k_cache[block_tables.long()].flatten(1, 2).contiguous()
    v = v_cache[block_tables.long()].flatten(1, 2).contiguous()
    o = torch.empty_like(q)
    _contiguous_kernel[(q.shape[0],)](q, k, v, o, k.shape[1], k.stride(0), BLOCK=16, D=q.shape[2])
    return o
""")
    out = verdicts(nb)
    assert "never reads the block table" in out["paged_attention_triton"], out


def test_torch_part_calling_sdpa_fails():
    nb = body(solution_nb(), "paged_attention_impl", GATHER_SDPA)
    out = verdicts(nb)
    assert set(out) == {"paged_attention"} and "scaled_dot_product_attention" in out["paged_attention"], out


def test_reference_library_fails():
    nb = add_cell(solution_nb(), "from llmopt.paged_attention import paged_attention_triton as _pa",
                  before="paged_attention_triton_impl")
    nb = body(nb, "paged_attention_triton_impl", "    return _pa(q, k_cache, v_cache, block_tables, context_lens, scale)\n")
    out = verdicts(nb)
    assert "llmopt.paged_attention" in out["paged_attention_triton"], out


@pytest.mark.parametrize("call", ["generate(model, p[None], n)[0]",
                                  "model.generate(p[None], max_new_tokens=n)[0]"])
def test_serve_through_generate_fails(call):
    nb = body(solution_nb(), "serve_impl", f"""
    n_new = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    return [{call} for p, n in zip(prompts, n_new)]
""")
    out = verdicts(nb)
    assert set(out) == {"serve"} and "generate" in out["serve"], out


def test_unparsable_solution_cell_fails_its_check():
    nb = edit(solution_nb(), "serve_impl", lambda src: src.replace("):", ")", 1))
    assert verdicts(nb)["serve"].startswith("could not read the code of serve")
