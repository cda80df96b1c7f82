"""PagedAttention: the KV cache in fixed-size blocks, a block table per sequence, and an engine.

Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP 2023, vLLM); the lecture's section «vLLM: Paged Attention»
(lab02_paged_attention).

A contiguous KV cache reserves, for every request, room for the longest sequence it might
become; most of that room never holds a token (the paper: 20-38% of the reserved KV memory
held real tokens in earlier systems). PagedAttention cuts each sequence's keys and values
into **KV blocks** of B tokens (the block size) that live anywhere in one pool of physical
blocks; a **block table** maps the sequence's logical block j to its physical block, like a
page table. Blocks are allocated on demand, so only the last block of a sequence is partly
empty, and blocks can be shared between sequences (parallel sampling) with copy-on-write.

Attention over blocks, for the query q_i of a sequence with blocks K_j, V_j:

    K_j = (k_{(j-1)B+1}, ..., k_{jB}),  V_j = (v_{(j-1)B+1}, ..., v_{jB})
    A_ij = exp(q_iᵀ K_j / √d) / Σ_t exp(q_iᵀ K_t / √d)      (one softmax over ALL blocks)
    o_i  = Σ_j V_j A_ijᵀ

- ``BlockAllocator``: a free list of physical block ids with a reference count per block.
- ``PagedKVCache``: the pool ``k``, ``v`` of shape (n_layer, num_blocks, block_size, H, d),
  a block table and a length per sequence; ``append`` per layer, ``fork`` (shares every
  block, copy-on-write on the first write into a shared block), ``free``, ``utilization``.
- ``paged_attention``: decode attention through block tables in PyTorch (the lecture's
  A_ij, V_j), and ``paged_attention_triton``: the same as a Triton kernel that reads the
  physical block numbers from the table and never builds a contiguous copy; long contexts
  are cut into slices whose (acc, m, ℓ) a second kernel merges (flash-decoding, split-KV).
- ``paged_forward``: one forward pass of ``llmopt.gpt.GPT`` over a ragged batch (prompts of
  any length and single decode tokens mixed), every token at its own position;
  ``forward_tokens``: its device part (the layers over the cache with any attention).
- ``serve``: greedy generation for many requests at once with continuous batching:
  finished sequences leave, waiting ones join, blocks are freed and reused; under memory
  pressure the newest sequence is preempted and recomputed later (vLLM's recompute mode).
- ``kv_memory_usage``: the fraction of reserved KV memory that holds tokens, contiguous
  max-length reservation vs paged.

Shapes: q (S, H, d) -- one query row per (sequence or token); caches (num_blocks,
block_size, H, d); block tables (S, max_blocks) int32; context lengths (S,) int32.
"""
from __future__ import annotations

import math
import os
from collections import deque
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .gpt import POSITION_OFFSET


# --------------------------------------------------------------------------------------
# Memory: contiguous reservation vs blocks
# --------------------------------------------------------------------------------------

def kv_memory_usage(context_lens, max_seq_len: int, block_size: int) -> tuple[float, float]:
    """Fraction of reserved KV slots that hold a token: (contiguous, paged).

    Contiguous: every sequence reserves ``max_seq_len`` slots. Paged: every sequence holds
    ceil(len / block_size) blocks of ``block_size`` slots (only the last one partly empty).
    """
    lens = [int(n) for n in context_lens]
    tokens = sum(lens)
    contiguous = tokens / (len(lens) * max_seq_len)
    paged = tokens / (sum(-(-n // block_size) for n in lens) * block_size)
    return contiguous, paged


# --------------------------------------------------------------------------------------
# Blocks: the allocator and the cache
# --------------------------------------------------------------------------------------

class OutOfBlocksError(RuntimeError):
    """Every physical KV block is in use."""


class BlockAllocator:
    """Physical KV blocks 0..num_blocks-1: a free list and a reference count per block.

    ``allocate`` takes a free block (ref count 1); ``incref`` adds a sharer (fork);
    ``free`` drops one reference and returns the block to the free list at zero. The free
    list is a stack, so the block freed last is the next one allocated.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free_list = list(range(num_blocks - 1, -1, -1))  # pop() gives 0, 1, 2, ...
        self.ref_counts = [0] * num_blocks

    def allocate(self) -> int:
        if not self.free_list:
            raise OutOfBlocksError(f"out of KV blocks: all {self.num_blocks} blocks are in use "
                                   "(free finished sequences, or preempt one)")
        block = self.free_list.pop()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            raise ValueError(f"block {block} is free: only a block in use can be shared")
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            raise ValueError(f"block {block} is already free (double free)")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_list.append(block)

    def ref_count(self, block: int) -> int:
        return self.ref_counts[block]

    def num_free(self) -> int:
        return len(self.free_list)


class PagedKVCache:
    """Keys and values of many sequences in one pool of blocks.

    ``k``, ``v``: (n_layer, num_blocks, block_size, H, d); ``k[layer]`` is what
    ``paged_attention`` reads. Each sequence has a block table (logical block j -> physical
    block) and a length. ``append(seq_id, layer, k, v)`` writes T new tokens (T, H, d) of
    one layer; the length advances after the last layer (every layer of a forward pass
    writes the same positions, as in ``llmopt.kv_cache.KVCache``).
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype=torch.float32, device=None):
        shape = (n_layer, num_blocks, block_size, n_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, NB, B, H, d)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, NB, B, H, d)
        self.n_layer, self.block_size, self.num_blocks = n_layer, block_size, num_blocks
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict = {}  # seq_id -> [physical block of logical block 0, 1, ...]
        self.lens: dict = {}    # seq_id -> tokens stored by completed forward passes

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                  device=None):
        return cls(config.n_layer, config.n_head, config.d_model // config.n_head, num_blocks,
                   block_size, dtype=dtype, device=device)

    # --- sequences -------------------------------------------------------------------
    def add_sequence(self, seq_id) -> None:
        if seq_id in self.tables:
            raise KeyError(f"sequence {seq_id!r} already exists")
        self.tables[seq_id], self.lens[seq_id] = [], 0

    def block_table(self, seq_id) -> list[int]:
        return list(self.tables[seq_id])

    def context_len(self, seq_id) -> int:
        return self.lens[seq_id]

    def free(self, seq_id) -> None:
        """Drop the sequence: one reference less on each of its blocks."""
        for block in self.tables.pop(seq_id):
            self.allocator.free(block)
        del self.lens[seq_id]

    def fork(self, parent_id, child_id) -> None:
        """The child shares every block of the parent (ref count + 1); nothing is copied."""
        if child_id in self.tables:
            raise KeyError(f"sequence {child_id!r} already exists")
        for block in self.tables[parent_id]:
            self.allocator.incref(block)
        self.tables[child_id] = list(self.tables[parent_id])
        self.lens[child_id] = self.lens[parent_id]

    # --- writing ---------------------------------------------------------------------
    def blocks_needed(self, seq_id, n_new: int) -> int:
        """New physical blocks that writing ``n_new`` tokens would take (incl. copy-on-write)."""
        t0, table, B = self.lens[seq_id], self.tables[seq_id], self.block_size
        need = max(0, -(-(t0 + n_new) // B) - len(table))
        if n_new and t0 % B and self.allocator.ref_count(table[t0 // B]) > 1:
            need += 1  # the shared, partly filled last block gets a private copy
        return need

    def reserve(self, seq_id, n_new: int) -> list[int]:
        """Make positions len..len+n_new-1 writable; return their flat slots (a list of n_new).

        New blocks are allocated as the sequence grows; a block still shared with another
        sequence is copied (all layers) before its first write: copy-on-write, one block.
        Idempotent until ``advance``: later layers of the same pass find the blocks ready.
        """
        t0, t1, B = self.lens[seq_id], self.lens[seq_id] + n_new, self.block_size
        table = self.tables[seq_id]
        for j in range(t0 // B, -(-t1 // B)):
            if j == len(table):
                table.append(self.allocator.allocate())
            elif self.allocator.ref_count(table[j]) > 1:  # shared: copy on write
                new = self.allocator.allocate()
                self.k[:, new] = self.k[:, table[j]]
                self.v[:, new] = self.v[:, table[j]]
                self.allocator.free(table[j])
                table[j] = new
        return [table[t // B] * B + t % B for t in range(t0, t1)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, H, d) of ``layer`` at flat ``slots`` (N,) of the pool."""
        L, NB, B, H, d = self.k.shape
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.k.device)
        self.k[layer].view(NB * B, H, d).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(NB * B, H, d).index_copy_(0, slots, v.to(self.v.dtype))

    def advance(self, seq_id, n_new: int) -> None:
        self.lens[seq_id] += n_new

    def append(self, seq_id, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (T, H, d) of ``layer`` at the next T positions of ``seq_id``."""
        self.write(layer, self.reserve(seq_id, k.shape[0]), k, v)
        if layer == self.n_layer - 1:  # the forward pass is done with these positions
            self.advance(seq_id, k.shape[0])

    # --- reading ---------------------------------------------------------------------
    def tables_tensor(self, seq_ids, max_blocks: int | None = None) -> torch.Tensor:
        """Block tables of ``seq_ids`` as (S, max_blocks) int32, padded with 0."""
        width = max_blocks or max([len(self.tables[s]) for s in seq_ids] + [1])
        rows = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.k.device)

    def gather(self, seq_id, layer: int):
        """Contiguous copies (len, H, d) of one sequence's keys and values (for tests)."""
        n = self.lens[seq_id]
        table = torch.tensor(self.tables[seq_id], dtype=torch.long, device=self.k.device)
        k = self.k[layer, table].flatten(0, 1)[:n]
        v = self.v[layer, table].flatten(0, 1)[:n]
        return k, v

    def utilization(self) -> float:
        """Fraction of the slots of blocks in use that hold a token (a shared block counts once)."""
        filled = {}
        for seq_id, table in self.tables.items():
            n = self.lens[seq_id]
            for j, block in enumerate(table):
                filled[block] = max(filled.get(block, 0), min(self.block_size, n - j * self.block_size))
        if not filled:
            return 0.0
        return sum(max(f, 0) for f in filled.values()) / (len(filled) * self.block_size)


# --------------------------------------------------------------------------------------
# Attention over blocks
# --------------------------------------------------------------------------------------

def paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """The lecture's attention over KV blocks, in PyTorch.

    q (S, H, d): one query per row; k_cache, v_cache (num_blocks, B, H, d); block_tables
    (S, max_blocks) int32 maps row s's logical block j to a physical block; context_lens
    (S,) int32: row s attends to its first context_lens[s] tokens. Returns o (S, H, d).
    """
    S, H, d = q.shape
    B = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    tables = block_tables.long()                                        # (S, M)
    K = k_cache[tables].float()                                         # (S, M, B, H, d): K_j
    V = v_cache[tables].float()                                         # (S, M, B, H, d): V_j
    scores = torch.einsum("shd,smbhd->shmb", q.float(), K) * scale       # (S, H, M, B): q_iᵀ K_j
    pos = torch.arange(tables.shape[1] * B, device=q.device).view(1, 1, -1, B)
    valid = pos < context_lens.view(S, 1, 1, 1).to(q.device)            # mask the last block's tail
    scores = scores.masked_fill(~valid, float("-inf"))
    M = tables.shape[1]
    A = torch.softmax(scores.view(S, H, M * B), dim=-1).view(S, H, M, B)  # A_ij, one softmax over all j
    o = torch.einsum("shmb,smbhd->shd", A, V)                           # o_i = Σ_j V_j A_ijᵀ
    return o.to(q.dtype)


@triton.jit
def _paged_attention_kernel(Q, K, V, O, Tables, Lens, Part, scale,
                            stride_qs, stride_qh, stride_kb, stride_kt, stride_kh,
                            stride_ts, stride_os, stride_oh, S, H,
                            BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                            SPLIT_ALIGN: tl.constexpr, HEADS_FIRST: tl.constexpr,
                            KV_POLICY: tl.constexpr, TABLE_POLICY: tl.constexpr,
                            LOOP_STAGES: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    # One program per (row s, group of HEADS = G adjacent heads, split); BLOCK_N tokens per
    # step. A token's keys sit in the cache as (H, d) rows side by side, so the G heads of a
    # group are G·d contiguous elements per token (G = 1: one 256-byte row of bf16; G = H: the
    # whole token, and a block of B tokens is one contiguous stream). Every head keeps its own
    # online softmax (m, ℓ, acc).
    # NUM_SPLITS > 1 (flash-decoding): each split walks one slice of the context (slices start
    # on a multiple of SPLIT_ALIGN, i.e. on block boundaries) and writes its unnormalised
    # (acc, m, ℓ) to Part; _paged_combine_kernel merges the slices.
    # LOOP_STAGES > 1: Triton software-pipelines the loop's loads (tl.range's num_stages:
    # cp.async into shared memory, LOOP_STAGES - 1 steps ahead); unpipelined, the same tiles
    # ran at 0.4x SDPA's speed in bench/paged_attention.py's sweep on an H200.
    # TMA (Hopper and later): K and V are tensor descriptors over the cache viewed as
    # (num_blocks·B, H, d); a step is one physical block, loaded as one (B, G, D) box by the
    # copy engine (cp.async.bulk.tensor) instead of B·G·D/8 16-byte loads from the threads.
    n_groups = tl.cdiv(H, HEADS)
    pid = tl.program_id(0)
    if HEADS_FIRST:   # neighbouring programs: the head groups of one row (they read the same blocks)
        s = pid // n_groups
        grp = pid % n_groups
    else:             # neighbouring programs: the same heads of neighbouring rows
        s = pid % S
        grp = pid // S
    split = tl.program_id(1)
    n_ctx = tl.load(Lens + s)
    chunk = tl.cdiv(tl.cdiv(n_ctx, NUM_SPLITS), SPLIT_ALIGN) * SPLIT_ALIGN
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_ctx)
    # Tiles are 3-D (tokens N, heads G, head dim D); the per-head softmax state is kept 3-D too
    # (sizes of 1, like keepdims) so that it broadcasts against the tiles as it is.
    offs_h = grp * HEADS + tl.arange(0, HEADS)[None, :, None]           # (1, G, 1) the group's heads
    offs_d = tl.arange(0, BLOCK_D)[None, None, :]                       # (1, 1, D)
    mask_hd = (offs_h < H) & (offs_d < HEAD_DIM)                        # (1, G, D)
    q = tl.load(Q + s * stride_qs + offs_h * stride_qh + offs_d, mask=mask_hd, other=0.0)
    q = q.to(tl.float32) * (scale * 1.4426950408889634)                 # (1, G, D) q_i, scores in base 2
    hd = offs_h * stride_kh + offs_d                                    # (1, G, D) offsets within a token
    offs_n = tl.arange(0, BLOCK_N)[:, None, None]                       # (N, 1, 1)
    m_i = tl.full([1, HEADS, 1], float("-inf"), dtype=tl.float32)       # (1, G, 1) running max m
    l_i = tl.zeros([1, HEADS, 1], dtype=tl.float32)                     # (1, G, 1) running sum ℓ
    acc = tl.zeros([1, HEADS, BLOCK_D], dtype=tl.float32)               # (1, G, D) running Σ V_j A_ijᵀ
    for start in tl.range(lo, hi, BLOCK_N, num_stages=LOOP_STAGES):
        t = start + offs_n                                              # (N, 1, 1) logical positions
        valid = t < hi
        if TMA:                                                         # BLOCK_N == BLOCK_SIZE
            block = tl.load(Tables + s * stride_ts + start // BLOCK_SIZE)   # this step's physical block
            k = K.load([block * BLOCK_SIZE, grp * HEADS, 0])            # K_j (N, G, D)
            v = V.load([block * BLOCK_SIZE, grp * HEADS, 0])            # V_j (N, G, D)
        else:
            block = tl.load(Tables + s * stride_ts + t // BLOCK_SIZE, mask=valid, other=0,
                            eviction_policy=TABLE_POLICY)               # (N, 1, 1) physical blocks
            ptrs = block.to(tl.int64) * stride_kb + (t % BLOCK_SIZE) * stride_kt + hd   # (N, G, D)
            kv_mask = valid & mask_hd
            k = tl.load(K + ptrs, mask=kv_mask, other=0.0, eviction_policy=KV_POLICY)  # K_j (N, G, D)
            v = tl.load(V + ptrs, mask=kv_mask, other=0.0, eviction_policy=KV_POLICY)  # V_j (N, G, D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        x = tl.sum(k * q, axis=2, keep_dims=True)                       # (N, G, 1) q_iᵀ K_j per head
        x = tl.where(valid, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=0, keep_dims=True))      # (1, G, 1)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(x - m_safe)                                    # (N, G, 1)
        alpha = tl.math.exp2(m_i - m_safe)                              # (1, G, 1) rescales the old state
        l_i = l_i * alpha + tl.sum(p, axis=0, keep_dims=True)
        acc = acc * alpha + tl.sum(p * v, axis=0, keep_dims=True)       # + V_j A_ijᵀ  (1, G, D)
        m_i = m_new
    if NUM_SPLITS == 1:
        tl.store(O + s * stride_os + offs_h * stride_oh + offs_d, (acc / l_i).to(O.dtype.element_ty),
                 mask=mask_hd)
    else:
        # Part: (S, H, splits, D + 2) fp32; the group's G rows of this split
        row = ((s.to(tl.int64) * H + offs_h) * NUM_SPLITS + split) * (BLOCK_D + 2)  # (1, G, 1)
        mask_h = offs_h < H
        tl.store(Part + row + offs_d, acc, mask=mask_h)
        tl.store(Part + row + BLOCK_D, m_i, mask=mask_h)
        tl.store(Part + row + BLOCK_D + 1, l_i, mask=mask_h)


@triton.jit
def _paged_combine_kernel(Part, O, stride_os, stride_oh, H, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    # merge the splits' online-softmax states: m = max m_k, o = Σ e^{m_k-m} acc_k / Σ e^{m_k-m} ℓ_k
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.arange(0, NUM_SPLITS)
    rows = ((s.to(tl.int64) * H + h) * NUM_SPLITS + k) * (BLOCK_D + 2)
    m = tl.load(Part + rows + BLOCK_D)                                  # (splits,)
    l = tl.load(Part + rows + BLOCK_D + 1)
    acc = tl.load(Part + rows[:, None] + offs_d[None, :])               # (splits, D)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_max))     # empty splits weigh 0
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(O + s * stride_os + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """``paged_attention`` as a Triton decode kernel: one program per (row, group of heads)
    walks the row's block table, loads each physical block's keys and values in place and
    keeps an online softmax (m, ℓ) per head over all of them."""
    S, H, d = q.shape
    B = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    o = torch.empty_like(q)
    if S == 0:
        return o
    cfg = _INTERPRETER_CONFIG if _interpreting() else _config(tables.shape[1] * B)
    _launch(q, k_cache, v_cache, o, tables, lens, scale, **cfg._asdict())
    return o


class _Config(NamedTuple):
    """One launch configuration of the decode kernel (bench/paged_attention.py --sweep)."""
    block_n: int                    # BLOCK_N: tokens per step
    num_warps: int
    splits: int = 1                 # split-KV slices per row (flash-decoding), a power of 2
    num_stages: int | None = None   # software pipelining of the loop's loads (None, 1: none)
    heads: int = 1                  # HEADS = G: adjacent heads per program, a power of 2
    evict: bool = False             # K/V loads evict_first (each is read once), tables evict_last
    heads_first: bool = False       # neighbouring program ids = the head groups of one row
    tma: bool = False               # load each block with TMA (block_n = block size; sm90+)


# The library's choice by table width (the longest context the tables can hold, in tokens):
# the first entry whose bound is >= the width (None: any). The best of bench/paged_attention.py
# --sweep on an H200 (batch 64, 32 heads of 128, bf16, blocks of 16; bench/results/
# paged_attention_sweep.json), timed as an engine runs a decode step (a CUDA graph's replay)
# and checked eager: one 16-token block per step, 4-8 adjacent heads (1-2 KB contiguous per
# token), a software-pipelined loop (num_stages=2: the next block's loads in flight while this
# one is used; without it the same tiles ran at 0.4x SDPA) and split-KV slices. TMA loads
# (tma=True) were as fast in graphs and slower eager (their descriptors are encoded on the
# host at every launch).
_CONFIGS = (
    (1024, _Config(block_n=16, num_warps=2, splits=4, num_stages=2, heads=4, evict=True, heads_first=True)),  # 512: 0.94x, 1k: 0.93x SDPA
    (None, _Config(block_n=16, num_warps=4, splits=8, num_stages=2, heads=8, evict=True, heads_first=True)),  # 2k-8k: 0.96, 0.98, 1.00x
)
# the interpreter (CPU): large tiles and all heads in one program are the fastest
_INTERPRETER_CONFIG = _Config(block_n=64, num_warps=4, heads=64, heads_first=True)


def _config(width: int) -> _Config:
    """The launch configuration for tables that hold up to ``width`` tokens (see _CONFIGS)."""
    for bound, cfg in _CONFIGS:
        if bound is None or width <= bound:
            return cfg
    return _CONFIGS[-1][1]


def _launch(q, k_cache, v_cache, o, tables, lens, scale, block_n, num_warps, splits=1,
            num_stages=None, heads=1, evict=False, heads_first=False, tma=False):
    """Run the kernel (and the combine kernel if splits > 1) into ``o``; the knobs are _Config's."""
    S, H, d = q.shape
    B = k_cache.shape[1]
    assert splits & (splits - 1) == 0 and heads & (heads - 1) == 0, "splits, heads: powers of 2"
    G = min(heads, triton.next_power_of_2(H))                      # a group is at most all heads
    block_d = triton.next_power_of_2(d)
    part = (torch.empty(S, H, splits, block_d + 2, device=q.device, dtype=torch.float32)
            if splits > 1 else o)
    K, V = k_cache, v_cache
    if tma:
        assert block_n == B and block_d == d and H % G == 0, "tma: block_n = block size, d a power of 2, G divides H"
        K = TensorDescriptor.from_tensor(k_cache.view(-1, H, d), [B, G, d])
        V = TensorDescriptor.from_tensor(v_cache.view(-1, H, d), [B, G, d])
    _paged_attention_kernel[(S * triton.cdiv(H, G), splits)](
        q, K, V, o, tables, lens, part, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0), o.stride(0), o.stride(1), S, H,
        BLOCK_SIZE=B, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, HEADS=G, NUM_SPLITS=splits,
        SPLIT_ALIGN=math.lcm(block_n, B), HEADS_FIRST=heads_first,
        KV_POLICY="evict_first" if evict else "", TABLE_POLICY="evict_last" if evict else "",
        LOOP_STAGES=num_stages or 1, UPCAST=_interpreting() or q.dtype == torch.float32, TMA=tma,
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    if splits > 1:
        _paged_combine_kernel[(S, H)](part, o, o.stride(0), o.stride(1), H, HEAD_DIM=d,
                                      BLOCK_D=block_d, NUM_SPLITS=splits)


# --------------------------------------------------------------------------------------
# The model over a paged cache, and the engine
# --------------------------------------------------------------------------------------

def paged_forward(model, cache: PagedKVCache, seq_ids, chunks, attention=None) -> torch.Tensor:
    """One forward pass of ``llmopt.gpt.GPT`` over a ragged batch; returns (S, V) logits of
    each sequence's last new token.

    ``chunks[s]`` holds the new token ids (1-D) of ``seq_ids[s]``: a whole prompt (prompt
    phase) or one token (generation phase), mixed freely. All new tokens are flattened into
    one (N, D) batch; token t of sequence s sits at position len(s) + t (OPT's learned
    positions, offset 2) and attends to the first len(s) + t + 1 tokens of its sequence
    through the block table -- causal attention as paged attention, one query per token.
    """
    attention = attention or paged_attention
    device = cache.k.device
    lens = [cache.context_len(s) for s in seq_ids]
    counts = [int(c.numel()) for c in chunks]
    ids = torch.cat([c.reshape(-1).cpu() for c in chunks])                     # (N,)
    pos = torch.cat([torch.arange(n0, n0 + c) for n0, c in zip(lens, counts)])  # (N,) per sequence
    slots = torch.tensor([x for s, c in zip(seq_ids, counts) for x in cache.reserve(s, c)],
                         dtype=torch.long)                                     # (N,) allocates blocks
    row_of = torch.repeat_interleave(torch.arange(len(seq_ids)), torch.tensor(counts))
    width = max(len(cache.tables[s]) for s in seq_ids)
    tables = torch.tensor([cache.tables[s] + [0] * (width - len(cache.tables[s])) for s in seq_ids],
                          dtype=torch.int32)[row_of]                           # (N, M): each token's table
    ctx = (pos + 1).to(torch.int32)                                            # (N,): causal
    ids, pos, slots, tables, ctx = (t.to(device, non_blocking=True) for t in (ids, pos, slots, tables, ctx))
    last = (torch.tensor(counts).cumsum(0) - 1).to(device)                     # each sequence's last token
    logits = forward_tokens(model, cache, ids, pos, slots,
                            lambda i, q: attention(q, cache.k[i], cache.v[i], tables, ctx), last)
    for s, c in zip(seq_ids, counts):
        cache.advance(s, c)
    return logits                                                              # (S, V)


def forward_tokens(model, cache: PagedKVCache, ids, pos, slots, attend, rows=None) -> torch.Tensor:
    """``llmopt.gpt.GPT`` over N new tokens ``ids`` (N,) at positions ``pos`` (N,): every
    layer writes their keys and values to the cache at flat ``slots`` (N,), then attends with
    ``attend(layer, q) -> o`` (q, o: (N, H, d)). Returns the logits (R, V) of ``rows`` (R,)
    of the tokens (None: all N). All on the device, no host sync: a CUDA graph can capture it
    (``llmopt.scheduler.EnginePasses``)."""
    H, d = model.config.n_head, model.config.head_dim
    x = model.embed_tokens(ids[None])                                          # (1, N, E)
    if model.project_in is not None:
        x = model.project_in(x)
    x = x + model.embed_positions(pos[None] + POSITION_OFFSET)                 # (1, N, D)
    for i, block in enumerate(model.layers):
        def attn(h, block=block, i=i):                                         # h (1, N, D)
            a = block.attn
            q = a.q_proj(h).view(-1, H, d)                                     # (N, H, d)
            k = a.k_proj(h).view(-1, H, d)
            v = a.v_proj(h).view(-1, H, d)
            cache.write(i, slots, k, v)                                        # append before attending
            return a.out_proj(attend(i, q).reshape(1, -1, H * d))              # (N, H, d) -> (1, N, D)
        if block.pre_ln:
            x = x + attn(block.attn_norm(x))
            x = x + block.mlp(block.mlp_norm(x))
        else:
            x = block.attn_norm(x + attn(x))
            x = block.mlp_norm(x + block.mlp(x))
    x = x[0] if rows is None else x[0, rows]                                   # (R, D)
    if model.final_layer_norm is not None:
        x = model.final_layer_norm(x)
    if model.project_out is not None:
        x = model.project_out(x)
    return model.lm_head(x)                                                    # (R, V)


@torch.no_grad()
def serve(model, prompts, max_new_tokens, block_size: int = 16, num_blocks: int | None = None,
          eos_id: int | None = None, max_batch: int | None = None, attention=None):
    """Greedy generation for many prompts at once over a paged cache, continuous batching.

    ``prompts``: 1-D token-id tensors (or lists); ``max_new_tokens``: an int or one per
    prompt. Returns, per prompt, prompt + new tokens (1-D), exactly what greedy
    ``llmopt.kv_cache.generate`` gives for that prompt alone (which stops after ``eos_id``).

    Every step runs ONE forward pass over the running sequences: the prompts of those that
    just joined and the newest token of the others. A sequence that is done leaves at once
    and frees its blocks; waiting prompts join (first come, first served) while their prompt
    blocks fit (and at most ``max_batch`` run). When a running sequence needs a block and
    none is free, the most recently joined one is preempted: its blocks are freed and it
    waits again, to be recomputed from its prompt + the tokens it has (vLLM's recompute).
    ``num_blocks`` defaults to enough for every request at full length.
    """
    model.eval()
    p = next(model.parameters())
    prompts = [torch.as_tensor(x, dtype=torch.long).reshape(-1).cpu() for x in prompts]
    n_new = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if num_blocks is None:
        num_blocks = sum(-(-(len(x) + n) // block_size) for x, n in zip(prompts, n_new))
    cache = PagedKVCache.for_model(model.config, max(num_blocks, 1), block_size, dtype=p.dtype,
                                   device=p.device)
    tokens = [x.tolist() for x in prompts]              # prompt + generated, per request
    waiting = deque(i for i in range(len(prompts)) if n_new[i] > 0)
    running: list[int] = []                              # in the order they joined
    todo: dict[int, list[int]] = {}                      # tokens not yet in the cache

    while waiting or running:
        # 1. admit waiting requests while their uncached tokens fit (plus one block of slack each)
        while waiting and (max_batch is None or len(running) < max_batch):
            i = waiting[0]
            need = -(-len(tokens[i]) // block_size)
            if need + len(running) > cache.allocator.num_free() and running:
                break
            if need > cache.allocator.num_free():
                raise OutOfBlocksError(f"request {i} ({len(tokens[i])} tokens) does not fit in "
                                       f"{num_blocks} blocks of {block_size}")
            waiting.popleft()
            cache.add_sequence(i)
            running.append(i)
            todo[i] = list(tokens[i])
        # 2. every running sequence must find room for its new tokens; preempt the newest if not
        while sum(cache.blocks_needed(i, len(todo[i])) for i in running) > cache.allocator.num_free():
            victim = running.pop()
            cache.free(victim)
            waiting.appendleft(victim)                   # recomputed from all its tokens
        # 3. one forward pass over the running sequences
        chunks = [torch.tensor(todo[i]) for i in running]
        logits = paged_forward(model, cache, list(running), chunks, attention)   # (S, V)
        next_ids = logits.argmax(dim=-1).tolist()
        for i, t in zip(list(running), next_ids):
            tokens[i].append(t)
            done = len(tokens[i]) - len(prompts[i]) >= n_new[i] or (eos_id is not None and t == eos_id)
            if done:                                     # leaves now; its blocks are reused
                running.remove(i)
                cache.free(i)
                del todo[i]
            else:
                todo[i] = [t]
    return [torch.tensor(t, dtype=torch.long) for t in tokens]
