"""FlashAttention's tiling, animated: which blocks sit in SRAM, and what crosses HBM.

lab04_flash_attention, part 5. The widget is driven by the student's own byte counters,
``standard_bytes(N, d, elem_bytes)`` and ``flash_bytes(N, d, block_q, block_k,
elem_bytes)``; the per-step counter inside the animation follows FA2's order (for each
Q_i: read Q_i, then K_j and V_j for every j, then write O_i and L_i), so at the last step
it must reach the student's ``flash_bytes`` total.

- ``tiling_schedule(N, block_q, block_k, causal)``: the (i, j) block pairs in FA2's order.
- ``step_traffic(...)``: HBM bytes read and written up to a step.
- ``tiling_figure(...)``: one frame as a matplotlib figure (testable without a browser).
- ``tiling_widget(standard_bytes, flash_bytes)``: sliders for N, d, B_r, B_c and a Play
  button over the steps.
"""
from __future__ import annotations

import math

H100_SRAM_PER_SM = 228 * 1024  # bytes of shared memory per SM on an H100 (and H200)


def tiling_schedule(N, block_q, block_k, causal=False):
    """[(i, j), ...]: Q block i meets K/V block j, in FA2's order (i outer, j inner);
    causal skips blocks wholly above the diagonal."""
    steps = []
    for i in range(math.ceil(N / block_q)):
        for j in range(math.ceil(N / block_k)):
            if causal and j * block_k > min(N, (i + 1) * block_q) - 1:
                break
            steps.append((i, j))
    return steps


def step_traffic(N, d, block_q, block_k, step, elem_bytes=2, causal=False):
    """(bytes read, bytes written) of HBM through ``step`` (inclusive) of the schedule."""
    steps = tiling_schedule(N, block_q, block_k, causal)
    read = written = 0
    for t, (i, j) in enumerate(steps[:step + 1]):
        rows = min(block_q, N - i * block_q)
        cols = min(block_k, N - j * block_k)
        if t == 0 or steps[t - 1][0] != i:
            read += rows * d * elem_bytes                     # Q_i
        read += 2 * cols * d * elem_bytes                     # K_j, V_j
        if t == len(steps) - 1 or steps[t + 1][0] != i:
            written += rows * d * elem_bytes + rows * 4       # O_i and L_i (fp32)
    return read, written


def sram_bytes(d, block_q, block_k, elem_bytes=2):
    """Q_i, K_j, V_j tiles, the fp32 S_ij/P_ij tile, the fp32 accumulator Õ_i, m_i, ℓ_i."""
    return ((block_q + 2 * block_k) * d * elem_bytes + block_q * block_k * 4
            + block_q * d * 4 + 2 * block_q * 4)


def tiling_figure(N, d, block_q, block_k, step, standard_bytes, flash_bytes, elem_bytes=2,
                  causal=False, fig=None):
    """Draw one step: the N×N score matrix in tiles (done, current, to do) with Q_i, K_j
    and V_j marked, and the HBM traffic of standard vs flash attention."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    steps = tiling_schedule(N, block_q, block_k, causal)
    step = max(0, min(step, len(steps) - 1))
    i, j = steps[step]
    fig = fig or plt.figure(figsize=(11, 4.6))
    fig.clf()
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    # left: S = QKᵀ, never materialised in HBM by flash attention
    done = set(steps[:step])
    for (a, b) in steps:
        color = "#d62728" if (a, b) == (i, j) else "#9ecae1" if (a, b) in done else "#f0f0f0"
        ax.add_patch(Rectangle((b * block_k, a * block_q), min(block_k, N - b * block_k),
                               min(block_q, N - a * block_q), facecolor=color,
                               edgecolor="white", linewidth=0.5))
    ax.add_patch(Rectangle((-0.09 * N, i * block_q), 0.06 * N, min(block_q, N - i * block_q),
                           color="#2ca02c", clip_on=False))
    ax.add_patch(Rectangle((j * block_k, -0.09 * N), min(block_k, N - j * block_k), 0.06 * N,
                           color="#ff7f0e", clip_on=False))
    ax.text(-0.06 * N, -0.06 * N, "SRAM:", ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.1 * N, N)
    ax.set_ylim(N, -0.1 * N)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    sram = sram_bytes(d, block_q, block_k, elem_bytes)
    ax.set_title(f"step {step + 1}/{len(steps)}: Q_{i} (green) meets K_{j}, V_{j} (orange)\n"
                 f"SRAM use {sram / 1024:.0f} KB of {H100_SRAM_PER_SM // 1024} KB per SM"
                 + ("  — does not fit!" if sram > H100_SRAM_PER_SM else ""), fontsize=9)
    ax.set_xlabel("keys j (blue: done, red: now)")
    ax.set_ylabel("queries i")

    # right: HBM traffic, MB (log scale)
    read, written = step_traffic(N, d, block_q, block_k, step, elem_bytes, causal)
    std = standard_bytes(N, d, elem_bytes)
    fl = flash_bytes(N, d, block_q, block_k, elem_bytes)
    names = ["flash: read\nso far", "flash: written\nso far", "flash total\n(your count)",
             "standard total\n(your count)"]
    values = [read, written, fl, std]
    bars = bx.bar(names, [max(v, 1) / 2**20 for v in values],
                  color=["#9ecae1", "#6baed6", "#3182bd", "#d62728"])
    for bar, v in zip(bars, values):
        bx.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v / 2**20:.2f}",
                ha="center", va="bottom", fontsize=8)
    bx.set_yscale("log")
    bx.set_ylabel("HBM traffic per head, MiB")
    bx.tick_params(axis="x", labelsize=8)
    bx.set_title(f"N={N}, d={d}, B_r={block_q}, B_c={block_k}: standard / flash = "
                 f"{std / max(fl, 1):.1f}×", fontsize=9)
    fig.tight_layout()
    return fig


def tiling_widget(standard_bytes, flash_bytes, N=256, d=64, block_q=64, block_k=64,
                  elem_bytes=2):
    """Sliders for N, d, B_r, B_c, causal, and a Play button that walks the steps."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    n_w = widgets.SelectionSlider(options=[2**p for p in range(6, 15)], value=N, description="N")
    d_w = widgets.SelectionSlider(options=[16, 32, 64, 128], value=d, description="d")
    bq_w = widgets.SelectionSlider(options=[16, 32, 64, 128, 256], value=block_q, description="B_r")
    bk_w = widgets.SelectionSlider(options=[16, 32, 64, 128, 256], value=block_k, description="B_c")
    causal_w = widgets.Checkbox(value=False, description="causal")
    step_w = widgets.IntSlider(value=0, min=0, description="step")
    play = widgets.Play(value=0, min=0, interval=400, description="play")
    widgets.jslink((play, "value"), (step_w, "value"))
    out = widgets.Output()

    def n_steps():
        return len(tiling_schedule(n_w.value, bq_w.value, bk_w.value, causal_w.value))

    def redraw(*_):
        step_w.max = play.max = n_steps() - 1
        with out:
            out.clear_output(wait=True)
            fig = tiling_figure(n_w.value, d_w.value, bq_w.value, bk_w.value, step_w.value,
                                standard_bytes, flash_bytes, elem_bytes, causal_w.value)
            display(fig)
            plt.close(fig)

    for w in (n_w, d_w, bq_w, bk_w, causal_w, step_w):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([n_w, d_w, causal_w]), widgets.HBox([bq_w, bk_w]),
                         widgets.HBox([play, step_w]), out])
