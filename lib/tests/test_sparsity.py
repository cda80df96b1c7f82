"""Tests of llmopt.sparsity: exact sparsity per comparison group, the 2:4 pattern, Wanda and
SparseGPT against magnitude pruning where they must win, SparseGPT's sweep against a
readable column-by-column OBS, and compress_model/evaluate on a tiny random OPT."""
import copy
import math

import pytest
import torch

from llmopt import gptq
from llmopt import sparsity as sp
from llmopt.viz.quant import correlated_inputs


def _setup(rows=16, cols=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(n, cols, seed=seed + 1, dtype=torch.float64)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, X, 2 * X.T @ X / n


def test_nm_mask_pattern_and_choice():
    W = torch.randn(8, 32)
    M = sp.nm_mask(W, 2, 4)
    assert M.dtype == torch.bool and M.shape == W.shape
    groups = M.reshape(8, 8, 4)
    assert (groups.sum(-1) == 2).all()
    a = W.abs().reshape(8, 8, 4)
    assert ((a * groups).amin(-1, keepdim=True) >= (a * ~groups).amax(-1, keepdim=True) - 0).all() or \
        (torch.where(groups, a, torch.inf).amin(-1) >= torch.where(~groups, a, -torch.inf).amax(-1)).all()
    with pytest.raises(ValueError):
        sp.nm_mask(torch.randn(4, 6), 2, 4)


def test_magnitude_is_per_tensor_wanda_per_row():
    W, X, _ = _setup()
    Wm = sp.magnitude_prune(W, 0.5)
    assert int((Wm == 0).sum()) == W.numel() // 2
    assert (Wm[Wm != 0] == W[Wm != 0]).all()
    assert W[Wm == 0].abs().max() <= W[Wm != 0].abs().min()
    Ww = sp.wanda_prune(W, X, 0.75)
    assert ((Ww == 0).sum(1) == 48).all()
    S = W.abs() * X.norm(dim=0)
    for r in range(W.shape[0]):
        assert S[r][Ww[r] == 0].max() <= S[r][Ww[r] != 0].min()
    assert ((sp.wanda_prune(W, X, 0, 2, 4) != 0).reshape(16, 16, 4).sum(-1) == 2).all()


def test_wanda_beats_magnitude_with_large_input_channels():
    W, X, _ = _setup()
    X[:, 5:9] *= 20
    assert sp.reconstruction_error(W, sp.wanda_prune(W, X, .5), X) < \
        sp.reconstruction_error(W, sp.magnitude_prune(W, .5), X)


def _obs_prune_columns(W, H, sparsity, percdamp=0.01):
    """Readable SparseGPT with one block: explicit H⁻¹, OBS step per column, mask chosen once."""
    W = W.clone()
    cols = W.shape[1]
    H = H.clone() + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    U = torch.linalg.cholesky(Hinv, upper=True)
    score = W ** 2 / torch.diag(U)[None] ** 2
    mask = sp._keep_largest(score.reshape(1, -1), sparsity).reshape(W.shape)
    for q in range(cols):
        delta = W[:, q] * mask[:, q] - W[:, q]
        W += delta[:, None] * Hinv[q][None, :] / Hinv[q, q]
        Hinv -= Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return W


def test_sparsegpt_matches_columnwise_obs_and_beats_magnitude():
    W, X, H = _setup(cols=48)
    Ws = sp.sparsegpt_prune(W, H, 0.5, block_size=48)
    torch.testing.assert_close(Ws, _obs_prune_columns(W, H, 0.5), rtol=1e-7, atol=1e-9)
    assert int((Ws == 0).sum()) == W.numel() // 2
    # several blocks: each block exactly at the sparsity
    Wb = sp.sparsegpt_prune(W, H, 0.5, block_size=16)
    assert all(int((Wb[:, i:i + 16] == 0).sum()) == 8 * 16 for i in range(0, 48, 16))
    e = {k: sp.reconstruction_error(W, v, X) for k, v in
         dict(sgpt=Wb, mag=sp.magnitude_prune(W, .5), wanda=sp.wanda_prune(W, X, .5)).items()}
    assert e["sgpt"] < e["wanda"] < e["mag"], e
    W24 = sp.sparsegpt_prune(W, H, 0, 2, 4, block_size=16)
    assert ((W24 != 0).reshape(16, 12, 4).sum(-1) == 2).all()
    assert sp.reconstruction_error(W, W24, X) < sp.reconstruction_error(W, sp.magnitude_prune(W, 0, 2, 4), X)


def test_joint_sparse_gptq_on_grid_and_dead_input():
    W, X, H = _setup(cols=32)
    H[3, :] = 0
    H[:, 3] = 0
    Q = sp._sparse_obs(W, H, 0.5, block_size=16, bits=4)
    assert not torch.isnan(Q).any() and (Q[:, 3] == 0).all()
    scale, zero = gptq.quant_params(W, 4)                   # the grid of the original W, as GPTQ
    k = Q / scale + zero
    assert ((k - k.round()).abs() < 1e-6).all()
    assert (Q == 0).double().mean() >= 0.5


def test_bits_per_weight():
    r = sp.make_recipe
    assert sp.bits_per_weight((256, 256), r()) == 16
    assert sp.bits_per_weight((256, 256), r(quant="nf4")) == 4.5
    assert sp.bits_per_weight((256, 256), r(quant="int8")) == 8 + 32 / 256
    assert sp.bits_per_weight((256, 256), r(prune="wanda")) == 9
    assert sp.bits_per_weight((256, 256), r(prune="sparsegpt", n=2, m=4)) == 9
    assert math.isclose(sp.bits_per_weight((256, 256), r(prune="sparsegpt", quant="gptq")),
                        0.5 * 4 + 1 + 20 / 256)
    assert sp.recipe_name(r(prune="sparsegpt", n=2, m=4, quant="gptq")) == "sparsegpt 2:4 + gptq w4"


def _tiny_opt(seed=0):
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(seed)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("recipe", [dict(prune="sparsegpt", quant="gptq"),
                                    dict(prune="wanda", n=2, m=4, quant="nf4"),
                                    dict(prune="magnitude", quant="int8"), dict(quant="rtn", bits=3)])
def test_compress_model_and_evaluate(recipe):
    model = _tiny_opt()
    ref = copy.deepcopy(model)
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    log = []
    sp.compress_model(model, recipe, calib, log=log)
    assert len(log) == 12 and all(0 < e["rel_err"] < 1 for e in log)
    if recipe.get("prune"):
        assert all(e["sparsity"] >= 0.5 for e in log)
    windows = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(2))
    ev = sp.evaluate(model, ref, windows, batch_size=2)
    assert ev["kl"] > 0 and ev["ppl"] > 1
    assert sp.evaluate(ref, ref, windows)["kl"] == pytest.approx(0, abs=1e-6)
