"""llmopt.flash_attention_hopper: every climb step agrees with standard attention (fp32 math).

Tiny ragged shapes through the Triton interpreter on the CPU (TMA descriptors are emulated
there; warp specialisation is a no-op); on a GPU the same tests run on CUDA.
"""
import dataclasses

import pytest
import torch

import llmopt  # noqa: F401  (sets TRITON_INTERPRET=1 without a GPU)
from llmopt import flash_attention_hopper as fh
from llmopt.flash_attention import attention_reference, flash_attention
from llmopt.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1.6e-2)}


def _qkv(B, H, N, d, dtype, seed=0, n_k=None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, N, d), (B, H, n_k or N, d), (B, H, n_k or N, d)]
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]


def _check(q, k, v, causal, fwd_cfg, bwd_cfg, scale=None, name=""):
    """Forward and backward of the Hopper path against attention_reference in fp32."""
    dtype = q.dtype
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = fh.HopperAttention.apply(qg, kg, vg, causal, scale, fwd_cfg, bwd_cfg)
    assert o.dtype == dtype and o.shape == q.shape
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    of = attention_reference(qf, kf, vf, causal, scale)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    o.backward(do)
    grads = torch.autograd.grad(of, (qf, kf, vf), do.float())
    rtol, atol = TOL[dtype]
    for what, got, want, f in zip(("O", "dQ", "dK", "dV"), (o, qg.grad, kg.grad, vg.grad),
                                  (of,) + grads, (1, 2, 2, 2)):
        assert got.dtype == dtype, what
        scale_ = max(1.0, want.abs().max().item())
        assert_close(got.float(), want, rtol=rtol * f, atol=atol * f * scale_,
                     name=f"{name} {what}")


@pytest.mark.parametrize("step", range(len(fh.STEPS)), ids=[s[0] for s in fh.STEPS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N,d", [(50, 64), (96, 128)])
def test_every_step_matches_reference(step, dtype, causal, N, d):
    """Each climb step (its switches on top of the earlier ones'), N not a multiple of the tiles
    (50) and a multiple (96 = 3 tiles), d ∈ {64, 128}."""
    fwd_cfg, bwd_cfg = fh.step_configs(step)
    q, k, v = _qkv(1, 2, N, d, dtype, seed=N + d + step)
    _check(q, k, v, causal, fwd_cfg, bwd_cfg, name=f"step {step} ({fh.STEPS[step][0]})")


# tiles that are not square, larger than N, or thin: the causal bands' bounds differ
TILES = [
    (fh.FwdConfig(64, 32, 4, 1), fh.BwdConfig(16, 64, 4, 1, 64, 16, 4, 1)),
    (fh.FwdConfig(16, 64, 4, 1), fh.BwdConfig(64, 16, 4, 1, 16, 64, 4, 1)),
    (fh.FwdConfig(128, 128, 4, 1), fh.BwdConfig(128, 128, 4, 1, 128, 128, 4, 1)),
    (fh.FwdConfig(32, 16, 4, 1), fh.BwdConfig(32, 64, 4, 1, 32, 32, 4, 1)),
]
SWITCHES = [
    dict(fwd={}, bwd={}),
    dict(fwd=dict(tma=True, persistent=True), bwd=dict(tma=True, split=True)),
    dict(fwd=dict(tma=True), bwd=dict(tma=True, split=True, fused=True)),
    dict(fwd=dict(persistent=True, warp_specialize=True),
         bwd=dict(fused=True, warp_specialize=True)),
    dict(fwd=dict(tma=True, overlap=True), bwd=dict(tma=True, split=True, dq_atomic=True)),
    dict(fwd=dict(overlap=True, persistent=True), bwd=dict(dq_atomic=True)),
]


@pytest.mark.parametrize("tiles", range(len(TILES)))
@pytest.mark.parametrize("switches", range(len(SWITCHES)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiles_and_switch_combinations(tiles, switches, causal):
    f, b = TILES[tiles]
    sw = SWITCHES[switches]
    fwd_cfg = dataclasses.replace(f, **sw["fwd"])
    bwd_cfg = dataclasses.replace(b, **sw["bwd"])
    q, k, v = _qkv(2, 1, 77, 64, torch.float32, seed=tiles * 10 + switches)
    _check(q, k, v, causal, fwd_cfg, bwd_cfg, name=f"{fwd_cfg} {bwd_cfg}")


def test_public_function_matches_the_lab_kernel():
    """Same signature and semantics as llmopt.flash_attention.flash_attention."""
    q, k, v = _qkv(1, 2, 70, 64, torch.float32, seed=3)
    for causal in (False, True):
        qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
        qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
        oa = fh.flash_attention_hopper(qa, ka, va, causal=causal)
        ob = flash_attention(qb, kb, vb, causal=causal)
        assert_close(oa, ob, rtol=1e-4, atol=1e-5, name="O vs lab")
        do = torch.randn_like(oa)
        oa.backward(do)
        ob.backward(do)
        for name, a, b in zip(("dQ", "dK", "dV"), (qa.grad, ka.grad, va.grad),
                              (qb.grad, kb.grad, vb.grad)):
            assert_close(a, b, rtol=1e-4, atol=1e-5, name=name + " vs lab")


def test_scale_cross_lengths_and_odd_head_dim():
    """A given scale, N_Q ≠ N_K (not causal), and d = 80 (TMA off: not a power of two)."""
    fwd_cfg, bwd_cfg = fh.step_configs(len(fh.STEPS) - 1)
    q, k, v = _qkv(1, 2, 30, 32, torch.float32, n_k=45)
    _check(q, k, v, False, fwd_cfg, bwd_cfg, scale=0.3, name="scale 0.3, N_K=45")
    q, k, v = _qkv(1, 1, 40, 80, torch.float32, seed=1)
    _check(q, k, v, True, fwd_cfg, bwd_cfg, name="d=80")
    with pytest.raises(ValueError):
        fh.flash_attention_hopper(q, k, v, scale=-1.0)


def test_forward_returns_lse_and_backward_saves_no_nxn():
    q, k, v = _qkv(2, 3, 40, 64, torch.float32)
    o, lse = fh.flash_attention_hopper_fwd(q, k, v, causal=True)
    s = (q.double() @ k.double().transpose(-2, -1)) * 64 ** -0.5
    s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-4, atol=1e-5, name="L")
    qg = q.clone().requires_grad_()
    o = fh.flash_attention_hopper(qg, k, v, causal=True)
    shapes = sorted(tuple(t.shape) for t in o.grad_fn.saved_tensors)
    assert shapes == sorted([(2, 3, 40, 64)] * 4 + [(2, 3, 40)]), shapes


def test_steps_are_cumulative():
    names = [s[0] for s in fh.STEPS]
    assert names[:2] == ["tiles", "tma"] and "causal_split" in names and "dq_atomic" in names
    f0, b0 = fh.step_configs(0)
    assert not (f0.tma or f0.warp_specialize or f0.persistent or f0.overlap)
    assert not (b0.tma or b0.split or b0.dq_atomic or b0.warp_specialize)
    f, b = fh.step_configs(len(fh.STEPS) - 1)
    assert f.tma and f.persistent and f.overlap and not f.warp_specialize
    assert b.tma and b.split and b.fused and b.dq_atomic and b.dq_tma_reduce
    f1, _ = fh.step_configs(1, fwd=fh.FwdConfig(64, 32, 4, 3))
    assert f1.tiles() == (64, 32, 4, 3) and f1.tma and not f1.persistent
