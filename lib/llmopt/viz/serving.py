"""Pictures of serving schedules: the passes a composer builds, and the curves of lab03.

``schedule_widget(composers, requests)`` drives the student's own composers step by step
over a small queue (one pass per step; a request arrives at its step) and draws every
forward pass as a stacked bar: one colour per request, prompt chunks solid, decode tokens
hatched, the token budget as a line. A dropdown picks the policy, a slider the budget.
``plot_rate_sweep``, ``plot_ttft`` and ``plot_table`` draw what the notebook measured.
Nothing here composes a pass, prices one or computes a metric: the widget only draws what
the student's functions did.
"""
from __future__ import annotations

import matplotlib.pyplot as plt

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
          "#ccb974", "#64b5cd"]


def default_queue():
    """(id, prompt_len, max_new_tokens, arrival_step): two long prompts among short ones."""
    return [(0, 10, 6, 0), (1, 70, 4, 0), (2, 6, 8, 1), (3, 12, 5, 2), (4, 45, 3, 3), (5, 8, 6, 5)]


def record_passes(compose, requests, budget, max_steps=200):
    """Drive ``compose(decoding, prefilling, budget)`` to the end; per pass [(rid, start, n, kind)]."""
    req = {r[0]: r for r in requests}
    order = sorted(requests, key=lambda r: (r[3], r[0]))
    active, done, gen, passes = [], {r[0]: 0 for r in requests}, {r[0]: 0 for r in requests}, []
    for step in range(max_steps):
        while order and order[0][3] <= step:
            active.append(order.pop(0)[0])
        if not active and not order:
            break
        dec = [(i, req[i][1] + gen[i] - 1) for i in active if done[i] >= req[i][1]]
        pre = [(i, req[i][1], done[i]) for i in active if done[i] < req[i][1]]
        if not dec and not pre:
            passes.append([])
            continue
        this = []
        for rid, start, n in compose(dec, pre, budget):
            if rid not in active:
                continue
            kind = "prefill" if done[rid] < req[rid][1] else "decode"
            this.append((rid, start, n, kind))
            if kind == "prefill":
                done[rid] += n
                if done[rid] < req[rid][1]:
                    continue
            gen[rid] += 1
            if gen[rid] >= req[rid][2]:
                active.remove(rid)
        passes.append(this)
    return passes


def draw_passes(ax, passes, budget, title=""):
    for x, p in enumerate(passes):
        bottom = 0
        for rid, start, n, kind in p:
            ax.bar(x, n, bottom=bottom, color=COLORS[rid % len(COLORS)], edgecolor="black", linewidth=0.3,
                   hatch="///" if kind == "decode" else None)
            bottom += n
    ax.axhline(budget, color="black", linestyle="--", linewidth=1, label=f"token budget {budget}")
    ax.set_xlabel("forward pass")
    ax.set_ylabel("tokens in the pass")
    ax.set_title(title or f"{len(passes)} passes")
    ax.legend(loc="upper right", fontsize=8)


def schedule_widget(composers: dict, requests=None, budget: int = 32):
    """Dropdown over ``composers`` ({policy: composer}), slider over the budget."""
    import ipywidgets as widgets

    requests = requests or default_queue()

    def show(policy, token_budget):
        passes = record_passes(composers[policy], requests, token_budget)
        fig, ax = plt.subplots(figsize=(9, 3.2))
        draw_passes(ax, passes, token_budget,
                    f"{policy}: {len(passes)} passes (colour = request; hatched = decode token)")
        plt.show()

    return widgets.interact(show, policy=widgets.Dropdown(options=list(composers)),
                            token_budget=widgets.IntSlider(value=budget, min=4, max=96, step=4))


def plot_rate_sweep(ax, rates, results: dict):
    """results: {policy: [metrics dict per rate]}: p50 latency against throughput."""
    for policy, rows in results.items():
        ax.plot([r["throughput_tokens_per_s"] for r in rows], [r["latency_p50"] for r in rows], "o-",
                label=policy)
        for rate, r in zip(rates, rows):
            ax.annotate(f"{rate:g}", (r["throughput_tokens_per_s"], r["latency_p50"]), fontsize=7)
    ax.set_xlabel("throughput (generated tokens / s)")
    ax.set_ylabel("median latency (s)")
    ax.set_yscale("log")
    ax.set_title("as the request rate grows (labels: requests / s)")
    ax.legend()


def plot_ttft(ax, ttfts: dict):
    """ttfts: {policy: [seconds per request]}: their empirical CDFs."""
    for policy, xs in ttfts.items():
        xs = sorted(xs)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend()


def plot_table(ax, lecture_rows, model_rows, title="the lecture's table"):
    """Grouped bars: linear and attention ms per batching scheme, lecture vs cost model."""
    names = [r["name"] for r in lecture_rows]
    x = range(len(names))
    w = 0.2
    for k, (rows, tag, shift) in enumerate(((lecture_rows, "lecture", -w), (model_rows, "cost model", w))):
        ax.bar([i + shift - w / 2 for i in x], [r["linear_ms"] for r in rows], w, label=f"linear ({tag})",
               color=COLORS[2 * k])
        ax.bar([i + shift + w / 2 for i in x], [r["attn_ms"] for r in rows], w, label=f"attention ({tag})",
               color=COLORS[2 * k + 1])
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms per forward pass")
    ax.set_title(title)
    ax.legend(fontsize=8)
