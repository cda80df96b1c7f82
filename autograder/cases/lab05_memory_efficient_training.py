"""Hidden-check cases of lab05_memory_efficient_training (run in the student's kernel; no answers here).

Checkpointing cases use dropout (the recomputation must draw the same mask) and count how the
function or the blocks are called (once under no_grad in the forward pass, once more with grad
in backward): an extra, early failure for a lazy shortcut, never a reason to pass. Accumulation
cases use batches whose rows do not split evenly into the micro-batches. Loss-scaling cases
feed the same stream of gradients, with infs and NaNs injected, to the student's scaler; the
verifier feeds it to ``torch.amp.GradScaler``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from llmopt.gpt import GPT, Block, GPTConfig

from . import DTYPES as _DTYPES, gen as _gen, randint as _randint


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


# --------------------------------------------------------------------------- modules of the cases
def block_config(d: int = 32, dropout: float = 0.0, attention_dropout: float = 0.0, n_layer: int = 1) -> GPTConfig:
    return GPTConfig(vocab_size=64, max_position_embeddings=64, n_layer=n_layer, n_head=2, d_model=d,
                     d_ff=2 * d, dropout=dropout, attention_dropout=attention_dropout)


def build_function(case: dict):
    """(module, fn, tensor inputs) of a checkpoint / saved-bytes case, the same for the same case."""
    torch.manual_seed(case["init"])
    kind, d = case["kind"], case["d"]
    g = _gen(case["init"] + 7)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(d, 3 * d), nn.ReLU(), nn.Dropout(case["p"]), nn.Linear(3 * d, d)).train()
        return m, (lambda x: m(x)), [torch.randn(case["rows"], d, generator=g)]
    if kind == "block":
        m = Block(block_config(d, case["p"], case["p"] / 2), 0).train()
        return m, (lambda x: m(x)), [torch.randn(2, case["rows"], d, generator=g)]
    if kind == "two_inputs":                                    # fn(x, y, k): y gates x, k a float
        m = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(case["p"]), nn.Linear(d, d)).train()
        return m, (lambda x, y, k: m(x) * torch.sigmoid(y) * k), \
            [torch.randn(case["rows"], d, generator=g), torch.randn(case["rows"], d, generator=g)]
    if kind == "shared":                                        # one tensor saved by several ops
        m = nn.Linear(d, d, bias=False)

        def fn(x):
            r = torch.relu(m(x))
            return r * r + r.sum(-1, keepdim=True)
        return m, fn, [torch.randn(case["rows"], d, generator=g)]
    if kind == "tanh_chain":                                    # saved outputs, views of x
        m = nn.Linear(d, d)
        return m, (lambda x: torch.tanh(m(x.t().t())).exp() * 2), [torch.randn(case["rows"], d, generator=g)]
    raise ValueError(kind)


def call_args(case: dict, tensors):
    return list(tensors) + ([case["k"]] if case["kind"] == "two_inputs" else [])


def loss_weights(y: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(y.shape, generator=_gen(seed + 11))


# --- checkpoint(fn, *args) -------------------------------------------------------------------------

def inputs_checkpoint(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 1)
    return [dict(kind="mlp", d=16, rows=5, p=0.3, init=seed * 10 + 1, drop=_randint(g, 0, 10**6)),
            dict(kind="block", d=32, rows=7, p=0.2, init=seed * 10 + 2, drop=_randint(g, 0, 10**6)),
            dict(kind="two_inputs", d=12, rows=6, p=0.25, k=1.5, init=seed * 10 + 3, drop=_randint(g, 0, 10**6)),
            dict(kind="mlp", d=24, rows=3, p=0.0, init=seed * 10 + 4, drop=_randint(g, 0, 10**6))]


def run_checkpoint(fn, case: dict) -> dict:
    module, f, tensors = build_function(case)
    calls = []

    def counted(*args):
        calls.append(torch.is_grad_enabled())
        return f(*args)

    xs = [t.clone().requires_grad_(True) for t in tensors]
    torch.manual_seed(case["drop"])
    y = fn(counted, *call_args(case, xs))
    raised = False
    try:
        (y * loss_weights(y, case["init"])).sum().backward()
    except RuntimeError:
        raised = True
    return {"y": y.detach(), "x_grads": torch.stack([_flat_grads([x]) for x in xs]),
            "param_grads": _flat_grads(module.parameters()),
            "no_x_grad": torch.tensor([x.grad is None for x in xs]),
            "calls": torch.tensor(len(calls)), "forward_grad": torch.tensor(bool(calls and calls[0])),
            "backward_raised": torch.tensor(raised)}


# --- checkpoint_sequential(blocks, x, segments) ----------------------------------------------------

def inputs_checkpoint_sequential(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 2)
    return [dict(n=9, segments=None, p=0.2, init=seed * 10 + 1, drop=_randint(g, 0, 10**6)),
            dict(n=7, segments=None, p=0.1, init=seed * 10 + 2, drop=_randint(g, 0, 10**6)),
            dict(n=10, segments=3, p=0.2, init=seed * 10 + 3, drop=_randint(g, 0, 10**6)),
            dict(n=_randint(g, 12, 17), segments=None, p=0.0, init=seed * 10 + 4, drop=_randint(g, 0, 10**6))]


def build_blocks(case: dict):
    torch.manual_seed(case["init"])
    cfg = block_config(16, case["p"], 0.0)
    blocks = nn.ModuleList(Block(cfg, i) for i in range(case["n"])).train()
    x = torch.randn(2, 5, 16, generator=_gen(case["init"] + 7))
    return blocks, x


def run_checkpoint_sequential(fn, case: dict) -> dict:
    blocks, x = build_blocks(case)
    order, grad_mode = [], []
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: (order.append(i), grad_mode.append(torch.is_grad_enabled())) and None)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(case["drop"])
    y = fn(blocks, x) if case["segments"] is None else fn(blocks, x, case["segments"])
    raised = False
    try:
        (y * loss_weights(y, case["init"])).sum().backward()
    except RuntimeError:
        raised = True
    n = case["n"]
    seq = torch.full((3 * n,), -1, dtype=torch.int64)
    mode = torch.zeros(3 * n, dtype=torch.bool)
    k = min(len(order), 3 * n)
    seq[:k] = torch.tensor(order[:k], dtype=torch.int64)
    mode[:k] = torch.tensor(grad_mode[:k], dtype=torch.bool)
    return {"y": y.detach(), "x_grad": _flat_grads([x]), "param_grads": _flat_grads(blocks.parameters()),
            "order": seq, "grad_enabled": mode, "n_calls": torch.tensor(len(order)),
            "backward_raised": torch.tensor(raised)}


# --- saved_activation_bytes(fn, *args) -> int ------------------------------------------------------

def inputs_saved_activation_bytes(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 3)
    return [dict(kind="mlp", d=8 * _randint(g, 2, 6), rows=_randint(g, 3, 9), p=0.0, init=seed * 10 + 1),
            dict(kind="mlp", d=16, rows=_randint(g, 3, 9), p=0.5, init=seed * 10 + 2),
            dict(kind="shared", d=8 * _randint(g, 1, 4), rows=_randint(g, 2, 7), init=seed * 10 + 3),
            dict(kind="tanh_chain", d=12, rows=_randint(g, 2, 7), init=seed * 10 + 4),
            dict(kind="block", d=16, rows=_randint(g, 3, 9), p=0.0, init=seed * 10 + 5)]


def run_saved_activation_bytes(fn, case: dict) -> dict:
    module, f, tensors = build_function(case)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    torch.manual_seed(case["init"])
    return {"bytes": torch.tensor(int(fn(f, *call_args(case, xs))))}


# --- train_step(model, batch, *, accum_steps, dtype, checkpoint) -> loss -----------------------------

def inputs_train_step(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 4)
    return [dict(B=6, T=8, accum_steps=1, checkpoint=False, init=seed * 10 + 1, data=_randint(g, 0, 10**6)),
            dict(B=7, T=8, accum_steps=3, checkpoint=False, init=seed * 10 + 2, data=_randint(g, 0, 10**6)),
            dict(B=5, T=6, accum_steps=2, checkpoint=False, init=seed * 10 + 3, data=_randint(g, 0, 10**6)),
            dict(B=9, T=5, accum_steps=4, checkpoint=False, init=seed * 10 + 4, data=_randint(g, 0, 10**6)),
            dict(B=5, T=8, accum_steps=3, checkpoint=True, init=seed * 10 + 5, data=_randint(g, 0, 10**6))]


def build_model(case: dict):
    torch.manual_seed(case["init"])
    model = GPT(block_config(16, n_layer=4)).train()
    batch = torch.randint(0, 64, (case["B"], case["T"] + 1), generator=_gen(case["data"]))
    return model, batch


def run_train_step(fn, case: dict) -> dict:
    model, batch = build_model(case)
    for p in model.parameters():                        # a previous step's gradients
        p.grad = torch.full_like(p, 0.5)
    loss = fn(model, batch.clone(), accum_steps=case["accum_steps"], dtype=None, checkpoint=case["checkpoint"])
    return {"loss": torch.as_tensor(float(loss), dtype=torch.float64), "grads": _flat_grads(model.parameters())}


# --- GradScaler(init_scale, growth_factor, backoff_factor, growth_interval) --------------------------

def inputs_GradScaler(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 5)
    cases = []
    for kw, steps in ((dict(init_scale=2.0 ** 12, growth_factor=2.0, backoff_factor=0.5, growth_interval=3), 24),
                      (dict(init_scale=1000.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=2), 20),
                      (dict(init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=4), 30),
                      (dict(init_scale=2.0 ** 126, growth_factor=4.0, backoff_factor=0.5, growth_interval=1), 8)):
        bad = torch.rand(steps, generator=g) < 0.3
        bad[1] = True
        bad[2] = True                                  # two skipped steps in a row
        bad[5] = False
        nan = bad & (torch.rand(steps, generator=g) < 0.3)
        unscale = torch.rand(steps, generator=g) < 0.35
        unscale[5] = True
        cases.append(dict(**kw, steps=steps, grads=torch.randn(steps, 5, generator=g) * 1e-3,
                          bad=bad, nan=nan, unscale=unscale))
    cases.append(dict(init_scale=128.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=5, steps=0,
                      double_unscale=True))
    return cases


def scaler_stream(case: dict):
    """The gradients of each step, with inf and NaN injected, as the loss (p · g).sum() gives them."""
    out = []
    for i in range(case["steps"]):
        v = case["grads"][i].clone()
        if bool(case["bad"][i]):
            v[i % v.numel()] = float("nan") if bool(case["nan"][i]) else float("inf")
        out.append(v)
    return out


def drive_scaler(scaler, case: dict) -> dict:
    """The stream through ``scaler``: scale the loss, backward, [unscale_ and clip], step, update."""
    if case.get("double_unscale"):
        p = nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([p], lr=0.1)
        scaler.scale(p.sum()).backward()
        scaler.unscale_(opt)
        try:
            scaler.unscale_(opt)
            raised = False
        except RuntimeError:
            raised = True
        return {"second_unscale_raises": torch.tensor(raised)}
    p = nn.Parameter(torch.zeros(case["grads"].shape[1]))
    opt = torch.optim.SGD([p], lr=0.5)
    scales, params, scaled = [], [], []
    for i, g in enumerate(scaler_stream(case)):
        opt.zero_grad()
        loss = scaler.scale((p * g).sum() + 1.0)
        scaled.append(float(loss.detach()))
        loss.backward()
        if bool(case["unscale"][i]):
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p], 1e9)       # clipping reads unscaled gradients
        scaler.step(opt)
        scaler.update()
        scales.append(float(scaler.get_scale()))
        params.append(p.detach().clone())
    return {"scales": torch.tensor(scales, dtype=torch.float64), "params": torch.stack(params),
            "scaled_loss": torch.tensor(scaled, dtype=torch.float64)}


def run_GradScaler(cls, case: dict) -> dict:
    scaler = cls(init_scale=case["init_scale"], growth_factor=case["growth_factor"],
                 backoff_factor=case["backoff_factor"], growth_interval=case["growth_interval"])
    return drive_scaler(scaler, case)


# --- MasterWeightOptimizer(params, optimizer_cls, **kwargs) -------------------------------------------

_OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam}


def inputs_MasterWeightOptimizer(seed: int) -> list[dict]:
    g = _gen(seed * 1000 + 6)
    return [dict(dtype="float16", opt="SGD", kw=dict(lr=1e-4), steps=30, scale=1.0, spread=0.0),
            dict(dtype="float16", opt="SGD", kw=dict(lr=3e-4, momentum=0.9), steps=20, scale=0.5, spread=0.5),
            dict(dtype="float16", opt="Adam", kw=dict(lr=1e-4), steps=12, scale=2e-5, spread=0.5),
            dict(dtype="bfloat16", opt="SGD", kw=dict(lr=1e-3), steps=25, scale=1.0, spread=0.3),
            dict(dtype="float16", opt="SGD", kw=dict(lr=2e-4), steps=15, scale=1.0,
                 spread=float(torch.rand(1, generator=g)))]


def master_stream(case: dict):
    """(initial fp32 weights near 1, the gradients of each step) of a case."""
    g = _gen(int(case["steps"] * 1000 + case["scale"] * 1e6) % 2**31)
    w0 = 1.0 + case["spread"] * torch.rand(8, generator=g)
    grads = case["scale"] * (1.0 + 0.5 * torch.rand(case["steps"], 8, generator=g))
    return w0, grads


def drive_master(cls, case: dict) -> dict:
    dtype = _DTYPES[case["dtype"]]
    w0, grads = master_stream(case)
    p = nn.Parameter(w0.to(dtype))
    opt = cls([p], _OPTIMIZERS[case["opt"]], **case["kw"])
    params = []
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
        opt.zero_grad()
        params.append(p.detach().clone())
    master = getattr(opt, "master_params", None)
    master = torch.full((8,), float("nan")) if not master else master[0].detach().clone()
    return {"params": torch.stack(params), "master": master,
            "model_dtype_kept": torch.tensor(p.dtype == dtype)}


def run_MasterWeightOptimizer(cls, case: dict) -> dict:
    return drive_master(cls, case)
