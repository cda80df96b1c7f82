"""GPTQ: post-training quantization of a transformer's weights, layer by layer (lab07).

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (2022), built on Optimal Brain Surgeon (Hassibi &
Stork, 1992) and Optimal Brain Compression (Frantar & Alistarh, 2022). Lecture section
"Квантизация LLM → OBS & GPTQ". The algorithm follows IST-DASLab's ``gptq.py``
(Algorithm 1 of the paper).

Layout and notation:
- ``W`` is a weight in ``nn.Linear`` layout ``(rows, cols) = (out_features, in_features)``;
  the layer computes ``X @ Wᵀ`` with inputs ``X`` of shape ``(N, cols)`` (N tokens).
  The lecture writes the same layer as ``W·X`` with ``X`` of shape ``(cols, N)``, so its
  ``H = 2XXᵀ`` is ``2 Xᵀ X`` here: ``(cols, cols)``, one row/column per *input* feature.
  ``GPTQ.add_batch`` keeps ``H = 2/N · Σ x xᵀ`` (a mean over the N tokens seen); the
  result of GPTQ does not change when H is scaled.
- The grid: ``bits`` bits give integers ``0 … maxq = 2**bits - 1``; a value ``w`` becomes
  ``scale · (clamp(round(w / scale) + zero, 0, maxq) - zero)``. ``scale`` and ``zero``
  are min-max fitted (the range always includes 0), per row, or per group of
  ``group_size`` consecutive input columns of a row.
- Every quantizer here returns ``(W_hat, scale, zero)``: ``W_hat`` has W's shape and dtype
  (dequantized values, i.e. "fake quantization"), ``scale`` and ``zero`` are
  ``(rows, n_groups)`` with ``n_groups = 1`` when ``group_size = -1`` and
  ``ceil(cols / group_size)`` otherwise; group ``g`` covers columns
  ``g·group_size … (g+1)·group_size - 1`` (with ``act_order``: of the permuted order,
  see ``gptq_quantize``). ``zero`` holds integers (stored as floats).
- Arithmetic is float32, or float64 when ``W`` is float64.

In the order the lab builds them:
0. ``quantize_rtn``: round-to-nearest, every weight on its own (the baseline), and what a
   quantized weight takes in memory: ``pack_codes`` (the integer codes as one bit stream),
   ``unpack_codes``, ``packed_bytes``.
1. ``obs_update``: OBS for one weight, δw = Δ / [H⁻¹]_qq · H⁻¹_{:,q}, L = ½ Δ² / [H⁻¹]_qq.
2. ``obs_quantize_columns``: a whole column at a time, in order, with the explicit inverse
   Hessian of the columns not yet quantized (updated by one step of Gaussian elimination).
3. ``gptq_quantize``: the same result from the upper Cholesky factor of H⁻¹ (its row q is
   the column-q step of that elimination, scaled), with lazy updates in blocks of B columns.

``quantize_model`` runs it through a whole model (llmopt ``GPT`` or HF ``OPTForCausalLM``):
decoder layer by decoder layer, each layer's inputs being the outputs of the layers
before it, already quantized.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn


# --------------------------------------------------------------------------- the grid
def quant_params(W: torch.Tensor, bits: int = 4, sym: bool = False):
    """Min-max grid of each row of ``W`` (rows, k): ``(scale, zero)``, each ``(rows, 1)``.

    Asymmetric: the grid spans ``[min(w_min, 0), max(w_max, 0)]``, ``zero`` is the integer
    that represents 0. Symmetric: it spans ``[-m, m]`` with ``m = max|w|`` (when the row has
    a negative value) and ``zero = (maxq + 1) / 2``. A row of zeros gets the range [-1, 1].
    """
    maxq = 2 ** bits - 1
    W = W.float() if W.dtype not in (torch.float32, torch.float64) else W
    xmin = W.min(dim=1).values.clamp(max=0)                  # (rows,)
    xmax = W.max(dim=1).values.clamp(min=0)                  # (rows,)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale[:, None], zero[:, None]                     # (rows, 1), (rows, 1)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Round ``W`` to the nearest point of the grid ``(scale, zero)`` (broadcast), dequantized."""
    maxq = 2 ** bits - 1
    q = torch.clamp(torch.round(W / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- RTN
def quantize_rtn(W: torch.Tensor, bits: int = 4, group_size: int = -1, sym: bool = False):
    """Round-to-nearest: each weight to its row's (or group's) grid, independently.

    Returns ``(W_hat, scale, zero)``: ``W_hat`` (rows, cols) in W's dtype; ``scale`` and
    ``zero`` ``(rows, n_groups)``.
    """
    Wf = W.to(_work_dtype(W))
    rows, cols = W.shape
    gs = cols if group_size is None or group_size <= 0 else group_size
    W_hat = torch.empty_like(Wf)
    scales, zeros = [], []
    for g0 in range(0, cols, gs):
        scale, zero = quant_params(Wf[:, g0:g0 + gs], bits, sym)    # (rows, 1)
        W_hat[:, g0:g0 + gs] = quantize(Wf[:, g0:g0 + gs], scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return W_hat.to(W.dtype), torch.cat(scales, 1), torch.cat(zeros, 1)


# --------------------------------------------------------------------------- storage
def codes_of(W_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             group_size: int = -1) -> torch.Tensor:
    """The integer codes ``k`` (rows, cols) int64 behind ``W_hat = scale·(k − zero)`` (no act-order)."""
    cols = W_hat.shape[1]
    gs = cols if group_size is None or group_size <= 0 else group_size
    g = torch.arange(cols, device=W_hat.device) // gs                      # group of each column
    return torch.round(W_hat.double() / scale.double()[:, g] + zero.double()[:, g]).long()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``0 … 2**bits − 1`` (any shape) into bytes: uint8 ``(ceil(n·bits/8),)``.

    The codes in row-major order (``codes.reshape(-1)``) form one little-endian bit stream:
    code ``i`` holds stream bits ``i·bits … i·bits + bits − 1``, its least significant bit
    first; stream bit ``t`` is bit ``t mod 8`` (worth ``2**(t mod 8)``) of byte ``t // 8``;
    the unused high bits of the last byte are 0. (``numpy.packbits(..., bitorder="little")``
    writes the same bytes from the same stream.)
    """
    flat = codes.reshape(-1).to(torch.int64)                               # (n,)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)                   # (n·bits,) LSB first
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])  # pad to whole bytes
    weights = 2 ** torch.arange(8, device=flat.device)                     # 1, 2, 4, … 128
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)        # (ceil(n·bits/8),)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``pack_codes``'s bytes: int64 ``(n,)``."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1)
    stream = stream.reshape(-1)[:n * bits].reshape(n, bits)                # (n, bits) LSB first
    return (stream * 2 ** torch.arange(bits, device=packed.device)).sum(1)


def packed_bytes(rows: int, cols: int, bits: int, group_size: int = -1,
                 scale_bytes: int = 2) -> int:
    """Bytes of one ``(rows, cols)`` weight stored packed: the codes, ``bits`` bits each, plus
    per (row, group) a scale of ``scale_bytes`` (fp16) and a zero point packed like the codes."""
    groups = 1 if group_size is None or group_size <= 0 else -(-cols // group_size)
    return -(-rows * cols * bits // 8) + rows * groups * scale_bytes + -(-rows * groups * bits // 8)


# --------------------------------------------------------------------------- OBS
def obs_update(w: torch.Tensor, Hinv: torch.Tensor, q: int, target):
    """Optimal Brain Surgeon for one weight: set ``w[q]`` to ``target``, compensate the rest.

    Minimises ½ δwᵀ H δw subject to ``e_qᵀ δw = Δ = target - w[q]`` (Lagrange):
    ``δw = Δ / [H⁻¹]_qq · H⁻¹_{:,q}`` and the error it costs ``L = ½ Δ² / [H⁻¹]_qq``.
    ``w`` (d,), ``Hinv`` (d, d). Returns ``(w + δw, L)``; ``w_new[q] == target``.
    """
    delta = target - w[q]
    d = Hinv[q, q]
    w_new = w + delta / d * Hinv[:, q]                       # (d,)
    L = 0.5 * delta ** 2 / d
    return w_new, L


def _damped(H: torch.Tensor, W: torch.Tensor, percdamp: float):
    """Dead inputs (diag 0) get H_qq = 1 and zero weights; then λ = percdamp·mean(diag H)."""
    H = H.to(W.dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    return H


def obs_quantize_columns(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = -1,
                         percdamp: float = 0.01, sym: bool = False):
    """Quantize ``W`` one column at a time with OBS, using the explicit inverse Hessian.

    For column q (in order): ``Δ = quant(W_:,q) - W_:,q``; the columns not yet quantized get
    ``W ← W + Δ · H⁻¹_{q,:} / [H⁻¹]_qq`` (the lecture's δW), then q is removed from the
    problem: ``H⁻¹ ← H⁻¹ - H⁻¹_{:,q} H⁻¹_{q,:} / [H⁻¹]_qq``. O(cols³) and unblocked: the
    readable specification that ``gptq_quantize`` must reproduce. Same grid, damping, dead
    inputs and return value as ``gptq_quantize`` (no act-order).
    """
    dtype = W.dtype
    W = W.to(_work_dtype(W)).clone()
    rows, cols = W.shape
    if group_size is None or group_size <= 0:
        scale, zero = quant_params(W, bits, sym)             # from the original W
    H = _damped(H, W, percdamp)
    Hinv = torch.linalg.inv(H)                               # (cols, cols)
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    for q in range(cols):
        if group_size is not None and group_size > 0 and q % group_size == 0:
            scale, zero = quant_params(W[:, q:q + group_size], bits, sym)   # updated weights
            scales.append(scale)
            zeros.append(zero)
        Q[:, q] = quantize(W[:, q:q + 1], scale, zero, bits)[:, 0]
        delta = Q[:, q] - W[:, q]                            # (rows,)
        W += delta[:, None] * Hinv[q][None, :] / Hinv[q, q]  # column q becomes Q[:, q]
        Hinv -= Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    if not scales:
        scales, zeros = [scale], [zero]
    return Q.to(dtype), torch.cat(scales, 1), torch.cat(zeros, 1)


# --------------------------------------------------------------------------- GPTQ
def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """The act-order: columns by decreasing ``diag(H)`` (stable, so ties keep their order)."""
    return torch.argsort(torch.diag(H), descending=True, stable=True)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = -1,
                  block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                  sym: bool = False):
    """GPTQ (Algorithm 1): quantize ``W`` (rows, cols) column by column given ``H`` (cols, cols).

    - ``H⁻¹`` through Cholesky: ``U = Cholesky((H + λI)⁻¹)ᵀ`` (upper), λ = percdamp·mean(diag H);
      row q of U, divided by ``U_qq``, is the update OBS applies after quantizing column q
      when the columns before q are already fixed, and ``U_qq² = [H⁻¹]_qq`` of that step.
    - Column j: ``Q_:,j = quant(W_:,j)``; ``E_:,j = (W_:,j - Q_:,j) / U_jj``; the block's later
      columns get ``W_:,j: -= E_:,j U_j,j:``. After the block of B columns the rest of the
      matrix gets all of the block's updates at once: ``W_:,i2: -= E · U_i1:i2,i2:``.
    - Groups: a group's grid is fitted, when its first column comes up, to the group's
      weights as updated by every column before it (in the block and before it).
    - ``act_order``: columns are processed by decreasing ``diag(H)`` (``act_order_perm``),
      the result is permuted back; the groups are then groups of consecutive columns *in
      that order*: group g holds columns ``perm[g·group_size:(g+1)·group_size]``.
    - Dead inputs (``H_qq = 0``) get zero weights.

    Returns ``(W_hat, scale, zero)``: ``W_hat`` (rows, cols) in W's dtype, on the grid;
    ``scale``, ``zero`` (rows, n_groups).
    """
    dtype = W.dtype
    W = W.to(_work_dtype(W)).clone()
    rows, cols = W.shape
    grouped = group_size is not None and group_size > 0
    if not grouped:
        scale, zero = quant_params(W, bits, sym)             # (rows, 1), from the original W
    H = H.to(W.dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = act_order_perm(H)
        W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)                             # H = L Lᵀ
    Hinv = torch.cholesky_solve(torch.eye(cols, dtype=W.dtype, device=W.device), L)  # H⁻¹
    Hinv = torch.linalg.cholesky(Hinv, upper=True)           # (cols, cols) upper: U of the paper

    Q = torch.zeros_like(W)
    scales, zeros = [], []
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()                             # (rows, B) this block, updated eagerly
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)                          # (rows, B) E of Algorithm 1
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if grouped and j % group_size == 0:
                g2 = min(j + group_size, cols)
                # the group's weights now: in the block from W1, beyond it W plus the
                # block's pending (lazy) update
                later = W[:, i2:g2] - Err1 @ Hinv[i1:i2, i2:g2]
                Wg = torch.cat([W1[:, i:], later], dim=1)[:, :g2 - j]
                scale, zero = quant_params(Wg, bits, sym)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]                                     # (rows,)
            d = Hinv1[i, i]
            q = quantize(w[:, None], scale, zero, bits)[:, 0]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                 # the lazy update of the rest
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    if not grouped:
        scales, zeros = [scale], [zero]
    return Q.to(dtype), torch.cat(scales, 1), torch.cat(zeros, 1)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """The layer's error ``‖X Wᵀ - X Ŵᵀ‖²`` (the lecture's ‖WX − ŴX‖²), X (N, cols)."""
    D = (W - W_hat).to(torch.float64)
    return float(((X.to(torch.float64) @ D.T) ** 2).sum())


class GPTQ:
    """Accumulates a linear layer's Hessian ``H = 2/N Σ x xᵀ`` (cols, cols) over its inputs.

    ``add_batch(inp)`` takes inputs of shape ``(..., in_features)`` (any leading dims are
    tokens) and keeps the running mean over the N tokens seen so far; ``quantize(...)``
    runs ``gptq_quantize`` on ``layer.weight`` with that H and writes ``W_hat`` back.
    """

    def __init__(self, layer_or_cols, device=None):
        if isinstance(layer_or_cols, nn.Module):
            self.layer = layer_or_cols
            cols = layer_or_cols.weight.shape[1]
            device = layer_or_cols.weight.device if device is None else device
        else:
            self.layer, cols = None, int(layer_or_cols)
        self.columns = cols
        self.H = torch.zeros(cols, cols, device=device, dtype=torch.float32)
        self.nsamples = 0                                    # tokens seen

    def add_batch(self, inp: torch.Tensor, out=None) -> None:
        x = inp.reshape(-1, inp.shape[-1])                   # (n, cols)
        if x.dtype != torch.float64:
            x = x.float()
        if self.H.dtype != x.dtype:
            self.H = self.H.to(x.dtype)
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.T @ x

    def quantize(self, bits=4, group_size=-1, block_size=128, percdamp=0.01,
                 act_order=False, sym=False):
        W = self.layer.weight.data
        W_hat, scale, zero = gptq_quantize(W, self.H, bits, group_size, block_size,
                                           percdamp, act_order, sym)
        self.layer.weight.data.copy_(W_hat)
        return W_hat, scale, zero


# --------------------------------------------------------------------------- models
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an llmopt ``GPT`` or an HF OPT: the first ``ModuleList`` whose
    items hold ``nn.Linear`` modules (``model.model.decoder.layers`` for HF OPT)."""
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and \
                any(isinstance(c, nn.Linear) for c in m[0].modules()):
            return m
    raise ValueError("no decoder layers found: expected an nn.ModuleList of blocks "
                     "that contain nn.Linear modules")


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one decoder layer by name (q, k, v, out, fc1, fc2)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    pass


def _capture_first_layer_inputs(model, layers, calib, batch_size):
    """Run the model on ``calib`` up to its first decoder layer: ``[(args, kwargs)]`` per batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in range(0, calib.shape[0], batch_size):
            try:
                if _is_hf(model):
                    model(calib[b:b + batch_size], use_cache=False)
                else:
                    model(calib[b:b + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def _with_hidden(args, kwargs, h):
    if args:
        return [h] + list(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sequential_layers(model: nn.Module, calib: torch.Tensor, batch_size: int = 8, log: list | None = None):
    """GPTQ's walk through the decoder layers, for any per-layer compression.

    Yields ``(index, layer, {name: GPTQ})`` for each decoder layer in turn: every
    ``nn.Linear`` of the layer with its ``H = 2/N Σ x xᵀ`` accumulated while the layer ran on
    its inputs — the calibration tokens through the layers before it, *already compressed*
    by the caller. After the caller has compressed the layer (in place, or by swapping its
    linears), the layer runs again to give the next one its inputs. ``log``, if a list, gets
    ``{"layer", "name": "*", "seconds"}`` per layer (both forwards and the caller's work).
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    inputs = _capture_first_layer_inputs(model, layers, calib.to(device), batch_size)
    for li, layer in enumerate(layers):
        t_layer = time.perf_counter()
        acc = {name: GPTQ(lin) for name, lin in layer_linears(layer).items()}
        handles = [g.layer.register_forward_hook(lambda m, inp, out, g=g: g.add_batch(inp[0].detach()))
                   for g in acc.values()]
        for args, kwargs in inputs:
            layer(*args, **kwargs)
        for h in handles:
            h.remove()
        yield li, layer, acc
        del acc
        # the compressed layer's outputs are the next layer's inputs
        inputs = [_with_hidden(args, kwargs, _first(layer(*args, **kwargs))) for args, kwargs in inputs]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if log is not None:                                  # the whole layer, forwards included
            log.append({"layer": li, "name": "*", "shape": None,
                        "seconds": time.perf_counter() - t_layer})


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "gptq", calib: torch.Tensor | None = None,
                   bits: int = 4, group_size: int = -1, *, block_size: int = 128,
                   percdamp: float = 0.01, act_order: bool = False, sym: bool = False,
                   batch_size: int = 8, log: list | None = None) -> nn.Module:
    """Quantize every ``nn.Linear`` of every decoder layer of ``model`` in place; return it.

    ``method``: ``"rtn"`` (no calibration needed) or ``"gptq"``. ``calib``: ``(n, seq_len)``
    token ids. GPTQ goes layer by layer: the inputs of layer 0 are captured once (a
    pre-hook stops the forward there); each layer's linears accumulate their H through
    forward hooks while the layer runs on its inputs, are quantized, and the layer runs
    again, now quantized, to give the next layer its inputs. Embeddings, norms and the LM
    head stay as they are. The model keeps its class, forward and dtype (the weights hold
    the dequantized values). ``log``, if a list, gets one dict per linear
    ``{"layer", "name", "shape", "seconds"}`` (GPTQ's time on that weight) and, for GPTQ, one
    per decoder layer with ``name="*"`` (the whole layer: its two forwards included).
    """
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    layers = decoder_layers(model)
    if method == "rtn":
        for li, layer in enumerate(layers):
            for name, lin in layer_linears(layer).items():
                t0 = time.perf_counter()
                W_hat, _, _ = quantize_rtn(lin.weight.data, bits, group_size, sym)
                lin.weight.data.copy_(W_hat)
                if log is not None:
                    log.append({"layer": li, "name": name, "shape": tuple(lin.weight.shape),
                                "seconds": time.perf_counter() - t0})
        return model
    if calib is None:
        raise ValueError("GPTQ needs calibration token ids: calib of shape (n, seq_len)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for li, layer, gptq in sequential_layers(model, calib, batch_size, log):
        for name, g in gptq.items():
            t0 = time.perf_counter()
            g.quantize(bits, group_size, block_size, percdamp, act_order, sym)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if log is not None:
                log.append({"layer": li, "name": name, "shape": tuple(g.layer.weight.shape),
                            "seconds": time.perf_counter() - t0})
    model.train(was_training)
    return model
