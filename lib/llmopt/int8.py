"""LLM.int8(): vector-wise int8 matrix multiplication with a 16-bit outlier decomposition (lab08).

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale" (2022, arXiv:2208.07339). Lecture section "Bits&Bytes → LLM.int8()";
notes in ``course/notes/lab08_int8_nf4.md``. Matches ``bitsandbytes.functional.
int8_vectorwise_quant`` (threshold 0) bit for bit.

Layout and notation (as ``torch.nn.Linear``):
- ``X`` is ``(N, K)``: N tokens (rows), K input features (columns);
  ``W`` is ``(M, K)``: M output features, each a row; the layer computes ``X @ Wᵀ`` ``(N, M)``.
  The lecture writes ``W`` as ``(K, M)`` with a scale per *column* ``c_w(j)``: that column is
  our row ``j``.
- absmax quantization of a vector ``v``: ``c = max|v|``, ``v_int8 = round(127 / c · v)``,
  back: ``v ≈ c / 127 · v_int8``. ``c`` is fp32, one per row of X (``c_x(i)``) and one per
  output row of W (``c_w(j)``): *vector-wise* quantization.
- The product: ``Out_int32 = X_int8 @ W_int8ᵀ`` accumulated in int32, then the lecture's
  dequantization ``Out_ij = c_x(i) · c_w(j) / 127² · Out_int32_ij``.
- Outlier decomposition: the feature columns ``O = {k : max_i |X_ik| > threshold}`` (6.0 in the
  paper) are *activation* outliers. ``X[:, O]`` and the matching input columns ``W[:, O]`` stay
  in 16-bit and are multiplied there; the rest, ``X[:, ¬O]`` and ``W[:, ¬O]``, go through
  vector-wise int8 (so neither the outliers of X nor W's weights on those features set a
  scale). ``Out = X_O W_Oᵀ + int8_matmul(X_¬O, W_¬O)``.

``Linear8bit`` is the deployable form (bitsandbytes' ``Linear8bitLt``): the weight is
quantized once, before any input is seen, so its row scales span every column; at run time
the outlier columns of X are multiplied with those columns of the dequantized weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn

Q_MAX = 127  # 2**8 / 2 - 1


def absmax_quantize(x: torch.Tensor, dim: int = -1):
    """Symmetric absmax quantization of ``x`` along ``dim`` to int8.

    Returns ``(x_int8, scale)``: ``x_int8`` int8 of x's shape, ``round(127 / scale · x)``;
    ``scale = max|x|`` over ``dim``, float32, with ``dim`` kept as size 1 (broadcasts back:
    ``x ≈ x_int8 · scale / 127``). A slice of zeros gets scale 0 and zeros.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=dim, keepdim=True)             # e.g. (N, 1) for dim=-1
    inv = Q_MAX / torch.where(scale == 0, torch.ones_like(scale), scale)
    x_int8 = torch.round(xf * inv).to(torch.int8)
    return x_int8, scale


def absmax_dequantize(x_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x_int8 · scale / 127`` in float32."""
    return x_int8.float() * scale / Q_MAX


def _int32_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ Bᵀ`` for int8 ``A (N, K)``, ``B (M, K)``, accumulated in int32.

    On a GPU ``torch._int_mm`` (int8 tensor cores) where its shape rules allow; elsewhere the
    same integers through a float64 matmul, which is exact (every partial sum is an integer of
    magnitude ≤ 127²·K < 2**53), so the int32 result bit for bit, and faster than PyTorch's
    int32 matmul on a CPU.
    """
    N, K = A.shape
    if A.is_cuda and N > 16 and K % 8 == 0 and B.shape[0] % 8 == 0:
        return torch._int_mm(A.contiguous(), B.t().contiguous())
    return (A.double() @ B.double().t()).to(torch.int32)


def int8_matmul(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Vector-wise int8 ``X @ Wᵀ``: X ``(N, K)`` per row, W ``(M, K)`` per output row.

    int8 × int8 with int32 accumulation, then ``c_x(i) · c_w(j) / 127²``. Returns ``(N, M)``
    in X's dtype.
    """
    X_int8, c_x = absmax_quantize(X, dim=1)                  # (N, K), (N, 1)
    W_int8, c_w = absmax_quantize(W, dim=1)                  # (M, K), (M, 1)
    out_int32 = _int32_matmul(X_int8, W_int8)                # (N, M) int32
    out = out_int32.float() * (c_x * c_w.t()) / (Q_MAX * Q_MAX)
    return out.to(X.dtype)


def outlier_columns(X: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Feature columns of ``X (N, K)`` with at least one ``|x| > threshold``: sorted indices."""
    return torch.nonzero((X.abs() > threshold).any(dim=0)).flatten()


def llm_int8_matmul(X: torch.Tensor, W: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8(): ``X @ Wᵀ`` with the outlier columns of X (and W's matching input columns)
    in 16-bit and the rest in vector-wise int8. X ``(N, K)``, W ``(M, K)`` → ``(N, M)``."""
    O = (X.abs() > threshold).any(dim=0)                      # (K,) outlier features
    out = int8_matmul(X[:, ~O], W[:, ~O]) if (~O).any() else \
        X.new_zeros(X.shape[0], W.shape[0])
    if O.any():
        out = out + (X[:, O].float() @ W[:, O].float().t()).to(X.dtype)   # the 16-bit part
    return out


class Linear8bit(nn.Module):
    """``nn.Linear`` with an int8 weight (one fp32 scale per output row) and LLM.int8()'s
    decomposition at run time: outlier columns of the input meet the dequantized weight's
    columns in 16-bit, the rest is int8 × int8."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        W_int8, scale = absmax_quantize(linear.weight.data, dim=1)
        self.register_buffer("weight_int8", W_int8)            # (M, K) int8
        self.register_buffer("weight_scale", scale)            # (M, 1) fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(),
                                                                  requires_grad=False)
        self.threshold = threshold
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        X = x.reshape(-1, shape[-1])                           # (N, K)
        O = (X.abs() > self.threshold).any(dim=0) if self.threshold > 0 else \
            torch.zeros(X.shape[1], dtype=torch.bool, device=X.device)
        X_int8, c_x = absmax_quantize(X[:, ~O], dim=1)
        out = _int32_matmul(X_int8, self.weight_int8[:, ~O]).float() * \
            (c_x * self.weight_scale.t()) / (Q_MAX * Q_MAX)
        if O.any():
            W_O = absmax_dequantize(self.weight_int8[:, O], self.weight_scale)   # (M, |O|)
            out = out + X[:, O].float() @ W_O.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        b = self.weight_int8.numel() + 4 * self.weight_scale.numel()
        return b + (0 if self.bias is None else 2 * self.bias.numel())


def int8_bytes(rows: int, cols: int) -> int:
    """Bytes of a ``(rows, cols)`` weight in vector-wise int8: the int8 values plus one fp32
    scale per row (as bitsandbytes stores ``SCB``)."""
    return rows * cols + 4 * rows
