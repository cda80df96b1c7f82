"""A widget that shows sequences' logical KV blocks mapped onto physical blocks.

``paged_widget(cache_cls)`` plays a small serving scenario on the student's own
``PagedKVCache`` class: prompts arrive, decode steps append one token each, a sequence is
forked for parallel sampling (its blocks shared, ref count 2) and the fork's first write
copies only the shared last block (copy-on-write), a finished sequence frees its blocks and
a new arrival reuses them. After every event it reads the cache back through its public
interface only (``block_table``, ``context_len``, ``allocator.num_free()``,
``utilization()``) and draws:

- left: one row per sequence, its logical blocks 0, 1, 2, ... with the physical block each
  maps to (the block table) and how full it is;
- right: the pool of physical blocks, coloured by owner, shared blocks hatched with the
  number of sequences that reference them, free blocks grey.

A slider (or the play button) steps through the events. Nothing here allocates, attends
or generates: the widget only draws what the student's class did.
"""
from __future__ import annotations

import torch

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def default_scenario():
    """(description, action) pairs; an action is ("add", sid, n) | ("decode", [sids]) |
    ("fork", parent, child) | ("free", sid)."""
    return [("request A arrives: a 6-token prompt", ("add", "A", 6)),
            ("request B arrives: a 3-token prompt", ("add", "B", 3)),
            ("decode: A and B get one token each", ("decode", ["A", "B"])),
            ("decode", ("decode", ["A", "B"])),
            ("parallel sampling: B is forked into B2 (blocks shared, nothing copied)", ("fork", "B", "B2")),
            ("decode: B2's first write copies only the shared last block (copy-on-write)",
             ("decode", ["A", "B2"])),
            ("decode: B now owns its last block alone and writes in place", ("decode", ["A", "B", "B2"])),
            ("decode", ("decode", ["A", "B", "B2"])),
            ("A finishes: its blocks return to the free list", ("free", "A")),
            ("request C arrives: a 9-token prompt reuses A's blocks", ("add", "C", 9)),
            ("decode", ("decode", ["B", "B2", "C"])),
            ("B finishes: blocks still shared with B2 stay (ref count 2 → 1)", ("free", "B")),
            ("decode", ("decode", ["B2", "C"])),
            ("decode", ("decode", ["B2", "C"]))]


def record_events(cache_cls, scenario=None, block_size: int = 4, num_blocks: int = 14,
                  n_layer: int = 1, n_head: int = 1, head_dim: int = 2):
    """Run ``scenario`` on ``cache_cls`` and snapshot the cache after every event."""
    scenario = scenario or default_scenario()
    cache = cache_cls(n_layer, n_head, head_dim, num_blocks, block_size=block_size,
                      dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    live, snaps = [], []

    def write(sid, n):
        for layer in range(n_layer):
            kv = torch.randn(2, n, n_head, head_dim, generator=g)
            cache.append(sid, layer, kv[0], kv[1])

    for text, action in scenario:
        kind = action[0]
        if kind == "add":
            cache.add_sequence(action[1])
            live.append(action[1])
            write(action[1], action[2])
        elif kind == "decode":
            for sid in action[1]:
                write(sid, 1)
        elif kind == "fork":
            cache.fork(action[1], action[2])
            live.append(action[2])
        elif kind == "free":
            cache.free(action[1])
            live.remove(action[1])
        snaps.append(dict(text=text, tables={s: list(cache.block_table(s)) for s in live},
                          lens={s: int(cache.context_len(s)) for s in live},
                          free=int(cache.allocator.num_free()), util=float(cache.utilization())))
    return snaps, block_size, num_blocks


def draw(snap, block_size, num_blocks, colors, ax_seq, ax_pool):
    from matplotlib.patches import Rectangle

    owners = {}
    for sid, table in snap["tables"].items():
        for b in table:
            owners.setdefault(b, []).append(sid)
    seqs = list(snap["tables"])
    width = max([len(t) for t in snap["tables"].values()] + [1])
    ax_seq.clear()
    for r, sid in enumerate(seqs):
        n = snap["lens"][sid]
        for j, b in enumerate(snap["tables"][sid]):
            fill = min(block_size, n - j * block_size) / block_size
            shared = len(owners[b]) > 1
            ax_seq.add_patch(Rectangle((j, -r - 0.9), 0.95, 0.8, fc="white", ec="black"))
            ax_seq.add_patch(Rectangle((j, -r - 0.9), 0.95 * fill, 0.8, fc=colors[sid], alpha=0.8,
                                       hatch="//" if shared else None))
            ax_seq.text(j + 0.47, -r - 0.5, f"→{b}", ha="center", va="center", fontsize=9)
        ax_seq.text(-0.2, -r - 0.5, f"{sid} ({n} tok)", ha="right", va="center", fontsize=9)
    ax_seq.set_xlim(-2.2, width + 0.2)
    ax_seq.set_ylim(-max(len(seqs), 1) - 0.2, 0.2)
    ax_seq.set_xticks([j + 0.47 for j in range(width)], [str(j) for j in range(width)])
    ax_seq.set_yticks([])
    ax_seq.set_xlabel("logical block j  (→ physical block from the block table)")
    ax_seq.set_title("block tables", fontsize=10)
    ax_pool.clear()
    cols = min(num_blocks, 8)
    for b in range(num_blocks):
        x, y = b % cols, -(b // cols)
        who = owners.get(b, [])
        if who:
            n = max(min(block_size, snap["lens"][s] - snap["tables"][s].index(b) * block_size) for s in who)
            ax_pool.add_patch(Rectangle((x, y - 0.9), 0.95, 0.8, fc="white", ec="black"))
            ax_pool.add_patch(Rectangle((x, y - 0.9), 0.95 * n / block_size, 0.8, fc=colors[who[0]],
                                        alpha=0.8, hatch="//" if len(who) > 1 else None))
            label = f"{b}\n{'+'.join(who)}" if len(who) > 1 else f"{b}\n{who[0]}"
        else:
            ax_pool.add_patch(Rectangle((x, y - 0.9), 0.95, 0.8, fc="#eeeeee", ec="#bbbbbb"))
            label = f"{b}\nfree"
        ax_pool.text(x + 0.47, y - 0.5, label, ha="center", va="center", fontsize=8)
    rows = -(-num_blocks // cols)
    ax_pool.set_xlim(-0.1, cols)
    ax_pool.set_ylim(-rows - 0.1, 0.1)
    ax_pool.axis("off")
    ax_pool.set_title(f"physical blocks: {snap['free']} free of {num_blocks}, "
                      f"utilization {snap['util']:.0%}", fontsize=10)


def paged_widget(cache_cls, scenario=None, block_size: int = 4, num_blocks: int = 14):
    """An ipywidgets view of the student's ``PagedKVCache`` through a serving scenario."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    snaps, bs, nb = record_events(cache_cls, scenario, block_size, num_blocks)
    names = []
    for s in snaps:
        names += [n for n in s["tables"] if n not in names]
    colors = {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}

    def show(event: int):
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
        draw(snaps[event], bs, nb, colors, a, b)
        fig.suptitle(f"event {event + 1}/{len(snaps)}: {snaps[event]['text']}", fontsize=11)
        fig.tight_layout()
        plt.show()

    slider = widgets.IntSlider(value=0, min=0, max=len(snaps) - 1, description="event",
                               continuous_update=False)
    play = widgets.Play(value=0, min=0, max=len(snaps) - 1, interval=900, description="play")
    widgets.jslink((play, "value"), (slider, "value"))
    out = widgets.interactive_output(show, {"event": slider})
    return widgets.VBox([widgets.HBox([play, slider]), out])
