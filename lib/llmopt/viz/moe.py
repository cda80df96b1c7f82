"""Widget of lab10: where a sparse MoE sends its tokens, with and without the balancing loss.

A router sends each token to k of E experts. Trained without an auxiliary loss, a router
tends to favour a few experts (the ones that happened to be good early get the gradient and
the tokens: rich get richer); Switch/Mixtral's load-balancing loss pushes the share of tokens
per expert toward 1/E. The widget shows, for each training run (e.g. "without" and "with"
the balancing loss):

- left: the share of the N·k assignments that each expert of each layer receives, as a
  heatmap (layers × experts; a balanced layer is a flat row at 1/E);
- right: for each token of a sentence, the experts its router picks in every layer.

Nothing here routes: the routing tables come from the callables passed in (the notebook's
own router). ``expert_shares`` only counts what it is given.
"""
from __future__ import annotations

import torch


def expert_shares(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) share of the assignments in a routing table ``experts`` (N, k) per expert."""
    counts = torch.bincount(experts.reshape(-1).long(), minlength=n_experts).float()
    return counts / counts.sum().clamp(min=1)


def imbalance(shares: torch.Tensor) -> float:
    """max share · E: 1.0 for a perfectly balanced layer, E when one expert takes everything."""
    return float(shares.max() * shares.numel())


def routing_figure(shares: torch.Tensor, tokens: list[str], sentence_experts: list[torch.Tensor],
                   title: str = "", fig=None):
    """shares (L, E); tokens (T,); sentence_experts: per layer a (T, k) table of chosen experts."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    L, E = shares.shape
    T = len(tokens)
    if fig is None:
        fig = plt.figure(figsize=(13, 4.2))
    fig.clf()
    ax1, ax2 = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, (2, 3))
    im = ax1.imshow(shares.numpy(), cmap="viridis", vmin=0, vmax=max(2.5 / E, float(shares.max())), aspect="auto")
    ax1.set_xlabel("expert")
    ax1.set_ylabel("layer")
    ax1.set_xticks(range(E))
    ax1.set_yticks(range(L))
    for layer in range(L):
        ax1.text(E - 0.5, layer, f" ×{imbalance(shares[layer]):.1f}", va="center", ha="left", fontsize=8)
    ax1.set_title(f"share of tokens per expert (1/E = {1 / E:.3f})\n×: max share · E", fontsize=9)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    cmap = colormaps["tab20" if E > 10 else "tab10"]
    top1 = torch.stack([e[:, 0] for e in sentence_experts]).numpy()          # (L, T)
    ax2.imshow(top1, cmap=cmap, vmin=0, vmax=cmap.N - 1, aspect="auto", alpha=0.55)
    for layer, e in enumerate(sentence_experts):
        for t in range(T):
            ax2.text(t, layer, ",".join(str(int(v)) for v in e[t]), ha="center", va="center", fontsize=7)
    ax2.set_xticks(range(T))
    ax2.set_xticklabels([repr(tok)[1:-1] for tok in tokens], rotation=60, ha="right", fontsize=8)
    ax2.set_yticks(range(L))
    ax2.set_ylabel("layer")
    ax2.set_title("experts chosen for each token (colour: the first choice)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def moe_routing_widget(shares_by_run: dict, route_sentence, sentence: str):
    """shares_by_run: {run: (L, E) shares}; route_sentence(run, text) -> (tokens, [(T, k)] per layer)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    runs = list(shares_by_run)
    run_w = widgets.ToggleButtons(options=runs, value=runs[0], description="run")
    text_w = widgets.Text(value=sentence, description="sentence", layout=widgets.Layout(width="70%"))
    out = widgets.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            tokens, experts = route_sentence(run_w.value, text_w.value)
            fig = routing_figure(shares_by_run[run_w.value], tokens[:40], [e[:40] for e in experts],
                                 title=f"routing, {run_w.value}")
            plt.show(fig)

    run_w.observe(draw, "value")
    text_w.observe(draw, "value")
    draw()
    display(widgets.VBox([run_w, text_w, out]))
