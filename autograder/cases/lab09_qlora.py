"""Hidden-check cases of lab09_qlora (run in the student's kernel; no answers here).

What is recorded about a module besides its outputs (which parameters require grad, what
tensors it holds) is the student's claim, read in the kernel; the verifier judges it against
the contract, and the numbers (outputs, merged weights) against its own reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import gen as _gen, randint as _randint
from .lab01_kv_cache import tiny_model

_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def linear_names(model: nn.Module) -> list[str]:
    """Paths of the decoder's projections, in a fixed order (what apply_lora may target)."""
    return [f"layers.{i}.{'attn' if p.endswith('proj') else 'mlp'}.{p}"
            for i in range(len(model.layers)) for p in _LINEARS]


def make_linear(case: dict) -> nn.Linear:
    lin = nn.Linear(case["d_in"], case["d_out"], bias=case["bias"] is not None)
    with torch.no_grad():
        lin.weight.copy_(case["W"])
        if case["bias"] is not None:
            lin.bias.copy_(case["bias"])
    return lin


def _linear_case(g, d_in, d_out, r, alpha, bias=True, T=5):
    return dict(d_in=d_in, d_out=d_out, r=r, alpha=alpha,
                W=torch.randn(d_out, d_in, generator=g) * 0.05,
                bias=torch.randn(d_out, generator=g) * 0.1 if bias else None,
                A=torch.randn(r, d_in, generator=g) * 0.1, B=torch.randn(d_out, r, generator=g) * 0.1,
                x=torch.randn(2, T, d_in, generator=g), init_seed=_randint(g, 0, 2 ** 30))


def _set_adapter(module, A, B):
    with torch.no_grad():
        module.A.copy_(A.to(module.A.dtype))
        module.B.copy_(B.to(module.B.dtype))


def _held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor the module holds: its state_dict, and tensors kept as plain attributes of
    it, of its submodules and of objects they hold (a quantization state), one level deep."""
    seen, found = set(), []

    def add(t):
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            found.append(t)

    for t in module.state_dict(keep_vars=True).values():
        add(t)
    for m in module.modules():
        for v in vars(m).values():
            add(v)
            if isinstance(v, (list, tuple)):
                for x in v:
                    add(x)
            elif hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type)):
                for x in vars(v).values():
                    add(x)
                    if hasattr(x, "__dict__") and not isinstance(x, (nn.Module, type, torch.Tensor)):
                        for y in vars(x).values():
                            add(y)
    return found


# --- LoRALinear(base, r, alpha, dropout=0.0) ------------------------------------------------

def inputs_LoRALinear(seed: int) -> list[dict]:
    g = _gen(seed)
    return [_linear_case(g, 16, 24, 4, 8.0), _linear_case(g, 32, 32, 8, 16.0),
            _linear_case(g, 24, 12, 2, 32.0, bias=False), _linear_case(g, 40, 20, 16, 8.0, T=3)]


def run_LoRALinear(cls, case: dict) -> dict:
    torch.manual_seed(case["init_seed"])
    base = make_linear(case)
    m = cls(base, case["r"], case["alpha"])
    x = case["x"].clone()
    with torch.no_grad():
        y_init = m(x)
    A0, B0 = m.A.detach().clone(), m.B.detach().clone()
    _set_adapter(m, case["A"], case["B"])
    y = m(x)
    y.sum().backward()
    base_train = [p.requires_grad for p in base.parameters()]
    grads = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in base.parameters()]
    return {"y_init": y_init.detach(), "y": y.detach(), "A_init": A0, "B_init": B0,
            "A_grad": m.A.grad if m.A.grad is not None else torch.zeros_like(m.A),
            "base_requires_grad": torch.tensor(base_train), "base_got_grad": torch.tensor(grads),
            "trainable": torch.tensor(sum(p.numel() for p in m.parameters() if p.requires_grad))}


# --- apply_lora(model, target_modules, r, alpha) --------------------------------------------

def inputs_apply_lora(seed: int) -> list[dict]:
    g = _gen(seed)
    targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
               ("k_proj", "out_proj", "fc2"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")]
    cases = []
    for i, t in enumerate(targets):
        r = (2, 4, 8, 4)[i]
        cases.append(dict(model_seed=seed + i, target_modules=t, r=r, alpha=float(2 * r * (i + 1)),
                          ids=torch.randint(3, 97, (2, 7), generator=g),
                          adapter_seed=_randint(g, 0, 2 ** 30)))
    return cases


def adapter_values(seed: int, path: str, r: int, d_in: int, d_out: int):
    """Deterministic (A, B) for the adapter at ``path`` (the verifier draws the same)."""
    g = torch.Generator().manual_seed(seed + sum(ord(c) * (i + 1) for i, c in enumerate(path)))
    return torch.randn(r, d_in, generator=g) * 0.2, torch.randn(d_out, r, generator=g) * 0.2


def run_apply_lora(fn, case: dict) -> dict:
    model = tiny_model(case["model_seed"])
    names = linear_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(case["adapter_seed"])
    out = fn(model, case["target_modules"], case["r"], case["alpha"])
    model = out if isinstance(out, nn.Module) else model
    with torch.no_grad():
        logits_init = model(case["ids"])
    wrapped = []
    for path in names:
        m = model.get_submodule(path)
        is_lora = isinstance(getattr(m, "A", None), torch.Tensor) and isinstance(getattr(m, "B", None), torch.Tensor)
        wrapped.append(is_lora)
        if is_lora:
            d_out, d_in = m.B.shape[0], m.A.shape[1]
            _set_adapter(m, *adapter_values(case["adapter_seed"], path, m.A.shape[0], d_in, d_out))
    with torch.no_grad():
        logits = model(case["ids"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in model.named_parameters()
                   if p.requires_grad and n.rsplit(".", 1)[-1] in ("A", "B"))
    return {"wrapped": torch.tensor(wrapped), "logits_init": logits_init, "logits": logits,
            "trainable": torch.tensor(trainable), "trainable_adapters": torch.tensor(adapters),
            "n_params_before": torch.tensor(n_params)}


# --- merge_lora(model) (recorded with the student's LoRALinear: check(..., (LoRALinear, merge_lora)))

def inputs_merge_lora(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for i, (t, r) in enumerate([(("q_proj", "v_proj"), 4), (("k_proj", "out_proj", "fc1"), 2),
                                (("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), 8)]):
        cases.append(dict(model_seed=seed + 10 + i, target_modules=t, r=r, alpha=float(4 * r + 3 * i),
                          ids=torch.randint(3, 97, (2, 6), generator=g), adapter_seed=_randint(g, 0, 2 ** 30)))
    return cases


def run_merge_lora(fns, case: dict) -> dict:
    cls, merge = fns
    model = tiny_model(case["model_seed"])
    torch.manual_seed(case["adapter_seed"])
    for path in linear_names(model):
        if path.rsplit(".", 1)[-1] in case["target_modules"]:
            parent, _, child = path.rpartition(".")
            lin = model.get_submodule(path)
            m = cls(lin, case["r"], case["alpha"])
            _set_adapter(m, *adapter_values(case["adapter_seed"], path, case["r"],
                                            lin.in_features, lin.out_features))
            setattr(model.get_submodule(parent), child, m)
    with torch.no_grad():
        before = model(case["ids"])
    out = merge(model)
    model = out if isinstance(out, nn.Module) else model
    with torch.no_grad():
        after = model(case["ids"])
    plain = [type(model.get_submodule(p)) is nn.Linear for p in linear_names(model)]
    weights = {}
    for p in linear_names(model):
        if p.rsplit(".", 1)[-1] in case["target_modules"]:
            w = getattr(model.get_submodule(p), "weight", None)
            ref_shape = tuple(tiny_model(case["model_seed"]).get_submodule(p).weight.shape)
            ok = isinstance(w, torch.Tensor) and tuple(w.shape) == ref_shape
            weights[f"W:{p}"] = w.detach().clone() if ok else torch.zeros(ref_shape)  # judged by plain_linear
    return {"logits_before": before, "logits_after": after, "plain_linear": torch.tensor(plain), **weights}


# --- QLoRALinear(linear, r, alpha, dropout=0.0, double_quant=True, ...) ---------------------

def inputs_QLoRALinear(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = [_linear_case(g, 64, 32, 4, 8.0), _linear_case(g, 128, 64, 8, 16.0),
             _linear_case(g, 96, 48, 2, 4.0, bias=False), _linear_case(g, 256, 128, 16, 32.0, T=3)]
    for i, c in enumerate(cases):
        c["double_quant"] = i % 2 == 1
    return cases


def run_QLoRALinear(cls, case: dict) -> dict:
    torch.manual_seed(case["init_seed"])
    lin = make_linear(case)
    m = cls(lin, case["r"], case["alpha"], double_quant=case["double_quant"])
    del lin
    x = case["x"].clone()
    with torch.no_grad():
        y_init = m(x)
    _set_adapter(m, case["A"], case["B"])
    y = m(x)
    y.float().sum().backward()
    held = _held_tensors(m)
    float_numel = sum(t.numel() for t in held if t.is_floating_point())
    held_bytes = sum(t.numel() * t.element_size() for t in held)
    trainable = sorted(n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad)
    return {"y_init": y_init.detach().float(), "y": y.detach().float(),
            "held_float_numel": torch.tensor(float_numel), "held_bytes": torch.tensor(held_bytes),
            "max_float_tensor": torch.tensor(max([t.numel() for t in held if t.is_floating_point()], default=0)),
            "trainable_numel": torch.tensor(sum(p.numel() for p in m.parameters() if p.requires_grad)),
            "trainable_is_AB": torch.tensor(trainable == ["A", "B"])}


# --- prepare_qlora(model, target_modules, r, alpha): only the adapters train ----------------

def inputs_prepare_qlora(seed: int) -> list[dict]:
    g = _gen(seed)
    cases = []
    for i, (t, r) in enumerate([(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), 4),
                                (("q_proj", "v_proj"), 8)]):
        cases.append(dict(model_seed=seed + 20 + i, target_modules=t, r=r, alpha=float(2 * r),
                          ids=torch.randint(3, 97, (4, 9), generator=g), init_seed=_randint(g, 0, 2 ** 30)))
    return cases


def run_prepare_qlora(fn, case: dict) -> dict:
    model = tiny_model(case["model_seed"], d_model=64)
    torch.manual_seed(case["init_seed"])
    out = fn(model, case["target_modules"], case["r"], case["alpha"])
    model = out if isinstance(out, nn.Module) else model
    names = linear_names(model)
    quantized = [not isinstance(getattr(model.get_submodule(p), "weight", None), nn.Parameter)
                 for p in names]
    ids = case["ids"]
    with torch.no_grad():
        logits_init = model(ids).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    if params:
        opt = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(3):
            logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
    changed_adapter = changed_other = 0
    for n, p in model.named_parameters():
        diff = int((p.detach() != before[n]).sum())
        if n.rsplit(".", 1)[-1] in ("A", "B"):
            changed_adapter += diff
        else:
            changed_other += diff
    for n, b in model.named_buffers():
        if n in bufs and b.shape == bufs[n].shape:
            changed_other += int((b != bufs[n]).sum())
    return {"quantized": torch.tensor(quantized), "logits_init": logits_init,
            "changed_adapter": torch.tensor(changed_adapter), "changed_other": torch.tensor(changed_other),
            "losses": torch.tensor(losses + [float("nan")] * (3 - len(losses)))}
