"""A widget that shows a KV cache filling up, layer by layer, as tokens are generated.

``kv_cache_widget(model, tokenizer, prompt, cache_cls)`` runs greedy decoding with the
student's own cache class (wrapped to log every ``update``) and shows, for each update, a
grid of layers × positions: which (layer, token) slots hold keys and values, which were
written by the prompt phase and which by the generation phase, the slot written in this
very update, and the bytes held so far. A slider (or the play button) walks through the
updates; the prompt phase fills whole rows at once, the generation phase one column per
token, from the first layer to the last.
"""
from __future__ import annotations

import html

import torch


def record_updates(model, input_ids, cache_cls, max_new_tokens: int):
    """Greedy-decode with ``cache_cls`` and log (layer, start, n_tokens) of every update."""
    events = []

    class LoggingCache(cache_cls):
        def update(self, layer, k, v):
            start = self.seq_len
            out = super().update(layer, k, v)
            events.append((layer, start, k.shape[2]))
            return out

    cfg = model.config
    B, T = input_ids.shape
    p = next(model.parameters())
    cache = LoggingCache(cfg.n_layer, B, cfg.n_head, T + max_new_tokens, cfg.d_model // cfg.n_head,
                         dtype=p.dtype, device=p.device)
    ids, step = input_ids, input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(step, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
            step = nxt
    return ids, events


def kv_cache_widget(model, tokenizer, prompt: str, cache_cls, max_new_tokens: int = 12,
                    dtype=torch.float16):
    """An ipywidgets view of the cache growing; driven by the student's ``cache_cls``."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    input_ids = torch.tensor([tokenizer.encode(prompt)])
    ids, events = record_updates(model, input_ids, cache_cls, max_new_tokens)
    cfg, T = model.config, input_ids.shape[1]
    n_pos = ids.shape[1] - 1  # the last token is produced but never cached
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_slot = 2 * cfg.d_model * itemsize  # k and v of one token in one layer
    labels = [tokenizer.decode([int(t)]).replace("\n", "⏎") for t in ids[0, :n_pos]]

    def show(update: int):
        grid = torch.zeros(cfg.n_layer, n_pos)  # 0 empty, 1 prompt, 2 generated, 3 this update
        for i, (layer, start, n) in enumerate(events[: update + 1]):
            value = 3 if i == update else (1 if start < T else 2)
            grid[layer, start:start + n] = value
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.45 * n_pos), 1.2 + 0.45 * cfg.n_layer))
        cmap = plt.matplotlib.colors.ListedColormap(["#f2f2f2", "#4c72b0", "#55a868", "#dd8452"])
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=3, aspect="auto")
        ax.set_xticks(range(n_pos), labels, rotation=60, fontsize=8)
        ax.set_yticks(range(cfg.n_layer), [f"layer {l}" for l in range(cfg.n_layer)])
        layer, start, n = events[update]
        phase = "prompt phase" if start < T else f"generation phase, token {start - T + 1}"
        held = int((grid > 0).sum()) * per_slot
        ax.set_title(f"update {update + 1}/{len(events)}: {phase}, layer {layer} — cache holds "
                     f"{held / 1024:.1f} KiB ({dtype})")
        ax.legend(handles=[Patch(color="#4c72b0", label="prompt k,v"),
                           Patch(color="#55a868", label="generated k,v"),
                           Patch(color="#dd8452", label="written now")],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        plt.show()

    slider = widgets.IntSlider(value=0, min=0, max=len(events) - 1, description="update",
                               continuous_update=False)
    play = widgets.Play(value=0, min=0, max=len(events) - 1, interval=400, description="play")
    widgets.jslink((play, "value"), (slider, "value"))
    out = widgets.interactive_output(show, {"update": slider})
    text = widgets.HTML(f"<b>generated:</b> {html.escape(repr(tokenizer.decode(ids[0, T:].tolist())))}")
    return widgets.VBox([widgets.HBox([play, slider]), out, text])
