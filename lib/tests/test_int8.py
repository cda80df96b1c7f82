"""LLM.int8() (llmopt.int8) against bitsandbytes' vector-wise int8 and the fp32 product."""
import pytest
import torch

from llmopt import int8

bnbF = pytest.importorskip("bitsandbytes.functional")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_absmax_quantize_matches_bitsandbytes_vectorwise(dtype):
    X = (torch.randn(33, 70, generator=_g(1)) * 3).to(dtype)
    q, scale, outliers = bnbF.int8_vectorwise_quant(X.clone())
    mq, mscale = int8.absmax_quantize(X, dim=1)
    assert outliers is None
    assert mq.dtype == torch.int8 and mscale.dtype == torch.float32 and mscale.shape == (33, 1)
    assert torch.equal(mq, q)
    assert torch.equal(mscale.flatten(), scale)


def test_absmax_quantize_per_row_and_per_column():
    X = torch.randn(6, 9, generator=_g(2))
    X[2] *= 100                                              # one large row
    q, s = int8.absmax_quantize(X, dim=1)
    assert s.shape == (6, 1) and torch.equal(s[:, 0], X.abs().amax(1))
    assert (q.abs().amax(1) == 127).all()                    # every row uses the full range
    q0, s0 = int8.absmax_quantize(X, dim=0)
    assert s0.shape == (1, 9) and torch.equal(s0[0], X.abs().amax(0))
    assert (q0.abs().amax(0) == 127).all()
    err = (int8.absmax_dequantize(q, s) - X).abs()
    assert (err <= s / 254 + 1e-6).all()                     # half a step of each row


def test_zero_row_gives_zeros_not_nan():
    X = torch.randn(3, 5, generator=_g(3))
    X[1] = 0
    q, s = int8.absmax_quantize(X, dim=1)
    assert s[1, 0] == 0 and (q[1] == 0).all()
    assert torch.isfinite(int8.int8_matmul(X, torch.randn(4, 5))).all()


def test_int8_matmul_is_the_lecture_formula():
    X = torch.randn(17, 40, generator=_g(4))
    W = torch.randn(11, 40, generator=_g(5)) * 0.1
    Xq, cx = int8.absmax_quantize(X, 1)
    Wq, cw = int8.absmax_quantize(W, 1)
    out_int32 = Xq.to(torch.int32) @ Wq.to(torch.int32).T
    expected = cx * cw.T / 127 ** 2 * out_int32.float()
    torch.testing.assert_close(int8.int8_matmul(X, W), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(int8._int32_matmul(Xq, Wq), out_int32)          # exactly the int32 product
    rel = (int8.int8_matmul(X, W) - X @ W.T).norm() / (X @ W.T).norm()
    assert rel < 0.02


def _with_outliers(seed, n=64, k=96, m=48, cols=(5, 40, 77), size=40.0, big_w=False):
    g = _g(seed)
    X = torch.randn(n, k, generator=g)
    W = torch.randn(m, k, generator=g) * 0.05
    for c in cols:
        X[:, c] *= size                                      # a whole outlier feature
    if big_w:
        W[:, list(cols)] *= 10
    return X, W


def test_llm_int8_matmul_beats_plain_int8_with_outliers():
    for seed in range(3):
        X, W = _with_outliers(seed)
        exact = X.double() @ W.double().T
        e_int8 = (int8.int8_matmul(X, W).double() - exact).norm() / exact.norm()
        e_llm = (int8.llm_int8_matmul(X, W).double() - exact).norm() / exact.norm()
        assert e_llm < e_int8 / 5, (e_llm, e_int8)
        assert e_llm < 0.02


def test_llm_int8_matmul_without_outliers_is_int8():
    X = torch.randn(20, 30, generator=_g(6))
    W = torch.randn(10, 30, generator=_g(7))
    X = X / X.abs().max() * 5.9
    torch.testing.assert_close(int8.llm_int8_matmul(X, W), int8.int8_matmul(X, W))
    assert int8.outlier_columns(X).numel() == 0


def test_llm_int8_matmul_all_outliers_is_fp():
    X = torch.randn(8, 6, generator=_g(8)) + 100
    W = torch.randn(5, 6, generator=_g(9))
    torch.testing.assert_close(int8.llm_int8_matmul(X, W), X @ W.T)


def test_decomposition_takes_w_columns_out_of_the_int8_part():
    """W's weights on outlier features must not set c_w: with large weights there, the
    decomposition of X alone (W whole in the int8 part) is clearly worse."""
    X, W = _with_outliers(10, big_w=True)
    O = (X.abs() > 6).any(0)
    exact = X.double() @ W.double().T
    Xz = X.clone(); Xz[:, O] = 0
    only_x = int8.int8_matmul(Xz, W) + X[:, O] @ W[:, O].T
    e_ref = (int8.llm_int8_matmul(X, W).double() - exact).norm()
    e_bad = (only_x.double() - exact).norm()
    assert e_bad > 3 * e_ref


def test_outlier_columns_are_those_of_x():
    X, W = _with_outliers(11)
    assert int8.outlier_columns(X).tolist() == [5, 40, 77]
    q, s, cols = bnbF.int8_vectorwise_quant(X.clone(), threshold=6.0)   # bitsandbytes agrees
    assert cols.tolist() == [5, 40, 77]


def test_linear8bit_close_to_linear():
    lin = torch.nn.Linear(96, 48)
    X, _ = _with_outliers(12)
    l8 = int8.Linear8bit(lin)
    with torch.no_grad():
        ref = lin(X)
        rel = (l8(X) - ref).norm() / ref.norm()
        rel0 = (int8.Linear8bit(lin, threshold=0)(X) - ref).norm() / ref.norm()
    assert rel < 0.01 and rel < rel0 / 3
    assert l8(X[None]).shape == (1, 64, 48)
    assert l8.nbytes() == 96 * 48 + 4 * 48 + 2 * 48
    assert int8.int8_bytes(48, 96) == 96 * 48 + 4 * 48
