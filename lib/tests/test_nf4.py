"""Block-wise FP4/NF4 and double quantization (llmopt.nf4) against bitsandbytes, bit for bit."""
import math

import pytest
import torch

from llmopt import nf4

bnbF = pytest.importorskip("bitsandbytes.functional")

LECTURE_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
               -0.28444138169288635, -0.1847734302282334, -0.09105003625154495, 0.0,
               0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
               0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0]
SHAPES = [(7, 37), (64, 64), (3, 100), (1, 1), (5,), (130, 257), (2, 3, 50)]


def _w(shape, seed, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def test_codes_equal_bitsandbytes_and_the_lecture():
    assert torch.equal(nf4.NF4_CODE, bnbF.get_4bit_type("nf4", "cpu"))
    assert torch.equal(nf4.FP4_CODE, bnbF.get_4bit_type("fp4", "cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, bnbF.create_dynamic_map())
    torch.testing.assert_close(nf4.NF4_CODE, torch.tensor(LECTURE_NF4), rtol=0, atol=1e-7)
    assert nf4.NF4_CODE.numel() == nf4.FP4_CODE.numel() == 16


def test_nf4_code_is_normal_quantiles():
    c = nf4.nf4_code(0.99)
    assert c.numel() == 16 and c[0] == -1 and c[-1] == 1 and (c == 0).sum() == 1
    assert (c[1:] > c[:-1]).all()
    assert not torch.allclose(c, nf4.NF4_CODE)


def test_fp4_code_is_sign_exponent_mantissa():
    c = nf4.FP4_CODE * 12
    assert c[:8].tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert torch.equal(c[8:], -c[:8])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_4bit_bit_exact(quant_type, dtype):
    for i, shape in enumerate(SHAPES):
        W = _w(shape, i, dtype)
        p, s = bnbF.quantize_4bit(W, blocksize=64, quant_type=quant_type)
        mp, ms = nf4.quantize_4bit(W, 64, quant_type)
        assert mp.dtype == torch.uint8 and mp.shape == (math.ceil(W.numel() / 2),)
        assert torch.equal(mp, p.flatten()), (shape, dtype)
        assert torch.equal(ms.absmax, s.absmax), (shape, dtype)
        assert ms.shape == s.shape and ms.dtype == s.dtype and ms.blocksize == 64
        assert ms.absmax.numel() == math.ceil(W.numel() / 64)   # the ragged block is kept
        md = nf4.dequantize_4bit(mp, ms)
        assert md.dtype == dtype and md.shape == W.shape
        if i < 3:                                            # bitsandbytes' dequant compiles: few calls
            assert torch.equal(md, bnbF.dequantize_4bit(p, s))


def _bnb_pytorch_blockwise(A, code, blocksize):
    """bitsandbytes' own PyTorch kernel of quantize_blockwise (its 'default' backend)."""
    import bitsandbytes  # noqa: F401  (registers the op)
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(ks, A, code, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bitsandbytes(quant_type):
    for i, shape in enumerate([(7, 37), (300, 257), (64, 64 * 300), (3, 70)]):
        W = _w(shape, 100 + i)
        p, s = bnbF.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=True)
        mp, ms = nf4.quantize_4bit(W, 64, quant_type, double_quant=True)
        assert torch.equal(mp, p.flatten())
        assert ms.nested and ms.absmax.dtype == torch.uint8
        assert torch.equal(ms.offset, s.offset)
        assert torch.equal(ms.state2.absmax, s.state2.absmax) and ms.state2.blocksize == 256
        plain = nf4.quantize_4bit(W, 64, quant_type)[1].absmax
        q_ref, am_ref = _bnb_pytorch_blockwise(plain - s.offset, bnbF.create_dynamic_map(), 256)
        assert torch.equal(ms.absmax, q_ref) and torch.equal(ms.state2.absmax, am_ref)
        # bitsandbytes' native CPU kernel searches the 8-bit code approximately: ours is the
        # nearest code, never farther than its choice
        x = (plain - s.offset) / ms.state2.absmax.repeat_interleave(256)[:plain.numel()]
        code = nf4.DYNAMIC_CODE
        assert ((code[ms.absmax.long()] - x).abs() <= (code[s.absmax.long()] - x).abs() + 1e-7).all()
        # dequantization equal to bitsandbytes' on the same state
        s.absmax = ms.absmax.clone()
        assert torch.equal(nf4.dequantize_4bit(mp, ms), bnbF.dequantize_4bit(p, s))


def test_nibble_order_and_padding():
    W = torch.tensor([1.0, -1.0, 0.0])                      # codes: nf4 15, 0, 7 (+ pad 7)
    p, s = nf4.quantize_4bit(W, 64, "nf4")
    assert p.tolist() == [0xF0, 0x77]
    p, s = nf4.quantize_4bit(W, 64, "fp4")
    assert p.tolist() == [(3 << 4) | 11, 0]


def test_ragged_last_block_padded_not_dropped():
    W = _w((1, 70), 7)
    W[0, 64:] *= 100                                          # a large tail of 6
    p, s = nf4.quantize_4bit(W, 64, "nf4")
    assert s.absmax.numel() == 2 and s.absmax[1] == W[0, 64:].abs().max()
    assert (nf4.dequantize_4bit(p, s) - W).abs()[0, 64:].max() < 0.1 * s.absmax[1]


def test_double_quant_subtracts_the_mean():
    W = _w((256, 512), 8) + 0.3 * torch.randn(256, 1)      # absmax with a large common part
    p, s = nf4.quantize_4bit(W, 64, "nf4", double_quant=True)
    _, plain = nf4.quantize_4bit(W, 64, "nf4")
    assert torch.equal(s.offset, plain.absmax.mean())
    err = (nf4.dequantize_absmax(s) - plain.absmax).abs().max()
    assert err < 0.02 * plain.absmax.max()


def test_bits_per_param_qlora():
    assert nf4.bits_per_param_absmax(64) == 0.5
    assert abs(nf4.bits_per_param_absmax(64, True) - 0.127) < 1e-3
    n = 768 * 3072
    assert nf4.bytes_4bit(n) == n // 2 + 4 * n // 64
    assert nf4.bytes_4bit(n, double_quant=True) == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
    assert nf4.bytes_4bit(65) == 33 + 8
    p, s = nf4.quantize_4bit(_w((130, 257), 9), 64, "nf4", double_quant=True)
    stored = p.numel() + s.absmax.numel() + 4 * s.state2.absmax.numel() + 4
    assert nf4.bytes_4bit(130 * 257, double_quant=True) == stored


def test_linear4bit_and_model_bytes():
    from llmopt.gpt import GPT, GPTConfig
    lin = torch.nn.Linear(128, 64)
    x = torch.randn(4, 128)
    for qt in ("nf4", "fp4"):
        l4 = nf4.Linear4bit(lin, qt, double_quant=True)
        with torch.no_grad():
            rel = (l4(x) - lin(x)).norm() / lin(x).norm()
        assert rel < 0.15, (qt, rel)
    cfg = GPTConfig(vocab_size=100, max_position_embeddings=32, n_layer=2, n_head=2, d_model=64, d_ff=128)
    model = GPT(cfg)
    names = nf4.quantized_linear_names(model)
    assert len(names) == 12 and all(".layers." in "." + n for n in names)
    b16, b4 = nf4.model_bytes(model, "fp16"), nf4.model_bytes(model, "nf4")
    lin_numel = sum(model.get_submodule(n).weight.numel() for n in names)
    assert b16 - b4 == 2 * lin_numel - sum(nf4.bytes_4bit(model.get_submodule(n).weight.numel()) for n in names)
    assert nf4.model_bytes(model, "fp32") == 4 * sum(p.numel() for p in model.parameters())
    nf4.replace_linears(model, lambda l: nf4.Linear4bit(l))
    assert model(torch.randint(0, 100, (1, 8))).shape == (1, 8, 100)


def test_widget_summary_uses_the_functions_given():
    from llmopt.viz.quant4 import block_summary, code_figure
    W = _w((4, 100), 11)
    W_hat = nf4.dequantize_4bit(*nf4.quantize_4bit(W))
    s = block_summary(W, W_hat, 64, 6)                        # the ragged last block
    assert s["n_blocks"] == 7 and s["w"].numel() == 16
    assert s["absmax"] == float(W.reshape(-1)[384:].abs().max())
    assert s["max_err"] <= s["absmax"] and s["rms_err_all"] > 0
    import matplotlib
    matplotlib.use("Agg")
    fig, _ = code_figure(W, W_hat, nf4.NF4_CODE, 64, 0, "NF4")
    assert len(fig.axes) == 2
