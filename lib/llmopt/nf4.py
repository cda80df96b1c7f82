"""Block-wise 4-bit quantization: FP4, NF4 and double quantization (lab08).

Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs"
(2023, arXiv:2305.14314), §3 (4-bit NormalFloat, Double Quantization), as implemented in
bitsandbytes. Lecture section "Bits&Bytes fp4/nf4"; notes in ``course/notes/lab08_int8_nf4.md``.
``quantize_4bit`` matches ``bitsandbytes.functional.quantize_4bit`` bit for bit (packed bytes
and absmax; with double quantization: the 8-bit codes of bitsandbytes' PyTorch kernel, see
``lib/tests/test_nf4.py``), and ``dequantize_4bit`` its dequantization.

The method:
1. ``W`` is flattened (row-major) into ``w`` of ``n`` values and cut into blocks of ``B = 64``;
   the last block may be shorter (it is padded, never dropped): ``⌈n / B⌉`` blocks.
2. Each block gets ``c_b = max|w_b|`` (its *absmax*, fp32) and is scaled into ``[-1, 1]``.
3. Each scaled value becomes the index (0..15) of the nearest of the 16 values of a 4-bit
   code: ``FP4_CODE`` (sign, 2 exponent bits, 1 mantissa bit, in bit order) or ``NF4_CODE``
   (quantiles of N(0, 1), sorted). Two indices share a byte, the first in the HIGH nibble:
   ``byte = idx[2i] << 4 | idx[2i + 1]``; an odd count is padded with the code of 0.0.
4. Double quantization: the fp32 absmax (32 bits per 64 weights = 0.5 bit per weight) is
   itself quantized: subtract its mean (``offset``), cut into blocks of 256, absmax-scale each
   block and round to the nearest value of bitsandbytes' 8-bit dynamic code (``DYNAMIC_CODE``):
   8 bits per 64 weights plus 32 bits per 64·256 → 8/64 + 32/16384 ≈ 0.127 bit per weight.
Dequantization: ``w ≈ code[idx] · c_b`` with ``c_b = DYNAMIC_CODE[q_b] · c2_{⌊b/256⌋} + offset``
under double quantization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

NF4_OFFSET = 0.9677083  # the outermost quantile: QLoRA's (1 - 1/2·(1/(2·15) + 1/(2·16)))


# --------------------------------------------------------------------------- the codes
def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NormalFloat: 8 positive quantiles ``Φ⁻¹`` of ``linspace(offset, 0.5, 9)[:-1]``, 7 negative
    ones of ``linspace(offset, 0.5, 8)[:-1]``, and an exact 0; sorted, divided by the max.
    ``(16,)`` float32 (the quantile levels in float32, ``Φ⁻¹`` in float64, as bitsandbytes)."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())      # 8 values
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())     # 7 values
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float()
    v = v.sort().values
    return v / v.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 in bit order ``s e1 e0 m``: ``(-1)^s · v / 12`` with ``v = m · 0.0625``
    for ``e = 0`` (subnormal) and ``v = 2^(4-e) · (1 + m/2)`` otherwise. ``(16,)`` float32."""
    vals = []
    for bits in range(16):
        s, e, m = bits >> 3, (bits >> 1) & 3, bits & 1
        v = m * 0.0625 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
        vals.append(-v if s else v)
    code = torch.tensor(vals, dtype=torch.float32)
    return code / code.abs().max()


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code (``create_dynamic_map``): ``(256,)`` float32, sorted."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


NF4_CODE = nf4_code()
FP4_CODE = fp4_code()
DYNAMIC_CODE = dynamic_map()


def code_of(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


# --------------------------------------------------------------------------- state
@dataclass
class QuantState:
    """What ``dequantize_4bit`` needs besides the packed bytes.

    ``absmax``: ``(n_blocks,)`` fp32, or with double quantization ``(n_blocks,)`` uint8 indices
    into ``DYNAMIC_CODE``; ``shape``/``dtype``: the original tensor's; ``offset``: the mean
    subtracted from the absmax (0-d fp32) and ``state2``: the nested state (its ``absmax`` is
    ``(⌈n_blocks / 256⌉,)`` fp32, ``blocksize`` 256), both None without double quantization.
    """
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


# --------------------------------------------------------------------------- block-wise
def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the nearest value of each entry (ties to the lower value)."""
    order = torch.argsort(code, stable=True)
    srt = code[order]
    bounds = (srt[:-1] + srt[1:]) / 2                         # decision boundaries
    return order[torch.bucketize(scaled, bounds)]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Flatten ``x``, absmax per block of ``blocksize`` (the last one may be shorter), nearest
    code index per value. Returns ``(idx (n,) int64, absmax (n_blocks,) fp32)``."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    full = (n // blocksize) * blocksize
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    scaled = torch.empty(n, dtype=torch.float32, device=x.device)
    if full:
        blocks = flat[:full].view(-1, blocksize)              # (n_full, B)
        absmax[: full // blocksize] = blocks.abs().amax(dim=1)
        inv = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)
        scaled[:full] = (blocks * inv[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:                                              # the ragged last block
        am = flat[full:].abs().max()
        absmax[-1] = am
        scaled[full:] = (flat[full:] / am.clamp(min=1e-38)).clamp(-1, 1)
    return _nearest(scaled, code.to(x.device)), absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, n: int) -> torch.Tensor:
    """``code[idx] · absmax[block]`` for the first ``n`` values, fp32 ``(n,)``."""
    vals = code.to(absmax.device)[idx.long().reshape(-1)[:n]]
    return vals * absmax.repeat_interleave(blocksize)[:n]


def pack_4bit(idx: torch.Tensor, pad: int) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble; ``pad`` fills an odd count."""
    idx = idx.reshape(-1)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), pad)])
    q = idx.to(torch.uint8)
    return (q[0::2] << 4) | q[1::2]                           # (⌈n/2⌉,) uint8


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``: ``(n,)`` int64 indices."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()


def quantize_4bit(W: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False):
    """Block-wise 4-bit quantization of ``W`` (any shape): ``(packed, QuantState)``.

    ``packed``: ``(⌈n/2⌉,)`` uint8, two code indices per byte, the first in the high nibble.
    ``double_quant``: the absmax quantized to 8 bits in blocks of 256 after subtracting
    their mean (see the module docstring).
    """
    code = code_of(quant_type)
    idx, absmax = quantize_blockwise(W, code, blocksize)
    pad = int(_nearest(torch.zeros(1), code))                 # the code of 0.0
    packed = pack_4bit(idx, pad)
    state = QuantState(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize,
                       quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()
        q2, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_CODE, 256)
        state.absmax = q2.to(torch.uint8)
        state.offset = offset
        state.state2 = QuantState(absmax=absmax2, shape=absmax.shape, dtype=torch.float32,
                                  blocksize=256, quant_type="dynamic")
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax of every block (undoing double quantization if there was one)."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    absmax = dequantize_blockwise(state.absmax, s2.absmax, DYNAMIC_CODE, s2.blocksize,
                                  state.absmax.numel())
    return absmax + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``code[idx] · absmax`` per block, reshaped to ``state.shape`` in ``state.dtype``."""
    n = math.prod(state.shape)
    idx = unpack_4bit(packed, n)
    W = dequantize_blockwise(idx, dequantize_absmax(state), code_of(state.quant_type),
                             state.blocksize, n)
    return W.reshape(state.shape).to(state.dtype)


# --------------------------------------------------------------------------- memory
def bytes_4bit(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Exact bytes of a tensor of ``numel`` values in block-wise 4-bit: ``⌈n/2⌉`` packed bytes
    plus the absmax: fp32 per block, or (double quantization) one byte per block, one fp32
    per 256 blocks and the fp32 offset."""
    n_blocks = -(-numel // blocksize)
    packed = -(-numel // 2)
    if not double_quant:
        return packed + 4 * n_blocks
    return packed + n_blocks + 4 * -(-n_blocks // 256) + 4


def bits_per_param_absmax(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """The QLoRA paper's overhead of the scales: 32/B, or 8/B + 32/(B·B2)."""
    return 8 / blocksize + 32 / (blocksize * blocksize2) if double_quant else 32 / blocksize


# --------------------------------------------------------------------------- the layer
class Linear4bit(nn.Module):
    """``nn.Linear`` whose weight is stored block-wise in 4 bits and dequantized per forward."""

    def __init__(self, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = False,
                 blocksize: int = 64, compute_dtype: torch.dtype | None = None):
        super().__init__()
        packed, self.state = quantize_4bit(linear.weight.data, blocksize, quant_type, double_quant)
        self.register_buffer("packed", packed)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(),
                                                                  requires_grad=False)
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        W = dequantize_4bit(self.packed, self.state).to(dtype)   # (out, in)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), W, bias).to(x.dtype)

    def nbytes(self) -> int:
        b = bytes_4bit(self.packed.numel() * 2 - (math.prod(self.state.shape) % 2),
                       self.state.blocksize, self.state.nested)
        return b + (0 if self.bias is None else 2 * self.bias.numel())


# --------------------------------------------------------------------------- whole models
FORMATS = ("fp32", "fp16", "int8", "fp4", "nf4", "nf4-dq")


def weight_bytes(shape, fmt: str) -> int:
    """Bytes of one linear weight of ``shape (out, in)`` in ``fmt`` (see ``FORMATS``)."""
    numel = math.prod(shape)
    if fmt == "fp32":
        return 4 * numel
    if fmt == "fp16":
        return 2 * numel
    if fmt == "int8":
        return numel + 4 * shape[0]
    if fmt in ("fp4", "nf4"):
        return bytes_4bit(numel, 64, False)
    if fmt == "nf4-dq":
        return bytes_4bit(numel, 64, True)
    raise ValueError(f"unknown format {fmt!r}")


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules inside the decoder layers (what bitsandbytes quantizes in a
    transformer; embeddings, norms and the tied LM head stay in 16-bit)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def model_bytes(model: nn.Module, fmt: str) -> int:
    """Exact bytes of ``model``'s parameters when the decoder layers' linear weights are in
    ``fmt`` and everything else in fp16 (fp32 for ``fmt="fp32"``). Tied parameters count once."""
    other = 4 if fmt == "fp32" else 2
    quant = {n + ".weight" for n in quantized_linear_names(model)}
    total, seen = 0, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += weight_bytes(tuple(p.shape), fmt) if name in quant else other * p.numel()
    return total


def replace_linears(model: nn.Module, make) -> nn.Module:
    """Replace every linear of ``quantized_linear_names(model)`` by ``make(linear)``, in place."""
    for name in quantized_linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return model
