"""llmopt.flash_attention: the PyTorch and Triton versions agree with standard attention.

Small shapes with ragged lengths (the Triton interpreter runs on the CPU); on a GPU the
same tests run on CUDA.
"""
import pytest
import torch

import llmopt  # noqa: F401  (sets TRITON_INTERPRET=1 without a GPU)
from llmopt.flash_attention import (
    attention_reference,
    block_sizes,
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
    flash_attention_hbm_bytes,
    flash_attention_torch,
    flash_attention_v1_torch,
    merge_softmax_stats,
    online_softmax,
    softmax_stats,
    softmax_triton,
    standard_attention_hbm_bytes,
)
from llmopt.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B, H, N, d, dtype=torch.float32, seed=0, n_k=None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, N, d), (B, H, n_k or N, d), (B, H, n_k or N, d)]
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]


def _exact(q, k, v, causal, scale=None):
    """Reference in float64, with its gradients for a fixed dO."""
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = qq @ kk.transpose(-2, -1) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril().logical_not(),
                          float("-inf"))
    o = torch.softmax(s, -1) @ vv
    lse = torch.logsumexp(s, -1)
    return o, lse, (qq, kk, vv)


def _close(actual, expected, dtype, name, factor=1.0):
    rtol, atol = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 2e-3),
                  torch.bfloat16: (2e-2, 1.6e-2)}[dtype]
    scale = max(1.0, expected.abs().max().item())
    assert_close(actual.double(), expected.double(), rtol=rtol * factor,
                 atol=atol * factor * scale, name=name)


def test_online_softmax_and_merge():
    x = torch.randn(4, 7, 53, dtype=torch.float64) * 5
    for block in (1, 8, 53, 64):
        assert_close(online_softmax(x, block), torch.softmax(x, -1))
    m1, l1 = softmax_stats(x[..., :20])
    m2, l2 = softmax_stats(x[..., 20:])
    m, l = merge_softmax_stats(m1, l1, m2, l2)
    assert_close(m, x.max(-1).values)
    assert_close(l, torch.exp(x - m[..., None]).sum(-1))
    # an all -inf half is neutral (a fully masked block)
    ninf = torch.full_like(m1, float("-inf"))
    mm, ll = merge_softmax_stats(ninf, torch.zeros_like(l1), m1, l1)
    assert_close(mm, m1)
    assert_close(ll, l1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_triton_matches_its_torch_twin(dtype):
    """The warm-up kernel and online_softmax (same signature) agree with softmax."""
    g = torch.Generator().manual_seed(0)
    for shape, block in (((5, 137), 32), ((2, 3, 50), 16), ((4, 7), 64), ((3, 64), 64)):
        x = (torch.randn(shape, generator=g) * 20).to(DEVICE, dtype)
        want = torch.softmax(x.double(), -1)
        got = softmax_triton(x, block)
        assert got.dtype == dtype and got.shape == x.shape
        _close(got, want, dtype, f"softmax_triton {shape}")
        _close(online_softmax(x.double(), block), want, torch.float32, "online_softmax")


def test_block_sizes_follow_the_lecture():
    # H100/H200: 228 KiB of shared memory per SM
    assert block_sizes(228 * 1024, 64, 4) == (64, 228)
    assert block_sizes(228 * 1024, 128, 4) == (114, 114)
    assert block_sizes(228 * 1024, 128, 2) == (128, 228)
    assert block_sizes(1000, 48, 4) == (2, 2)           # ⌈250 / 192⌉ = 2
    for sram, d, b in ((228 * 1024, 64, 2), (100 * 1024, 80, 4), (4096, 16, 2)):
        B_r, B_c = block_sizes(sram, d, b)
        M = sram // b
        assert (B_c - 1) * 4 * d < M <= B_c * 4 * d and B_r == min(B_c, d)


@pytest.mark.parametrize("N,bq,bk", [(1, 16, 16), (50, 16, 8), (67, 32, 64)])
def test_torch_versions_match_reference(N, bq, bk):
    q, k, v = _qkv(2, 3, N, 24, seed=N)
    for causal in (False, True):
        o_ex, lse_ex, _ = _exact(q, k, v, causal)
        o, lse = flash_attention_torch(q, k, v, causal=causal, block_q=bq, block_k=bk)
        _close(o, o_ex, torch.float32, "flash_attention_torch O")
        _close(lse, lse_ex, torch.float32, "flash_attention_torch L")
        assert lse.shape == (2, 3, N) and lse.dtype == torch.float32
        assert_close(attention_reference(q, k, v, causal), o_ex.float(), name="reference")
    _close(flash_attention_v1_torch(q, k, v, bq, bk), _exact(q, k, v, False)[0], torch.float32,
           "flash_attention_v1_torch O")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,d,causal", [(37, 16, False), (37, 16, True), (100, 64, True),
                                        (65, 80, False), (64, 128, True)])
def test_triton_forward_backward(dtype, N, d, causal):
    q, k, v = _qkv(2, 2, N, d, dtype, seed=N + d)
    o_ex, lse_ex, leaves = _exact(q, k, v, causal)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(qg, kg, vg, causal=causal)
    assert o.dtype == dtype and o.shape == q.shape
    _close(o, o_ex, dtype, "O")
    _, lse = flash_attention_fwd(q, k, v, causal=causal)
    _close(lse, lse_ex, torch.float32, "L", factor=10 if dtype != torch.float32 else 1)
    do = torch.randn_like(o)
    o.backward(do)
    grads = torch.autograd.grad(o_ex, leaves, do.double())
    for name, got, want in zip(("dQ", "dK", "dV"), (qg.grad, kg.grad, vg.grad), grads):
        assert got.dtype == dtype
        _close(got, want, dtype, name, factor=2)


def test_triton_scale_and_cross_lengths():
    q, k, v = _qkv(1, 2, 30, 32, n_k=45)
    o_ex, _, leaves = _exact(q, k, v, False, scale=0.3)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(qg, kg, vg, scale=0.3)
    _close(o, o_ex, torch.float32, "O")
    do = torch.randn_like(o)
    o.backward(do)
    for name, got, want in zip("qkv", (qg.grad, kg.grad, vg.grad),
                               torch.autograd.grad(o_ex, leaves, do.double())):
        _close(got, want, torch.float32, "d" + name)


def test_backward_saves_only_inputs_output_and_lse():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 40, 16))
    o = flash_attention(q, k, v, causal=True)
    saved = o.grad_fn.saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(2, 3, 40, 16)] * 4 + [(2, 3, 40)]), shapes
    assert any(t.data_ptr() == o.data_ptr() for t in saved), "O itself is saved"


def test_bwd_function_matches_autograd():
    q, k, v = _qkv(1, 1, 33, 16, seed=3)
    o, lse = flash_attention_fwd(q, k, v)
    do = torch.randn_like(o)
    dq, dk, dv = flash_attention_bwd(q, k, v, o, lse, do)
    o_ex, _, leaves = _exact(q, k, v, False)
    for name, got, want in zip("qkv", (dq, dk, dv), torch.autograd.grad(o_ex, leaves, do.double())):
        _close(got, want, torch.float32, "d" + name)


def test_hbm_bytes():
    assert standard_attention_hbm_bytes(1024, 64, 2) == (4 * 1024 * 64 + 4 * 1024 ** 2) * 2
    # one Q block: every input read once, O written once, L in fp32
    assert flash_attention_hbm_bytes(100, 64, 128, 64, 2) == 4 * 100 * 64 * 2 + 400
    # flash moves about 2·N²·d/B_r elements, standard 4·N²: a ratio near d/(2·B_r) = 1/4
    n = 16384
    ratio = flash_attention_hbm_bytes(n, 64, 128, 128) / standard_attention_hbm_bytes(n, 64)
    assert ratio < 0.3
