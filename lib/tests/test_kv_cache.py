"""llmopt.kv_cache: the cache, its size, cached attention, and generation on tiny-opt."""
import pytest
import torch
import torch.nn.functional as F

from llmopt.gpt import GPT, GPTConfig, load_model
from llmopt.kv_cache import KVCache, cached_attention, generate, kv_cache_bytes


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-opt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_cache_bytes_equals_what_the_cache_holds(dtype):
    cfg = GPTConfig(vocab_size=100, n_layer=3, n_head=4, d_model=64, d_ff=256)
    cache = KVCache.for_model(cfg, batch=2, max_seq_len=37, dtype=dtype)
    held = sum(t.untyped_storage().nbytes() for t in (cache.k, cache.v))
    assert kv_cache_bytes(cfg, 2, 37, dtype) == held == cache.nbytes()


def test_kv_cache_bytes_opt13b():
    cfg = GPTConfig(n_layer=40, n_head=40, d_model=5120, d_ff=20480)
    assert kv_cache_bytes(cfg, 1, 1, torch.float16) == 800 * 1024


def test_update_returns_views_up_to_the_current_length():
    cache = KVCache(n_layer=2, batch=1, n_head=2, max_seq_len=10, head_dim=4)
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    for layer in range(2):
        k_all, v_all = cache.update(layer, k[:, :, :4], v[:, :, :4])
        assert k_all.shape == (1, 2, 4, 4) and cache.seq_len == (4 if layer == 1 else 0)
    for layer in range(2):
        k_all, v_all = cache.update(layer, k[:, :, 4:], v[:, :, 4:])
    assert torch.equal(k_all, k) and torch.equal(v_all, v) and cache.seq_len == 6
    assert k_all.data_ptr() == cache.k[1].data_ptr()  # a view, not a copy


def test_full_cache_raises_a_clear_error():
    cache = KVCache(n_layer=1, batch=1, n_head=1, max_seq_len=3, head_dim=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))


@pytest.mark.parametrize("T,S", [(5, 5), (1, 8), (3, 11)])
def test_cached_attention_matches_sdpa(T, S):
    q, k, v = torch.randn(2, 3, T, 16), torch.randn(2, 3, S, 16), torch.randn(2, 3, S, 16)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query i sees keys <= S-T+i
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(cached_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_generate_with_and_without_cache_equal_transformers_on_tiny_opt(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode("The tokenizer splits the text into")])
    with_cache = generate(model, ids, 50, use_cache=True)
    without_cache = generate(model, ids, 50, use_cache=False)
    hf = model.to_hf().eval()
    hf.generation_config.eos_token_id = None  # plain greedy: no stop, no eos suppression
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=50,
                               do_sample=False, pad_token_id=1)
    assert with_cache.shape == (1, ids.shape[1] + 50)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache, expected)


def test_generate_batch_with_eos_stops_and_pads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, d_ff=64,
                          max_position_embeddings=64)).eval()
    ids = torch.randint(3, 50, (3, 4))
    eos = int(model(ids)[0, -1].argmax())
    out = generate(model, ids, 12, use_cache=True, eos_id=eos)
    assert torch.equal(out, generate(model, ids, 12, use_cache=False, eos_id=eos))
    assert int(out[0, 4]) == eos and (out[0, 4:] == eos).all()


@pytest.mark.parametrize("pre_ln", [True, False])
def test_static_decode_gives_generate_tokens(pre_ln):
    """The fixed-shape decode step (the CUDA-graph path, run plainly on a CPU) is the cached path."""
    from llmopt.kv_cache import generate_static

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, max_position_embeddings=64, n_layer=2, n_head=2, d_model=32,
                          d_ff=64, do_layer_norm_before=pre_ln)).eval()
    ids = torch.randint(3, 97, (3, 5))
    assert torch.equal(generate_static(model, ids, 9, cuda_graph=False), generate(model, ids, 9))
    eos = int(generate(model, ids, 3)[0, 6])  # a token sequence 0 produces: it stops there
    assert torch.equal(generate_static(model, ids, 9, eos_id=eos, cuda_graph=False),
                       generate(model, ids, 9, eos_id=eos))
