"""Comparisons with messages a student can act on.

``assert_close(actual, expected)`` checks shape, dtype and values with a tolerance per
dtype and, when it fails, says *what* differs: the shapes, the dtypes, or where the
largest error is, how large it is and what the tolerance was. Labs use it in their
visible tests; the autograder uses the same tolerances when it judges hidden checks.
"""
from __future__ import annotations

import torch

# (rtol, atol) per dtype: what a correct implementation reaches with a different but
# legitimate order of floating-point operations (e.g. tiled vs. whole softmax).
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing tensors of ``dtype``; exact for integer types."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


def compare(actual, expected, *, rtol=None, atol=None, name="output", check_dtype=True):
    """Return ``None`` if ``actual`` matches ``expected``, else a message saying why not."""
    if not isinstance(actual, torch.Tensor):
        return f"{name}: expected a torch.Tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return (f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if check_dtype and actual.dtype != expected.dtype:
        return f"{name}: dtype {actual.dtype}, expected {expected.dtype}"
    d_rtol, d_atol = tolerance(expected.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if actual.numel() == 0:
        return None
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a = torch.isnan(a)
    if nan_a.any():  # always a failure: NaN > tol is False, so it must be caught here
        idx = tuple(int(i) for i in nan_a.nonzero()[0])
        return f"{name}: {int(nan_a.sum())} NaN of {a.numel()} elements, first at index {idx}"
    if not expected.is_floating_point():
        bad = a != e
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{name}: {int(bad.sum())} of {a.numel()} elements differ; first at "
                    f"index {idx}")
        return None
    err = (a - e).abs().nan_to_num(0.0)
    allowed = atol + rtol * e.abs().nan_to_num(0.0)
    bad = err > allowed
    if bad.any():
        worst = int(torch.argmax(err - allowed))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        return (f"{name}: {int(bad.sum())} of {a.numel()} elements out of tolerance; max "
                f"abs error {err.max().item():.3g} at index {idx} (allowed atol={atol:g} + "
                f"rtol={rtol:g}·|expected|)")
    return None


def assert_close(actual, expected, *, rtol=None, atol=None, name="output", check_dtype=True):
    """Like ``torch.testing.assert_close`` with a message that names what to fix."""
    msg = compare(actual, expected, rtol=rtol, atol=atol, name=name, check_dtype=check_dtype)
    if msg is not None:
        raise AssertionError(msg)
