"""Widget of lab05: the memory timeline of one training step, for each combination of the switches.

One step of training holds four kinds of memory: the parameters, the gradients, the
optimizer's state (AdamW: two fp32 moments per parameter) and the activations autograd saves
for backward. The first three are fixed sizes; the activations grow during the forward pass,
shrink during backward as each layer's saved tensors are released, and are what gradient
checkpointing (recompute), accumulation (smaller micro-batches) and mixed precision (half the
bytes) act on.

``record_step(step_fn, model, batch, optimizer, **switches)`` runs the caller's ``step_fn``
(the student's ``train_step``) and ``optimizer.step()`` once and records, at every tensor
autograd saves or releases, the live bytes of each kind. Saved tensors are followed through
``torch.autograd.graph.saved_tensors_hooks`` (a storage counts once while any saved reference
to it lives); nothing here computes a gradient or a checkpoint. ``plot_timeline`` draws one
record; ``plot_grid`` the eight combinations; ``memory_widget`` adds the three switches.
On a GPU the same records can be compared with ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import torch


class _Tracker:
    """Live bytes of saved tensors (each storage once), and a timeline of events."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.refs = {}                     # storage key -> [count, nbytes]
        self.live = 0
        self.phase = "forward"
        self.events = []                   # (phase, activations, grads, optimizer state)

    def _bytes(self, tensors):
        return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor))

    def sample(self):
        grads = self._bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        state = sum(self._bytes(s.values()) for s in self.optimizer.state.values())
        self.events.append((self.phase, self.live, grads, state))

    def pack(self, t):
        base = t if t._base is None else t._base
        if isinstance(base, torch.nn.Parameter):
            return t
        s = t.untyped_storage()
        return _Saved(self, t, (str(s.device), s.data_ptr()), s.nbytes())

    @staticmethod
    def unpack(obj):
        return obj.t if isinstance(obj, _Saved) else obj


class _Saved:
    __slots__ = ("tracker", "t", "key")

    def __init__(self, tracker, t, key, nbytes):
        self.tracker, self.t, self.key = tracker, t, key
        ref = tracker.refs.setdefault(key, [0, nbytes])
        ref[0] += 1
        if ref[0] == 1:
            tracker.live += nbytes
            if tracker.phase == "backward":
                tracker.phase = "recompute"
            tracker.sample()

    def __del__(self):
        tr = self.tracker
        ref = tr.refs.get(self.key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            tr.live -= ref[1]
            del tr.refs[self.key]
            if tr.phase == "recompute":
                tr.phase = "backward"
            tr.sample()


def record_step(step_fn, model, batch, optimizer, **switches) -> dict:
    """Run ``step_fn(model, batch, **switches)`` and ``optimizer.step()``; the memory timeline.

    Returns ``{"phase": [...], "activations": [...], "grads": [...], "optimizer": [...],
    "params": bytes, "peak": bytes, "loss": float}`` (bytes per event).
    """
    tr = _Tracker(model, optimizer)
    hooks = []
    first = next(model.modules())
    embed = getattr(model, "embed_tokens", first)
    head = getattr(model, "lm_head", first)

    def start_forward(*_):
        tr.phase = "forward"

    def start_backward(module, args, out):
        def mark(grad):
            tr.phase = "backward"
            tr.sample()
        if out.requires_grad:
            out.register_hook(mark)

    hooks.append(embed.register_forward_pre_hook(start_forward))
    hooks.append(head.register_forward_hook(start_backward))
    optimizer.zero_grad(set_to_none=True)
    tr.sample()
    try:
        with torch.autograd.graph.saved_tensors_hooks(tr.pack, tr.unpack):
            loss = step_fn(model, batch, **switches)
    finally:
        for h in hooks:
            h.remove()
    tr.phase = "optimizer"
    tr.sample()
    optimizer.step()
    tr.sample()
    params = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                        for p in model.parameters()}.values())
    ph, act, gr, st = zip(*tr.events)
    total = [params + a + g + s for a, g, s in zip(act, gr, st)]
    return {"phase": list(ph), "activations": list(act), "grads": list(gr), "optimizer": list(st),
            "params": params, "peak": max(total), "loss": float(loss)}


_COLORS = {"params": "0.75", "optimizer": "C2", "grads": "C1", "activations": "C0"}
_PHASES = {"forward": "#e8f0ff", "backward": "#fff1e0", "recompute": "#ffd6d6", "optimizer": "#e6ffe6"}


def plot_timeline(ax, rec: dict, title: str = "", ymax: float | None = None):
    """Stacked live bytes (MiB) over the events of one step, phases shaded behind."""
    n = len(rec["phase"])
    x = list(range(n))
    start = 0
    for i in range(1, n + 1):
        if i == n or rec["phase"][i] != rec["phase"][start]:
            ax.axvspan(start - 0.5, i - 0.5, color=_PHASES[rec["phase"][start]], lw=0)
            start = i
    mib = 2.0 ** 20
    layers = [[rec["params"] / mib] * n, [v / mib for v in rec["optimizer"]],
              [v / mib for v in rec["grads"]], [v / mib for v in rec["activations"]]]
    ax.stackplot(x, *layers, colors=[_COLORS[k] for k in ("params", "optimizer", "grads", "activations")],
                 labels=["parameters", "optimizer state", "gradients", "saved activations"], alpha=0.9)
    ax.set_title(f"{title}  peak {rec['peak'] / mib:.1f} MiB", fontsize=9)
    ax.set_xlim(0, max(1, n - 1))
    if ymax:
        ax.set_ylim(0, ymax)
    ax.set_xlabel("event (a tensor saved or released)", fontsize=8)
    ax.set_ylabel("MiB", fontsize=8)
    return ax


def combinations(accum: int = 4, dtype=torch.bfloat16):
    """The eight (checkpoint, accum_steps, dtype) switches."""
    return [dict(checkpoint=c, accum_steps=k, dtype=d)
            for d in (None, dtype) for k in (1, accum) for c in (False, True)]


def switches_label(sw: dict) -> str:
    return (f"{'ckpt' if sw['checkpoint'] else 'plain'}, k={sw['accum_steps']}, "
            f"{'fp32' if sw['dtype'] is None else str(sw['dtype']).replace('torch.', '')}")


def plot_grid(records: list[tuple[dict, dict]]):
    """A 2 × 4 grid of timelines: ``records`` = [(switches, record)] (from ``combinations``)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(15, 5.6), sharey=True)
    ymax = max(r["peak"] for _, r in records) / 2 ** 20 * 1.05
    for ax, (sw, rec) in zip(axes.flat, records):
        plot_timeline(ax, rec, switches_label(sw), ymax)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def memory_widget(step_fn, make_model, batch, make_optimizer):
    """Checkboxes and a dropdown for the three switches; each change runs one step afresh
    (``make_model()``, ``make_optimizer(model)``) with ``step_fn`` and redraws its timeline."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    ckpt = widgets.Checkbox(False, description="checkpoint")
    accum = widgets.Dropdown(options=[1, 2, 4], value=1, description="accum k")
    dtype = widgets.Dropdown(options=[("fp32", None), ("bf16 autocast", torch.bfloat16)], description="dtype")
    out = widgets.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            model = make_model()
            rec = record_step(step_fn, model, batch, make_optimizer(model), checkpoint=ckpt.value,
                              accum_steps=accum.value, dtype=dtype.value)
            fig, ax = plt.subplots(figsize=(9, 3.4))
            plot_timeline(ax, rec, switches_label(dict(checkpoint=ckpt.value, accum_steps=accum.value,
                                                       dtype=dtype.value)))
            ax.legend(fontsize=7, loc="upper left")
            plt.show()
            print(f"peak {rec['peak'] / 2**20:.2f} MiB, of which saved activations at most "
                  f"{max(rec['activations']) / 2**20:.2f} MiB; loss {rec['loss']:.4f}")

    for w in (ckpt, accum, dtype):
        w.observe(draw, names="value")
    draw()
    box = widgets.VBox([widgets.HBox([ckpt, accum, dtype]), out])
    display(box)
    return box
