"""Chunked-prefill attention: prompt chunks and decode tokens of many sequences in one pass,
over a paged KV cache.

Agrawal et al., "SARATHI: Efficient LLM Inference by Piggybacking Decodes with Chunked
Prefills" (2023) and Holmes et al., "DeepSpeed-FastGen" (2024, Dynamic SplitFuse); the
lecture's section «DeepSpeed: FastGen» (lab03_serving). The kernel is the paged twin of
FlashAttention-2's variable-length forward (Dao 2023), like vLLM's prefix-prefill kernel.

A SplitFuse pass holds, for each of S sequences, n_s new tokens: a prompt chunk (n_s > 1)
whose keys and values before it are already in the cache, or one decode token (n_s = 1).
Sequence s has c_s tokens in the cache after the pass writes its new ones, so its new token
i (0 ≤ i < n_s) sits at position p = c_s - n_s + i and attends causally to positions 0..p:

    o_p = Σ_j V_j A_pjᵀ,   A_pj = softmax_t(q_pᵀ k_t / √d) over t ≤ p   (K_j, V_j: blocks)

``llmopt.paged_attention.paged_attention_triton`` does this one query row at a time: every
row reads its whole context, so a chunk of n rows reads the cache n times (memory-bound,
n·c·d bytes). Here a program takes a **tile** of up to BLOCK_M consecutive rows of one
sequence and one head, walks the sequence's block table once, and multiplies the tile with
each block of keys on the tensor cores (compute-bound, c·d bytes per tile): FlashAttention's
online softmax, the rows' causal limits as a mask. Decode rows are tiles of one row.

Inputs, in FlashAttention's varlen layout:
- q (N, H, d): the pass's new tokens, sequence after sequence (``cu_seqlens`` (S + 1,) int32
  marks where each starts: sequence s owns rows cu[s]..cu[s+1]-1); rows past cu[S] are
  padding and come back as zeros;
- k_cache, v_cache (num_blocks, block_size, H, d): the pool, new tokens already written;
- block_tables (S, max_blocks) int32, context_lens (S,) int32: c_s, after the new tokens.

``chunked_attention`` is the PyTorch twin (each row through ``paged_attention``);
``chunked_attention_triton`` the kernel. Neither synchronises with the host, so a forward
pass that uses them can be captured in a CUDA graph (``llmopt.scheduler.EnginePasses``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import _interpreting, paged_attention


def _rows(context_lens, cu_seqlens):
    """(seq, pos) of every real row: its sequence and its position in that sequence."""
    n = cu_seqlens[1:] - cu_seqlens[:-1]                                     # (S,) new tokens
    seq = torch.repeat_interleave(torch.arange(len(n), device=n.device), n.long())  # (N_real,)
    i = torch.arange(len(seq), device=n.device) - cu_seqlens[seq].long()     # row within its sequence
    pos = context_lens[seq].long() - n[seq].long() + i                       # its position
    return seq, pos


def chunked_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens, scale=None):
    """Attention of every new token to its sequence's cache up to its own position, in
    PyTorch: each row through ``paged_attention`` with its own causal length p + 1.
    q (N, H, d) -> o (N, H, d); rows past cu_seqlens[-1] are zeros."""
    seq, pos = _rows(context_lens, cu_seqlens)
    o = torch.zeros_like(q)
    n = len(seq)
    if n:
        o[:n] = paged_attention(q[:n], k_cache, v_cache, block_tables[seq], (pos + 1).int(), scale)
    return o


@triton.jit
def _chunked_kernel(Q, K, V, O, Tables, Lens, Cu, TileSeq, TileRow, scale,
                    stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_ts,
                    stride_on, stride_oh,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    # one program per (tile, head): rows i0..i0+BLOCK_M-1 of sequence s, one pass over its blocks
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(TileSeq + t)
    if s >= 0:                                                        # s < 0: an empty tile
        i0 = tl.load(TileRow + t)
        row0 = tl.load(Cu + s)
        n_s = tl.load(Cu + s + 1) - row0                              # new tokens of s
        c_s = tl.load(Lens + s)                                       # its context after them
        offs_m = i0 + tl.arange(0, BLOCK_M)                           # rows within the sequence
        row_ok = offs_m < n_s
        pos = c_s - n_s + offs_m                                      # (BLOCK_M,) positions p
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        rows = row0 + offs_m
        q = tl.load(Q + rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & mask_d[None, :], other=0.0)          # (BLOCK_M, D)
        q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(q.dtype)    # scores in base 2
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum(c_s, c_s - n_s + i0 + BLOCK_M)                # the tile's last row sees up to here
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(0, hi, BLOCK_N):
            tk = start + offs_n                                       # key positions
            kv_ok = tk < hi
            block = tl.load(Tables + s * stride_ts + tk // BLOCK_SIZE, mask=kv_ok, other=0)
            base = block.to(tl.int64) * stride_kb + (tk % BLOCK_SIZE) * stride_kt + h * stride_kh
            k = tl.load(K + base[:, None] + offs_d[None, :], mask=kv_ok[:, None] & mask_d[None, :], other=0.0)
            v = tl.load(V + base[:, None] + offs_d[None, :], mask=kv_ok[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                x = tl.dot(q, tl.trans(k), input_precision="ieee")    # (BLOCK_M, BLOCK_N) q_pᵀ k_t
            else:
                x = tl.dot(q, tl.trans(k))
            causal = (tk[None, :] <= pos[:, None]) & kv_ok[None, :]   # t ≤ p
            x = tl.where(causal, x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(x - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)   # + V_j A_pjᵀ
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + rows[:, None] * stride_on + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])


def tiles(cu_seqlens, n_rows: int, block_m: int, skip_single: bool = False):
    """The work list, on the device and of a fixed length (no host sync, so capturable):
    (tile_seq, tile_row) of length cdiv(n_rows, block_m) + S, sequence s cut into
    cdiv(n_s, block_m) tiles of rows tile_row, tile_row + 1, ...; unused entries have seq -1.
    ``skip_single``: sequences of one new token get no tile (the decode kernel takes them)."""
    S = cu_seqlens.shape[0] - 1
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).long()                             # (S,)
    per = (n + block_m - 1) // block_m                                        # tiles of each sequence
    if skip_single:
        per = torch.where(n == 1, 0, per)
    end = torch.cumsum(per, 0)                                                # (S,)
    T = -(-n_rows // block_m) + S
    t = torch.arange(T, device=cu_seqlens.device)
    seq = torch.searchsorted(end, t, right=True)                              # (T,) in 0..S
    first = (end - per)[seq.clamp(max=max(S - 1, 0))] if S else t * 0
    row = (t - first) * block_m
    seq = torch.where(seq < S, seq, -1)
    return seq.to(torch.int32), row.to(torch.int32)


def chunked_attention_triton(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens,
                             scale=None, block_m: int = 32, block_n: int = 64, num_warps: int = 4,
                             num_stages: int | None = None, split_decodes: bool = True):
    """``chunked_attention`` in Triton: the tile kernel over (tile, head) programs for prompt
    chunks, and (``split_decodes``) the split-KV decode kernel of
    ``llmopt.paged_attention`` for the sequences that feed one token -- a tile of one row
    would waste the tensor cores and walk a long context alone."""
    from .paged_attention import paged_attention_triton
    N, H, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    q = q.contiguous()
    S = block_tables.shape[0]
    o = torch.zeros((N + 1, H, d), dtype=q.dtype, device=q.device)          # + a scratch row
    if N == 0 or S == 0:
        return o[:N]
    cu = cu_seqlens.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    tile_seq, tile_row = tiles(cu, N, block_m, skip_single=split_decodes)
    B = k_cache.shape[1]
    _chunked_kernel[(tile_seq.shape[0], H)](
        q, k_cache, v_cache, o, tables, lens, cu, tile_seq, tile_row, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0), o.stride(0), o.stride(1),
        BLOCK_SIZE=B, HEAD_DIM=d, BLOCK_D=max(triton.next_power_of_2(d), 16), BLOCK_M=block_m,
        BLOCK_N=block_n, UPCAST=_interpreting() or q.dtype == torch.float32, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    if split_decodes:                         # row cu[s] of each one-token sequence s
        single = (cu[1:] - cu[:-1]) == 1                                      # (S,)
        rows = torch.where(single, cu[:-1].long(), N)                         # others: the scratch row
        dec = paged_attention_triton(q[cu[:-1].long().clamp(max=N - 1)], k_cache, v_cache, tables,
                                     torch.where(single, lens, 1), scale)     # (S, H, d)
        o.index_copy_(0, rows, dec)
    return o[:N]
