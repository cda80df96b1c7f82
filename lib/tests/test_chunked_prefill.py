"""llmopt.chunked_prefill: prompt chunks and decode tokens over a paged cache, the Triton
kernel against the PyTorch twin and both against dense causal attention."""
import pytest
import torch
import torch.nn.functional as F

from llmopt.chunked_prefill import chunked_attention, chunked_attention_triton, tiles


def _pass(new, ctx, H=2, d=16, B=4, pad_rows=0, seed=0, dtype=torch.float32):
    """A pass: sequence s has ctx[s] tokens after its new[s] ones, in shuffled physical blocks."""
    g = torch.Generator().manual_seed(seed)
    nb = sum(-(-c // B) for c in ctx) + 3
    kc, vc = torch.randn(nb, B, H, d, generator=g), torch.randn(nb, B, H, d, generator=g)
    perm, M = torch.randperm(nb, generator=g), max(-(-c // B) for c in ctx) + 1
    tables, k = torch.zeros(len(ctx), M, dtype=torch.int32), 0
    for s, c in enumerate(ctx):
        tables[s, :-(-c // B)] = perm[k:k - (-c // B)]
        k -= -c // B
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]) + pad_rows, H, d, generator=g)
    return [x.to(dtype) if x.is_floating_point() else x for x in (q, kc, vc)] + [
        tables, torch.tensor(ctx, dtype=torch.int32), cu]


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)])
def test_kernel_equals_twin_on_ragged_chunks_and_decodes(block_m, block_n):
    # prompt from 0, a chunk after a cached prefix, decodes, an empty sequence, a partial last block
    q, kc, vc, tables, ctx, cu = _pass(new=[9, 1, 1, 37, 0, 6], ctx=[9, 7, 1, 50, 3, 6], pad_rows=3)
    want = chunked_attention(q, kc, vc, tables, ctx, cu)
    got = chunked_attention_triton(q, kc, vc, tables, ctx, cu, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[-3:].abs().sum() == 0                       # padding rows stay zero


def test_twin_equals_dense_causal_attention_of_the_whole_sequence():
    # a sequence of 23 tokens whose last 10 are new: rows = the last 10 rows of causal attention
    q, kc, vc, tables, ctx, cu = _pass(new=[10], ctx=[23], seed=1)
    B = kc.shape[1]
    k = kc[tables[0, :6].long()].flatten(0, 1)[:23].transpose(0, 1)   # (H, 23, d)
    v = vc[tables[0, :6].long()].flatten(0, 1)[:23].transpose(0, 1)
    qf = torch.zeros(2, 23, 16)
    qf[:, 13:] = q.transpose(0, 1)
    want = F.scaled_dot_product_attention(qf, k, v, is_causal=True)[:, 13:].transpose(0, 1)
    assert B == 4
    torch.testing.assert_close(chunked_attention(q, kc, vc, tables, ctx, cu), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_attention_triton(q, kc, vc, tables, ctx, cu), want, atol=1e-5, rtol=1e-5)


def test_fp16_kernel_close_to_fp32_twin():
    q, kc, vc, tables, ctx, cu = _pass(new=[12, 1, 5], ctx=[30, 19, 5], seed=2)
    want = chunked_attention(q, kc, vc, tables, ctx, cu)
    got = chunked_attention_triton(q.half(), kc.half(), vc.half(), tables, ctx, cu)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=5e-3, rtol=5e-3)


def test_tiles_cover_every_row_once():
    cu = torch.tensor([0, 5, 6, 6, 40], dtype=torch.int32)
    seq, row = tiles(cu, 45, 16)
    assert len(seq) == -(-45 // 16) + 4                     # a fixed length: capturable
    got = sorted((int(s), int(r)) for s, r in zip(seq, row) if s >= 0)
    assert got == [(0, 0), (1, 0), (3, 0), (3, 16), (3, 32)]
