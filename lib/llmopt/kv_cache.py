"""KV cache: the prompt phase, the generation phase and the memory they keep.

Lecture: «KV-Cache». A decoder computes, for every token x_i and every layer,

    q_i = W_q x_i,   k_i = W_k x_i,   v_i = W_v x_i,
    a_ij = exp(q_iᵀ k_j / √d) / Σ_{t ≤ i} exp(q_iᵀ k_t / √d),   o_i = Σ_{j ≤ i} a_ij v_j .

Token i needs the keys and values of every earlier token, and those never change. So:

- the **prompt phase** (prefill) runs all n prompt tokens through the model at once —
  parallel, matrix-matrix work — and stores k_1..k_n, v_1..v_n of every layer;
- the **generation phase** (decode) feeds one new token at a time, computes only its own
  q, k, v, appends k, v to the cache *before* attending, and reads the rest from the cache:
  vector-matrix work, bound by reading the cache and the weights from memory.

Design, as in nanochat's ``engine.py``: the cache is preallocated once per layer,
``(n_layer, B, H, T_max, d)``, and ``update`` writes in place and returns views up to
the current length; ``seq_len`` advances after the last layer has written, so every layer
of one forward call sees the same position offset (``GPT.forward`` reads it once).

The fast path: a decode step is a few hundred small kernels for one token, so on a GPU the
Python loop that launches them, not the arithmetic, sets the pace. Because the cache is
preallocated, a step can run with *fixed* shapes — attend over all ``T_max`` slots, masked
beyond the current position, which lives in a device tensor — and then one CUDA graph
replays the whole step with a single launch (``decode_step_static``, ``generate_static``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cuda_graph import capture


class KVCache:
    """Preallocated keys and values for every layer: ``k``, ``v`` are (L, B, H, T_max, d)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_seq_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layer, batch, n_head, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, T_max, d)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, T_max, d)
        self.n_layer = n_layer
        self.max_seq_len = max_seq_len
        self.seq_len = 0  # tokens cached by completed forward calls

    @classmethod
    def for_model(cls, config, batch: int, max_seq_len: int, dtype=torch.float32, device=None):
        """A cache sized for a ``GPTConfig``."""
        return cls(config.n_layer, batch, config.n_head, max_seq_len,
                   config.d_model // config.n_head, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append ``k, v`` (B, H, T_new, d) to ``layer``; return all of its keys and values."""
        t0, t1 = self.seq_len, self.seq_len + k.shape[2]
        if t1 > self.max_seq_len:
            raise ValueError(f"KVCache is full: {t1} tokens > max_seq_len={self.max_seq_len}; "
                             "allocate the cache for prompt length + max_new_tokens")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        if layer == self.n_layer - 1:  # the forward call is done with this position range
            self.seq_len = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]  # (B, H, t1, d) each

    def nbytes(self) -> int:
        """Bytes this cache holds (both tensors, the whole preallocation)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def kv_cache_bytes(config, batch: int, seq_len: int, dtype=torch.float16) -> int:
    """Bytes of keys and values for ``batch`` sequences of ``seq_len`` tokens.

    2 (k and v) · n_layer · batch · seq_len · n_head · head_dim · bytes per element,
    where n_head · head_dim = d_model. For OPT-13B (40 layers, d_model 5120) in fp16 this is
    800 KB per token: a 2,048-token sequence holds 1.6 GB.
    """
    head_dim = config.d_model // config.n_head
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * batch * seq_len * config.n_head * head_dim * itemsize


def max_batch_size(config, gpu_bytes: int, seq_len: int, weight_bytes: int,
                   dtype=torch.float16) -> int:
    """The most sequences of ``seq_len`` tokens whose KV cache fits beside the weights.

    ⌊(gpu_bytes − weight_bytes) / kv_cache_bytes(config, 1, seq_len)⌋, 0 when even the weights
    do not fit. OPT-13B in fp16 (26 GB of weights) on an 80 GB card at 2,048 tokens: 32.
    """
    free = gpu_bytes - weight_bytes
    if free <= 0:
        return 0
    return free // kv_cache_bytes(config, 1, seq_len, dtype)


def reservation_waste(lengths, max_len: int) -> float:
    """Fraction of a max-length reservation that holds no token.

    A contiguous cache reserves ``max_len`` positions for every request; request i fills
    ``lengths[i]`` of them: waste = 1 − Σ lengths / (n · max_len). (PagedAttention, lab 02,
    reserves blocks only as tokens arrive.)
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    if lengths.numel() == 0:
        raise ValueError("no requests")
    if bool((lengths > max_len).any()) or bool((lengths < 0).any()):
        raise ValueError(f"every length must lie in 0..max_len={max_len}")
    return float(1.0 - lengths.sum() / (lengths.numel() * max_len))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The lecture's attention for T new queries over S ≥ T cached keys and values.

    q: (B, H, T, d), k and v: (B, H, S, d), where the T queries are the *last* T positions
    of the S: query i sits at absolute position S − T + i and may attend to keys 0..S−T+i.
    Returns o: (B, H, T, d).
    """
    T, S, d = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, S): q_iᵀ k_j / √d
    pos_q = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1) absolute positions
    pos_k = torch.arange(S, device=q.device)[None, :]  # (1, S)
    scores = scores.masked_fill(pos_k > pos_q, float("-inf"))  # no peeking at the future
    a = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (B, H, T, S): a_ij
    return a @ v  # (B, H, T, d): o_i = Σ_j a_ij v_j


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
             eos_id: int | None = None) -> torch.Tensor:
    """Greedy decoding: (B, T) prompt ids -> (B, T + n) ids, n ≤ max_new_tokens.

    With ``use_cache`` the prompt phase runs once over the whole prompt and every later
    step feeds only the newest token; without it every step re-runs the whole sequence.
    Both must give the same tokens. A sequence that produced ``eos_id`` keeps emitting it;
    decoding stops early when all sequences have.
    """
    model.eval()
    ids = input_ids
    B, T = ids.shape
    cache = None
    if use_cache:
        p = next(model.parameters())
        cache = KVCache.for_model(model.config, B, T + max_new_tokens, dtype=p.dtype, device=p.device)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    step_input = ids  # the prompt phase: every prompt token at once
    for _ in range(max_new_tokens):
        logits = model(step_input, kv_cache=cache) if use_cache else model(ids)
        next_id = logits[:, -1, :].argmax(dim=-1)  # (B,)
        if eos_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
            finished |= next_id == eos_id
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        step_input = next_id[:, None]  # the generation phase: one token per step
        if eos_id is not None and bool(finished.all()):
            break
    return ids


def decode_step_static(model, token: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
    """One generation step with fixed shapes: logits (B, 1, V) for ``token`` (B, 1).

    ``pos`` is a (1,) long tensor on the device: the new token's position. Its k, v go into
    slot ``pos`` of every layer's cache, and the query attends over all ``T_max`` slots with
    the ones beyond ``pos`` masked out; nothing reads a host value, so a CUDA graph can
    capture the step. Same arithmetic as ``GPT.forward(token, kv_cache=cache)``.
    """
    from .gpt import POSITION_OFFSET

    B = token.shape[0]
    x = model.embed_tokens(token)  # (B, 1, E)
    if model.project_in is not None:
        x = model.project_in(x)  # (B, 1, D)
    x = x + model.embed_positions(pos + POSITION_OFFSET)  # (B, 1, D)
    visible = (torch.arange(cache.max_seq_len, device=token.device) <= pos).view(1, 1, 1, -1)  # (1, 1, 1, T_max)
    for layer, block in enumerate(model.layers):
        attn = block.attn
        H, d = attn.n_head, attn.head_dim

        def attend(h):
            q = attn.q_proj(h).view(B, 1, H, d).transpose(1, 2)  # (B, H, 1, d)
            cache.k[layer].index_copy_(2, pos, attn.k_proj(h).view(B, 1, H, d).transpose(1, 2))
            cache.v[layer].index_copy_(2, pos, attn.v_proj(h).view(B, 1, H, d).transpose(1, 2))
            y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer],
                                               attn_mask=visible)  # (B, H, 1, d)
            return attn.out_proj(y.transpose(1, 2).reshape(B, 1, H * d))

        if block.pre_ln:
            x = x + attend(block.attn_norm(x))
            x = x + block.mlp(block.mlp_norm(x))
        else:
            x = block.attn_norm(x + attend(x))
            x = block.mlp_norm(x + block.mlp(x))
    if model.final_layer_norm is not None:
        x = model.final_layer_norm(x)
    if model.project_out is not None:
        x = model.project_out(x)
    return model.lm_head(x)  # (B, 1, V)


@torch.no_grad()
def generate_static(model, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                    cuda_graph: bool | None = None) -> torch.Tensor:
    """``generate(..., use_cache=True)`` with fixed-shape decode steps, graphed on a GPU.

    The prompt phase runs as usual; then each step is ``decode_step_static`` followed by the
    greedy choice, which feeds the next step in place (token and position live on the
    device). With ``cuda_graph`` (default: on CUDA) one step is captured once and replayed
    ``max_new_tokens − 1`` times. The tokens are those of ``generate``: after ``eos_id`` a
    sequence emits eos (rows never interact, so the rest of its row is simply overwritten),
    and the result is trimmed where ``generate`` would have stopped.
    """
    model.eval()
    B, T = input_ids.shape
    p = next(model.parameters())
    cache = KVCache.for_model(model.config, B, T + max_new_tokens, dtype=p.dtype, device=p.device)
    first = model(input_ids, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1): the prompt phase
    token, pos = first.clone(), torch.full((1,), T, dtype=torch.long, device=input_ids.device)

    def step():  # one token, in place: no host value read, no host value written
        token.copy_(decode_step_static(model, token, cache, pos)[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    replay = step
    if cuda_graph if cuda_graph is not None else input_ids.is_cuda:
        replay = capture(step).replay
        token.copy_(first)  # the warm-up and the capture moved them: back to the first step
        pos.fill_(T)
    out = [first]
    for _ in range(max_new_tokens - 1):
        replay()
        out.append(token.clone())
    new = torch.cat(out, dim=1)  # (B, n)
    if eos_id is not None:
        done = (new == eos_id).cumsum(dim=1) > 0  # (B, n): at or after the first eos
        new = torch.where(done, torch.full_like(new, eos_id), new)
        all_done = done.all(dim=0).nonzero()
        if len(all_done):
            new = new[:, :int(all_done[0]) + 1]
    return torch.cat([input_ids, new], dim=1)
