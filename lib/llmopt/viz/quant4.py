"""Widget of lab08: a 4-bit code laid over the weight distribution, one block's absmax and error.

Block-wise 4-bit quantization (FP4/NF4, QLoRA) scales every block of 64 weights by its absmax
into [-1, 1] and rounds each value to the nearest of 16 code values. The widget shows, for a
weight matrix and the functions passed in (the student's ``quantize_4bit`` and
``dequantize_4bit``):

- left: the histogram of all weights divided by their block's absmax, with the 16 code values
  as vertical lines: NF4 puts them where the (normal) weights are dense, FP4 does not;
- right: one block: the weights, their dequantized values, ±absmax, and the errors.

``block_summary`` computes the numbers (testable without a display); ``code_figure`` draws them;
``quant4_widget`` adds a block slider, the code and double quantization. Nothing here
quantizes: every quantized value comes from the functions passed in.
"""
from __future__ import annotations

import torch


def block_summary(W: torch.Tensor, W_hat: torch.Tensor, blocksize: int, block: int) -> dict:
    """The values of block ``block`` of the flattened ``W`` and ``W_hat``, its absmax and errors."""
    w = W.reshape(-1).float()
    w_hat = W_hat.reshape(-1).float()
    lo, hi = block * blocksize, min((block + 1) * blocksize, w.numel())
    wb, hb = w[lo:hi], w_hat[lo:hi]
    err = hb - wb
    return {"w": wb, "w_hat": hb, "absmax": float(wb.abs().max()), "max_err": float(err.abs().max()),
            "rms_err": float(err.pow(2).mean().sqrt()), "rms_err_all": float((w_hat - w).pow(2).mean().sqrt()),
            "n_blocks": -(-w.numel() // blocksize)}


def _normalised(W: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Every weight divided by the max |w| of its block (for the histogram)."""
    w = W.reshape(-1).float()
    n = w.numel()
    pad = torch.zeros(-(-n // blocksize) * blocksize)
    pad[:n] = w
    b = pad.view(-1, blocksize)
    return (b / b.abs().amax(1, keepdim=True).clamp(min=1e-30)).reshape(-1)[:n]


def code_figure(W, W_hat, code, blocksize: int, block: int, title: str = "", fig=None):
    """Left: histogram of W / absmax with ``code``'s values; right: block ``block``."""
    import matplotlib.pyplot as plt
    s = block_summary(W, W_hat, blocksize, block)
    if fig is None:
        fig = plt.figure(figsize=(11, 3.6))
    fig.clf()
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(_normalised(W, blocksize).numpy(), bins=120, range=(-1, 1), color="0.7", density=True)
    for c in torch.as_tensor(code).reshape(-1).tolist():
        ax1.axvline(c, color="C3", lw=0.8)
    ax1.set_xlabel("w / absmax of its block")
    ax1.set_title(f"{title}: the 16 code values over the weights")
    x = torch.arange(s["w"].numel())
    ax2.axhline(s["absmax"], color="k", lw=0.6, ls="--")
    ax2.axhline(-s["absmax"], color="k", lw=0.6, ls="--", label="± absmax")
    ax2.plot(x, s["w"].numpy(), "o", ms=3, label="w")
    ax2.plot(x, s["w_hat"].numpy(), "x", ms=4, label="dequantized")
    ax2.vlines(x, s["w"].numpy(), s["w_hat"].numpy(), color="C3", lw=0.8)
    ax2.set_title(f"block {block}/{s['n_blocks'] - 1}: absmax {s['absmax']:.4f}, "
                  f"max err {s['max_err']:.4f}, rms {s['rms_err']:.4f}")
    ax2.set_xlabel("position in the block")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig, s


def quant4_widget(quantize_fn, dequantize_fn, codes: dict, W: torch.Tensor, blocksize: int = 64):
    """Slider over the blocks of ``W``; a dropdown over ``codes`` ({"nf4": code, "fp4": code});
    a checkbox for double quantization. Calls ``quantize_fn(W, blocksize, quant_type,
    double_quant)`` and ``dequantize_fn(packed, state)``."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    cache = {}

    def dequantized(qt, dq):
        if (qt, dq) not in cache:
            packed, state = quantize_fn(W, blocksize=blocksize, quant_type=qt, double_quant=dq)
            cache[qt, dq] = dequantize_fn(packed, state)
        return cache[qt, dq]

    n_blocks = -(-W.numel() // blocksize)
    block = widgets.IntSlider(0, 0, n_blocks - 1, description="block")
    qt = widgets.Dropdown(options=list(codes), description="code")
    dq = widgets.Checkbox(False, description="double quant")
    out = widgets.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            W_hat = dequantized(qt.value, dq.value)
            fig, s = code_figure(W, W_hat, codes[qt.value], blocksize, block.value,
                                 title=qt.value.upper() + (" + DQ" if dq.value else ""))
            plt.show()
            print(f"whole matrix: rms error {s['rms_err_all']:.5f}")

    for w in (block, qt, dq):
        w.observe(draw, names="value")
    draw()
    box = widgets.VBox([widgets.HBox([block, qt, dq]), out])
    display(box)
    return box
