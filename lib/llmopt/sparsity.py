"""Sparsification of a transformer's weights, alone and with quantization (hw01_compression).

Magnitude pruning (Han et al., 2015; the layer-wise baseline of the two papers below);
Wanda: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models" (2023, arXiv:2306.11695); SparseGPT: Frantar & Alistarh, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot" (2023, arXiv:2301.00774), which is
Optimal Brain Surgeon (Hassibi & Stork, 1992) run the GPTQ way. Lecture section
"Квантизация LLM → OBS & GPTQ" (OBS for pruning: "ошибка, вызванная квантизацией
(прунингом)") and the homework "анализ падения точности … квантизации и спарсификации";
notes in ``course/notes/hw01_compression.md``.

Layout and notation (as lab07's ``llmopt.gptq``):
- ``W`` is ``(rows, cols) = (out_features, in_features)``; the layer computes ``X @ Wᵀ``
  for inputs ``X`` of shape ``(N, cols)`` (N tokens). ``H = 2 XᵀX`` (cols, cols), or its mean
  over tokens ``2/N XᵀX``: the result does not depend on the scale of H.
- A *mask* is boolean, ``True`` = keep. ``sparsity`` is the fraction of weights set to zero,
  counted exactly: ``floor(sparsity · size)`` zeros in each *comparison group*, which is
  what tells the methods apart:

  ============  ================================  ====================================
  method        score of weight (i, j)            comparison group (who competes)
  ============  ================================  ====================================
  magnitude     |W_ij|                            the whole tensor (layer-wise)
  Wanda         |W_ij| · ‖X_:,j‖₂ (over tokens)     one output row
  SparseGPT     W_ij² / [H⁻¹]_jj (OBS saliency)     a block of B columns, all rows
  n:m (2:4)     any of the above                  n kept of every m consecutive *inputs*
                                                  of a row (groups along ``cols``)
  ============  ================================  ====================================

- SparseGPT (Algorithm 1 of the paper, IST-DASLab's ``sparsegpt.py``): the columns are
  visited left to right with GPTQ's machinery (U = upper Cholesky factor of the damped
  H⁻¹, lazy updates per block of B columns). When column j comes up, the weights the mask
  removes are set to 0 (and, with ``bits``, the others rounded to their row's grid), and
  the error ``E_:,j = (W_:,j − Q_:,j) / U_jj`` moves the columns to the right:
  ``W_:,j: −= E_:,j U_j,j:``. That update is what makes it better than magnitude pruning
  on correlated inputs: the kept weights absorb what the pruned ones did. The mask of a
  block is chosen when the block comes up, from the weights as updated so far, by the
  saliency ``W_ij² / U_jj²`` (``U_jj² = [H⁻¹]_jj`` of that step).

``compress_model(model, recipe, calib)`` applies a recipe (pruning, quantization or both)
decoder layer by decoder layer, as ``llmopt.gptq.quantize_model`` does: each layer is
calibrated on the outputs of the layers before it, already compressed. ``evaluate`` gives
perplexity and the KL divergence to the uncompressed model's next-token distribution;
``bits_per_weight`` the storage of the compressed linears, overheads included.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt import gptq as _gptq
from llmopt import int8 as _int8
from llmopt import nf4 as _nf4


# --------------------------------------------------------------------------- masks
def _keep_largest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of each row of ``score`` (g, k): the ``floor(sparsity·k)`` smallest go."""
    k = score.shape[-1]
    n_prune = int(math.floor(sparsity * k + 1e-9))
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.argsort(score, dim=-1, stable=True)[..., :n_prune]
        mask.scatter_(-1, idx, False)
    return mask


def nm_mask(W: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """n:m keep-mask of ``W`` (rows, cols): in every group of ``m`` consecutive inputs of a
    row (columns ``g·m … g·m + m − 1``), the ``n`` entries of largest ``|W|`` are kept.

    ``W`` may be a weight (magnitude 2:4) or any score (Wanda's ``|W|·‖X‖``). ``cols`` must
    be a multiple of ``m``. Returns a bool tensor of W's shape: exactly ``n`` True per group.
    """
    rows, cols = W.shape
    if cols % m:
        raise ValueError(f"n:m sparsity needs in_features ({cols}) to be a multiple of m={m}")
    S = W.abs().reshape(rows, cols // m, m)                  # (rows, groups, m)
    idx = torch.topk(S, n, dim=-1).indices                   # (rows, groups, n)
    mask = torch.zeros_like(S, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def magnitude_prune(W: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Zero the ``floor(sparsity · W.numel())`` weights of smallest ``|W|`` in the whole tensor
    (layer-wise); with ``n, m > 0`` keep ``n`` of every ``m`` inputs by ``|W|`` instead
    (``sparsity`` is then ignored). Returns the pruned weight (W's shape and dtype)."""
    if n:
        return W * nm_mask(W, n, m)
    mask = _keep_largest(W.abs().reshape(1, -1), sparsity).reshape(W.shape)
    return W * mask


def wanda_prune(W: torch.Tensor, X: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Wanda: score ``S_ij = |W_ij| · ‖X_:,j‖₂`` (the norm of input feature j over the tokens
    of ``X`` (N, cols)); in each output row zero the ``floor(sparsity · cols)`` smallest
    scores (with ``n, m > 0``: keep ``n`` of every ``m`` inputs by S). No weight update.
    Returns the pruned weight (W's shape and dtype)."""
    norm = X.to(torch.float64 if W.dtype == torch.float64 else torch.float32).norm(dim=0)  # (cols,)
    S = W.abs() * norm[None, :].to(W.dtype)                  # (rows, cols)
    mask = nm_mask(S, n, m) if n else _keep_largest(S, sparsity)
    return W * mask


# --------------------------------------------------------------------------- SparseGPT
def _sparse_obs(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.0, n: int = 0, m: int = 0,
                block_size: int = 128, percdamp: float = 0.01, bits: int = 0,
                mask: torch.Tensor | None = None, sym: bool = False) -> torch.Tensor:
    """The OBS sweep behind SparseGPT (and GPTQ on a fixed mask). ``mask`` given: that mask
    is used (e.g. Wanda's) instead of choosing one. ``bits > 0``: kept weights are rounded
    to their row's min-max grid of the original W (joint sparsification + quantization)."""
    dtype = W.dtype
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    W = W.to(wd).clone()
    rows, cols = W.shape
    if n and block_size % m:
        raise ValueError(f"block_size ({block_size}) must be a multiple of m={m}")
    if bits:
        scale, zero = _gptq.quant_params(W, bits, sym)       # (rows, 1) each
    H = H.to(wd).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_solve(torch.eye(cols, dtype=wd, device=W.device), L)   # H⁻¹
    U = torch.linalg.cholesky(Hinv, upper=True)              # (cols, cols), the paper's H⁻¹ info

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()                             # (rows, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)                                  # (B,)
        if mask is not None:
            M1 = mask[:, i1:i2].to(W.device)
        elif n:
            M1 = torch.ones_like(W1, dtype=torch.bool)       # filled every m columns below
        else:                                                # the block's mask, all rows at once
            M1 = _keep_largest((W1 ** 2 / d1[None, :] ** 2).reshape(1, -1), sparsity).reshape(W1.shape)
        for i in range(i2 - i1):
            if mask is None and n and i % m == 0:
                M1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d1[None, i:i + m] ** 2, n, m)
            w = W1[:, i]                                     # (rows,)
            q = w * M1[:, i]
            if bits:
                q = _gptq.quantize(q[:, None], scale, zero, bits)[:, 0] * M1[:, i]
            Q1[:, i] = q
            err = (w - q) / d1[i]                            # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                    # the lazy update of the rest
    return W.to(dtype)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int = 0, m: int = 0,
                    block_size: int = 128, percdamp: float = 0.01, bits: int = 0) -> torch.Tensor:
    """SparseGPT: prune ``W`` (rows, cols) given ``H = 2XᵀX`` (cols, cols), compensating with OBS.

    Unstructured (``n = 0``): in each block of ``block_size`` columns, chosen when it comes
    up, the ``floor(sparsity · rows · B)`` weights of smallest ``W_ij² / U_jj²`` are pruned.
    n:m: every ``m`` columns the mask of the next ``m`` columns keeps, per row, the ``n``
    largest of that saliency. Damping ``λ = percdamp · mean(diag H)``; dead inputs
    (``H_jj = 0``) get zero weights. ``bits > 0``: SparseGPT + GPTQ in one sweep (the
    paper's joint mode): each kept weight is also rounded, when its column comes up, to its
    row's ``bits``-bit min-max grid of the original W (``llmopt.gptq.quant_params``), and the
    error of both moves the later columns. Returns the pruned, compensated weight.
    """
    return _sparse_obs(W, H, sparsity, n, m, block_size, percdamp, bits)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """``‖X Wᵀ − X Ŵᵀ‖_F`` (the lecture's ‖WX − C(W)X‖), X (N, cols), in float64."""
    D = (W - W_hat).to(torch.float64)
    return float((X.to(torch.float64) @ D.T).norm())


# --------------------------------------------------------------------------- recipes
PRUNE = (None, "magnitude", "wanda", "sparsegpt")
QUANT = (None, "rtn", "gptq", "int8", "nf4")


def make_recipe(prune=None, sparsity: float = 0.5, n: int = 0, m: int = 0, quant=None,
                bits: int = 4, group_size: int = -1) -> dict:
    """A recipe: what ``compress_model`` does to every linear of the decoder layers."""
    if prune not in PRUNE:
        raise ValueError(f"prune must be one of {PRUNE}, got {prune!r}")
    if quant not in QUANT:
        raise ValueError(f"quant must be one of {QUANT}, got {quant!r}")
    return dict(prune=prune, sparsity=sparsity, n=n, m=m, quant=quant, bits=bits,
                group_size=group_size)


def recipe_name(recipe: dict) -> str:
    """``'sparsegpt 2:4 + gptq w4'``, ``'wanda 50%'``, ``'nf4'``, ``'dense'``..."""
    r = make_recipe(**recipe)
    parts = []
    if r["prune"]:
        pat = f"{r['n']}:{r['m']}" if r["n"] else f"{r['sparsity']:.0%}"
        parts.append(f"{r['prune']} {pat}")
    if r["quant"] in ("rtn", "gptq"):
        g = "" if r["group_size"] <= 0 else f" g{r['group_size']}"
        parts.append(f"{r['quant']} w{r['bits']}{g}")
    elif r["quant"]:
        parts.append(r["quant"])
    return " + ".join(parts) or "dense"


def bits_per_weight(shape, recipe: dict) -> float:
    """Bits per weight of one ``(rows, cols)`` linear weight stored as the recipe says.

    values: 16 (fp16), ``bits`` (RTN/GPTQ), 8 (int8), 4 (NF4), for the kept fraction of the
    weights only; plus their scales: RTN/GPTQ an fp16 scale and a ``bits``-bit zero per row
    (or group), int8 an fp32 scale per row, NF4 an fp32 absmax per block of 64; plus the
    positions of the kept weights: a bitmask (1 bit per weight) for unstructured sparsity,
    a ``log2 m``-bit index per kept weight for n:m (2 bits per kept value for 2:4, as the
    sparse tensor cores store it).
    """
    r = make_recipe(**recipe)
    rows, cols = shape
    numel = rows * cols
    q = r["quant"]
    if q is None:
        value, over = 16.0, 0.0
    elif q in ("rtn", "gptq"):
        gs = cols if r["group_size"] <= 0 else r["group_size"]
        value, over = float(r["bits"]), rows * math.ceil(cols / gs) * (16 + r["bits"]) / numel
    elif q == "int8":
        value, over = 8.0, 8 * (_int8.int8_bytes(rows, cols) - numel) / numel
    else:  # nf4
        value, over = 4.0, 8 * _nf4.bytes_4bit(numel, 64) / numel - 4.0
    if r["prune"] is None:
        return value + over
    if r["n"]:
        keep = r["n"] / r["m"]
        return keep * (value + math.ceil(math.log2(r["m"]))) + over
    keep = 1 - math.floor(r["sparsity"] * numel + 1e-9) / numel
    return keep * value + 1.0 + over


def model_bits_per_weight(model: nn.Module, recipe: dict) -> float:
    """``bits_per_weight`` averaged over every linear of the decoder layers (by size)."""
    total, count = 0.0, 0
    for layer in _gptq.decoder_layers(model):
        for lin in _gptq.layer_linears(layer).values():
            shape = (lin.out_features, lin.in_features)
            total += bits_per_weight(shape, recipe) * shape[0] * shape[1]
            count += shape[0] * shape[1]
    return total / count


# --------------------------------------------------------------------------- the model
def _compress_weight(W: torch.Tensor, H: torch.Tensor, r: dict) -> torch.Tensor:
    """One linear's weight through the recipe's pruning and RTN/GPTQ (int8/NF4: later)."""
    prune, q = r["prune"], r["quant"]
    bits = r["bits"] if q == "gptq" else 0
    if q == "gptq" and r["group_size"] > 0 and prune:
        raise ValueError("pruning + GPTQ uses one grid per row: group_size must be -1")
    if prune == "sparsegpt":
        W = _sparse_obs(W, H, r["sparsity"], r["n"], r["m"], bits=bits)
    elif prune in ("magnitude", "wanda"):
        if prune == "magnitude":
            mask = magnitude_prune(W, r["sparsity"], r["n"], r["m"]) != 0
        else:
            # Wanda needs only ‖X_:,j‖₂ ∝ sqrt(H_jj): one "token" with those values stands for X
            Wp = wanda_prune(W, torch.sqrt(torch.diag(H).clamp(min=0))[None, :], r["sparsity"],
                             r["n"], r["m"])
            mask = Wp != 0
        W = W * mask if q != "gptq" else _sparse_obs(W, H, mask=mask, bits=bits)
    elif q == "gptq":
        W = _gptq.gptq_quantize(W, H, r["bits"], r["group_size"])[0]
    if q == "rtn":                                           # 0 is on every grid: zeros stay
        W = _gptq.quantize_rtn(W, r["bits"], r["group_size"])[0]
    return W


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module)


@torch.no_grad()
def compress_model(model: nn.Module, recipe: dict, calib: torch.Tensor | None = None, *,
                   batch_size: int = 8, log: list | None = None) -> nn.Module:
    """Apply ``recipe`` (see ``make_recipe``) to every linear of every decoder layer, in place.

    Layer by layer (as ``llmopt.gptq.quantize_model``): the layer's linears collect
    ``H = 2/N Σ x xᵀ`` of their inputs while the layer runs on its inputs (the outputs of
    the layers before it, already compressed), each weight is pruned (magnitude, Wanda from
    ``‖X_:,j‖ ∝ √H_jj``, SparseGPT) and/or quantized (RTN, GPTQ — jointly with SparseGPT's
    sweep when both are asked for —, int8 as ``Linear8bit``, NF4 as ``Linear4bit``), then
    the compressed layer runs again to give the next one its inputs. ``calib``: ``(n,
    seq_len)`` token ids. ``log``, if a list, gets per linear ``{"layer", "name", "shape",
    "rel_err", "sparsity", "seconds"}`` with ``rel_err = ‖WX − C(W)X‖ / ‖WX‖`` on the
    calibration inputs (the int8/NF4 rounding included).
    """
    r = make_recipe(**recipe)
    if r["prune"] is None and r["quant"] is None:
        return model
    was_training = model.training
    model.eval()
    if calib is None:
        raise ValueError("compress_model needs calibration token ids: calib of shape (n, seq_len)")
    for li, layer, acc in _gptq.sequential_layers(model, calib, batch_size):
        linears = {name: g.layer for name, g in acc.items()}
        for name, lin in linears.items():
            t0 = time.perf_counter()
            W, H = lin.weight.data.clone(), acc[name].H
            W_hat = _compress_weight(W.float(), H, r).to(W.dtype)
            lin.weight.data.copy_(W_hat)
            if r["quant"] == "int8":
                new = _int8.Linear8bit(lin)
                W_hat = _int8.absmax_dequantize(new.weight_int8, new.weight_scale)
            elif r["quant"] == "nf4":
                new = _nf4.Linear4bit(lin)
                W_hat = _nf4.dequantize_4bit(new.packed, new.state)
            if r["quant"] in ("int8", "nf4"):
                _replace(layer, name, new)
            if log is not None:
                D = (W.double() - W_hat.double())
                Hd = H.double()
                err = float(((D @ Hd) * D).sum()) / max(float(((W.double() @ Hd) * W.double()).sum()), 1e-30)
                log.append({"layer": li, "name": name, "shape": tuple(W.shape),
                            "rel_err": math.sqrt(max(err, 0.0)),
                            "sparsity": float((W_hat == 0).float().mean()),
                            "seconds": time.perf_counter() - t0})
            del acc[name]
    model.train(was_training)
    return model


# --------------------------------------------------------------------------- evaluation
def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def eval_windows(tokens, seq_len: int = 128, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n_windows, seq_len + 1)`` of a 1-D token array."""
    import numpy as np
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    data = torch.as_tensor(np.asarray(tokens[:n]).astype(np.int64))
    n_full = (n - 1) // seq_len
    return torch.stack([data[i * seq_len: (i + 1) * seq_len + 1] for i in range(n_full)])


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> list:
    """The uncompressed model's next-token log-probabilities on ``windows``, per batch."""
    model.eval()
    device = next(model.parameters()).device
    return [F.log_softmax(_logits(model, windows[b:b + batch_size, :-1].to(device)).float(), -1).cpu()
            for b in range(0, len(windows), batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, reference, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity of ``model`` on ``windows`` and ``KL(p_ref ‖ p_model)`` per token (nats).

    ``reference``: the uncompressed model, or its ``reference_logprobs`` on the same windows
    and batch size (computed once for a sweep). Returns ``{"ppl", "kl"}``.
    """
    if isinstance(reference, nn.Module):
        reference = reference_logprobs(reference, windows, batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, kl, count = 0.0, 0.0, 0
    for bi, b in enumerate(range(0, len(windows), batch_size)):
        x = windows[b:b + batch_size].to(device)
        logp = F.log_softmax(_logits(model, x[:, :-1]).float(), -1).cpu()   # (b, L, V)
        ref = reference[bi]
        nll += float(F.nll_loss(logp.reshape(-1, logp.shape[-1]), x[:, 1:].reshape(-1).cpu(),
                                reduction="sum"))
        kl += float((ref.exp() * (ref - logp)).sum())
        count += x[:, 1:].numel()
    model.train(was_training)
    return {"ppl": math.exp(nll / count), "kl": kl / count}
