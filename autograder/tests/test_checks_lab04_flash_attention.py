"""lab04's hidden checks, tested both ways: the reference passes; stubs and the mistakes of
course/mistakes.md (lab04 row) fail, each with a message that points at the mistake."""

import pytest
import torch

import llmopt  # noqa: F401  (first: Triton's interpreter on a CPU, before triton is imported)
import labkit
import triton
import triton.language as tl
from autograder import grade_functions
from llmopt import flash_attention as ref

LAB = "lab04_flash_attention"
CHECKS = {
    "block_sizes": ref.block_sizes,
    "softmax_triton": ref.softmax_triton,
    "merge_softmax_stats": ref.merge_softmax_stats,
    "online_softmax": ref.online_softmax,
    "flash_attention_v1_torch": ref.flash_attention_v1_torch,
    "flash_attention_torch": ref.flash_attention_torch,
    "flash_attention_fwd": ref.flash_attention_fwd,
    "flash_attention_fwd_causal": ref.flash_attention_fwd,
    "flash_attention": ref.flash_attention,
    "flash_attention_saved": ref.flash_attention,
}


def stub(*args, **kwargs):
    raise NotImplementedError()


def grade(name, fn, seed=1):
    return grade_functions(LAB, {name: fn}, seed=seed)[name]


def failed_with(result, text):
    """Not all cases pass and some message contains ``text``."""
    return not result.ok and any(text in m for m in result.messages), result.summary()


@pytest.mark.parametrize("seed", [0, 12345])
def test_reference_passes(seed):
    results = grade_functions(LAB, CHECKS, seed=seed)
    for result in results.values():
        assert result.ok, result.summary()


@pytest.mark.parametrize("name", list(CHECKS))
def test_stub_fails(name):
    result = grade(name, stub)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0]


# --- part 1: the lecture's block sizes -------------------------------------------------------

def blocks(ceil=True, in_bytes=False, use_min=True, paren=True, swap=False, fraction=False):
    import math

    def fn(sram_bytes, d, bytes_per_el=4):
        M = sram_bytes if in_bytes else sram_bytes // bytes_per_el
        x = M / (4 * d) if paren else M / 4 * d
        B_c = x if fraction else math.ceil(x) if ceil else math.floor(x)
        B_r = min(B_c, d) if use_min else B_c
        return (B_c, B_r) if swap else (B_r, B_c)
    return fn


def test_block_sizes_helper_is_right_without_mistakes():
    assert grade("block_sizes", blocks()).ok


@pytest.mark.parametrize("bug,text", [(dict(ceil=False), "rounds up"),
                                      (dict(in_bytes=True), "numbers, not bytes"),
                                      (dict(use_min=False), "min(⌈M / 4d⌉, d)"),
                                      (dict(paren=False), "divides by 4d"),
                                      (dict(swap=True), "the order is (B_r, B_c)"),
                                      (dict(fraction=True), "whole numbers")])
def test_block_size_mistakes_fail(bug, text):
    for seed in (0, 1):
        assert failed_with(grade("block_sizes", blocks(**bug), seed), text)


# --- part 4: the warm-up Triton kernel, with one mistake each ---------------------------------

@triton.jit
def _softmax_variant(X, Y, n_cols, stride, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
                     RESCALE: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + offs
        x = tl.load(X + row * stride + cols, mask=cols < n_cols, other=TAIL)
        if UPCAST:
            x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        if RESCALE:
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        else:
            l = l + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    for start in range(0, n_cols, BLOCK_N):
        cols = start + offs
        x = tl.load(X + row * stride + cols, mask=cols < n_cols, other=TAIL)
        if UPCAST:
            x = x.to(tl.float32)
        tl.store(Y + row * stride + cols, (tl.exp(x - m) / l).to(Y.dtype.element_ty), mask=cols < n_cols)


def softmax_variant(tail=float("-inf"), rescale=True, upcast=True):
    def fn(x, block_size=64):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        y = torch.empty_like(x2)
        _softmax_variant[(x2.shape[0],)](x2, y, n, x2.stride(0), BLOCK_N=block_size, TAIL=tail,
                                         RESCALE=rescale, UPCAST=upcast)
        return y.reshape(x.shape)
    return fn


def test_softmax_variant_is_right_without_mistakes():
    assert grade("softmax_triton", softmax_variant()).ok


def test_softmax_tail_filled_with_zero_fails():
    assert failed_with(grade("softmax_triton", softmax_variant(tail=0.0)), "-inf")


def test_softmax_without_rescaling_l_fails():
    assert failed_with(grade("softmax_triton", softmax_variant(rescale=False)), "ℓ must be rescaled")


def test_softmax_bf16_without_upcast_fails_in_the_interpreter():
    if not ref._interpreting():
        pytest.skip("bf16 tiles are only wrong in Triton's CPU interpreter")
    assert failed_with(grade("softmax_triton", softmax_variant(upcast=False)), "fp32 right after tl.load")


def test_softmax_without_a_kernel_fails_in_the_kernel_too():
    """torch's softmax: right values, no launch (the trusted failure is the METHOD rule below)."""
    r = grade("softmax_triton", lambda x, block_size=64: torch.softmax(x.float(), -1).to(x.dtype))
    assert r.passed == 0 and all("no Triton kernel was launched" in m for m in r.messages), r.messages


# --- mutants: a tiled forward with one mistake each ---------------------------------------

def tiled(q, k, v, causal=False, scale=None, block_q=16, block_k=16, rescale_o=True,
          scale_twice=False, no_scale=False, strict_causal=False, tail_zero=False,
          lse_early=False):
    """FA2's forward in PyTorch with switchable mistakes; returns (O, L)."""
    B, H, N, d = q.shape
    n_k = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    scale = 1.0 if no_scale else scale * scale if scale_twice else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if tail_zero:  # pad K, V with zero rows whose scores take part unmasked
        pad = -n_k % block_k
        kf = torch.cat([kf, kf.new_zeros(B, H, pad, d)], 2)
        vf = torch.cat([vf, vf.new_zeros(B, H, pad, d)], 2)
    O, L = torch.empty(B, H, N, d), torch.empty(B, H, N)
    for i in range(0, N, block_q):
        Q_i = qf[:, :, i:i + block_q]
        rows = torch.arange(i, i + Q_i.shape[2])
        m = torch.full(Q_i.shape[:-1], float("-inf"))
        l = torch.zeros(Q_i.shape[:-1])
        acc = torch.zeros_like(Q_i)
        lse = None
        for j in range(0, kf.shape[2], block_k):
            S = Q_i @ kf[:, :, j:j + block_k].transpose(-2, -1) * scale
            if causal:
                cols = torch.arange(j, j + S.shape[-1])
                hide = cols[None] >= rows[:, None] if strict_causal else cols[None] > rows[:, None]
                S = S.masked_fill(hide, float("-inf"))
            if lse_early and j + block_k >= kf.shape[2] and j > 0:
                lse = m + torch.log(l)
            m_new = torch.maximum(m, S.max(-1).values)
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            P = torch.exp(S - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = alpha * l + P.sum(-1)
            acc = (alpha[..., None] * acc if rescale_o else acc) + P @ vf[:, :, j:j + block_k]
            m = m_new
        O[:, :, i:i + block_q] = acc / l[..., None]
        L[:, :, i:i + block_q] = m + torch.log(l) if lse is None else lse
    return O.to(q.dtype), L


def as_v1(**bug):
    return lambda q, k, v, block_q=64, block_k=64: tiled(q, k, v, block_q=block_q, block_k=block_k, **bug)[0]


def as_torch(**bug):
    return lambda q, k, v, causal=False, block_q=64, block_k=64: tiled(
        q, k, v, causal, block_q=block_q, block_k=block_k, **bug)


def as_fwd(**bug):
    return lambda q, k, v, causal=False, scale=None: tiled(q, k, v, causal, scale, **bug)


def test_tiled_helper_is_right_without_mistakes():
    assert grade("flash_attention_torch", as_torch()).ok
    r = grade("flash_attention_fwd_causal", as_fwd())         # right values, but no Triton
    assert r.passed == 0 and all("no Triton kernel was launched" in m for m in r.messages), r.messages


def test_in_kernel_counters_fail_torch_attention_in_the_triton_parts():
    """An extra, early failure (the trusted one is autograder.static's reading of the code)."""
    def sdpa_after_a_launch(q, k, v, causal=False, scale=None):
        o, lse = ref.flash_attention_fwd(q, k, v, causal, scale)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=causal, scale=scale)
        return o.to(q.dtype), lse
    r = grade("flash_attention_fwd", sdpa_after_a_launch)
    assert r.passed == 0 and all("scaled_dot_product_attention" in m for m in r.messages), r.messages
    r = grade("flash_attention", SavesP.apply)
    assert r.passed == 0 and all("no Triton kernel was launched" in m for m in r.messages), r.messages


def test_merge_without_rescaling_l_fails():
    result = grade("merge_softmax_stats", lambda m1, l1, m2, l2: (torch.maximum(m1, m2), l1 + l2))
    assert failed_with(result, "rescaled by e^{m_half - m}")


def test_merge_nan_on_empty_state_fails():
    def naive(m1, l1, m2, l2):
        m = torch.maximum(m1, m2)
        return m, torch.exp(m1 - m) * l1 + torch.exp(m2 - m) * l2
    # -inf - finite is fine; this one subtracts m from itself in the wrong order
    def nan_merge(m1, l1, m2, l2):
        m = torch.maximum(m1, m2)
        return m, torch.exp(m1 - m1) * l1 * torch.exp(m1 - m) + torch.exp(m2 - m) * l2
    assert grade("merge_softmax_stats", naive).ok
    assert failed_with(grade("merge_softmax_stats", nan_merge), "NaN")


def test_softmax_per_block_fails():
    def per_block(x, block_size):
        return torch.cat([torch.softmax(x[..., j:j + block_size], -1)
                          for j in range(0, x.shape[-1], block_size)], -1)
    assert failed_with(grade("online_softmax", per_block), "rows do not sum to 1")


def test_v1_without_rescaling_o_fails():
    assert failed_with(grade("flash_attention_v1_torch", as_v1(rescale_o=False)),
                       "rescaled by e^{m_old - m_new}")


@pytest.mark.parametrize("bug,text", [(dict(no_scale=True), "not scaled"),
                                      (dict(scale_twice=True), "applied twice")])
def test_scale_mistakes_fail(bug, text):
    assert failed_with(grade("flash_attention_torch", as_torch(**bug)), text)
    assert failed_with(grade("flash_attention_fwd", as_fwd(**bug)), text)


def test_causal_off_by_one_fails():
    assert failed_with(grade("flash_attention_torch", as_torch(strict_causal=True)), "off by one")
    assert failed_with(grade("flash_attention_fwd_causal", as_fwd(strict_causal=True)), "off by one")


def test_causal_flag_ignored_fails():
    noncausal = lambda q, k, v, causal=False, scale=None: ref.flash_attention_fwd(q, k, v, False, scale)  # noqa: E731
    assert failed_with(grade("flash_attention_fwd_causal", noncausal), "causal mask is missing")


def test_tail_filled_with_zero_fails():
    assert failed_with(grade("flash_attention_fwd", as_fwd(tail_zero=True)), "-inf")
    assert failed_with(grade("flash_attention_torch", as_torch(tail_zero=True)), "-inf")


def test_lse_before_last_block_fails():
    assert failed_with(grade("flash_attention_torch", as_torch(lse_early=True)), "before the last")
    assert failed_with(grade("flash_attention_fwd", as_fwd(lse_early=True)), "before the last")


def test_o_not_rescaled_fails_in_torch_and_fwd():
    assert failed_with(grade("flash_attention_torch", as_torch(rescale_o=False)), "e^{m_old - m_new}")
    assert not grade("flash_attention_fwd", as_fwd(rescale_o=False)).ok


def test_bf16_without_upcast_fails_in_the_interpreter(monkeypatch):
    """The library's kernel with its upcast switched off: right on a GPU, wrong here."""
    if not ref._interpreting():
        pytest.skip("bf16 tiles are only wrong in Triton's CPU interpreter")
    monkeypatch.setattr(ref, "_launch_params",
                        lambda q: (1 << (q.shape[-1] - 1).bit_length(), q.dtype == torch.float32,
                                   "ieee" if q.dtype == torch.float32 else "tf32"))
    result = grade("flash_attention_fwd", ref.flash_attention_fwd)
    assert failed_with(result, "bfloat16")
    assert failed_with(result, "fp32 right after tl.load")


# --- the backward --------------------------------------------------------------------------

class SavesP(torch.autograd.Function):
    """Right gradients, but keeps the N×N matrix P for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = q @ k.transpose(-2, -1) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).tril().logical_not(), float("-inf"))
        p = torch.softmax(s, -1)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return p @ v

    @staticmethod
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        dv = p.transpose(-2, -1) @ do
        dp = do @ v.transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        return ds @ k * ctx.scale, ds.transpose(-2, -1) @ q * ctx.scale, dv, None, None


class SavesMAndL(ref.FlashAttention):
    """Keeps m and ℓ separately instead of one L = m + log ℓ."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        o, lse = ref.flash_attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, torch.zeros_like(lse))
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, _ = ctx.saved_tensors
        return (*ref.flash_attention_bwd(q, k, v, o, lse, do, ctx.causal, ctx.scale), None, None)


def test_backward_keeping_p_fails():
    assert failed_with(grade("flash_attention_saved", SavesP.apply), "N×N")


def test_backward_keeping_p_as_attribute_fails():
    class PAttr(SavesP):
        @staticmethod
        def forward(ctx, q, k, v, causal=False, scale=None):
            o = SavesP.forward(ctx, q, k, v, causal, scale)
            ctx.p = ctx.saved_tensors[3]
            ctx.save_for_backward(q, k, v, o.detach(), o.new_zeros(o.shape[:3]))
            return o
    assert failed_with(grade("flash_attention_saved", PAttr.apply), "N×N")


def test_backward_keeping_m_and_l_fails():
    assert failed_with(grade("flash_attention_saved", SavesMAndL.apply), "exactly one log-sum-exp")


def test_backward_from_wrong_lse_fails():
    """lse taken before the last block: the forward is right, the gradients are not."""
    class EarlyLse(ref.FlashAttention):  # the reference backward, fed a wrong lse
        @staticmethod
        def forward(ctx, q, k, v, causal=False, scale=None):
            o, lse = as_fwd(lse_early=True)(q, k, v, causal, scale)
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.causal, ctx.scale = causal, scale
            return o
    result = grade("flash_attention", EarlyLse.apply)
    assert not result.ok and any(t in " ".join(result.messages) for t in ("dQ", "dK", "dV"))


def test_gradient_mistake_fails():
    def no_scale_in_dq(q, k, v, causal=False, scale=None):
        class F(ref.FlashAttention):
            @staticmethod
            def backward(ctx, do):
                dq, dk, dv, *_ = ref.FlashAttention.backward(ctx, do)
                return dq / (q.shape[-1] ** -0.5 if scale is None else scale), dk, dv, None, None
        return F.apply(q, k, v, causal, scale)
    assert failed_with(grade("flash_attention", no_scale_in_dq), "dQ")


# --- the method: the Triton parts must launch the student's own kernels (autograder/static.py) --

import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

from autograder import static  # noqa: E402
from autograder.notebook import cell_source, grade_cells, nbgrader_meta  # noqa: E402

SOLUTION = pathlib.Path(__file__).parents[2] / "solutions" / LAB / f"{LAB}.ipynb"
ATTENTION_CHECKS = {"flash_attention_fwd", "flash_attention_fwd_causal", "flash_attention",
                    "flash_attention_saved"}
TRITON_CHECKS = ATTENTION_CHECKS | {"softmax_triton"}


def solution_nb():
    return json.loads(SOLUTION.read_text())


def edit(nb, grade_id, fn):
    """Replace the source of the solution cell ``grade_id`` by ``fn(old_source)``."""
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("grade_id") == grade_id:
            cell["source"] = fn(cell_source(cell))
            return nb
    raise KeyError(grade_id)


def add_cell(nb, source, before="flash_attention_fwd_impl"):
    """Insert a student's own code cell before the solution cell ``before``."""
    i = next(i for i, c in enumerate(nb["cells"]) if nbgrader_meta(c).get("grade_id") == before)
    nb["cells"].insert(i, {"cell_type": "code", "metadata": {}, "source": source})
    return nb


def fwd_body(nb, body):
    """flash_attention_fwd (the whole answer cell, given launcher included) with ``body``."""
    return edit(nb, "flash_attention_fwd_impl", lambda src: (
        "def flash_attention_fwd(q, k, v, causal=False, scale=None):\n" + body.strip("\n") + "\n"))


def stubbed(nb):
    """The student's release: every solution replaced by raise NotImplementedError()."""
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("solution") and cell["cell_type"] == "code":
            cell["source"] = re.sub(r"( *)### BEGIN SOLUTION.*?### END SOLUTION",
                                    r"\1raise NotImplementedError()", cell_source(cell), flags=re.S)
    return nb


def verdicts(nb):
    return static.method_verdicts(LAB, nb)


LAUNCH = """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _flash_fwd_kernel[(triton.cdiv(N, 64), B * H)](
        q, k, v, o, lse, scale, q.stride(0), q.stride(1), q.stride(2), H, N,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=64, BLOCK_N=64,
        CAUSAL=causal, UPCAST=True)
"""


def test_reference_solution_follows_the_method():
    assert verdicts(solution_nb()) == {}


def test_release_stubs_fail_the_triton_parts():
    out = verdicts(stubbed(solution_nb()))
    assert set(out) == TRITON_CHECKS
    # the forward's launcher is given but its grid is the student's line: undefined in the release
    for check, m in out.items():
        assert "launches no Triton kernel of your own" in m or (
            check.startswith("flash_attention_fwd") and "uses grid" in m), (check, m)


def test_no_triton_at_all_keeps_at_most_40_percent():
    """Plain attention in an autograd.Function (it scored 15/15 before the method rules)."""
    nb = fwd_body(solution_nb(), "    return attention_naive(q, k, v, causal, scale), None")
    nb = edit(nb, "flash_bwd_kernels_impl", lambda src: "# no kernels\n")
    nb = edit(nb, "flash_fwd_kernel_impl", lambda src: "# no kernels\n")
    nb = edit(nb, "flash_attention_impl", lambda src: (
        "class FlashAttention(torch.autograd.Function):\n"
        "    pass\n\n\n"
        "def flash_attention(q, k, v, causal=False, scale=None):\n"
        "    return attention_naive(q, k, v, causal, scale)\n"))
    out = verdicts(nb)
    assert set(out) == ATTENTION_CHECKS
    assert all("launches no Triton kernel of your own" in m for m in out.values()), out
    kept = sum(gc.points * sum(c not in out for c in gc.checks) / len(gc.checks)
               for gc in grade_cells(solution_nb()))
    total = sum(gc.points for gc in grade_cells(solution_nb()))
    assert kept <= 0.4 * total, (kept, total)


@pytest.mark.parametrize("variant", ["direct", "alias", "from_import", "helper", "renamed",
                                     "computed_getattr"])
def test_sdpa_inside_the_triton_parts_fails(variant):
    nb = solution_nb()
    call = {"direct": "torch.nn.functional.scaled_dot_product_attention",
            "alias": "G.scaled_dot_product_attention", "from_import": "a",
            "helper": "my_helper", "renamed": "mine",
            "computed_getattr": 'getattr(torch.nn.functional, "scaled_dot" + "_product_attention")'}[variant]
    cells = {"alias": "import torch.nn.functional as G",
             "from_import": "from torch.nn.functional import scaled_dot_product_attention as a",
             "helper": "def my_helper(q, k, v, **kw):\n    import torch.nn.functional as H\n"
                       "    return H.scaled_dot_product_attention(q, k, v, **kw)\n",
             "renamed": "import torch.nn.functional as G\nattn = G.scaled_dot_product_attention\n"
                        "mine = attn\n"}
    if variant in cells:
        add_cell(nb, cells[variant], before="online_softmax_impl")
    nb = fwd_body(nb, LAUNCH + f"    o = {call}(q, k, v, is_causal=causal, scale=scale)\n"
                               "    return o, lse\n")
    out = verdicts(nb)
    assert set(out) == ATTENTION_CHECKS, out
    text = "computed name" if variant == "computed_getattr" else "scaled_dot_product_attention"
    assert all(text in m for m in out.values()), out


def test_dummy_kernel_with_torch_attention_fails():
    """A Triton kernel that loads, stores and dots something is launched; O comes from torch."""
    nb = add_cell(solution_nb(), (
        "@triton.jit\n"
        "def _dummy(X, BLOCK: tl.constexpr):\n"
        "    i = tl.arange(0, BLOCK)\n"
        "    x = tl.load(X + i[:, None] * BLOCK + i[None, :])\n"
        "    tl.store(X + i[:, None] * BLOCK + i[None, :], tl.dot(x, x))\n"))
    nb = fwd_body(nb, """
    scratch = torch.zeros(16, 16)
    _dummy[(1,)](scratch, BLOCK=16)
    s = (q.float() @ k.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), torch.logsumexp(s, -1)
""")
    out = verdicts(nb)
    assert set(out) == ATTENTION_CHECKS
    assert all("the @ operator" in m and "inside your @triton.jit kernels" in m for m in out.values()), out


def test_torch_tiled_forward_behind_a_kernel_launch_fails():
    """The Triton forward returns part 3's PyTorch result after launching the real kernel."""
    nb = fwd_body(solution_nb(), LAUNCH + "    return flash_attention_torch(q, k, v, causal)\n")
    out = verdicts(nb)
    assert set(out) == ATTENTION_CHECKS
    assert all("(in flash_attention_torch)" in m for m in out.values()), out


def test_reference_library_kernel_fails():
    nb = add_cell(solution_nb(), "from llmopt.flash_attention import flash_attention_fwd as _fwd")
    nb = fwd_body(nb, "    return _fwd(q, k, v, causal, scale)\n")
    out = verdicts(nb)
    assert "llmopt.flash_attention.flash_attention_fwd" in out["flash_attention_fwd"], out


def test_release_skeleton_launches_no_kernel_of_its_own():
    """The release's forward skeleton launches a kernel with loads and stores but no tl.dot:
    it is not the student's kernel yet."""
    nb = stubbed(solution_nb())
    launcher = next(cell_source(c) for c in solution_nb()["cells"]
                    if nbgrader_meta(c).get("grade_id") == "flash_attention_fwd_impl")
    out = verdicts(edit(nb, "flash_attention_fwd_impl", lambda src: launcher))
    for check in ("flash_attention_fwd", "flash_attention_fwd_causal"):
        assert "launches no Triton kernel of your own" in out[check] and "tl.dot" in out[check], out


def softmax_answer(nb, source):
    return edit(nb, "softmax_triton_impl", lambda src: source)


def test_softmax_triton_without_a_kernel_fails():
    nb = softmax_answer(solution_nb(), "def softmax_triton(x, block_size=64):\n"
                                       "    return torch.softmax(x, -1)\n")
    out = verdicts(nb)
    assert set(out) == {"softmax_triton"} and "launches no Triton kernel of your own" in out["softmax_triton"], out


@pytest.mark.parametrize("shortcut,text", [
    ("torch.softmax(x2, -1)", "softmax"),
    ("x2.exp() / x2.exp().sum(-1, keepdim=True)", "exp"),
    ("torch.nn.functional.softmax(x2, -1)", "torch.nn"),
])
def test_softmax_triton_with_torch_after_a_launch_fails(shortcut, text):
    """The real kernel is launched, but the returned values come from torch."""
    nb = solution_nb()
    src = next(cell_source(c) for c in nb["cells"] if nbgrader_meta(c).get("grade_id") == "softmax_triton_impl")
    src = src.replace("    return y.reshape(x.shape)", f"    y = {shortcut}\n    return y.reshape(x.shape)")
    out = verdicts(softmax_answer(nb, src))
    assert set(out) == {"softmax_triton"} and text in out["softmax_triton"], out


def test_softmax_kernel_that_calls_torch_fails():
    nb = solution_nb()
    src = next(cell_source(c) for c in nb["cells"] if nbgrader_meta(c).get("grade_id") == "softmax_triton_impl")
    src = src.replace("tl.exp(x - m) / l", "torch.exp(x - m) / l")
    out = verdicts(softmax_answer(nb, src))
    assert "uses torch.exp: a kernel may only use triton.language" in out["softmax_triton"], out


def test_torch_parts_must_not_call_softmax():
    nb = edit(solution_nb(), "online_softmax_impl", lambda src: src.replace(
        "return torch.exp(x - m[..., None]) / l[..., None]", "return x.softmax(-1)"))
    out = verdicts(nb)
    assert set(out) == {"online_softmax"} and "softmax" in out["online_softmax"], out


def test_unparsable_solution_cell_fails_its_checks():
    nb = edit(solution_nb(), "flash_attention_fwd_impl", lambda src: src.replace("):", ")", 1))
    out = verdicts(nb)
    assert out["flash_attention_fwd"].startswith("could not read the code of flash_attention_fwd")


# --- NaN never passes; the output specs match what the reference records ---------------------

def test_nan_in_an_output_fails_with_a_message_saying_so():
    def nan_rows(q, k, v, causal=False, scale=None):
        o, lse = ref.flash_attention_fwd(q, k, v, causal, scale)
        o[..., 0, :] = float("nan")
        return o, lse
    assert failed_with(grade("flash_attention_fwd", nan_rows), "NaN")

    def nan_lse(q, k, v, causal=False, block_q=64, block_k=64):
        o, lse = ref.flash_attention_torch(q, k, v, causal, block_q, block_k)
        return o, torch.full_like(lse, float("nan"))
    assert failed_with(grade("flash_attention_torch", nan_lse), "NaN")


def test_compare_fails_on_nan_even_where_nan_is_expected():
    from llmopt.testing import compare
    nan = torch.tensor([1.0, float("nan")])
    assert "NaN" in compare(nan, torch.tensor([1.0, 2.0]))
    assert "NaN" in compare(nan, nan.clone())
    assert "NaN" in compare(nan, torch.tensor([1, 2]), check_dtype=False)


def test_output_specs_match_the_reference_records():
    labkit.assert_outputs_match_reference(LAB, CHECKS)
