"""FlashAttention 1 and 2: exact attention in tiles, with an online softmax.

Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
(NeurIPS 2022) and Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning" (2023); the lecture's section "Flash Attention" (lab04_flash_attention).

Standard attention writes S = QKᵀ/√d and P = softmax(S), both N×N, to HBM and reads them
back: O(N²) memory traffic and O(N²) extra memory. FlashAttention keeps a block of Q, K and V
in SRAM, computes its block of S there and folds it into the output with the online softmax.
Its extra memory is O(N) (O and L); its HBM traffic still grows with N² (K and V are read once
per block of B_r query rows: 2N²d/B_r elements against standard attention's 4N², i.e. 2B_r/d
times fewer at large N). The online softmax that makes the tiling exact:

    m(x) = max_i x_i,  f(x) = e^{x - m(x)},  ℓ(x) = Σ f(x)
    m([x¹ x²]) = max(m¹, m²),  ℓ([x¹ x²]) = e^{m¹-m}ℓ¹ + e^{m²-m}ℓ²

- ``block_sizes``: the lecture's step 1, block sizes from the SRAM size M (in numbers):
  B_c = ⌈M/4d⌉, B_r = min(⌈M/4d⌉, d).
- ``attention_reference``: the standard algorithm (materialises S and P); the spec.
- ``flash_attention_v1_torch``: the lecture's algorithm (FA1): outer loop over K_j, V_j,
  inner loop over Q_i; O_i, ℓ_i, m_i read from and written back to "HBM" at every step,
  O_i kept normalised by diag(ℓ_i)⁻¹ at every step.
- ``flash_attention_torch``: FA2's order: outer loop over Q_i (parallel on a GPU), inner
  over K_j, V_j; the unnormalised Õ is rescaled only by e^{m_old - m_new} and divided by
  ℓ once at the end; it returns O and the log-sum-exp L = m + log ℓ, which is all the
  backward needs.
- ``softmax_triton``: a warm-up Triton kernel, the online softmax of ``online_softmax`` (its
  PyTorch twin, same signature) over the rows of a matrix, one program per row, columns in tiles.
- ``flash_attention``: the same in Triton, an ``autograd.Function`` whose backward saves
  only Q, K, V, O and L (shape (B, H, N)) and recomputes P = exp(S - L) block by block.
  Forward and backward run in the CPU interpreter too (``import llmopt`` turns it on);
  there every tile is upcast to fp32 after ``tl.load`` because the interpreter's bf16
  arithmetic is wrong. On a GPU fp16/bf16 tiles feed the tensor cores directly.

Shapes are (B, H, N, d); causal masks are aligned top-left (row i sees keys j ≤ i), as in
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------
# The specification and the PyTorch versions
# --------------------------------------------------------------------------------------


def block_sizes(sram_bytes, d, bytes_per_el=4):
    """The lecture's step 1: block sizes for an SRAM of M = sram_bytes // bytes_per_el numbers,
    B_c = ⌈M / 4d⌉ and B_r = min(⌈M / 4d⌉, d). Returns (B_r, B_c) = (block_q, block_k).

    4·B_c·d ≤ M (up to the rounding): K_j, V_j, Q_i and O_i (each ≤ B_c × d) fit together.
    H100/H200: 228 KiB of shared memory per SM; in fp32 and d = 64, (B_r, B_c) = (64, 228)."""
    M = sram_bytes // bytes_per_el
    B_c = -(-M // (4 * d))                                              # ⌈M / 4d⌉
    return min(B_c, d), B_c


def attention_reference(q, k, v, causal=False, scale=None):
    """Standard attention softmax(QKᵀ·scale)V, computed in fp32, returned in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, N, N) -- the O(N²) part
    if causal:
        n_q, n_k = s.shape[-2:]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ v.float()).to(q.dtype)


def softmax_stats(x):
    """The lecture's m(x), ℓ(x) over the last dimension (f(x) = exp(x - m) is implied)."""
    m = x.max(dim=-1).values
    l = torch.exp(x - m[..., None]).sum(dim=-1)
    return m, l


def merge_softmax_stats(m1, l1, m2, l2):
    """Statistics of [x¹ x²] from those of the halves: m = max(m¹, m²),
    ℓ = e^{m¹-m} ℓ¹ + e^{m²-m} ℓ². A half that is all -inf (m = -inf, ℓ = 0) is neutral."""
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # -inf - -inf would be NaN
    l = torch.exp(m1 - m_safe) * l1 + torch.exp(m2 - m_safe) * l2
    return m, l


def online_softmax(x, block_size):
    """softmax(x) over the last dimension, reading x in blocks of ``block_size`` columns:
    one pass for (m, ℓ) with ``merge_softmax_stats``, one pass to write e^{x-m}/ℓ."""
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for j in range(0, x.shape[-1], block_size):
        m_j, l_j = softmax_stats(x[..., j:j + block_size])
        m, l = merge_softmax_stats(m, l, m_j, l_j)
    return torch.exp(x - m[..., None]) / l[..., None]


def flash_attention_v1_torch(q, k, v, block_q=64, block_k=64):
    """The lecture's FlashAttention (FA1, not causal): j over K/V blocks outside, i over Q
    blocks inside; O, ℓ, m live in "HBM" and are read and written at every (i, j)."""
    B, H, N, d = q.shape
    scale = d ** -0.5
    q, k, v = q.float(), k.float(), v.float()
    O = torch.zeros(B, H, N, d, device=q.device)                        # step 2
    l = torch.zeros(B, H, N, device=q.device)
    m = torch.full((B, H, N), float("-inf"), device=q.device)
    for j in range(0, k.shape[2], block_k):                             # step 5
        K_j, V_j = k[:, :, j:j + block_k], v[:, :, j:j + block_k]       # step 6
        for i in range(0, N, block_q):                                  # step 7
            Q_i, O_i = q[:, :, i:i + block_q], O[:, :, i:i + block_q]   # step 8
            l_i, m_i = l[:, :, i:i + block_q], m[:, :, i:i + block_q]
            S_ij = Q_i @ K_j.transpose(-2, -1) * scale                  # step 9 (B, H, Br, Bc)
            m_ij = S_ij.max(dim=-1).values                              # step 10
            P_ij = torch.exp(S_ij - m_ij[..., None])
            l_ij = P_ij.sum(dim=-1)
            m_new = torch.maximum(m_i, m_ij)                            # step 11
            l_new = torch.exp(m_i - m_new) * l_i + torch.exp(m_ij - m_new) * l_ij
            O[:, :, i:i + block_q] = (                                  # step 12
                (l_i * torch.exp(m_i - m_new))[..., None] * O_i
                + torch.exp(m_ij - m_new)[..., None] * (P_ij @ V_j)) / l_new[..., None]
            l[:, :, i:i + block_q], m[:, :, i:i + block_q] = l_new, m_new  # step 13
    return O.to(v.dtype if v.dtype != torch.float32 else O.dtype)


def flash_attention_torch(q, k, v, causal=False, block_q=64, block_k=64):
    """FA2's order in PyTorch: for each Q_i, loop over K_j, V_j keeping m_i, ℓ_i and the
    unnormalised Õ_i; divide by ℓ_i once at the end. Returns (O, L) with L = m + log ℓ
    of shape (B, H, N), fp32."""
    B, H, N, d = q.shape
    n_k = k.shape[2]
    scale = d ** -0.5
    qf, kf, vf = q.float(), k.float(), v.float()
    O = torch.empty(B, H, N, d, device=q.device)
    L = torch.empty(B, H, N, device=q.device)
    for i in range(0, N, block_q):
        Q_i = qf[:, :, i:i + block_q]                                   # (B, H, Br, d)
        rows = torch.arange(i, i + Q_i.shape[2], device=q.device)
        m_i = torch.full(Q_i.shape[:-1], float("-inf"), device=q.device)
        l_i = torch.zeros(Q_i.shape[:-1], device=q.device)
        O_i = torch.zeros_like(Q_i)
        hi = min(n_k, i + Q_i.shape[2]) if causal else n_k              # causal: skip blocks above the diagonal
        for j in range(0, hi, block_k):
            K_j, V_j = kf[:, :, j:j + block_k], vf[:, :, j:j + block_k]
            S_ij = Q_i @ K_j.transpose(-2, -1) * scale                  # (B, H, Br, Bc)
            if causal:
                cols = torch.arange(j, j + K_j.shape[2], device=q.device)
                S_ij = S_ij.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
            m_new = torch.maximum(m_i, S_ij.max(dim=-1).values)
            P_ij = torch.exp(S_ij - m_new[..., None])
            alpha = torch.exp(m_i - m_new)                              # rescales the old state
            l_i = alpha * l_i + P_ij.sum(dim=-1)
            O_i = alpha[..., None] * O_i + P_ij @ V_j
            m_i = m_new
        O[:, :, i:i + block_q] = O_i / l_i[..., None]                   # rescale once, at the end
        L[:, :, i:i + block_q] = m_i + torch.log(l_i)
    return O.to(q.dtype), L


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

# log2(e) = 1.4426950408889634 and ln 2 = 0.6931471805599453 appear as literals in the kernels:
# Triton kernels read no plain Python globals.


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _softmax_kernel(X, Y, n_cols, stride_x, stride_y, BLOCK_N: tl.constexpr):
    """One program per row: pass 1 folds the row's tiles into (m, ℓ) with the online merge,
    pass 2 writes e^{x - m}/ℓ tile by tile. Tiles are fp32 after tl.load."""
    row = tl.program_id(0)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    offs = tl.arange(0, BLOCK_N)
    m = tl.full([], float("-inf"), dtype=tl.float32)                    # the empty state
    l = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))                             # -inf tail: e^-inf = 0
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    for start in range(0, n_cols, BLOCK_N):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        y = tl.exp(x - m) / l
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols)


def softmax_triton(x, block_size=64):
    """softmax(x, dim=-1) with ``_softmax_kernel``: the Triton twin of ``online_softmax``.
    ``block_size`` (a power of two) is the width of a column tile."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()                                  # (rows, n)
    y = torch.empty_like(x2)
    _softmax_kernel[(x2.shape[0],)](x2, y, n, x2.stride(0), y.stride(0), BLOCK_N=block_size)
    return y.reshape(x.shape)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
               offs_m, offs_n, offs_d, mask_d, lo, hi, N_K, qk_scale,
               MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold K/V blocks [lo, hi) into (acc, ℓ, m); all in base 2 (exp2 is the fast one)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = mask_d[None, :]
        if MASK_TAIL:
            kv_mask = kv_mask & (cols[:, None] < N_K)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BM, BN)
        if MASK_TAIL:
            s = tl.where(cols[None, :] < N_K, s, float("-inf"))         # -inf, not 0: e^0 = 1
        if MASK_CAUSAL:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)                               # e^{m_old - m_new}
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(Q, K, V, O, L, sm_scale,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_on,
                      H, N_Q, N_K,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    # heavy (late, causal) query blocks first: the tail of the grid is then short blocks
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < N_Q) & mask_d[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)                                            # (BM, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                # unnormalised Õ
    qk_scale = sm_scale * 1.4426950408889634                            # scores in base 2
    if CAUSAL:
        # blocks left of the diagonal need no mask; the diagonal ones do
        lo = start_m * BLOCK_M
        lo = tl.minimum(lo, N_K) // BLOCK_N * BLOCK_N
        hi = tl.minimum((start_m + 1) * BLOCK_M, N_K)
        if EVEN_N:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                       offs_m, offs_n, offs_d, mask_d, 0, lo, N_K, qk_scale,
                                       False, False, UPCAST, DOT_PRECISION, BLOCK_N)
        else:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                       offs_m, offs_n, offs_d, mask_d, 0, lo, N_K, qk_scale,
                                       False, True, UPCAST, DOT_PRECISION, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   offs_m, offs_n, offs_d, mask_d, lo, hi, N_K, qk_scale,
                                   True, True, UPCAST, DOT_PRECISION, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   offs_m, offs_n, offs_d, mask_d, 0, N_K, N_K, qk_scale,
                                   False, not EVEN_N, UPCAST, DOT_PRECISION, BLOCK_N)
    acc = acc / l_i[:, None]                                            # FA2: divide once
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453                # L = m + log ℓ (natural)
    o_base = O + off_b * stride_ob + off_h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_mask)
    tl.store(L + off_bh * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _flash_bwd_preprocess_kernel(O, DO, DELTA, N, stride_ob, stride_oh, stride_on,
                                 stride_dob, stride_doh, stride_don, H,
                                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_M: tl.constexpr):
    """Δ_i = rowsum(dO_i ∘ O_i), the term that softmax's Jacobian subtracts."""
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, L, DELTA, DK, DV, sm_scale,
                           stride_qb, stride_qh, stride_qn,
                           stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn,
                           stride_dob, stride_doh, stride_don,
                           H, N_Q, N_K,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """One K_j, V_j block per program; loop over Q_i, recomputing Pᵀ = exp(K Qᵀ·scale - L)."""
    start_n = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: early keys have most work
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < N_K) & mask_d[None, :]
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = 0
    if CAUSAL:
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M                   # rows above see none of these keys
    for start_m in range(lo, N_Q, BLOCK_M):
        rows = start_m + offs_m
        q_mask = (rows[:, None] < N_Q) & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # padded rows get L = +inf, so their P is exp(-inf) = 0
        lse2 = tl.load(L + off_bh * N_Q + rows, mask=rows < N_Q, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + off_bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)     # (BN, BM)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])                # recomputed, never stored
        if CAUSAL:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)   # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, L, DELTA, DQ, sm_scale,
                         stride_qb, stride_qh, stride_qn,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_dob, stride_doh, stride_don,
                         H, N_Q, N_K,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """One Q_i block per program; loop over K_j, V_j: dQ_i = scale · Σ_j dS_ij K_j."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < N_Q) & mask_d[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(L + off_bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + off_bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    hi = N_K
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, N_K)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < N_K) & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)      # (BM, BN)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        keep = cols[None, :] < N_K
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)    # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def _launch_params(q):
    """(BLOCK_D, UPCAST, DOT_PRECISION) for q's head dim, dtype and device."""
    d = q.shape[-1]
    if not 16 <= d <= 256:
        raise ValueError(f"head dim d={d} is not supported (16 ≤ d ≤ 256)")
    upcast = _interpreting() or q.dtype == torch.float32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return triton.next_power_of_2(d), upcast, precision


def _fwd_config(d):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): large blocks in the interpreter (its
    time grows with programs × loop steps), tuned on an H100/H200 otherwise."""
    if _interpreting():
        return 64, 64, 4, 1
    if d <= 64:
        return 128, 64, 8, 4   # H200, N=4k causal: 323 TFLOP/s (bench/README.md)
    return 64, 64, 4, 3        # H200, N=4k causal: 420 TFLOP/s


def _bwd_config(d):
    """((BLOCK_M, BLOCK_N, warps, stages) of the dK/dV kernel, the same of the dQ kernel).
    dK/dV keeps a tall K/V block and streams short Q blocks; dQ the other way round."""
    if _interpreting():
        return (64, 64, 4, 1), (64, 64, 4, 1)
    return (32, 64, 4, 3), (64, 32, 4, 3)  # H200, N=4k causal: 316 (d=128), 266 (d=64) TFLOP/s


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must have shape (B, H, N, d)")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must have the same dtype")


def flash_attention_fwd(q, k, v, causal=False, scale=None, config=None):
    """Triton forward: returns (O, L) with O like q and L = m + log ℓ, (B, H, N) fp32."""
    _check_inputs(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    BLOCK_D, upcast, precision = _launch_params(q)
    bm, bn, nw, ns = config or _fwd_config(d)  # config: (BLOCK_M, BLOCK_N, warps, stages)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N_Q, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N_Q, bm), B * H)
    _flash_fwd_kernel[grid](
        q, k, v, o, lse, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, N_Q, N_K,
        HEAD_DIM=d, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        EVEN_N=N_K % bn == 0, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=nw, num_stages=ns)
    return o, lse


def flash_attention_bwd(q, k, v, o, lse, do, causal=False, scale=None, config=None):
    """Triton backward from (Q, K, V, O, L, dO): returns (dQ, dK, dV)."""
    q, k, v, o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, o, do))
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    BLOCK_D, upcast, precision = _launch_params(q)
    (bm1, bn1, nw1, ns1), (bm2, bn2, nw2, ns2) = config or _bwd_config(d)
    delta = torch.empty(B, H, N_Q, device=q.device, dtype=torch.float32)
    pre_m = 64 if _interpreting() else 128
    _flash_bwd_preprocess_kernel[(triton.cdiv(N_Q, pre_m), B * H)](
        o, do, delta, N_Q, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H,
        HEAD_DIM=d, BLOCK_D=BLOCK_D, BLOCK_M=pre_m)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               do.stride(0), do.stride(1), do.stride(2))
    meta = dict(HEAD_DIM=d, BLOCK_D=BLOCK_D, CAUSAL=causal, UPCAST=upcast,
                DOT_PRECISION=precision)
    # dk/dv and dq are written with the strides of k/v and q
    assert dk.stride() == k.stride() and dv.stride() == v.stride() and dq.stride() == q.stride()
    _flash_bwd_dkdv_kernel[(triton.cdiv(N_K, bn1), B * H)](
        q, k, v, do, lse, delta, dk, dv, scale, *strides, H, N_Q, N_K,
        BLOCK_M=bm1, BLOCK_N=bn1, num_warps=nw1, num_stages=ns1, **meta)
    _flash_bwd_dq_kernel[(triton.cdiv(N_Q, bm2), B * H)](
        q, k, v, do, lse, delta, dq, scale, *strides, H, N_Q, N_K,
        BLOCK_M=bm2, BLOCK_N=bn2, num_warps=nw2, num_stages=ns2, **meta)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Saves Q, K, V (the inputs), O and L (B, H, N) for the backward -- no N×N tensor."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        o, lse = flash_attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(q, k, v, o, lse, do, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=False, scale=None):
    """softmax(QKᵀ·scale)V with FlashAttention-2 in Triton; differentiable in q, k, v."""
    return FlashAttention.apply(q, k, v, causal, scale)


# --------------------------------------------------------------------------------------
# HBM traffic (per head), the lecture's O(N²) vs FlashAttention in numbers
# --------------------------------------------------------------------------------------

def standard_attention_hbm_bytes(N, d, elem_bytes=2):
    """Bytes moved by the lecture's 3-step standard attention for one head: read Q, K and
    write S; read S and write P; read P, V and write O -- 4·N·d + 4·N² elements."""
    return (4 * N * d + 4 * N * N) * elem_bytes


def flash_attention_hbm_bytes(N, d, block_q, block_k, elem_bytes=2):
    """Bytes moved by the FA2 forward for one head: Q read once, K and V read once per
    Q block (T_r = ⌈N / B_r⌉ times), O written once, L written once in fp32."""
    T_r = math.ceil(N / block_q)
    return (2 * N * d + 2 * T_r * N * d) * elem_bytes + 4 * N
