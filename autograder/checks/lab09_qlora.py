"""How the hidden checks of lab09_qlora are judged (trusted side; never in the kernel).

References: peft's own LoRA layer (``peft.tuners.lora.Linear``) with the case's weights for
``LoRALinear``; ``llmopt.nf4`` (bit-exact with bitsandbytes) for the NF4 base of
``QLoRALinear``; plain ``W₀ + (α/r)·BA`` arithmetic on the tiny model for ``apply_lora`` and
``merge_lora``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from autograder import static
from llmopt import nf4 as ref4
from llmopt.testing import compare

from ..cases.lab09_qlora import adapter_values, linear_names, make_linear, tiny_model

# The sandbox shows these llmopt modules (and what they import); lora stays hidden.
# nf4 is lab08's reference, on which QLoRA builds (lab08 comes first).
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "instructions", "nf4", "viz.lora"]

_ADAPTER_TOL = dict(rtol=1e-4, atol=1e-5)


def _nonfinite(out: dict) -> str | None:
    for k, t in out.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return f"{k} contains NaN or inf"
    return None


def _peft_reference(case: dict, scaling_alpha=None) -> torch.Tensor:
    """peft's LoRA layer around the same base with the case's A and B, on x (float64)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    alpha = case["alpha"] if scaling_alpha is None else scaling_alpha
    base = make_linear(case).double()
    layer = PeftLinear(base, "default", LoraConfig(r=case["r"], lora_alpha=alpha), r=case["r"],
                       lora_alpha=alpha).double()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(case["A"].double())
        layer.lora_B["default"].weight.copy_(case["B"].double())
        return layer(case["x"].double()).float()


def _plain(case, scale):
    x = case["x"].double()
    y = x @ case["W"].double().T
    if case["bias"] is not None:
        y = y + case["bias"].double()
    return (y + scale * (x @ case["A"].double().T) @ case["B"].double().T).float()


# --------------------------------------------------------------------------- LoRALinear
def verify_LoRALinear(case: dict, out: dict) -> str | None:
    r, alpha = case["r"], case["alpha"]
    where = f"(d_in={case['d_in']}, d_out={case['d_out']}, r={r}, alpha={alpha})"
    if tuple(out["A_init"].shape) != (r, case["d_in"]) or tuple(out["B_init"].shape) != (case["d_out"], r):
        return (f"A has shape {tuple(out['A_init'].shape)} and B {tuple(out['B_init'].shape)} {where}: "
                f"expected A (r, in_features) = {(r, case['d_in'])} and B (out_features, r) = "
                f"{(case['d_out'], r)}")
    msg = _nonfinite(out)
    if msg:
        return msg + f" {where}"
    if bool(out["B_init"].abs().max() > 0):
        return (f"B is not zero after __init__ {where}: B initialised randomly changes the model "
                "before any training — B = 0 so that the adapted model starts as the base model")
    if float(out["A_init"].abs().max()) == 0.0:
        return f"A is all zeros after __init__ {where}: with A = B = 0 no gradient ever reaches B (A: Kaiming)"
    y0 = _plain(case, 0.0)
    msg = compare(out["y_init"], y0, name="output before training", rtol=1e-4, atol=1e-5)
    if msg:
        return msg + f" {where} — before training the layer must equal its base linear (B = 0)"
    if bool(out["base_requires_grad"].any()) or bool(out["base_got_grad"].any()):
        return (f"the base linear's weight/bias still require grad {where}: freeze the base "
                "(requires_grad_(False)); only A and B train")
    n_ab = r * (case["d_in"] + case["d_out"])
    if int(out["trainable"]) != n_ab:
        return (f"{int(out['trainable'])} trainable parameters {where}, expected r·(d_in + d_out) = "
                f"{n_ab}: only A and B train")
    expected = _peft_reference(case)
    msg = compare(out["y"], expected, name="output with A and B set", **_ADAPTER_TOL)
    if msg:
        if compare(out["y"], _plain(case, alpha), **_ADAPTER_TOL) is None:
            return msg + f" {where} — scaled by alpha instead of scaling = alpha / r"
        if compare(out["y"], _plain(case, 1.0), **_ADAPTER_TOL) is None:
            return msg + f" {where} — the LoRA term is not scaled: multiply by alpha / r"
        if case["d_in"] == case["d_out"]:
            alt = _plain(dict(case, A=case["B"].T, B=case["A"].T), alpha / r)
            if compare(out["y"], alt, **_ADAPTER_TOL) is None:
                return msg + f" {where} — A and B swapped: y = base(x) + (alpha/r) · x Aᵀ Bᵀ"
        return msg + f" {where} (compared with peft's LoRA layer holding the same weights)"
    if float(out["A_grad"].abs().sum()) == 0.0:
        return f"no gradient reached A {where}: compute the LoRA term from the parameters A and B"
    return None


# --------------------------------------------------------------------------- apply_lora
def _adapted_logits(case: dict, scale_of=lambda r, a: a / r) -> torch.Tensor:
    """The tiny model with W + (alpha/r)·BA on the targets, in float64."""
    model = tiny_model(case["model_seed"]).double()
    with torch.no_grad():
        for path in linear_names(model):
            if path.rsplit(".", 1)[-1] in case["target_modules"]:
                lin = model.get_submodule(path)
                A, B = adapter_values(case["adapter_seed"], path, case["r"], lin.in_features, lin.out_features)
                lin.weight += scale_of(case["r"], case["alpha"]) * (B.double() @ A.double())
        return model(case["ids"]).float()


def verify_apply_lora(case: dict, out: dict) -> str | None:
    model = tiny_model(case["model_seed"])
    names = linear_names(model)
    targets = case["target_modules"]
    expected_mask = torch.tensor([p.rsplit(".", 1)[-1] in targets for p in names])
    wrapped = out["wrapped"]
    if tuple(wrapped.shape) != (len(names),):
        return f"wrapped: shape {tuple(wrapped.shape)}, expected ({len(names)},)"
    where = f"target_modules={list(targets)}"
    if not torch.equal(wrapped.bool(), expected_mask):
        got = sorted({p.rsplit(".", 1)[-1] for p, w in zip(names, wrapped.tolist()) if w})
        missing = sorted({p for p, w, e in zip(names, wrapped.tolist(), expected_mask.tolist()) if e and not w})
        extra = sorted({p for p, w, e in zip(names, wrapped.tolist(), expected_mask.tolist()) if w and not e})
        hint = (f" — {len(missing)} named projections were left unwrapped (e.g. {missing[0]})" if missing
                else f" — {len(extra)} projections that were not named got adapters (e.g. {extra[0]})")
        return (f"LoRA on the wrong projections for {where}: adapters found on {got or 'none'}"
                f"{hint}; wrap exactly the linears whose name is in target_modules")
    msg = _nonfinite(out)
    if msg:
        return msg + f" ({where})"
    base = tiny_model(case["model_seed"]).double()
    with torch.no_grad():
        base_logits = base(case["ids"]).float()
    msg = compare(out["logits_init"], base_logits, name="logits right after apply_lora", rtol=1e-4, atol=1e-4)
    if msg:
        return msg + f" ({where}) — before training the adapted model must equal the base model (B = 0)"
    n_ab = sum(case["r"] * (model.get_submodule(p).in_features + model.get_submodule(p).out_features)
               for p, e in zip(names, expected_mask.tolist()) if e)
    if int(out["trainable"]) != n_ab:
        hint = (" — the base weights are left trainable: freeze every parameter but the adapters"
                if int(out["trainable"]) > n_ab else "")
        return (f"{int(out['trainable'])} trainable parameters after apply_lora ({where}), expected "
                f"{n_ab} (r·(d_in + d_out) per adapter){hint}")
    if int(out["trainable_adapters"]) != n_ab:
        return f"the trainable parameters are not the adapters' A and B ({where})"
    expected = _adapted_logits(case)
    msg = compare(out["logits"], expected, name="logits with the adapters set", rtol=1e-4, atol=1e-4)
    if msg:
        if compare(out["logits"], _adapted_logits(case, lambda r, a: a), rtol=1e-4, atol=1e-4) is None:
            return msg + f" ({where}) — scaled by alpha instead of alpha / r"
        return msg + f" ({where}): y = W₀x + b + (alpha/r)·B A x in every wrapped projection"
    return None


# --------------------------------------------------------------------------- merge_lora
def verify_merge_lora(case: dict, out: dict) -> str | None:
    where = f"target_modules={list(case['target_modules'])}, r={case['r']}, alpha={case['alpha']}"
    msg = _nonfinite(out)
    if msg:
        return msg + f" ({where})"
    model = tiny_model(case["model_seed"])
    names = linear_names(model)
    plain = out["plain_linear"]
    if tuple(plain.shape) != (len(names),) or not bool(plain.all()):
        left = [p for p, ok in zip(names, plain.tolist()) if not ok]
        return (f"after merge_lora {len(left)} projections are not plain nn.Linear (e.g. {left[:1]}) "
                f"({where}): put the base linear back with the merged weight")
    for p in names:
        if p.rsplit(".", 1)[-1] not in case["target_modules"]:
            continue
        lin = model.get_submodule(p)
        A, B = adapter_values(case["adapter_seed"], p, case["r"], lin.in_features, lin.out_features)
        W0, BA = lin.weight.detach().double(), B.double() @ A.double()
        exp = (W0 + case["alpha"] / case["r"] * BA).float()
        key = f"W:{p}"
        if key not in out:
            return f"no merged weight found at {p} ({where})"
        msg = compare(out[key], exp, name=f"merged weight of {p}", rtol=1e-4, atol=1e-5)
        if msg:
            if compare(out[key], (W0 + BA).float(), rtol=1e-4, atol=1e-5) is None:
                return msg + f" ({where}) — merge without the scale: W = W₀ + (alpha/r)·B A"
            if compare(out[key], W0.float(), rtol=1e-4, atol=1e-5) is None:
                return msg + f" ({where}) — the weight is unchanged: add (alpha/r)·B A to it"
            return msg + f" ({where}): W = W₀ + (alpha/r)·B A (B is (out, r), A is (r, in))"
    msg = compare(out["logits_after"], out["logits_before"].float(), name="merged model's logits",
                  rtol=1e-4, atol=1e-4)
    if msg:
        return msg + f" ({where}) — the merged model must give the unmerged model's outputs"
    return None


# --------------------------------------------------------------------------- QLoRALinear
def _dequantized(case: dict) -> torch.Tensor:
    packed, state = ref4.quantize_4bit(case["W"], 64, "nf4", case["double_quant"])
    return ref4.dequantize_4bit(packed, state).double()


def verify_QLoRALinear(case: dict, out: dict) -> str | None:
    r, alpha = case["r"], case["alpha"]
    d_in, d_out = case["d_in"], case["d_out"]
    where = f"(d_in={d_in}, d_out={d_out}, r={r}, alpha={alpha}, double_quant={case['double_quant']})"
    msg = _nonfinite(out)
    if msg:
        return msg + f" {where}"
    n = d_in * d_out
    adapters = r * (d_in + d_out)
    bias = d_out if case["bias"] is not None else 0
    if int(out["max_float_tensor"]) >= n or int(out["held_float_numel"]) - adapters - bias >= n // 4:
        return (f"the layer holds {int(out['held_float_numel'])} floating-point values {where}, "
                f"about a full-precision copy of the {d_out}×{d_in} base weight: QLoRA keeps only "
                "the NF4 codes and block scales (dequantize in forward, keep no copy)")
    fp16 = 2 * n
    base_bytes = int(out["held_bytes"]) - 4 * adapters - 4 * bias
    if base_bytes > 0.3 * fp16:
        return (f"the base weight takes {base_bytes} bytes {where}, {base_bytes / fp16:.2f}× of fp16: "
                "NF4 is ⌈n/2⌉ bytes plus the block absmax (≤ 0.3× of fp16)")
    if not bool(out["trainable_is_AB"]) or int(out["trainable_numel"]) != adapters:
        return (f"{int(out['trainable_numel'])} trainable values {where}, expected only A and B "
                f"({adapters}): the NF4 base and its bias are frozen")
    x = case["x"].double()
    Wd = _dequantized(case)
    y0 = x @ Wd.T
    if case["bias"] is not None:
        y0 = y0 + case["bias"].double()
    msg = compare(out["y_init"], y0.float(), name="output before training", rtol=1e-3, atol=1e-4)
    if msg:
        exact = x @ case["W"].double().T + (0 if case["bias"] is None else case["bias"].double())
        if compare(out["y_init"], exact.float(), rtol=1e-4, atol=1e-5) is None:
            return msg + f" {where} — this is the full-precision weight: the base must be the NF4 (dequantized) weight"
        return msg + f" {where} — before training: dequant(W₀) x + b (B = 0)"
    lora = (x @ case["A"].double().T) @ case["B"].double().T
    msg = compare(out["y"], (y0 + alpha / r * lora).float(), name="output with A and B set",
                  rtol=1e-3, atol=1e-4)
    if msg:
        if compare(out["y"], (y0 + alpha * lora).float(), rtol=1e-3, atol=1e-4) is None:
            return msg + f" {where} — scaled by alpha instead of alpha / r"
        return msg + f" {where}: dequant(W₀) x + b + (alpha/r)·x Aᵀ Bᵀ"
    return None


# --------------------------------------------------------------------------- prepare_qlora
def verify_prepare_qlora(case: dict, out: dict) -> str | None:
    where = f"target_modules={list(case['target_modules'])}"
    model = tiny_model(case["model_seed"], d_model=64)
    names = linear_names(model)
    expected = torch.tensor([p.rsplit(".", 1)[-1] in case["target_modules"] for p in names])
    q = out["quantized"]
    if tuple(q.shape) != (len(names),) or not torch.equal(q.bool(), expected):
        return (f"the quantized projections are not the targets ({where}): replace exactly the "
                "named linears by your QLoRALinear")
    with torch.no_grad():
        for p, e in zip(names, expected.tolist()):
            if e:
                lin = model.get_submodule(p)
                packed, state = ref4.quantize_4bit(lin.weight.data, 64, "nf4", True)
                lin.weight.copy_(ref4.dequantize_4bit(packed, state))
        ref_logits = model.double()(case["ids"]).float()
    msg = compare(out["logits_init"], ref_logits, name="logits right after prepare_qlora", rtol=1e-3, atol=1e-3)
    if msg:
        return msg + f" ({where}) — before training: the model with NF4 (double-quantized) weights, B = 0"
    if int(out["changed_other"]) > 0:
        return (f"{int(out['changed_other'])} values outside the adapters changed during 3 training "
                f"steps ({where}): freeze the base (weights, biases, norms, embeddings); only A and B train")
    if int(out["changed_adapter"]) == 0:
        return f"no adapter value changed during 3 training steps ({where}): A and B must require grad"
    losses = out["losses"]
    if not torch.isfinite(losses).all():
        return f"training on the prepared model gave a non-finite loss ({where})"
    return None


# --- how the parts must be computed (read from the notebook's source, see static.py) --------
_PEFT = ("peft", "*get_peft_model*", "*LoraConfig*", "*LoraModel*", "*inject_adapter*",
         "bitsandbytes", "bnb", "transformers", "accelerate")
_OWN = [static.no_dynamic_access(),
        static.no_llmopt_imports(allowed=("llmopt.nf4", "llmopt.testing")),
        static.forbids(*_PEFT, why=": this part asks for your own LoRA, not peft's layers "
                       "(get_peft_model, LoraConfig) or bitsandbytes")]
METHOD = {"LoRALinear": _OWN, "apply_lora": _OWN,
          "merge_lora": ("merge_lora", _OWN),
          "QLoRALinear": _OWN + [static.calls("Linear4bit", "quantize_4bit", "llmopt.nf4.Linear4bit",
                                              "llmopt.nf4.quantize_4bit",
                                              what="NF4 quantization (llmopt.nf4's quantize_4bit or Linear4bit)")],
          "prepare_qlora": _OWN}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----
def _merge_outputs(case):
    model = tiny_model(case["model_seed"])
    spec = {"logits_before": ("float", None), "logits_after": ("float", None), "plain_linear": ("bool", (None,))}
    for p in linear_names(model):
        if p.rsplit(".", 1)[-1] in case["target_modules"]:
            spec[f"W:{p}"] = ("float", tuple(model.get_submodule(p).weight.shape))
    return spec


OUTPUTS = {
    "LoRALinear": lambda case: {
        "y_init": ("float", (2, None, case["d_out"])), "y": ("float", (2, None, case["d_out"])),
        "A_init": ("float", None), "B_init": ("float", None), "A_grad": ("float", None),
        "base_requires_grad": ("bool", (None,)), "base_got_grad": ("bool", (None,)), "trainable": ("int", ())},
    "apply_lora": lambda case: {
        "wrapped": ("bool", (None,)), "logits_init": ("float", (2, 7, 97)), "logits": ("float", (2, 7, 97)),
        "trainable": ("int", ()), "trainable_adapters": ("int", ()), "n_params_before": ("int", ())},
    "merge_lora": _merge_outputs,
    "QLoRALinear": lambda case: {
        "y_init": ("float", (2, None, case["d_out"])), "y": ("float", (2, None, case["d_out"])),
        "held_float_numel": ("int", ()), "held_bytes": ("int", ()), "max_float_tensor": ("int", ()),
        "trainable_numel": ("int", ()), "trainable_is_AB": ("bool", ())},
    "prepare_qlora": lambda case: {
        "quantized": ("bool", (None,)), "logits_init": ("float", (4, 9, 97)),
        "changed_adapter": ("int", ()), "changed_other": ("int", ()), "losses": ("float", (3,))},
}
