"""llmopt.paged_attention: allocator, paged cache, attention over blocks (PyTorch and Triton),
the paged forward pass and the continuous-batching engine on tiny-opt."""
import pytest
import torch
import torch.nn.functional as F

from llmopt import paged_attention as pa
from llmopt.gpt import GPT, GPTConfig, load_model
from llmopt.kv_cache import generate


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-opt")


def random_paged(S=5, H=3, d=16, B=4, num_blocks=40, dtype=torch.float32, seed=0, lens=None):
    """Random caches, shuffled physical blocks, ragged lengths; the unused slots hold junk."""
    g = torch.Generator().manual_seed(seed)
    lens = lens or [int(x) for x in torch.randint(1, 30, (S,), generator=g)]
    max_blocks = max(-(-n // B) for n in lens)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(S, max_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(lens):
        nb = -(-n // B)
        tables[s, :nb] = perm[used:used + nb].int()
        used += nb
    k_cache = torch.randn(num_blocks, B, H, d, generator=g) * 100  # junk everywhere ...
    v_cache = torch.randn(num_blocks, B, H, d, generator=g) * 100
    ks, vs = [], []
    for s, n in enumerate(lens):  # ... except the slots that hold the sequence's tokens
        k, v = torch.randn(n, H, d, generator=g), torch.randn(n, H, d, generator=g)
        for t in range(n):
            blk = int(tables[s, t // B])
            k_cache[blk, t % B], v_cache[blk, t % B] = k[t], v[t]
        ks.append(k)
        vs.append(v)
    q = torch.randn(S, H, d, generator=g)
    cast = lambda x: x.to(dtype)
    return (cast(q), cast(k_cache), cast(v_cache), tables, torch.tensor(lens, dtype=torch.int32),
            [cast(k) for k in ks], [cast(v) for v in vs])


def dense(q, ks, vs, scale=None):
    out = []
    for s in range(q.shape[0]):  # (1, H, 1, d) over (1, H, n, d)
        out.append(F.scaled_dot_product_attention(
            q[s, None, :, None].float(), ks[s].transpose(0, 1)[None].float(),
            vs[s].transpose(0, 1)[None].float(), scale=scale)[0, :, 0])
    return torch.stack(out).to(q.dtype)


# --- memory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [2, 4])
def test_split_kv_triton_agrees(splits):
    """Flash-decoding: the context cut into slices, (acc, m, ℓ) merged by a second kernel;
    rows shorter than the number of splits leave empty slices."""
    q, kc, vc, tables, lens, ks, vs = random_paged(S=4, B=4, d=16, num_blocks=60, seed=3, lens=[1, 2, 37, 9])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kc, vc, tables, lens = (t.to(dev) for t in (q, kc, vc, tables, lens))
    o = torch.empty_like(q)
    pa._launch(q, kc, vc, o, tables.int(), lens.int(), 16 ** -0.5, 16, 4, splits)
    torch.testing.assert_close(o.cpu(), dense(q.cpu(), ks, vs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("heads", [1, 2, 4])   # 4 >= H = 3: all heads in one program
def test_head_groups_agree_with_the_pytorch_twin(heads, splits):
    """G adjacent heads per program (an online softmax per head), with and without split-KV:
    shuffled tables, ragged lengths, partly filled last blocks, rows shorter than the number
    of splits, a last group with fewer than G heads; tiles smaller and larger than a block,
    both program orders, eviction hints on and off, the loop pipelined or not."""
    q, kc, vc, tables, lens, _, _ = random_paged(S=4, H=3, B=4, d=16, num_blocks=60, seed=heads + splits,
                                                 lens=[1, 6, 37, 9])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kc, vc, tables, lens = (t.to(dev) for t in (q, kc, vc, tables, lens))
    expected = pa.paged_attention(q, kc, vc, tables, lens)
    for block_n, stages, evict, heads_first in ((2, None, False, True), (8, 3, True, False)):
        o = torch.empty_like(q)
        pa._launch(q, kc, vc, o, tables, lens, 16 ** -0.5, block_n, 2, splits, stages, heads, evict, heads_first)
        torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA needs Hopper or later (or the interpreter)")
@pytest.mark.parametrize("heads,splits", [(1, 1), (2, 4), (4, 2)])
def test_tma_loads_agree_with_the_pytorch_twin(heads, splits):
    """tma=True: each step is one physical block loaded as a (B, G, d) box through a tensor
    descriptor; ragged lengths and partly filled last blocks are masked after the load."""
    q, kc, vc, tables, lens, _, _ = random_paged(S=4, H=4, B=4, d=16, num_blocks=60, seed=11 + heads,
                                                 lens=[1, 6, 37, 9])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kc, vc, tables, lens = (t.to(dev) for t in (q, kc, vc, tables, lens))
    expected = pa.paged_attention(q, kc, vc, tables, lens)
    o = torch.empty_like(q)
    pa._launch(q, kc, vc, o, tables, lens, 16 ** -0.5, 4, 2, splits, 2, heads, True, True, tma=True)
    torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-5)


def test_head_groups_bf16_odd_block_size():
    """bf16 loads upcast in the kernel; blocks of 3 tokens (slices start on block boundaries)."""
    q, kc, vc, tables, lens, _, _ = random_paged(S=3, H=4, B=3, d=32, num_blocks=60, seed=7,
                                                 dtype=torch.bfloat16, lens=[2, 31, 13])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kc, vc, tables, lens = (t.to(dev) for t in (q, kc, vc, tables, lens))
    expected = pa.paged_attention(q, kc, vc, tables, lens, scale=0.3)
    o = torch.empty_like(q)
    pa._launch(q, kc, vc, o, tables, lens, 0.3, 4, 2, splits=2, num_stages=None, heads=2, evict=True,
               heads_first=True)
    torch.testing.assert_close(o.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_library_config_table():
    """_config picks a launch configuration for any table width; splits and heads are powers of 2."""
    for width in (16, 512, 1024, 2048, 4096, 8192, 10 ** 6):
        cfg = pa._config(width)
        assert isinstance(cfg, pa._Config)
        assert cfg.splits & (cfg.splits - 1) == 0 and cfg.heads & (cfg.heads - 1) == 0
    assert pa._config(10 ** 6) == pa._CONFIGS[-1][1]


def test_kv_memory_usage():
    contiguous, paged = pa.kv_memory_usage([10, 30, 17], max_seq_len=100, block_size=8)
    assert contiguous == pytest.approx(57 / 300)
    assert paged == pytest.approx(57 / ((2 + 4 + 3) * 8))


# --- the allocator ----------------------------------------------------------------------------

def test_allocator_ref_counts_error_and_reuse():
    a = pa.BlockAllocator(3)
    blocks = [a.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and a.num_free() == 0
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        a.allocate()
    a.incref(blocks[1])
    assert a.ref_count(blocks[1]) == 2
    a.free(blocks[1])
    assert a.num_free() == 0 and a.ref_count(blocks[1]) == 1  # still shared by one
    a.free(blocks[1])
    assert a.num_free() == 1 and a.allocate() == blocks[1]     # freed blocks are reused
    with pytest.raises(ValueError, match="already free"):
        b = blocks[0]
        a.free(b)
        a.free(b)


# --- attention over blocks -------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 4, 16])
def test_paged_attention_equals_dense(B):
    q, kc, vc, tables, lens, ks, vs = random_paged(B=B, num_blocks=200 if B == 1 else 40)
    torch.testing.assert_close(pa.paged_attention(q, kc, vc, tables, lens), dense(q, ks, vs),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pa.paged_attention(q, kc, vc, tables, lens, scale=0.3),
                               dense(q, ks, vs, scale=0.3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,B,d", [(torch.float32, 4, 16), (torch.float16, 16, 32),
                                       (torch.bfloat16, 8, 24), (torch.float32, 3, 8)])
def test_triton_twin_agrees(dtype, B, d):
    q, kc, vc, tables, lens, ks, vs = random_paged(B=B, d=d, dtype=dtype, num_blocks=64, seed=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    o = pa.paged_attention_triton(*(t.to(dev) for t in (q, kc, vc, tables, lens))).cpu()
    assert o.dtype == dtype and o.shape == q.shape
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(o.float(), dense(q, ks, vs).float(), rtol=tol, atol=tol)


# --- the cache: append, fork with copy-on-write, free ----------------------------------------

def fill(cache, seq, n, g):
    kv = torch.randn(cache.n_layer, 2, n, cache.k.shape[3], cache.k.shape[4], generator=g)
    for layer in range(cache.n_layer):
        cache.append(seq, layer, kv[layer, 0], kv[layer, 1])
    return kv


def test_append_across_layers_and_gather():
    g = torch.Generator().manual_seed(0)
    cache = pa.PagedKVCache(n_layer=2, n_head=2, head_dim=4, num_blocks=10, block_size=4)
    cache.add_sequence("a")
    cache.add_sequence("b")
    kv_a = [fill(cache, "a", 6, g)]
    kv_b = [fill(cache, "b", 3, g)]
    kv_a.append(fill(cache, "a", 1, g))
    kv_a.append(fill(cache, "a", 2, g))   # crosses a block boundary
    kv_a = torch.cat(kv_a, dim=2)
    assert cache.context_len("a") == 9 and len(cache.block_table("a")) == 3
    for layer in range(2):
        k, v = cache.gather("a", layer)
        assert torch.equal(k, kv_a[layer, 0]) and torch.equal(v, kv_a[layer, 1])
        k, v = cache.gather("b", layer)
        assert torch.equal(k, kv_b[0][layer, 0])
    assert set(cache.block_table("a")).isdisjoint(cache.block_table("b"))
    assert cache.utilization() == pytest.approx(12 / 16)
    cache.free("b")
    assert cache.allocator.num_free() == 10 - 3


def test_fork_shares_then_copies_one_block_on_write():
    g = torch.Generator().manual_seed(0)
    cache = pa.PagedKVCache(n_layer=2, n_head=2, head_dim=4, num_blocks=8, block_size=4)
    cache.add_sequence("p")
    kv_p = fill(cache, "p", 10, g)       # 3 blocks, the last one half full
    free_before = cache.allocator.num_free()
    cache.fork("p", "c")
    assert cache.block_table("c") == cache.block_table("p")
    assert cache.allocator.num_free() == free_before
    assert all(cache.allocator.ref_count(b) == 2 for b in cache.block_table("p"))
    kv_c = fill(cache, "c", 1, g)        # first write into the shared last block: copy it
    assert cache.allocator.num_free() == free_before - 1
    tp, tc = cache.block_table("p"), cache.block_table("c")
    assert tp[:2] == tc[:2] and tp[2] != tc[2]
    kv_p2 = fill(cache, "p", 1, g)       # the parent's block is private again: no copy
    assert cache.allocator.num_free() == free_before - 1
    for layer in range(2):
        assert torch.equal(cache.gather("p", layer)[0], torch.cat([kv_p, kv_p2], 2)[layer, 0])
        assert torch.equal(cache.gather("c", layer)[0], torch.cat([kv_p, kv_c], 2)[layer, 0])
    cache.free("p")                      # shared blocks stay for the child
    cache.add_sequence("x")
    fill(cache, "x", 12, g)
    assert torch.equal(cache.gather("c", 1)[1], torch.cat([kv_p, kv_c], 2)[1, 1])
    assert cache.utilization() == pytest.approx((11 + 12) / (3 * 4 + 3 * 4))


def test_parent_attention_unchanged_after_fork_and_child_appends():
    g = torch.Generator().manual_seed(3)
    cache = pa.PagedKVCache(n_layer=1, n_head=2, head_dim=8, num_blocks=12, block_size=4)
    cache.add_sequence(0)
    fill(cache, 0, 7, g)
    q = torch.randn(1, 2, 8, generator=g)
    before = pa.paged_attention(q, cache.k[0], cache.v[0], cache.tables_tensor([0]), torch.tensor([7]))
    cache.fork(0, 1)
    for _ in range(6):
        fill(cache, 1, 1, g)
    after = pa.paged_attention(q, cache.k[0], cache.v[0], cache.tables_tensor([0]), torch.tensor([7]))
    assert torch.equal(before, after)


# --- the model over the paged cache ----------------------------------------------------------

def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, max_position_embeddings=64, n_layer=2, n_head=2, d_model=32, d_ff=64)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("pre_ln", [True, False])
def test_paged_forward_equals_the_model_per_sequence(pre_ln):
    model = small_model(do_layer_norm_before=pre_ln)
    prompts = [torch.randint(3, 97, (n,)) for n in (5, 1, 12)]
    cache = pa.PagedKVCache.for_model(model.config, num_blocks=20, block_size=4)
    for s in range(3):
        cache.add_sequence(s)
    with torch.no_grad():
        logits = pa.paged_forward(model, cache, [0, 1, 2], prompts)
        for s, p in enumerate(prompts):
            torch.testing.assert_close(logits[s], model(p[None])[0, -1], rtol=1e-4, atol=1e-5)
        nxt = [torch.tensor([7]), torch.tensor([8, 9, 10]), torch.tensor([11])]  # mixed phases
        logits = pa.paged_forward(model, cache, [0, 1, 2], nxt)
        for s in range(3):
            full = torch.cat([prompts[s], nxt[s]])
            torch.testing.assert_close(logits[s], model(full[None])[0, -1], rtol=1e-4, atol=1e-5)


def test_serve_equals_generate_and_transformers_on_tiny_opt(tiny):
    model, tok = tiny
    texts = ["The tokenizer splits the text into", "import torch", "A", "Returns the number of"]
    prompts = [torch.tensor(tok.encode(t)) for t in texts]
    n_new = [20, 7, 12, 3]
    out = pa.serve(model, prompts, n_new, block_size=4)
    hf = model.to_hf().eval()
    hf.generation_config.eos_token_id = None
    for p, n, o in zip(prompts, n_new, out):
        ours = generate(model, p[None], n)[0]
        with torch.no_grad():
            theirs = hf.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=n,
                                 do_sample=False, pad_token_id=1)[0]
        assert torch.equal(o, ours) and torch.equal(o, theirs)


def test_serve_batches_and_reuses_blocks_under_memory_pressure(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (int(n),), generator=g) for n in torch.randint(2, 14, (6,), generator=g)]
    n_new = [int(n) for n in torch.randint(1, 12, (6,), generator=g)]
    passes = []
    hook = model.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[:-1].numel()))
    try:
        out = pa.serve(model, prompts, n_new, block_size=4, num_blocks=12)  # fits ~2 at a time
        n_tight = len(passes)
        passes.clear()
        roomy = pa.serve(model, prompts, n_new, block_size=4)
    finally:
        hook.remove()
    assert len(passes) <= max(n_new) and max(passes) > 1          # everyone in the same passes
    assert n_tight < sum(n_new)                                   # not one prompt after another
    for p, n, o, r in zip(prompts, n_new, out, roomy):
        expected = generate(model, p[None], n)[0]
        assert torch.equal(o, expected) and torch.equal(r, expected)


def test_serve_stops_at_eos_like_generate():
    model = small_model(1)
    prompts = [torch.randint(3, 97, (n,)) for n in (4, 6, 3)]
    eos = int(model(prompts[0][None])[0, -1].argmax())
    out = pa.serve(model, prompts, 10, block_size=4, eos_id=eos)
    for p, o in zip(prompts, out):
        expected = generate(model, p[None], 10, eos_id=eos)[0]
        assert torch.equal(o, expected)
    assert len(out[0]) == 5


def test_request_that_cannot_fit_raises_a_clear_error():
    model = small_model()
    with pytest.raises(RuntimeError, match="does not fit"):
        pa.serve(model, [torch.arange(3, 40)], 2, block_size=4, num_blocks=3)
