"""Quantization widgets (lab07): GPTQ's sweep across a weight matrix, against RTN.

GPTQ quantizes the columns of ``W`` (rows, cols) one after another and, after each, moves
the columns not yet quantized so that the layer's output ``X Wᵀ`` changes as little as
possible. The widget shows that sweep, driven by the functions passed in (the student's
``gptq_quantize`` and ``quantize_rtn``), from their final outputs alone:

- after ``j`` columns, GPTQ's matrix is ``[Ŵ_:,:j, W^(j)_:,j:]``; its not-yet-quantized part
  is the OBS compensation given the first ``j`` quantized columns,
  ``W^(j)_:,j: = W_:,j: + Δ_:,:j H_:j,j: (H_j:,j:)⁻¹`` with ``Δ = W − Ŵ`` and the damped H
  (the sequential OBS updates compose to exactly this, since the error is quadratic);
- RTN's matrix after ``j`` columns is ``[Ŵ_:,:j, W_:,j:]``: nothing is compensated;
- the error of a matrix ``M`` is the mean squared output error per token,
  ``‖X (W − M)ᵀ‖² / N = ½ tr((W − M) H (W − M)ᵀ)`` for ``H = 2 XᵀX / N``.

``sweep_errors`` computes the curves (testable without a display); ``gptq_sweep_widget``
draws them with a slider over the column and controls for bits, group size and act-order.
The OBS compensation behind the picture (``_gptq_state``) is private to this widget: it
needs a finished ``W_hat`` and is not a quantizer, and lab07's graded functions may not use
anything from ``llmopt.viz.quant`` but ``correlated_inputs`` (the grader reads the notebook's
code and gives 0 to a ``gptq_quantize`` that does).
``correlated_inputs`` makes the kind of inputs where GPTQ matters: correlated features
with a few large ("outlier") ones, as in a transformer's hidden states.
"""
from __future__ import annotations

import torch


def correlated_inputs(n: int, d: int, seed: int = 0, rho: float = 0.9, outliers: int = 4,
                      dtype=torch.float32) -> torch.Tensor:
    """``(n, d)`` inputs with correlated features, ``outliers`` of them 5x larger."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.eye(d, dtype=torch.float64) + rho * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    X = Z @ A                                                # (n, d), covariance AᵀA
    X[:, :outliers] *= 5
    return X.to(dtype)


def _damped_hessian(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    return H


def _gptq_state(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, j: int,
                percdamp: float = 0.01, order: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's matrix after its first ``j`` columns (in ``order``): quantized ones from
    ``W_hat``, the rest compensated by OBS. (rows, cols), float64, original column order.
    Private to the widget (see the module's docstring)."""
    W, W_hat = W.to(torch.float64), W_hat.to(torch.float64)
    cols = W.shape[1]
    order = torch.arange(cols) if order is None else order
    Hd = _damped_hessian(H, percdamp)[order][:, order]
    Wp, Qp = W[:, order], W_hat[:, order]
    M = Wp.clone()
    M[:, :j] = Qp[:, :j]
    if 0 < j < cols:
        delta = Wp[:, :j] - Qp[:, :j]                        # (rows, j)
        M[:, j:] = Wp[:, j:] + torch.linalg.solve(Hd[j:, j:], (delta @ Hd[:j, j:]).T).T
    out = torch.empty_like(M)
    out[:, order] = M
    return out


def output_error(W: torch.Tensor, M: torch.Tensor, H: torch.Tensor) -> float:
    """½ tr((W − M) H (W − M)ᵀ): the mean squared output error per token when H = 2XᵀX/N."""
    D = (W.to(torch.float64) - M.to(torch.float64))
    return float(0.5 * ((D @ H.to(torch.float64)) * D).sum())


def sweep_errors(W: torch.Tensor, H: torch.Tensor, W_gptq: torch.Tensor, W_rtn: torch.Tensor,
                 percdamp: float = 0.01, order: torch.Tensor | None = None) -> dict:
    """The curves of the widget, for ``j = 0 … cols`` columns quantized (in ``order``).

    Returns tensors: ``gptq`` and ``rtn`` (cols + 1,), the output error after j columns;
    ``gptq_col`` and ``rtn_col`` (cols,), the squared weight change ``‖W_:,q − Ŵ_:,q‖²`` of
    each column (GPTQ moves weights *more* than RTN, and the output *less*).
    """
    cols = W.shape[1]
    order = torch.arange(cols) if order is None else order
    Wd = W.to(torch.float64)
    g, r = [], []
    for j in range(cols + 1):
        g.append(output_error(Wd, _gptq_state(Wd, W_gptq, H, j, percdamp, order), H))
        M = Wd.clone()
        M[:, order[:j]] = W_rtn.to(torch.float64)[:, order[:j]]
        r.append(output_error(Wd, M, H))
    return {"gptq": torch.tensor(g), "rtn": torch.tensor(r),
            "gptq_col": ((Wd - W_gptq.to(torch.float64)) ** 2).sum(0),
            "rtn_col": ((Wd - W_rtn.to(torch.float64)) ** 2).sum(0)}


def gptq_sweep_widget(gptq_fn, rtn_fn, W: torch.Tensor | None = None, X: torch.Tensor | None = None,
                      bits: int = 3, percdamp: float = 0.01):
    """A slider over the columns of ``W`` showing GPTQ's sweep against RTN.

    ``gptq_fn(W, H, bits=, group_size=, act_order=)`` and ``rtn_fn(W, bits=, group_size=)``
    return ``(W_hat, scale, zero)``. Defaults: ``W`` (16, 48) random, ``X`` correlated.
    Returns the ipywidgets box (display it, or let the notebook show it as the cell's value).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(0)) if W is None else W
    X = correlated_inputs(512, W.shape[1], seed=1) if X is None else X
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    cols = W.shape[1]
    cache = {}

    def compute(b, gs, act):
        key = (b, gs, act)
        if key not in cache:
            Wg = gptq_fn(W, H.to(W.dtype), bits=b, group_size=gs, act_order=act)[0]
            Wr = rtn_fn(W, bits=b, group_size=gs)[0]
            order = torch.argsort(torch.diag(H), descending=True, stable=True) if act else torch.arange(cols)
            cache[key] = (Wg, Wr, order, sweep_errors(W, H, Wg, Wr, percdamp, order))
        return cache[key]

    col = widgets.IntSlider(value=cols // 2, min=0, max=cols, description="columns done")
    nbits = widgets.Dropdown(options=[2, 3, 4, 8], value=bits, description="bits")
    group = widgets.Dropdown(options=[("per row", -1), ("16", 16)], value=-1, description="group")
    act = widgets.Checkbox(value=False, description="act-order")
    out = widgets.Output()

    def draw(*_):
        Wg, Wr, order, curves = compute(nbits.value, group.value, act.value)
        j = col.value
        state = _gptq_state(W, Wg, H, j, percdamp, order)
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
            moved = (state - W.double())[:, order]
            lim = float(moved.abs().max()) or 1.0
            ax[0].imshow(moved, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            ax[0].axvline(j - 0.5, color="k")
            ax[0].set_title(f"GPTQ: W after {j} columns − W\n(left: quantized, right: compensated)")
            ax[0].set_xlabel("column (in quantization order)")
            x = torch.arange(cols)
            ax[1].bar(x - 0.2, curves["rtn_col"][order], 0.4, label="RTN")
            ax[1].bar(x + 0.2, curves["gptq_col"][order], 0.4, label="GPTQ")
            ax[1].set_title("weight change per column ‖W_:,q − Ŵ_:,q‖²")
            ax[1].set_xlabel("column (in quantization order)")
            ax[1].legend()
            steps = torch.arange(cols + 1)
            ax[2].plot(steps, curves["rtn"], label=f"RTN  {curves['rtn'][-1]:.3g}")
            ax[2].plot(steps, curves["gptq"], label=f"GPTQ {curves['gptq'][-1]:.3g}")
            ax[2].axvline(j, color="k", lw=0.8)
            ax[2].set_title("output error ‖X(W − Ŵ)ᵀ‖²/N after j columns")
            ax[2].set_xlabel("columns quantized")
            ax[2].legend()
            fig.tight_layout()
            plt.show()

    for w in (col, nbits, group, act):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([col, nbits, group, act]), out])
