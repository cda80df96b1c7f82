"""Per-rank model-state memory under ZeRO: the formula beside the measurement.

``zero_widget(model_state_bytes, measured=None)`` draws, for a chosen stage and world size,
one stacked bar per rank — parameters, gradients, optimizer state — from the student's own
``model_state_bytes`` (split into its three parts by evaluating it with the other byte
counts set to zero), and beside it the bytes measured on the ranks of a real run
(``measured``: what ``collect_measurements`` gathers with ``launch``). Below the bars: the
communication volume per step, 2Ψ for stages 0–2 (all-reduce = reduce-scatter +
all-gather) and 3Ψ for stage 3 (an extra all-gather of the weights in backward: 1.5×).

``measured_state_bytes(optimizer, model)`` is the measurement: a rank's bytes of
parameters, gradients and optimizer state, found by following references from the model
and the optimizer (storages counted once; freed storages count 0). It looks inside the
process that calls it, so it shows what the code holds — it proves nothing to a grader
(the autograder judges memory by the out-of-memory limit of the grading sandbox instead).
"""
from __future__ import annotations

import torch

PARTS = ("params", "grads", "optimizer")
COLORS = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868"}


def formula_parts(model_state_bytes, num_params, stage, world_size, k=12, param_bytes=2,
                  grad_bytes=2) -> dict:
    """The formula split into parameters, gradients and optimizer state (bytes per rank)."""
    f = lambda **kw: float(model_state_bytes(num_params, stage, world_size, **kw))  # noqa: E731
    return {"params": f(k=0, param_bytes=param_bytes, grad_bytes=0),
            "grads": f(k=0, param_bytes=0, grad_bytes=grad_bytes),
            "optimizer": f(k=k, param_bytes=0, grad_bytes=0)}


def comm_bytes(num_params, stage, elem_bytes=2) -> float:
    """Bytes each rank sends per step: 2Ψ (stages 0–2) or 3Ψ (stage 3) elements."""
    return (3 if stage == 3 else 2) * num_params * elem_bytes


def plot_ranks(ax, model_state_bytes, num_params, stage, world_size, k=12, param_bytes=2,
               grad_bytes=2, measured_ranks=None, max_ranks=8, unit=2**30, unit_name="GiB"):
    """Stacked bars per rank: formula (solid) and, if given, measured (hatched) beside it."""
    parts = formula_parts(model_state_bytes, num_params, stage, world_size, k, param_bytes, grad_bytes)
    ranks = list(range(min(world_size, max_ranks)))
    width = 0.38 if measured_ranks else 0.7
    for r in ranks:
        bottom = 0.0
        for name in PARTS:
            ax.bar(r - (width / 2 if measured_ranks else 0), parts[name] / unit, width, bottom=bottom,
                   color=COLORS[name], label=name if r == 0 else None)
            bottom += parts[name] / unit
        if measured_ranks and r < len(measured_ranks):
            bottom = 0.0
            for name in PARTS:
                v = measured_ranks[r][name] / unit
                ax.bar(r + width / 2, v, width, bottom=bottom, color=COLORS[name], hatch="//",
                       edgecolor="white", label="measured" if (r == 0 and name == "params") else None)
                bottom += v
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylabel(f"model state per rank ({unit_name})")
    total = sum(parts.values())
    ax.set_title(f"stage {stage}, N_d = {world_size}: {total / unit:.3g} {unit_name} per rank"
                 + (f" (showing {len(ranks)} of {world_size})" if world_size > max_ranks else ""))
    ax.legend(fontsize=8)
    return total


def collect_measurements(run_rank, world_sizes=(2, 4), stages=(0, 1, 2, 3)):
    """``{(stage, N): [per-rank {"params","grads","optimizer"}]}`` from real runs.

    ``run_rank(rank, world_size, stage)`` must return this rank's measured bytes (e.g.
    ``measured_state_bytes`` below); each (stage, N) is one ``launch``.
    """
    from ..launch import launch
    return {(s, n): launch(run_rank, n, s) for n in world_sizes for s in stages}


def zero_widget(model_state_bytes, measured=None, measured_setup=None):
    """Sliders for stage, world size and Ψ; bars per rank; communication per step.

    ``measured``: ``{(stage, N): [per-rank bytes]}``; ``measured_setup``: the formula's
    arguments for that run (``num_params``, ``k``, ``param_bytes``, ``grad_bytes``).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    stage = widgets.IntSlider(value=3, min=0, max=3, description="stage")
    world = widgets.Dropdown(options=[1, 2, 4, 8, 16, 64, 256], value=64, description="N_d")
    psi = widgets.FloatLogSlider(value=7.5e9, base=10, min=6, max=12, step=0.1,
                                 description="Ψ", readout_format=".3g")
    use_measured = widgets.Checkbox(value=bool(measured), description="measured run",
                                    disabled=not measured)

    def show(stage, world_size, num_params, use_measured):
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        plot_ranks(axes[0], model_state_bytes, num_params, stage, world_size,
                   unit=1e9, unit_name="GB")
        if use_measured and measured:
            setup = measured_setup or {}
            n = min((s for _, s in measured), key=lambda s: abs(s - world_size))
            plot_ranks(axes[1], model_state_bytes, setup.get("num_params"), stage, n,
                       k=setup.get("k", 12), param_bytes=setup.get("param_bytes", 4),
                       grad_bytes=setup.get("grad_bytes", 4),
                       measured_ranks=measured.get((stage, n)), unit=1e3, unit_name="kB")
            axes[1].set_title(f"measured on {n} processes (hatched) vs formula, stage {stage}")
        else:
            totals = [sum(formula_parts(model_state_bytes, num_params, s, world_size).values()) / 1e9
                      for s in range(4)]
            axes[1].bar(range(4), totals, color="#8172b2")
            axes[1].set_xticks(range(4), ["0 (DP)", "1 P_os", "2 P_os+g", "3 P_os+g+p"])
            axes[1].set_ylabel("GB per rank")
            axes[1].set_title("all stages at this Ψ and N_d")
        sent = [comm_bytes(num_params, s) / 1e9 for s in range(4)]
        fig.suptitle(f"communication per step and rank (fp16): stages 0–2 {sent[0]:.3g} GB "
                     f"(2Ψ), stage 3 {sent[3]:.3g} GB (3Ψ = 1.5×)", fontsize=10)
        fig.tight_layout()
        plt.show()

    out = widgets.interactive_output(show, {"stage": stage, "world_size": world,
                                            "num_params": psi, "use_measured": use_measured})
    return widgets.VBox([widgets.HBox([stage, world, psi, use_measured]), out])


# ------------------------------------------------------- measuring model-state memory

def live_storages() -> dict:
    """{data_ptr: storage} of every tensor alive in this process (kept alive by the dict)."""
    import gc
    gc.collect()
    out = {}
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor):    # type(): no __class__ lookups
                st = obj.untyped_storage()
                if st.nbytes() and st.data_ptr() not in out:
                    out[st.data_ptr()] = st
        except Exception:  # tensors without storage (meta, sparse, fake)
            continue
    return out


def reachable_tensors(*roots, max_objects: int = 200_000) -> list:
    """Every tensor reachable from ``roots`` through attributes, containers, hooks and
    closures (functions' globals, modules and classes are not followed)."""
    import gc
    import types
    seen, out, stack = set(), [], list(roots)
    while stack and len(seen) < max_objects:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if issubclass(type(obj), torch.Tensor):
            out.append(obj)
            continue
        if isinstance(obj, (types.ModuleType, type, str, bytes, int, float, bool, type(None))):
            continue
        if isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in (obj.__closure__ or ()) if _filled(c))
            stack.extend(obj.__defaults__ or ())
            stack.extend((obj.__kwdefaults__ or {}).values())
            continue
        if isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
            stack.append(obj.__func__)
            continue
        stack.extend(gc.get_referents(obj))
    return out


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _storages(tensors) -> dict:
    out = {}
    for t in tensors:
        try:
            st = t.untyped_storage()
        except Exception:  # no storage (meta, sparse)
            continue
        if st.nbytes():
            out[st.data_ptr()] = st
    return out


def measured_state_bytes(optimizer, model=None, baseline: dict | None = None) -> dict:
    """This rank's model-state bytes as ``{"params", "grads", "optimizer", "total"}``.

    Counts every storage once (views share their storage; a storage freed with
    ``resize_(0)`` counts 0). ``optimizer`` = tensors in ``optimizer.state`` and the
    tensors the optimizer updates (fp32 master copies); ``grads`` = their ``.grad`` and
    those of every other tensor found; ``params`` = every other tensor found. With
    ``model``, tensors are found by following references from the model and the
    optimizer (attributes, hooks, closures); without it, every live tensor of the process
    that is not in ``baseline = live_storages()`` (taken before building the model)
    counts. Call it after ``backward()``, before ``step()``.
    """
    import gc
    if model is not None:
        found = reachable_tensors(model, optimizer)
    else:
        gc.collect()
        baseline = baseline or {}
        found = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
        found = [t for t in found if t.untyped_storage().data_ptr() not in baseline]
    opt_tensors = [p for g in optimizer.param_groups for p in g["params"]]
    opt_tensors += [v for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor)]
    opt = _storages(opt_tensors)
    grads = _storages(t.grad for t in found + opt_tensors if t.grad is not None)
    params = {k: v for k, v in _storages(found).items() if k not in opt and k not in grads}
    total = lambda d: sum(s.nbytes() for s in d.values())  # noqa: E731
    out = {"params": total(params), "grads": total(grads), "optimizer": total(opt)}
    out["total"] = sum(out.values())
    return out
