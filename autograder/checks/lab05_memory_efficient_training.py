"""How the hidden checks of lab05_memory_efficient_training are judged (trusted side; never in the kernel).

- ``checkpoint`` / ``checkpoint_sequential``: the outputs and every gradient must equal those of
  plain autograd on the same function, with the same dropout seed (the verifier runs it
  without checkpointing). The call counts recorded in the kernel can only fail a case (fn run
  once, or with grad enabled in the forward pass, or the wrong segments); that the recompute is
  the student's own ``torch.autograd.Function`` is read from the notebook's code (``METHOD``).
- ``saved_activation_bytes``: the verifier measures the same function with the reference.
- ``train_step``: the gradient of the full batch's mean loss, computed here without any
  accumulation, on batches whose rows do not split evenly.
- ``GradScaler``: ``torch.amp.GradScaler`` runs here on the same stream of gradients; the
  scales after every update and the parameters after every step must be the same.
- ``MasterWeightOptimizer``: the reference on the same stream; updates below fp16's
  resolution must add up in the fp32 master copy.
"""
from __future__ import annotations

import torch

from autograder import static
from llmopt import checkpointing as ref_ckpt
from llmopt import mixed_precision as ref_mp
from llmopt.testing import compare

from ..cases import lab05_memory_efficient_training as C

# The sandbox shows these llmopt modules (and what they import); checkpointing and
# mixed_precision stay hidden.
LLMOPT_VISIBLE = ["gpt", "data", "bench", "testing", "viz.memory"]


def _not_finite(out: dict, keys) -> str | None:
    for name in keys:
        t = out[name]
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            kind = "NaN" if torch.isnan(t).any() else "inf"
            return f"{name} contains {kind} ({int((~torch.isfinite(t)).sum())} of {t.numel()} entries)"
    return None


def _tol(t: torch.Tensor) -> float:
    return 1e-5 * max(1.0, float(t.abs().max()) if t.numel() else 1.0)


def _plain(case: dict):
    """Outputs and gradients of the case's function without checkpointing."""
    module, f, tensors = C.build_function(case)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    torch.manual_seed(case["drop"])
    y = f(*C.call_args(case, xs))
    (y * C.loss_weights(y, case["init"])).sum().backward()
    return (y.detach(), torch.stack([C._flat_grads([x]) for x in xs]), C._flat_grads(module.parameters()))


_NO_GRAD_HINT = (" — the recomputation in backward ran without a graph: recompute fn under "
                 "torch.enable_grad() on detached inputs that require grad, then backpropagate through it")
_RNG_HINT = (" — dropout drew a different mask in the recomputation: save the RNG state in forward "
             "(torch.get_rng_state()) and restore it before recomputing (torch.random.fork_rng + "
             "torch.set_rng_state)")


def verify_checkpoint(case: dict, out: dict) -> str | None:
    y_exp, xg_exp, pg_exp = _plain(case)
    y = out["y"]
    where = f"({case['kind']}, dropout p={case['p']})"
    if tuple(y.shape) != tuple(y_exp.shape):
        return f"output: shape {tuple(y.shape)}, expected fn's output shape {tuple(y_exp.shape)} {where}"
    msg = compare(y.float(), y_exp, rtol=1e-5, atol=1e-6, name=f"output {where}")
    if msg:
        return msg + " — checkpoint(fn, *args) must return fn(*args)"
    if bool(out["backward_raised"]):
        return f"backward raised an error {where}" + _NO_GRAD_HINT
    if int(out["calls"]) == 1:
        return (f"fn ran once {where}: nothing was recomputed — the forward pass runs fn under no_grad "
                "and saves only the inputs; backward runs fn again")
    if bool(out["forward_grad"]):
        return (f"fn ran with grad enabled in the forward pass {where}: autograd kept every activation "
                "inside it — run it under torch.no_grad() and save only the inputs")
    if int(out["calls"]) != 2:
        return f"fn ran {int(out['calls'])} times {where}; expected twice (forward, then once in backward)"
    xg, pg = out["x_grads"], out["param_grads"]
    if tuple(xg.shape) != tuple(xg_exp.shape) or tuple(pg.shape) != tuple(pg_exp.shape):
        return f"gradients: shapes {tuple(xg.shape)}, {tuple(pg.shape)}, expected {tuple(xg_exp.shape)}, {tuple(pg_exp.shape)}"
    msg = _not_finite(out, ["x_grads", "param_grads"])
    if msg:
        return msg
    if bool(out["no_x_grad"].any()) or (float(pg.abs().max()) == 0 and float(pg_exp.abs().max()) > 0):
        return f"no gradient reached {'the inputs' if bool(out['no_x_grad'].any()) else 'the parameters'} {where}" + _NO_GRAD_HINT
    for name, got, exp in (("input gradients", xg, xg_exp), ("parameter gradients", pg, pg_exp)):
        msg = compare(got, exp, rtol=1e-4, atol=_tol(exp), name=f"{name} {where}")
        if msg:
            return msg + (_RNG_HINT if case["p"] > 0 else " — backpropagate the incoming gradients "
                          "through the recomputed outputs and return the inputs' .grad")
    return None


def _segments_seen(order: list[int], n: int):
    """The recomputed segments, read from the order of the blocks' calls after the forward pass."""
    rest = order[n:]
    segs, cur = [], []
    for i in rest:
        if cur and i != cur[-1] + 1:
            segs.append(cur)
            cur = []
        cur.append(i)
    if cur:
        segs.append(cur)
    return segs


def verify_checkpoint_sequential(case: dict, out: dict) -> str | None:
    n, segments = case["n"], case["segments"]
    blocks, x = C.build_blocks(case)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(case["drop"])
    y_exp = x
    for b in blocks:
        y_exp = b(y_exp)
    (y_exp * C.loss_weights(y_exp, case["init"])).sum().backward()
    where = f"({n} blocks, segments={segments}, dropout p={case['p']})"
    y = out["y"]
    if tuple(y.shape) != tuple(y_exp.shape):
        return f"output: shape {tuple(y.shape)}, expected {tuple(y_exp.shape)} {where}"
    msg = compare(y.float(), y_exp.detach(), rtol=1e-5, atol=1e-6, name=f"output {where}")
    if msg:
        return msg + " — run every block, in order"
    if bool(out["backward_raised"]):
        return f"backward raised an error {where}" + _NO_GRAD_HINT
    order = [int(i) for i in out["order"] if int(i) >= 0]
    mode = [bool(m) for m in out["grad_enabled"][:len(order)]]
    if order[:n] != list(range(n)):
        return f"the forward pass did not run blocks 0..{n - 1} once each, in order {where}"
    s = len(ref_ckpt.segment_bounds(n, segments))
    segs = _segments_seen(order, n)
    if not segs:
        return (f"no block was recomputed in backward {where}: every segment but the last goes through "
                "your checkpoint")
    recomputed = sorted(i for g in segs for i in g)
    t = len(recomputed)                                  # blocks t..n-1: the last segment, run plainly
    if recomputed != list(range(t)):
        return (f"the blocks recomputed in backward ({recomputed}) are not the first blocks, each once "
                f"{where}: checkpoint contiguous segments; only the last may run without checkpoint")
    sizes = [len(g) for g in segs] + ([n - t] if t < n else [])
    if len(sizes) != s or max(sizes) - min(sizes) > 1:
        return (f"the blocks ran in {len(sizes)} segment(s) of sizes {sorted(sizes)} {where}; expected "
                f"{s} contiguous segments of (nearly) equal size"
                + (" — by default round(√n) segments: √n checkpoints and √n blocks recomputed at a time"
                   if segments is None else " — use the number of segments asked for"))
    if any(mode[i] for i in range(t)):
        return (f"a checkpointed block ran with grad enabled in the forward pass {where}: "
                "its activations were kept — it must run inside your checkpoint (under no_grad)")
    msg = _not_finite(out, ["x_grad", "param_grads"])
    if msg:
        return msg
    pg_exp = C._flat_grads(blocks.parameters())
    xg_exp = C._flat_grads([x])
    for name, got, exp in (("input gradient", out["x_grad"], xg_exp), ("parameter gradients", out["param_grads"], pg_exp)):
        if tuple(got.shape) != tuple(exp.shape):
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.shape)}"
        msg = compare(got, exp, rtol=1e-4, atol=_tol(exp), name=f"{name} {where}")
        if msg:
            return msg + (_RNG_HINT if case["p"] > 0 else "")
    return None


def _saved_variants(case: dict) -> dict:
    """What typical mistakes measure (for the hints only)."""
    module, f, tensors = C.build_function(case)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    args = C.call_args(case, xs)
    per_tensor, storages = [0], {}

    def pack(t):
        s = t.untyped_storage()
        base = t if t._base is None else t._base
        per_tensor[0] += 0 if isinstance(base, torch.nn.Parameter) else t.numel() * t.element_size()
        storages[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(case["init"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(*args)
    return {"per_tensor": per_tensor[0], "with_params": sum(storages.values())}


def verify_saved_activation_bytes(case: dict, out: dict) -> str | None:
    module, f, tensors = C.build_function(case)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    torch.manual_seed(case["init"])
    exp = ref_ckpt.saved_activation_bytes(f, *C.call_args(case, xs))
    got = int(out["bytes"])
    if got == exp:
        return None
    where = f"({case['kind']}, inputs {[tuple(t.shape) for t in tensors]})"
    v = _saved_variants(case)
    if got == v["with_params"]:
        return f"wrong byte count {where} — the weights were counted: parameters are not activations (leave out nn.Parameter and its views)"
    if got == v["per_tensor"] and got != exp:
        return f"wrong byte count {where} — a tensor saved by several ops (or two views of it) was counted each time: count each storage once"
    if got * 8 == exp or got == exp * 8:
        return f"wrong byte count {where} — bytes, not elements or bits"
    return (f"wrong byte count {where} — sum the bytes of every distinct storage autograd saves "
            "(torch.autograd.graph.saved_tensors_hooks), parameters left out")


def _full_batch(case: dict):
    model, batch = C.build_model(case)
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    return float(loss.detach()), C._flat_grads(model.parameters())


def _micro(case: dict, divide: int):
    """The gradient when every micro-batch's mean loss is divided by ``divide`` (k: the mean of the
    means, right only for equal micro-batches; 1: the sum of the means)."""
    model, batch = C.build_model(case)
    k = case["accum_steps"]
    for x, y in zip(batch[:, :-1].tensor_split(k), batch[:, 1:].tensor_split(k)):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (loss / divide).backward()
    return C._flat_grads(model.parameters())


def verify_train_step(case: dict, out: dict) -> str | None:
    loss_exp, g_exp = _full_batch(case)
    k = case["accum_steps"]
    where = (f"(batch of {case['B']} rows, accum_steps={k}: micro-batches of "
             f"{[len(t) for t in torch.arange(case['B']).tensor_split(k)]} rows"
             + (", checkpoint=True" if case["checkpoint"] else "") + ")")
    msg = _not_finite(out, ["loss", "grads"])
    if msg:
        return msg + f" {where}"
    g = out["grads"]
    if tuple(g.shape) != tuple(g_exp.shape):
        return f"gradients: {tuple(g.shape)}, expected {tuple(g_exp.shape)} (every parameter of the model)"
    tol = dict(rtol=1e-3, atol=1e-6 * max(1.0, float(g_exp.abs().max())) + 1e-6)
    msg = compare(g, g_exp, name=f"accumulated gradients {where}", **tol)
    if msg:
        if compare(g - 0.5, g_exp, **tol) is None:
            return msg + " — the previous step's gradients were kept: set every .grad to None (or zero) first"
        if k > 1 and (compare(g, k * g_exp, **tol) is None or compare(g, _micro(case, 1), **tol) is None):
            return msg + " — the loss was not divided: k micro-batch losses summed are k times the mean (divide each by k, or weight by its size)"
        if k > 1 and compare(g, _micro(case, k), **tol) is None:
            return msg + (" — each micro-batch loss divided by k: on unequal micro-batches that is the mean of "
                          "the means, not the batch's mean; weight each by its share b_i / B")
        return msg + " — the gradient of the mean loss over the whole batch, summed over micro-batches"
    loss = float(out["loss"])
    if abs(loss - loss_exp) > 1e-4 * max(1.0, abs(loss_exp)):
        return f"returned loss {loss:.6g} is not the full batch's mean loss {where} (relative error {abs(loss - loss_exp) / abs(loss_exp):.2e})"
    return None


def verify_GradScaler(case: dict, out: dict) -> str | None:
    ref = torch.amp.GradScaler("cpu", init_scale=case["init_scale"], growth_factor=case["growth_factor"],
                               backoff_factor=case["backoff_factor"], growth_interval=case["growth_interval"])
    exp = C.drive_scaler(ref, case)
    if case.get("double_unscale"):
        if not bool(out["second_unscale_raises"]):
            return ("a second unscale_ before update() did not raise: unscale_ once per step "
                    "(raise RuntimeError, as torch.amp.GradScaler does)")
        return None
    where = (f"(init_scale={case['init_scale']:g}, growth_factor={case['growth_factor']}, backoff_factor="
             f"{case['backoff_factor']}, growth_interval={case['growth_interval']})")
    sc, sc_exp = out["scales"], exp["scales"]
    if tuple(sc.shape) != tuple(sc_exp.shape):
        return f"scales: {sc.numel()} steps recorded, expected {sc_exp.numel()}"
    bad = [int(i) for i in (sc.double() != sc_exp.double()).nonzero().reshape(-1)]
    skipped = [i for i in range(case["steps"]) if bool(case["bad"][i])]
    if bad:
        i = bad[0]
        prev = float(sc_exp[i - 1]) if i else case["init_scale"]
        msg = (f"the scale after step {i} differs from torch.amp.GradScaler's {where}; steps with "
               f"inf/NaN gradients: {skipped}")
        grew = float(sc[i]) > prev and float(sc_exp[i]) <= prev
        if i in skipped and float(sc[i]) >= prev:
            return msg + f" — step {i} had an inf/NaN gradient: multiply the scale by backoff_factor"
        if grew:
            return msg + (" — the scale grew too early: growth counts only consecutive finite steps, "
                          "the growth tracker restarts at 0 after a skipped step (and after each growth)")
        if i not in skipped and float(sc[i]) < prev:
            return msg + " — this step's gradients were all finite: no backoff"
        return msg + (f" — after growth_interval consecutive finite steps multiply the scale by "
                      f"growth_factor and restart the count")
    a, b = out["scaled_loss"].double(), exp["scaled_loss"]
    if tuple(a.shape) != tuple(b.shape) or ((a[:1] != b[:1]) & ~(a[:1].isnan() & b[:1].isnan())).any():
        return f"scale(loss) is not loss × the current scale {where}"
    p, p_exp = out["params"], exp["params"]
    if tuple(p.shape) != tuple(p_exp.shape):
        return f"params: shape {tuple(p.shape)}, expected {tuple(p_exp.shape)}"
    ok = (p.double() - p_exp.double()).abs() <= 1e-6 * (1 + p_exp.double().abs())   # NaN is never ok
    diff = [int(i) for i in (~ok.all(1)).nonzero().reshape(-1)]
    if diff:
        i = diff[0]
        msg = f"the parameters after step {i} differ from torch.amp.GradScaler's {where}"
        unscaled = [j for j in range(case["steps"]) if bool(case["unscale"][j])]
        if i in skipped:
            return msg + " — that step had inf/NaN gradients: skip optimizer.step()"
        if i in unscaled:
            return msg + (" — unscale_ was called before step() here: step() must not unscale again "
                          "(unscale_ once per step)")
        return msg + " — step() unscales the gradients (× 1/scale) before optimizer.step()"
    return None


def verify_MasterWeightOptimizer(case: dict, out: dict) -> str | None:
    exp = C.drive_master(ref_mp.MasterWeightOptimizer, case)
    where = f"({case['dtype']} model, {case['opt']} {case['kw']}, {case['steps']} steps)"
    if not bool(out["model_dtype_kept"]):
        return f"the model's parameters changed dtype {where}: they stay {case['dtype']}; only the master copy is fp32"
    m = out["master"]
    if torch.isnan(m).all():
        return "no master_params: keep the fp32 master copies in a list attribute master_params"
    if m.dtype != torch.float32:
        return (f"master_params are {m.dtype} {where} — master weights updated in half precision: "
                "the master copy (and so the optimizer's state) must be fp32")
    p, p_exp = out["params"], exp["params"]
    if tuple(p.shape) != tuple(p_exp.shape) or p.dtype != p_exp.dtype:
        return f"params: {tuple(p.shape)} {p.dtype}, expected {tuple(p_exp.shape)} {p_exp.dtype}"
    msg = compare(m, exp["master"], rtol=1e-5, atol=1e-7, name=f"master weights {where}")
    if msg is None:
        msg = compare(p.float(), p_exp.float(), rtol=0, atol=0, name=f"model weights {where}")
        if msg:
            return msg + " — after each step copy the fp32 master weights into the model (rounded to its dtype)"
        return None
    w0, _ = C.master_stream(case)
    still = (p.float() == w0.to(p.dtype).float()).all()
    if still and not (p_exp.float() == w0.to(p_exp.dtype).float()).all():
        return msg + (" — every update was lost: each one is below the model dtype's resolution; "
                      "keep the weights in an fp32 master copy, step the optimizer there, copy back")
    return msg + " — the optimizer steps the fp32 master copy with the model's gradients converted to fp32"


# --- how the parts must be computed (read from the notebook's source, see static.py) --------
def own_autograd_function():
    """The graded function reaches a class of the notebook that subclasses torch.autograd.Function
    and defines forward and backward (the recomputation is the student's own)."""
    import ast

    def rule(code, fn):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            if b.kind == "class" and "torch.autograd.Function" in u.names:
                methods = {s.name for s in b.node.body if isinstance(s, ast.FunctionDef)}
                if {"forward", "backward"} <= methods:
                    return None
        return (f"{fn} reaches no torch.autograd.Function of your own (a class with forward and "
                "backward): the recomputation in backward is what this part asks you to write")
    return rule


_PLAIN = ("torch", "math", "numpy", "functools", "itertools", "typing", "dataclasses", "collections",
          "warnings", "sys.stderr", "sys.stdout", "time", "llmopt.testing")
_FORBIDDEN = ("torch.utils.checkpoint", "checkpoint_sequential", "torch.amp", "torch.cuda.amp",
              "torch.cpu.amp", "GradScaler", "torch.distributed", "deepspeed", "accelerate", "apex",
              "torch._functorch", "torch.func")
_BASE = [static.no_dynamic_access(), static.no_llmopt_imports(allowed=("llmopt.testing",)),
         static.forbids(*[f for f in _FORBIDDEN if f not in ("checkpoint_sequential", "GradScaler")],
                        why=": this part asks for your own code, not torch's checkpoint or amp"),
         static.imports_only(*_PLAIN)]
METHOD = {
    "checkpoint": ("checkpoint", _BASE + [own_autograd_function()]),
    "checkpoint_sequential": ("checkpoint_sequential", _BASE + [own_autograd_function()]),
    "saved_activation_bytes": ("saved_activation_bytes", _BASE),
    "train_step": ("train_step", _BASE),
    "GradScaler": ("GradScaler", _BASE),
    "MasterWeightOptimizer": ("MasterWeightOptimizer", _BASE),
}


# --- what each run_X records: {key: (kind, shape)}, checked before anything is computed ----
OUTPUTS = {
    "checkpoint": lambda case: {"y": ("float", None), "x_grads": ("float", (None, None)),
                                "param_grads": ("float", (None,)), "no_x_grad": ("bool", (None,)),
                                "calls": ("int", ()), "forward_grad": ("bool", ()),
                                "backward_raised": ("bool", ())},
    "checkpoint_sequential": lambda case: {"y": ("float", None), "x_grad": ("float", (None,)),
                                           "param_grads": ("float", (None,)),
                                           "order": ("int", (3 * case["n"],)),
                                           "grad_enabled": ("bool", (3 * case["n"],)),
                                           "n_calls": ("int", ()), "backward_raised": ("bool", ())},
    "saved_activation_bytes": lambda case: {"bytes": ("int", ())},
    "train_step": lambda case: {"loss": ("float", ()), "grads": ("float", (None,))},
    "GradScaler": lambda case: ({"second_unscale_raises": ("bool", ())} if case.get("double_unscale") else
                                {"scales": ("float", (case["steps"],)),
                                 "params": ("float", (case["steps"], None)),
                                 "scaled_loss": ("float", (case["steps"],))}),
    "MasterWeightOptimizer": lambda case: {"params": ("float", (case["steps"], None)),
                                           "master": ("float", (None,)), "model_dtype_kept": ("bool", ())},
}
