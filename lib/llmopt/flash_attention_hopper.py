"""FlashAttention on Hopper: the lab's FA2 kernel plus FlashAttention-3's techniques, one by one.

Shah, Bikshandi, Zhang, Thakkar, Ramani, Dao, "FlashAttention-3: Fast and Accurate Attention
with Asynchrony and Low-precision" (2024); the lecture's section "Flash Attention"
(lab04_flash_attention, "going further"). The algorithm is the one of ``llmopt.flash_attention``
(FA2: outer loop over query tiles Q_i, inner loop over K_j, V_j, online softmax in base 2,
divide by ℓ once, keep only L = m + log ℓ for the backward, recompute P = exp(S - L) there).
What changes is how the H100/H200 is fed. FA3 names these techniques, and each is a switch
here (``FwdConfig`` / ``BwdConfig``), so the bench can record what each one buys (``STEPS``,
cumulative: a step adds its technique to the best configuration so far):

0. ``tiles``: Hopper-sized tiles (128 × 128 query × key tiles, 8 warps = two warpgroups for
   the wgmma tensor-core instructions), the loop software-pipelined over ``num_stages``.
1. ``tma``: Q, K, V, O (and dO, dK, dV) move as whole tiles with the Tensor Memory
   Accelerator: device-side tensor descriptors (``tl.make_tensor_descriptor``) over the
   flattened (B·H·N, d) view instead of B_r × d pointer arithmetic per element. TMA reads past
   the end of the tensor as zeros; rows of the next head are read (and masked out) at a ragged
   end; ragged stores go back to masked pointer stores, so no head writes into its neighbour.
2. ``causal_split``: the backward's loops are split like the forward's: the blocks on the
   diagonal band apply the causal mask, the others (most of them) run without ``tl.where``.
3. ``persistent``: the forward launches one program per SM (two for tiles of ≤ 64 × 64);
   programs walk the (query tile, head) work items heaviest-first (late causal tiles see the
   most keys), round-robin, so every SM gets the same work and the grid has no ragged tail.
4. ``bwd_fused``: the backward in one launch: program j computes dK_j, dV_j of key tile j and
   then dQ_j of query tile j. Causal, key tile j meets N - j·B_c query rows and query tile j
   meets (j + 1)·B_r keys: with B_c = B_r every program does the same work (no tail).
5. ``dq_atomic``: FA2/FA3's dQ inside the dK/dV pass (dQ_i += dS_ij K_j added atomically in
   fp32) instead of the second pass that recomputes S and P: 5 matrix products per tile pair
   instead of 7, for fp32 atomic traffic; the bench measures which pays.
6. ``dq_tma_reduce``: that atomic dQ as one bulk TMA reduce-add per (B_r, d) tile
   (``desc.atomic_add``), as FA3 does, instead of one atomic per element.
7. ``overlap``: FA3's intra-warpgroup pipelining, written as Triton lets one write it: the
   scores S_{j+1} = Q K_{j+1}ᵀ are issued (an asynchronous wgmma) before the softmax of tile j.
   Compiled for sm_90 by Triton 3.6, the wgmma is waited for right after it is issued (the
   TTGIR has ``warp_group_dot_wait {pendings = 0}`` before the exponentials), so the softmax
   does not overlap it: Triton keeps only accumulator chains asynchronous across iterations.
   The step stays in the climb as the measurement of that. The backward loops issue both
   score-sized products (S and dP) before the exponentials (always on).

Warp specialisation (``warp_specialize``: ``tl.range(..., warp_specialize=True)``, FA3's
producer/consumer warps) is a switch but not a step: in Triton 3.6 it is Blackwell-only in
effect. Compiled for sm_90 the 8-warp kernels keep only the loop attribute (the TTGIR has no
``ttg.warp_specialize`` partitions: the same kernel) and the 4-warp ones fail in the
NVGPUWarpSpecialization pass. Two CTAs of 4 warps per SM (64 × 64 tiles) are the nearest thing
to FA3's ping-pong of two warpgroups that Triton 3.6 gives on Hopper: one CTA's softmax runs
while the other's matrix products do; the bench's tile sweep includes them.

Every kernel also folds log₂e into the softmax scale (``exp2``, one FMA per score:
s·(scale·log₂e) - m) as the lab's does. Not expressible in Triton 3.6 and left out: FA3's
ping-pong scheduling of two warpgroups with named barriers, explicit register reallocation
(setmaxnreg) between producer and consumer, and FP8 with incoherent processing.

- ``flash_attention_hopper(q, k, v, causal=False, scale=None)``: same signature and semantics
  as ``llmopt.flash_attention.flash_attention`` (an ``autograd.Function``; saves Q, K, V, O
  and L only), with the default configurations ``DEFAULT_FWD`` / ``DEFAULT_BWD``.
- ``flash_attention_hopper_fwd`` / ``flash_attention_hopper_bwd``: the launchers, with a
  ``config``; ``HopperAttention.apply(q, k, v, causal, scale, fwd_config, bwd_config)``.
- ``step_configs(i)``: the configuration of climb step i with the default tiles.

The CPU path: ``import llmopt`` turns on Triton's interpreter; every switch runs there except
``warp_specialize`` (ignored by the interpreter: the loop is the same loop), ``dq_tma_reduce``
(the interpreter has no descriptor reduce: element atomics instead) and the persistent grid's
size (3 programs instead of one per SM); TMA descriptor loads and stores are emulated by the
interpreter (tiles are upcast to fp32 after every load there: its bf16 arithmetic is wrong).
On a GPU, TMA needs a head dim that is a power of two (16-byte aligned rows); otherwise the
kernels fall back to pointer loads.

Shapes are (B, H, N, d), causal masks aligned top-left (row i sees keys j ≤ i), as in
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``. ``scale`` must be > 0
(the max is taken before scaling, so the scale folds into one FMA).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .flash_attention import _check_inputs, _interpreting

# log2(e) = 1.4426950408889634 and ln 2 = 0.6931471805599453 appear as literals in the
# kernels: Triton kernels read no plain Python globals.


@dataclass(frozen=True)
class FwdConfig:
    """The forward's tiles and switches: BLOCK_M = B_r query rows per tile, BLOCK_N = B_c keys."""
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = False
    warp_specialize: bool = False
    persistent: bool = False
    overlap: bool = False

    def tiles(self):
        return (self.block_m, self.block_n, self.num_warps, self.num_stages)


@dataclass(frozen=True)
class BwdConfig:
    """The backward's tiles and switches. The dK/dV pass keeps a tall K_j, V_j tile
    (block_n1 keys) and streams short Q_i tiles (block_m1 rows); the dQ pass the other way."""
    block_m1: int = 64
    block_n1: int = 128
    num_warps1: int = 8
    num_stages1: int = 2
    block_m2: int = 128
    block_n2: int = 64
    num_warps2: int = 8
    num_stages2: int = 2
    tma: bool = False
    warp_specialize: bool = False
    split: bool = False
    fused: bool = False
    dq_atomic: bool = False
    dq_tma_reduce: bool = False

    def tiles(self):
        return ((self.block_m1, self.block_n1, self.num_warps1, self.num_stages1),
                (self.block_m2, self.block_n2, self.num_warps2, self.num_stages2))


# The climb: (name, what it adds, forward switches, backward switches); each step adds its
# switches to the configuration of the step before (the bench keeps a step only if it pays).
STEPS = (
    ("tiles", "the lab's FA2 algorithm with Hopper tiles/warps/stages", {}, {}),
    ("tma", "TMA tensor descriptors for Q, K, V, O, dO, dK, dV", {"tma": True}, {"tma": True}),
    ("causal_split", "backward: causal masks only on the diagonal band", {}, {"split": True}),
    ("persistent", "forward: persistent grid, heaviest (query tile, head) first",
     {"persistent": True}, {}),
    ("bwd_fused", "backward: one launch, program j does key tile j's dK/dV and query tile "
     "j's dQ (causal work balanced)", {}, {"fused": True}),
    ("dq_atomic", "backward: dQ accumulated atomically in the dK/dV pass", {}, {"dq_atomic": True}),
    ("dq_tma_reduce", "backward: the atomic dQ as one TMA reduce-add per tile", {},
     {"dq_atomic": True, "dq_tma_reduce": True}),
    ("overlap", "forward: QK of tile j+1 issued before the softmax of tile j",
     {"overlap": True}, {}),
)

# Defaults of ``flash_attention_hopper``: the best configuration bench/flash_attention_hopper.py
# measured on an H200 (bench/results/flash_attention_hopper.json, ``best_fwd_config`` /
# ``best_bwd_config``): 64 x 64 forward tiles without TMA; the backward with masks only on the
# diagonal band and dQ accumulated in the dK/dV pass.
DEFAULT_FWD = FwdConfig(64, 64, 4, 3)
DEFAULT_BWD = BwdConfig(64, 128, 8, 3, 128, 64, 8, 3, split=True, dq_atomic=True)
# The interpreter's time grows with programs × loop steps: small tests, moderate tiles.
_INTERPRET_FWD = FwdConfig(32, 32, 4, 1)
_INTERPRET_BWD = BwdConfig(32, 32, 4, 1, 32, 32, 4, 1)


def step_configs(i, fwd=None, bwd=None):
    """(FwdConfig, BwdConfig) of climb step i: steps 0..i's switches on ``fwd``/``bwd``'s tiles."""
    fwd = fwd or (_INTERPRET_FWD if _interpreting() else FwdConfig())
    bwd = bwd or (_INTERPRET_BWD if _interpreting() else BwdConfig())
    for _, _, f, b in STEPS[:i + 1]:
        fwd, bwd = dataclasses.replace(fwd, **f), dataclasses.replace(bwd, **b)
    return fwd, bwd


# --------------------------------------------------------------------------------------
# Triton: loads, the online-softmax step
# --------------------------------------------------------------------------------------

@triton.jit
def _make_src(X, n_rows, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, TMA: tl.constexpr):
    """A tile source over the flattened (B·H·N, d) view: a TMA descriptor, or the pointer."""
    if TMA:
        src = tl.make_tensor_descriptor(X, shape=[n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[BLOCK_ROWS, HEAD_DIM])
    else:
        src = X
    return src


@triton.jit
def _load_tile(src, row0, start, N, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr, TMA: tl.constexpr, MASK_ROWS: tl.constexpr,
               UPCAST: tl.constexpr):
    """Rows [start, start + BLOCK_ROWS) of one head (its row 0 is ``row0`` in the flattened
    view), (BLOCK_ROWS, BLOCK_D). TMA zero-fills past the tensor's end; the pointer path masks
    rows ≥ N when MASK_ROWS (a ragged last tile) and columns ≥ HEAD_DIM."""
    if TMA:
        x = src.load([row0 + start, 0])
    else:
        rows = start + tl.arange(0, BLOCK_ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = src + (row0 + rows).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK_ROWS:
            x = tl.load(ptrs, mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != BLOCK_D:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(X, src, x, row0, start, N, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, TMA_STORE: tl.constexpr):
    """Write a (BLOCK_ROWS, BLOCK_D) tile: TMA only when the tile is whole (TMA_STORE),
    else masked pointer stores (a TMA store would write into the next head's rows)."""
    x = x.to(X.dtype.element_ty)
    if TMA_STORE:
        src.store([row0 + start, 0], x)
    else:
        rows = start + tl.arange(0, BLOCK_ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = X + (row0 + rows).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(ptrs, x, mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, offs_m, cols, N_K, qk_scale,
                  MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Fold one tile of raw scores s = Q_i K_jᵀ (BM, BN) and its V_j into (Õ, ℓ, m), base 2."""
    if MASK_CAUSAL or MASK_TAIL:
        s = s * qk_scale
        if MASK_TAIL:
            s = tl.where(cols[None, :] < N_K, s, float("-inf"))         # -inf, not 0: e^0 = 1
        if MASK_CAUSAL:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        s = s - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                # scale > 0
        s = s * qk_scale - m_new[:, None]                               # one FMA per score
    p = tl.math.exp2(s)
    alpha = tl.math.exp2(m_i - m_new)                                   # e^{m_old - m_new}
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kv_row0, offs_m, lo, hi, N_K, qk_scale,
              MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              TMA: tl.constexpr, WS: tl.constexpr, OVERLAP: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the K/V tiles [lo, hi) into (Õ, ℓ, m)."""
    offs_n = tl.arange(0, BLOCK_N)
    if OVERLAP:
        # FA3's intra-warpgroup overlap: S_{j+1} is issued before the softmax of S_j
        if lo < hi:
            k = _load_tile(k_src, kv_row0, lo, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA,
                           MASK_TAIL, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            for start_n in tl.range(lo + BLOCK_N, hi, BLOCK_N):
                k = _load_tile(k_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA,
                               MASK_TAIL, UPCAST)
                s_next = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                prev = start_n - BLOCK_N
                v = _load_tile(v_src, kv_row0, prev, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA,
                               MASK_TAIL, UPCAST)
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, offs_m, prev + offs_n, N_K,
                                              qk_scale, MASK_CAUSAL, MASK_TAIL, DOT_PRECISION)
                s = s_next
            last = lo + (hi - lo - 1) // BLOCK_N * BLOCK_N
            v = _load_tile(v_src, kv_row0, last, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA,
                           MASK_TAIL, UPCAST)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, offs_m, last + offs_n, N_K,
                                          qk_scale, MASK_CAUSAL, MASK_TAIL, DOT_PRECISION)
    else:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            k = _load_tile(k_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA,
                           MASK_TAIL, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BM, BN)
            v = _load_tile(v_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA,
                           MASK_TAIL, UPCAST)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, offs_m, start_n + offs_n, N_K,
                                          qk_scale, MASK_CAUSAL, MASK_TAIL, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(q_src, k_src, v_src, o_src, O, L, start_m, bh, qk_scale, N_Q, N_K,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
              TMA_STORE: tl.constexpr, WS: tl.constexpr, OVERLAP: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One work item: query tile ``start_m`` of head ``bh`` -> O_i and L_i."""
    q_row0 = bh * N_Q                                                   # the head's row 0
    kv_row0 = bh * N_K
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_tile(q_src, q_row0, start_m * BLOCK_M, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D, TMA,
                   not EVEN_M, UPCAST)                                  # (BM, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                # unnormalised Õ
    if CAUSAL:
        # whole tiles left of the diagonal need no mask; the diagonal band does
        lo = tl.minimum(start_m * BLOCK_M, N_K) // BLOCK_N * BLOCK_N
        hi = tl.minimum((start_m + 1) * BLOCK_M, N_K)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kv_row0, offs_m, 0, lo, N_K,
                                  qk_scale, False, False, HEAD_DIM, BLOCK_D, BLOCK_N, TMA, WS,
                                  OVERLAP, UPCAST, DOT_PRECISION)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kv_row0, offs_m, lo, hi, N_K,
                                  qk_scale, True, not EVEN_N, HEAD_DIM, BLOCK_D, BLOCK_N, TMA,
                                  WS, OVERLAP, UPCAST, DOT_PRECISION)
    else:
        full = N_K // BLOCK_N * BLOCK_N                                 # whole tiles: no mask
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kv_row0, offs_m, 0, full,
                                  N_K, qk_scale, False, False, HEAD_DIM, BLOCK_D, BLOCK_N, TMA,
                                  WS, OVERLAP, UPCAST, DOT_PRECISION)
        if not EVEN_N:
            acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kv_row0, offs_m, full,
                                      N_K, N_K, qk_scale, False, True, HEAD_DIM, BLOCK_D,
                                      BLOCK_N, TMA, False, False, UPCAST, DOT_PRECISION)
    acc = acc / l_i[:, None]                                            # FA2: divide once
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453                # L = m + log ℓ
    _store_tile(O, o_src, acc, q_row0, start_m * BLOCK_M, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D,
                TMA_STORE)
    tl.store(L + q_row0 + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _hopper_fwd_kernel(Q, K, V, O, L, sm_scale, BH, N_Q, N_K,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
                       TMA_STORE: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr,
                       OVERLAP: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_src = _make_src(Q, BH * N_Q, HEAD_DIM, BLOCK_M, TMA)
    k_src = _make_src(K, BH * N_K, HEAD_DIM, BLOCK_N, TMA)
    v_src = _make_src(V, BH * N_K, HEAD_DIM, BLOCK_N, TMA)
    o_src = _make_src(O, BH * N_Q, HEAD_DIM, BLOCK_M, TMA)
    qk_scale = sm_scale * 1.4426950408889634                            # scores in base 2
    n_m = tl.cdiv(N_Q, BLOCK_M)
    if PERSISTENT:
        # one program per SM; work items (query tile, head) heaviest first, round-robin
        for item in tl.range(tl.program_id(0), n_m * BH, tl.num_programs(0)):
            _fwd_tile(q_src, k_src, v_src, o_src, O, L, n_m - 1 - item // BH, item % BH,
                      qk_scale, N_Q, N_K, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, EVEN_M,
                      EVEN_N, TMA, TMA_STORE, WS, OVERLAP, UPCAST, DOT_PRECISION)
    else:
        # heavy (late, causal) query tiles first: the hardware scheduler then fills SMs well
        _fwd_tile(q_src, k_src, v_src, o_src, O, L, n_m - 1 - tl.program_id(0),
                  tl.program_id(1), qk_scale, N_Q, N_K, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                  CAUSAL, EVEN_M, EVEN_N, TMA, TMA_STORE, WS, OVERLAP, UPCAST, DOT_PRECISION)


# --------------------------------------------------------------------------------------
# Triton: backward
# --------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """Δ_i = rowsum(dO_i ∘ O_i) over the flattened rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_src, do_src, dq_src, L, DELTA, DQ, q_row0, offs_n, lo, hi, N_Q,
               N_K, sm_scale, qk_scale, MASK_CAUSAL: tl.constexpr, MASK_COLS: tl.constexpr,
               MASK_ROWS: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_REDUCE: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               TMA: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Stream Q_i, dO_i for i in [lo, hi) past one K_j, V_j: dV_j += P_ijᵀ dO_i,
    dK_j += dS_ijᵀ Q_i (and, with DQ_ATOMIC, dQ_i += dS_ij K_j, atomically: element by
    element, or with DQ_REDUCE one TMA reduce-add per tile)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WS):
        rows = start_m + offs_m
        q = _load_tile(q_src, q_row0, start_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D, TMA, MASK_ROWS,
                       UPCAST)
        do = _load_tile(do_src, q_row0, start_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D, TMA,
                        MASK_ROWS, UPCAST)
        # rows past N get L = +inf, so their P is exp(-inf) = 0 (and dS = 0)
        lse2 = tl.load(L + q_row0 + rows, mask=rows < N_Q, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + q_row0 + rows, mask=rows < N_Q, other=0.0)
        # both score-sized products first: the tensor cores compute dPᵀ while exp2 runs
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)     # (BN, BM)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)   # (BN, BM)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])                # recomputed, never stored
        if MASK_CAUSAL:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        if MASK_COLS:
            pT = tl.where(offs_n[:, None] < N_K, pT, 0.0)               # keys past N (dQ only)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
            if DQ_REDUCE:
                # one bulk TMA reduce-add of the (BM, d) tile; rows past N add zeros (P = 0)
                dq_src.atomic_add([q_row0 + start_m, 0], dq)
            else:
                ptrs = DQ + (q_row0 + rows).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
                tl.atomic_add(ptrs, dq, mask=(rows[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM),
                              sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_tile(Q, K, V, DO, L, DELTA, DK, DV, DQ, sm_scale, BH, N_Q, N_K, start_n, bh,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DQ_ATOMIC: tl.constexpr,
               DQ_REDUCE: tl.constexpr, MASK_COLS: tl.constexpr, EVEN_M: tl.constexpr,
               EVEN_N: tl.constexpr, TMA: tl.constexpr, TMA_STORE: tl.constexpr,
               WS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK_j, dV_j of the key tile at ``start_n``: loop over Q_i, recomputing
    Pᵀ = exp(K Qᵀ·scale - L)."""
    q_row0 = bh * N_Q
    kv_row0 = bh * N_K
    q_src = _make_src(Q, BH * N_Q, HEAD_DIM, BLOCK_M, TMA)
    do_src = _make_src(DO, BH * N_Q, HEAD_DIM, BLOCK_M, TMA)
    k_src = _make_src(K, BH * N_K, HEAD_DIM, BLOCK_N, TMA)
    v_src = _make_src(V, BH * N_K, HEAD_DIM, BLOCK_N, TMA)
    dq_src = _make_src(DQ, BH * N_Q, HEAD_DIM, BLOCK_M, DQ_REDUCE)     # fp32 dQ accumulator
    k = _load_tile(k_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA, not EVEN_N,
                   UPCAST)
    v = _load_tile(v_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA, not EVEN_N,
                   UPCAST)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    mid = 0                                                             # [0, mid): the masked band
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M                               # rows above: no such keys
        mid = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M                           # no SPLIT: all masked
        if SPLIT:
            # rows below the band see every key of the tile: no mask there
            mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, mid)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_src, do_src, dq_src, L, DELTA, DQ, q_row0, offs_n,
                            lo, mid, N_Q, N_K, sm_scale, qk_scale, True, MASK_COLS, not EVEN_M,
                            DQ_ATOMIC, DQ_REDUCE, HEAD_DIM, BLOCK_D, BLOCK_M, TMA, WS, UPCAST,
                            DOT_PRECISION)
    dk, dv = _dkdv_loop(dk, dv, k, v, q_src, do_src, dq_src, L, DELTA, DQ, q_row0, offs_n,
                        mid, N_Q, N_Q, N_K, sm_scale, qk_scale, False, MASK_COLS, not EVEN_M,
                        DQ_ATOMIC, DQ_REDUCE, HEAD_DIM, BLOCK_D, BLOCK_M, TMA, WS, UPCAST,
                        DOT_PRECISION)
    dk = dk * sm_scale
    dk_src = _make_src(DK, BH * N_K, HEAD_DIM, BLOCK_N, TMA_STORE)
    dv_src = _make_src(DV, BH * N_K, HEAD_DIM, BLOCK_N, TMA_STORE)
    _store_tile(DK, dk_src, dk, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA_STORE)
    _store_tile(DV, dv_src, dv, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA_STORE)


@triton.jit
def _hopper_bwd_dkdv_kernel(Q, K, V, DO, L, DELTA, DK, DV, DQ, sm_scale, BH, N_Q, N_K,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                            DQ_REDUCE: tl.constexpr, MASK_COLS: tl.constexpr, EVEN_M: tl.constexpr,
                            EVEN_N: tl.constexpr, TMA: tl.constexpr, TMA_STORE: tl.constexpr,
                            WS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K_j, V_j tile per program, early keys (the most work when causal) first."""
    start_n = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_N
    _dkdv_tile(Q, K, V, DO, L, DELTA, DK, DV, DQ, sm_scale, BH, N_Q, N_K, start_n,
               tl.program_id(1), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, SPLIT, DQ_ATOMIC,
               DQ_REDUCE, MASK_COLS, EVEN_M, EVEN_N, TMA, TMA_STORE, WS, UPCAST, DOT_PRECISION)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, k_src, v_src, kv_row0, offs_m, lo, hi, N_K, qk_scale,
             MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             TMA: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """dQ_i += dS_ij K_j over the K/V tiles [lo, hi) (scaled by the caller)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        k = _load_tile(k_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA, MASK_TAIL,
                       UPCAST)
        v = _load_tile(v_src, kv_row0, start_n, N_K, HEAD_DIM, BLOCK_N, BLOCK_D, TMA, MASK_TAIL,
                       UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)      # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)    # (BM, BN)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASK_TAIL:
            p = tl.where(cols[None, :] < N_K, p, 0.0)
        if MASK_CAUSAL:
            p = tl.where(offs_m[:, None] >= cols[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_tile(Q, K, V, DO, L, DELTA, DQ, sm_scale, BH, N_Q, N_K, start_m, bh,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
             EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
             TMA_STORE: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """dQ_i of the query tile at ``start_m``: loop over K_j, V_j, dQ_i = scale · Σ_j dS_ij K_j."""
    q_row0 = bh * N_Q
    kv_row0 = bh * N_K
    q_src = _make_src(Q, BH * N_Q, HEAD_DIM, BLOCK_M, TMA)
    do_src = _make_src(DO, BH * N_Q, HEAD_DIM, BLOCK_M, TMA)
    k_src = _make_src(K, BH * N_K, HEAD_DIM, BLOCK_N, TMA)
    v_src = _make_src(V, BH * N_K, HEAD_DIM, BLOCK_N, TMA)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_src, q_row0, start_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D, TMA, not EVEN_M,
                   UPCAST)
    do = _load_tile(do_src, q_row0, start_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D, TMA, not EVEN_M,
                    UPCAST)
    lse2 = tl.load(L + q_row0 + offs_m, mask=offs_m < N_Q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + q_row0 + offs_m, mask=offs_m < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N_K)
        if SPLIT:
            lo = tl.minimum(start_m, N_K) // BLOCK_N * BLOCK_N         # whole tiles left of it
            dq = _dq_loop(dq, q, do, lse2, delta, k_src, v_src, kv_row0, offs_m, 0, lo, N_K,
                          qk_scale, False, False, HEAD_DIM, BLOCK_D, BLOCK_N, TMA, WS, UPCAST,
                          DOT_PRECISION)
            dq = _dq_loop(dq, q, do, lse2, delta, k_src, v_src, kv_row0, offs_m, lo, hi, N_K,
                          qk_scale, True, not EVEN_N, HEAD_DIM, BLOCK_D, BLOCK_N, TMA, WS,
                          UPCAST, DOT_PRECISION)
        else:
            dq = _dq_loop(dq, q, do, lse2, delta, k_src, v_src, kv_row0, offs_m, 0, hi, N_K,
                          qk_scale, True, not EVEN_N, HEAD_DIM, BLOCK_D, BLOCK_N, TMA, WS,
                          UPCAST, DOT_PRECISION)
    else:
        dq = _dq_loop(dq, q, do, lse2, delta, k_src, v_src, kv_row0, offs_m, 0, N_K, N_K,
                      qk_scale, False, not EVEN_N, HEAD_DIM, BLOCK_D, BLOCK_N, TMA, WS, UPCAST,
                      DOT_PRECISION)
    dq = dq * sm_scale
    dq_src = _make_src(DQ, BH * N_Q, HEAD_DIM, BLOCK_M, TMA_STORE)
    _store_tile(DQ, dq_src, dq, q_row0, start_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D, TMA_STORE)


@triton.jit
def _hopper_bwd_dq_kernel(Q, K, V, DO, L, DELTA, DQ, sm_scale, BH, N_Q, N_K,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                          EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
                          TMA_STORE: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """One Q_i tile per program, late queries (the most work when causal) first."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    _dq_tile(Q, K, V, DO, L, DELTA, DQ, sm_scale, BH, N_Q, N_K, start_m, tl.program_id(1),
             HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, SPLIT, EVEN_M, EVEN_N, TMA, TMA_STORE,
             WS, UPCAST, DOT_PRECISION)


@triton.jit
def _hopper_bwd_fused_kernel(Q, K, V, DO, L, DELTA, DK, DV, DQ, sm_scale, BH, N_Q, N_K,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                             BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                             CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                             EVEN_M1: tl.constexpr, EVEN_N1: tl.constexpr,
                             EVEN_M2: tl.constexpr, EVEN_N2: tl.constexpr,
                             TMA: tl.constexpr, TMA_STORE1: tl.constexpr,
                             TMA_STORE2: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    """One launch for the whole backward: program j computes dK_j, dV_j of key tile j, then
    dQ_j of query tile j. Causal: key tile j sees N - j·B_c query rows, query tile j sees
    (j + 1)·B_r keys, so every program does about the same work (B_c = B_r)."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    if j * BLOCK_N1 < N_K:
        _dkdv_tile(Q, K, V, DO, L, DELTA, DK, DV, DQ, sm_scale, BH, N_Q, N_K, j * BLOCK_N1, bh,
                   HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1, CAUSAL, SPLIT, False, False, False,
                   EVEN_M1, EVEN_N1, TMA, TMA_STORE1, WS, UPCAST, DOT_PRECISION)
    if j * BLOCK_M2 < N_Q:
        _dq_tile(Q, K, V, DO, L, DELTA, DQ, sm_scale, BH, N_Q, N_K, j * BLOCK_M2, bh,
                 HEAD_DIM, BLOCK_D, BLOCK_M2, BLOCK_N2, CAUSAL, SPLIT, EVEN_M2, EVEN_N2, TMA,
                 TMA_STORE2, WS, UPCAST, DOT_PRECISION)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def _alloc_scratch(size, alignment, stream):
    """Global scratch for device-side TMA descriptors (128 bytes each)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)




def _prepare(q, k, v, scale):
    """Checks, contiguous (B, H, N, d) tensors, and (scale, BLOCK_D, UPCAST, DOT_PRECISION)."""
    _check_inputs(q, k, v)                                          # the lab's checks
    d = q.shape[-1]
    if not 16 <= d <= 256:
        raise ValueError(f"head dim d={d} is not supported (16 ≤ d ≤ 256)")
    scale = d ** -0.5 if scale is None else scale
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    upcast = _interpreting() or q.dtype == torch.float32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return scale, triton.next_power_of_2(d), upcast, precision


def _use_tma(flag, d):
    """TMA needs rows of 16-byte multiples and a box as wide as the row: d a power of two.
    The descriptors' scratch allocator is set on every call: Triton keeps it per context, and
    autograd runs the backward on another thread."""
    if not flag or d != triton.next_power_of_2(d):
        return False
    if not _interpreting():
        triton.set_allocator(_alloc_scratch)
    return True


def _persistent_programs(device, cfg):
    """One program per SM, two for small tiles (two CTAs fit in an SM's 228 KB)."""
    if _interpreting() or device.type != "cuda":
        return 3                                                        # a few, to test the loop
    per_sm = 2 if cfg.block_m * cfg.block_n <= 64 * 64 else 1
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def flash_attention_hopper_fwd(q, k, v, causal=False, scale=None, config=None):
    """Forward: returns (O, L), O like q and L = m + log ℓ of shape (B, H, N), fp32."""
    scale, BLOCK_D, upcast, precision = _prepare(q, k, v, scale)
    cfg = config or (_INTERPRET_FWD if _interpreting() else DEFAULT_FWD)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N_Q, device=q.device, dtype=torch.float32)
    n_m = triton.cdiv(N_Q, cfg.block_m)
    tma = _use_tma(cfg.tma, d)
    if cfg.persistent:
        grid = (min(n_m * B * H, _persistent_programs(q.device, cfg)),)
    else:
        grid = (n_m, B * H)
    _hopper_fwd_kernel[grid](
        q, k, v, o, lse, scale, B * H, N_Q, N_K,
        HEAD_DIM=d, BLOCK_D=BLOCK_D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        EVEN_M=N_Q % cfg.block_m == 0, EVEN_N=N_K % cfg.block_n == 0,
        TMA=tma, TMA_STORE=tma and N_Q % cfg.block_m == 0, WS=cfg.warp_specialize,
        PERSISTENT=cfg.persistent,
        OVERLAP=cfg.overlap, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def flash_attention_hopper_bwd(q, k, v, o, lse, do, causal=False, scale=None, config=None):
    """Backward from (Q, K, V, O, L, dO): returns (dQ, dK, dV)."""
    scale, BLOCK_D, upcast, precision = _prepare(q, k, v, scale)
    cfg = config or (_INTERPRET_BWD if _interpreting() else DEFAULT_BWD)
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    BH = B * H
    tma = _use_tma(cfg.tma, d)
    delta = torch.empty(B, H, N_Q, device=q.device, dtype=torch.float32)
    pre_m = 64 if _interpreting() else 128
    _bwd_preprocess_kernel[(triton.cdiv(BH * N_Q, pre_m),)](
        o, do, delta, BH * N_Q, HEAD_DIM=d, BLOCK_D=BLOCK_D, BLOCK_M=pre_m)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    (bm1, bn1, nw1, ns1), (bm2, bn2, nw2, ns2) = cfg.tiles()
    meta = dict(HEAD_DIM=d, BLOCK_D=BLOCK_D, CAUSAL=causal, SPLIT=cfg.split, TMA=tma,
                WS=cfg.warp_specialize, UPCAST=upcast, DOT_PRECISION=precision)
    if cfg.dq_atomic:
        dq32 = torch.zeros(B, H, N_Q, d, device=q.device, dtype=torch.float32)
        # the TMA reduce-add is not in the interpreter: element atomics there
        reduce = cfg.dq_tma_reduce and tma and not _interpreting()
        _hopper_bwd_dkdv_kernel[(triton.cdiv(N_K, bn1), BH)](
            q, k, v, do, lse, delta, dk, dv, dq32, scale, BH, N_Q, N_K,
            BLOCK_M=bm1, BLOCK_N=bn1, DQ_ATOMIC=True, DQ_REDUCE=reduce, MASK_COLS=N_K % bn1 != 0,
            EVEN_M=N_Q % bm1 == 0, EVEN_N=N_K % bn1 == 0, TMA_STORE=tma and N_K % bn1 == 0,
            num_warps=nw1, num_stages=ns1, **meta)
        return dq32.to(q.dtype), dk, dv
    dq = torch.empty_like(q)
    if cfg.fused:
        _hopper_bwd_fused_kernel[(max(triton.cdiv(N_K, bn1), triton.cdiv(N_Q, bm2)), BH)](
            q, k, v, do, lse, delta, dk, dv, dq, scale, BH, N_Q, N_K,
            BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2,
            EVEN_M1=N_Q % bm1 == 0, EVEN_N1=N_K % bn1 == 0, EVEN_M2=N_Q % bm2 == 0,
            EVEN_N2=N_K % bn2 == 0, TMA_STORE1=tma and N_K % bn1 == 0,
            TMA_STORE2=tma and N_Q % bm2 == 0, num_warps=nw1, num_stages=ns1, **meta)
        return dq, dk, dv
    _hopper_bwd_dkdv_kernel[(triton.cdiv(N_K, bn1), BH)](
        q, k, v, do, lse, delta, dk, dv, dq, scale, BH, N_Q, N_K,
        BLOCK_M=bm1, BLOCK_N=bn1, DQ_ATOMIC=False, DQ_REDUCE=False, MASK_COLS=False,
        EVEN_M=N_Q % bm1 == 0,
        EVEN_N=N_K % bn1 == 0, TMA_STORE=tma and N_K % bn1 == 0, num_warps=nw1,
        num_stages=ns1, **meta)
    _hopper_bwd_dq_kernel[(triton.cdiv(N_Q, bm2), BH)](
        q, k, v, do, lse, delta, dq, scale, BH, N_Q, N_K,
        BLOCK_M=bm2, BLOCK_N=bn2, EVEN_M=N_Q % bm2 == 0, EVEN_N=N_K % bn2 == 0,
        TMA_STORE=tma and N_Q % bm2 == 0, num_warps=nw2, num_stages=ns2, **meta)
    return dq, dk, dv


class HopperAttention(torch.autograd.Function):
    """Saves Q, K, V, O and L (B, H, N) for the backward -- no N×N tensor -- and the configs."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None, fwd_config=None, bwd_config=None):
        o, lse = flash_attention_hopper_fwd(q, k, v, causal, scale, fwd_config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.bwd_config = causal, scale, bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_hopper_bwd(q, k, v, o, lse, do, ctx.causal, ctx.scale,
                                                ctx.bwd_config)
        return dq, dk, dv, None, None, None, None


def flash_attention_hopper(q, k, v, causal=False, scale=None):
    """softmax(QKᵀ·scale)V with the Hopper path (``DEFAULT_FWD``/``DEFAULT_BWD``);
    differentiable in q, k, v; the same semantics as ``llmopt.flash_attention.flash_attention``."""
    return HopperAttention.apply(q, k, v, causal, scale, None, None)
