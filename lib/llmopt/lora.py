"""LoRA and QLoRA: low-rank adapters on a frozen (4-bit) base (lab09).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021, arXiv:2106.09685),
§4.1; Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023,
arXiv:2305.14314), §3. Lecture section "LoRA / QLoRA" (the seminar: a QLoRA pipeline with a
Russian instruction dataset). Notes in ``course/notes/lab09_qlora.md``.

The method:
- A frozen linear ``W₀ ∈ R^{d_out × d_in}`` gets a trainable low-rank update
  ``ΔW = (α / r) · B A`` with ``A ∈ R^{r × d_in}`` (Kaiming-uniform, as ``nn.Linear``
  initialises its weight, ``a = √5``) and ``B ∈ R^{d_out × r}`` (zeros: ``ΔW = 0`` at the
  start, so the adapted model IS the base model before training):
  ``y = W₀ x + b + (α / r) · B A x``, computed as ``base(x) + scaling · (x Aᵀ) Bᵀ``.
  Dropout (if any) applies to the input of the LoRA branch only (as in peft).
- ``apply_lora`` replaces the named projections (LoRA's paper: ``q_proj`` and ``v_proj``;
  QLoRA: every linear layer) and freezes every other parameter of the model.
- ``merge_lora`` folds the update into the weight, ``W = W₀ + (α / r) · B A``, and puts the
  plain ``nn.Linear`` back: inference costs nothing extra.
- QLoRA: the base is NF4 (``llmopt.nf4.Linear4bit``: packed 4-bit codes, block absmax,
  optionally double-quantized), dequantized per forward into the compute dtype; only ``A``
  and ``B`` (fp32 or bf16) are trained. ``QLoRALinear`` holds no full-precision copy of
  ``W₀``: its weight memory is ``⌈n/2⌉`` bytes + the absmax, about 0.27× of fp16 at block 64.
  ``prepare_qlora`` quantizes the decoder's linears and adds the adapters.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.nf4 import Linear4bit, dequantize_4bit

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
ALL_LINEAR = ATTENTION + ("fc1", "fc2")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · dropout(x) Aᵀ Bᵀ`` with the base frozen.

    ``base``: an ``nn.Linear`` (or anything with ``in_features``/``out_features`` that maps
    ``(..., in) -> (..., out)``). ``A``: ``(r, in_features)``, Kaiming-uniform; ``B``:
    ``(out_features, r)``, zeros; ``scaling = alpha / r``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = next(iter(base.parameters()), torch.empty(0)).device   # the adapters live by the base
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=dev))      # (r, d_in)
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))     # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term ``(alpha / r) · x Aᵀ Bᵀ``: ``(..., in) -> (..., out)``."""
        return (self.dropout(x) @ self.A.t()) @ self.B.t() * self.scaling  # (..., r) -> (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_delta(x.to(self.A.dtype)).to(x.dtype)


def apply_lora(model: nn.Module, target_modules=("q_proj", "v_proj"), r: int = 8,
               alpha: float = 16, dropout: float = 0.0) -> nn.Module:
    """Wrap every ``nn.Linear`` whose name ends with one of ``target_modules`` in a
    ``LoRALinear``, in place; freeze all other parameters. Returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    for name in targets:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each ``LoRALinear`` over an ``nn.Linear`` by that linear with
    ``W = W₀ + (alpha / r) · B A``, in place. Returns ``model``."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in found:
        base = m.base
        delta = (m.B.float() @ m.A.float()) * m.scaling                # (d_out, d_in)
        base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
        model.set_submodule(name, base)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(shapes, r: int) -> int:
    """Adapter parameters for linears of ``shapes`` [(d_out, d_in), ...]: ``r (d_in + d_out)`` each."""
    return sum(r * (o + i) for o, i in shapes)


# --------------------------------------------------------------------------- QLoRA
class QLoRALinear(nn.Module):
    """A frozen NF4 base (``llmopt.nf4.Linear4bit``) plus a LoRA adapter:
    ``y = dequant(W₀) x + b + (alpha / r) · x Aᵀ Bᵀ``, computed in ``compute_dtype``.

    ``linear``: the ``nn.Linear`` to quantize (its weight is NOT kept). Holds the packed
    codes and absmax as buffers, the bias frozen, and ``A``, ``B`` as the only parameters
    that require grad.
    """

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 double_quant: bool = True, blocksize: int = 64,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = Linear4bit(linear, "nf4", double_quant, blocksize, compute_dtype)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        dev = linear.weight.device
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=dev))   # (r, d_in)
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))  # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_4bit(self.base.packed, self.base.state)       # (d_out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        W = self.dequantized_weight().to(self.compute_dtype)             # (d_out, d_in)
        bias = None if self.base.bias is None else self.base.bias.to(self.compute_dtype)
        y = F.linear(xc, W, bias)                                        # (..., d_out)
        A, B = self.A.to(self.compute_dtype), self.B.to(self.compute_dtype)
        y = y + (self.dropout(xc) @ A.t()) @ B.t() * self.scaling
        return y.to(x.dtype)


def prepare_qlora(model: nn.Module, target_modules=ALL_LINEAR, r: int = 8, alpha: float = 16,
                  dropout: float = 0.0, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Quantize the decoder's linears named in ``target_modules`` to NF4 with a LoRA adapter
    each (``QLoRALinear``), in place; freeze everything else. Returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in f".{name}"
               and name.rsplit(".", 1)[-1] in target_modules]
    for name in targets:
        model.set_submodule(name, QLoRALinear(model.get_submodule(name), r, alpha, dropout,
                                              double_quant, compute_dtype=compute_dtype))
    return model


def qlora_base_bytes(model: nn.Module) -> int:
    """Bytes the ``QLoRALinear`` bases hold (packed codes, quantized absmax and their state)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            s = m.base.state
            total += m.base.packed.numel() * m.base.packed.element_size()
            total += s.absmax.numel() * s.absmax.element_size()
            if s.nested:
                total += s.state2.absmax.numel() * 4 + 4
    return total


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapters: ``{name: tensor}`` of every ``A`` and ``B``."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".A", ".B"))}
