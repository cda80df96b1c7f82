"""Widgets of lab09 (LoRA / QLoRA), driven by the student's own modules.

``adapter_strength_widget(model, tokenizer, examples, generate)``: a slider multiplies the
``scaling`` of every adapter in ``model`` (the student's ``LoRALinear``/``QLoRALinear``, found
by their ``A``, ``B`` and ``scaling`` attributes) from 0 (the base model) to 1.5, and shows the
greedy answers to a few Russian tasks and how many are exact. ``plot_memory(rows)`` draws the
memory of full fine-tuning, LoRA and QLoRA as stacked bars. Nothing here builds an adapter or
quantizes a weight.
"""
from __future__ import annotations

import matplotlib.pyplot as plt


def _adapters(model):
    return [m for m in model.modules()
            if hasattr(m, "A") and hasattr(m, "B") and hasattr(m, "scaling")]


def adapter_strength_widget(model, tokenizer, examples, generate, values=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)):
    """A slider over a multiplier of every adapter's scaling; shows answers and exact matches.
    ``generate(model, tokenizer, examples) -> list[str]``."""
    import ipywidgets as widgets
    from IPython.display import display

    adapters = _adapters(model)
    base_scaling = [m.scaling for m in adapters]
    out = widgets.Output()
    slider = widgets.SelectionSlider(options=list(values), value=1.0, description="× α/r")

    def show(change=None):
        s = slider.value
        for m, b in zip(adapters, base_scaling):
            m.scaling = b * s
        try:
            answers = generate(model, tokenizer, examples)
        finally:
            for m, b in zip(adapters, base_scaling):
                m.scaling = b
        hits = sum(a == ex.answer for a, ex in zip(answers, examples))
        with out:
            out.clear_output(wait=True)
            print(f"adapter scale × {s}: {hits}/{len(examples)} exact")
            for a, ex in zip(answers, examples):
                mark = "✓" if a == ex.answer else "✗"
                print(f"{mark} {ex.instruction:<40} → {a!r}  (expected {ex.answer!r})")

    slider.observe(show, names="value")
    show()
    box = widgets.VBox([slider, out])
    display(box)
    return box


def plot_memory(rows, title="Fine-tuning memory (GB)"):
    """``rows``: [(label, {part: GB})]: one stacked bar per label."""
    parts = []
    for _, d in rows:
        for k in d:
            if k not in parts:
                parts.append(k)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [d.get(part, 0.0) for _, d in rows]
        ax.bar([r[0] for r in rows], vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, b in enumerate(bottom):
        ax.text(i, b, f"{b:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15, fontsize=8)
    fig.tight_layout()
    return fig
