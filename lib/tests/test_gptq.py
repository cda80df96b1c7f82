"""Tests of llmopt.gptq (lab07): the grid, OBS, GPTQ against its unblocked form, models."""
import copy
import os

import pytest
import torch

from llmopt.gptq import (GPTQ, act_order_perm, codes_of, decoder_layers, gptq_quantize,
                         layer_linears, obs_quantize_columns, obs_update, pack_codes, packed_bytes,
                         quant_params, quantize, quantize_model, quantize_rtn, reconstruction_error,
                         unpack_codes)
from llmopt.viz.quant import correlated_inputs, _gptq_state, sweep_errors


def _problem(rows=24, cols=64, n=512, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    X = correlated_inputs(n, cols, seed=seed + 1, dtype=dtype)
    H = 2 * X.T @ X / n
    return W, X, H


def _assert_on_grid(W_hat, scale, zero, bits, group_size, perm=None):
    """Every entry of W_hat is scale·(k − zero) for an integer 0 ≤ k ≤ maxq of its group."""
    rows, cols = W_hat.shape
    maxq = 2 ** bits - 1
    order = torch.arange(cols) if perm is None else perm
    gs = cols if group_size <= 0 else group_size
    group = torch.arange(cols) // gs                         # group of each processed position
    Wp = W_hat[:, order].double()
    k = Wp / scale.double()[:, group] + zero.double()[:, group]
    assert torch.allclose(k, k.round(), atol=1e-6), "W_hat off the grid"
    assert k.round().min() >= 0 and k.round().max() <= maxq, "W_hat outside 0..maxq"
    assert scale.shape == (rows, (cols + gs - 1) // gs) == zero.shape


@pytest.mark.parametrize("bits,group_size,sym", [(4, -1, False), (3, 16, False), (4, 16, True), (2, 24, False)])
def test_rtn_on_grid_and_nearest(bits, group_size, sym):
    W, _, _ = _problem(cols=72)
    W_hat, scale, zero = quantize_rtn(W, bits, group_size, sym)
    _assert_on_grid(W_hat, scale, zero, bits, group_size)
    assert W_hat.dtype == W.dtype
    # nearest: no grid point is closer than the chosen one by more than rounding
    gs = W.shape[1] if group_size <= 0 else group_size
    s = scale[:, torch.arange(W.shape[1]) // gs]
    assert ((W_hat - W).abs() <= s / 2 + 1e-9).all()
    if sym:
        assert (zero == 2 ** (bits - 1)).all()


def test_quant_params_zero_row_and_zero_exact():
    W = torch.zeros(2, 8)
    W[1] = torch.linspace(0.5, 3.0, 8)                       # all positive: range starts at 0
    scale, zero = quant_params(W, 4)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (quantize(torch.zeros(2, 1), scale, zero, 4) == 0).all(), "0 must be on the grid"


def test_pack_codes_layout_and_round_trip():
    # 5 = 101, 3 = 011, 7 = 111 (3 bits, least significant first): stream 101 110 111 ->
    # byte 0 = bits 1,0,1,1,1,0,1,1 = 221, byte 1 = the ninth bit
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [221, 1]
    assert pack_codes(torch.tensor([[1, 2], [3, 4]]), 4).tolist() == [0x21, 0x43]
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        c = torch.randint(0, 2 ** bits, (7, 13), generator=g)
        p = pack_codes(c, bits)
        assert p.dtype == torch.uint8 and p.shape == (-(-c.numel() * bits // 8),)
        stream = ((c.reshape(-1, 1).numpy() >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
        assert np.array_equal(np.packbits(stream, bitorder="little"), p.numpy())
        assert torch.equal(unpack_codes(p, bits, c.numel()), c.reshape(-1))


def test_codes_and_packed_bytes_of_a_quantized_weight():
    W, _, _ = _problem(rows=16, cols=40)
    for bits, gs in ((4, -1), (3, 16)):
        W_hat, scale, zero = quantize_rtn(W, bits, gs)
        k = codes_of(W_hat, scale, zero, gs)
        assert k.min() >= 0 and k.max() <= 2 ** bits - 1
        g = torch.arange(40) // (40 if gs < 0 else gs)
        assert torch.allclose(scale[:, g] * (k - zero[:, g]), W_hat)
        groups = 1 if gs < 0 else 3
        expect = len(pack_codes(k, bits)) + 2 * 16 * groups + len(pack_codes(zero.long(), bits))
        assert packed_bytes(16, 40, bits, gs) == expect


def test_obs_update_one_weight():
    W, X, H = _problem(rows=1, cols=32)
    w = W[0]
    Hinv = torch.linalg.inv(H)
    q = 5
    target = torch.round(w[q] * 2) / 2
    w_new, L = obs_update(w, Hinv, q, target)
    assert torch.isclose(w_new[q], target)
    dw = w_new - w
    assert torch.isclose(0.5 * dw @ H @ dw, torch.as_tensor(L, dtype=H.dtype))
    naive = w.clone(); naive[q] = target                     # no compensation
    assert L <= 0.5 * (naive - w) @ H @ (naive - w) + 1e-12


@pytest.mark.parametrize("rows,cols,bits,group_size,block_size", [
    (24, 64, 4, -1, 16), (24, 64, 3, 16, 16), (16, 70, 3, 16, 32),  # ragged last block/group
    (16, 64, 4, 24, 16), (16, 48, 2, -1, 128)])                   # groups across blocks
def test_gptq_matches_unblocked_obs(rows, cols, bits, group_size, block_size):
    W, X, H = _problem(rows, cols)
    a = gptq_quantize(W, H, bits, group_size, block_size)
    b = obs_quantize_columns(W, H, bits, group_size)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    _assert_on_grid(*a, bits, group_size)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_act_order_is_permuted_gptq(group_size):
    W, X, H = _problem(16, 64)
    perm = act_order_perm(H)
    a = gptq_quantize(W, H, 3, group_size, 16, act_order=True)
    b = obs_quantize_columns(W[:, perm], H[perm][:, perm], 3, group_size)
    torch.testing.assert_close(a[0], b[0][:, torch.argsort(perm)], rtol=1e-9, atol=1e-9)
    _assert_on_grid(*a, 3, group_size, perm=perm)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    W, X, H = _problem(32, 128, n=1024, dtype=torch.float32)
    e_gptq = reconstruction_error(W, gptq_quantize(W, H, bits)[0], X)
    e_rtn = reconstruction_error(W, quantize_rtn(W, bits)[0], X)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)


def test_float32_and_dtype_kept():
    W, X, H = _problem(16, 64)
    a = gptq_quantize(W.float(), H.float(), 4)
    b = gptq_quantize(W, H, 4)
    assert a[0].dtype == torch.float32
    assert (a[0].double() - b[0]).abs().max() < 1e-4
    h = gptq_quantize(W.half(), H.float(), 4)[0]
    assert h.dtype == torch.float16


def test_dead_input_and_singular_hessian_need_damping():
    W, X, H = _problem(8, 32, n=16)                          # 16 tokens < 32 features: singular
    H[3, :] = 0; H[:, 3] = 0                                 # input 3 never fires
    W_hat, scale, zero = gptq_quantize(W, H, 4)
    assert torch.isfinite(W_hat).all() and (W_hat[:, 3] == 0).all()
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_quantize(W, H, 4, percdamp=0.0)


def test_hessian_accumulates_over_batches():
    X = torch.randn(3, 10, 16)
    g = GPTQ(16)
    for b in range(3):
        g.add_batch(X[b])
    Xf = X.reshape(-1, 16)
    torch.testing.assert_close(g.H, 2 * Xf.T @ Xf / Xf.shape[0], rtol=1e-5, atol=1e-5)
    assert g.nsamples == 30


def test_sweep_state_is_sequential_obs():
    W, X, H = _problem(8, 32)
    Wg, Wr = gptq_quantize(W, H, 3)[0], quantize_rtn(W, 3)[0]
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(32, dtype=H.dtype)
    Wc, Hinv = W.clone(), torch.linalg.inv(Hd)
    for q in range(10):                                      # ten OBS steps by hand
        Wc += (Wg[:, q] - Wc[:, q])[:, None] * Hinv[q][None, :] / Hinv[q, q]
        Hinv -= Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    torch.testing.assert_close(_gptq_state(W, Wg, H, 10), Wc, rtol=1e-6, atol=1e-6)
    c = sweep_errors(W, H, Wg, Wr)
    assert c["gptq"][0] == 0 and c["rtn"][0] == 0
    n = X.shape[0]
    assert abs(c["gptq"][-1] - reconstruction_error(W, Wg, X) / n) < 1e-6 * (1 + c["gptq"][-1])
    assert c["gptq"][-1] < c["rtn"][-1]


def _tiny_hf_opt(seed=0, layers=2):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=layers, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_model_keeps_api_and_grid(method):
    model = _tiny_hf_opt()
    original = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 12))
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    out = quantize_model(model, method, calib, bits=3, group_size=-1)
    assert out is model and type(out).__name__ == "OPTForCausalLM"
    logits = out(ids).logits
    assert logits.shape == (2, 12, 256) and torch.isfinite(logits).all()
    changed = []
    for n, p in model.named_parameters():
        if n.endswith(".weight") and p.dim() == 2 and ".layers." in n:
            changed.append(n)
            scale, zero = quant_params(original[n], 3)       # per-row grid of the original
            k = p.double() / scale.double() + zero.double()
            assert torch.allclose(k, k.round(), atol=1e-4), n
        else:
            assert torch.equal(p, original[n]), f"{n} should not change"
    assert len(changed) == 12                                # 6 linears x 2 layers


def test_quantize_model_feeds_quantized_outputs():
    """Layer i's H must come from the model whose layers before i are already quantized."""
    model = _tiny_hf_opt(layers=3)
    ref = copy.deepcopy(model)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    quantize_model(model, "gptq", calib, bits=3, batch_size=3)  # 2 batches: kwargs per batch
    ql, rl = decoder_layers(model), decoder_layers(ref)
    for i in range(len(rl)):
        hs = {}
        lins = layer_linears(rl[i])
        handles = [lin.register_forward_hook(lambda m, a, o, n=n: hs.setdefault(n, GPTQ(a[0].shape[-1])).add_batch(a[0]))
                   for n, lin in lins.items()]
        with torch.no_grad():
            ref(calib, use_cache=False)
        for h in handles:
            h.remove()
        for n, lin in lins.items():
            W_hat = gptq_quantize(lin.weight.data, hs[n].H, 3)[0]
            mism = (W_hat - layer_linears(ql[i])[n].weight).abs().gt(1e-5).float().mean()
            assert mism < 0.01, f"layer {i} {n}: {mism:.3f} of weights differ"
            lin.weight.data.copy_(W_hat)                     # now quantized: on to layer i+1


TINY = os.path.join(os.path.dirname(__file__), os.pardir, "llmopt", "assets", "tiny-opt", "config.json")


@pytest.fixture
def one_thread():
    """GPTQ's column loop is many small ops: extra threads only spin on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not os.path.exists(TINY), reason="tiny-opt checkpoint not built yet")
def test_quantize_model_on_tiny_opt_gpt(one_thread):
    from llmopt.gpt import load_model
    model, _ = load_model("tiny-opt")
    ids = torch.randint(0, 100, (1, 16))
    before = model(ids)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    out = quantize_model(model, "gptq", calib, bits=4, group_size=-1)
    after = out(ids)
    logits = after.logits if hasattr(after, "logits") else after
    assert logits.shape == before.shape and torch.isfinite(logits).all()
    changed = [n for n, p in out.named_parameters() if not torch.equal(p, original[n])]
    n_linear = 6 * model.config.n_layer  # q, k, v, out, fc1, fc2 per layer
    assert len(changed) == n_linear, f"{len(changed)} tensors quantized, expected {n_linear}"
    for name in changed:  # 4 bits per output row: at most 16 distinct values in every row
        W = dict(out.named_parameters())[name].detach()
        distinct = (W.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1   # (rows,)
        assert int(distinct.max()) <= 16, name
    assert not torch.allclose(logits, before)  # quantization changed the outputs ...
    assert (logits - before).abs().mean() < before.abs().mean()  # ... but not beyond recognition
