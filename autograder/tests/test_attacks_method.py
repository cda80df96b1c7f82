"""Shortcuts that skip a lab's method, graded end to end in the sandbox (family 3 of the
attack suite; the rules themselves are unit-tested in test_static.py and the labs' check tests).

- lab04 with no Triton at all (plain attention in an autograd.Function) scored 15/15 before
  the method rules; SDPA inside the Triton parts scored 13/15. Both keep at most 40% now.
- lab07's gptq_quantize built on the per-column OBS part scored full marks; its check fails now.
Measurement and widget cells are dropped (plain student cells) to keep the run short.
"""
import json
import os

import pytest

from autograder import course
from autograder.grade import grade_folder
from autograder.notebook import cell_source, nbgrader_meta
from autograder.release import sample_submission

HEAVY = ("widget(", "time_ms(", "perplexity(")


def light(nb):
    nb = json.loads(json.dumps(nb))
    nb["cells"] = [c for c in nb["cells"] if nbgrader_meta(c) or c["cell_type"] != "code"
                   or not any(k in cell_source(c) for k in HEAVY)]
    return nb


def answer(nb, grade_id, source):
    """A student's answer cell ``grade_id`` replaced whole by ``source``."""
    for cell in nb["cells"]:
        if nbgrader_meta(cell).get("grade_id") == grade_id:
            cell["source"] = source
            return nb
    raise KeyError(grade_id)


def grade(tmp_path, lab, submissions):
    subs = tmp_path / "subs"
    for student, nb in submissions.items():
        (subs / student / lab).mkdir(parents=True)
        (subs / student / lab / f"{lab}.ipynb").write_text(json.dumps(nb))
    results = grade_folder(lab, str(subs), str(tmp_path / "g.csv"), jobs=2,
                           workdir=str(tmp_path / "w"), timeout=float(os.environ.get(
                               "AUTOGRADER_TEST_TIMEOUT", "240")), progress=False, gradebook=False)
    return {r.student: r for r in results}


NAIVE = '''
def attention_naive_mine(q, k, v, causal=False, scale=None):
    s = (q.float() @ k.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), torch.logsumexp(s, -1)
'''


@pytest.fixture(scope="module")
def lab04(tmp_path_factory):
    lab = "lab04_flash_attention"
    release = course.release_notebook(lab)
    full = light(sample_submission(lab, release))
    no_triton = json.loads(json.dumps(full))
    answer(no_triton, "flash_fwd_kernel_impl", NAIVE)
    answer(no_triton, "flash_attention_fwd_impl",
           "def flash_attention_fwd(q, k, v, causal=False, scale=None):\n"
           "    return attention_naive_mine(q, k, v, causal, scale)\n")
    answer(no_triton, "flash_bwd_kernels_impl", "# no kernels\n")
    answer(no_triton, "flash_attention_impl",
           "class _Plain(torch.autograd.Function):\n"
           "    @staticmethod\n"
           "    def forward(ctx, q, k, v, causal, scale):\n"
           "        with torch.enable_grad():\n"
           "            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))\n"
           "            o = attention_naive_mine(qq, kk, vv, causal, scale)[0]\n"
           "        ctx.save_for_backward(qq, kk, vv, o)\n"
           "        return o.detach()\n"
           "    @staticmethod\n"
           "    def backward(ctx, do):\n"
           "        qq, kk, vv, o = ctx.saved_tensors\n"
           "        return (*torch.autograd.grad(o, (qq, kk, vv), do), None, None)\n\n\n"
           "def flash_attention(q, k, v, causal=False, scale=None):\n"
           "    return _Plain.apply(q, k, v, causal, scale)\n")
    sdpa = json.loads(json.dumps(full))
    answer(sdpa, "flash_attention_fwd_impl",
           "import torch.nn.functional as G\n\n\n"
           "def flash_attention_fwd(q, k, v, causal=False, scale=None):\n"
           "    o = G.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)\n"
           "    s = (q.float() @ k.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)\n"
           "    if causal:\n"
           "        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float('-inf'))\n"
           "    return o, torch.logsumexp(s, -1)\n")
    return grade(tmp_path_factory.mktemp("lab04"), lab, {"no_triton": no_triton, "sdpa": sdpa})


def test_lab04_without_its_own_kernels_keeps_at_most_40_percent(lab04):
    for student in ("no_triton", "sdpa"):
        r = lab04[student]
        assert r.status == "graded", r.message
        assert r.score <= 0.4 * r.max_score, (student, r.score, r.message)
        for gid in ("check_flash_attention_fwd", "check_flash_attention_fwd_causal", "check_flash_attention"):
            assert r.cells[gid]["score"] == 0, (student, gid, r.cells[gid]["message"])
    assert "launches no Triton kernel of your own" in lab04["no_triton"].cells["check_flash_attention_fwd"]["message"]
    assert lab04["no_triton"].cells["check_flash_attention_torch"]["score"] > 0  # its own torch parts still count


@pytest.fixture(scope="module")
def lab07(tmp_path_factory):
    lab = "lab07_gptq"
    full = light(sample_submission(lab, course.release_notebook(lab)))
    obs = json.loads(json.dumps(full))
    answer(obs, "gptq_quantize_impl",
           "def gptq_quantize(W, H, bits=4, group_size=-1, block_size=128, percdamp=0.01,\n"
           "                  act_order=False, sym=False):\n"
           "    return obs_quantize_columns(W, H, bits, group_size, percdamp, sym)\n")
    return grade(tmp_path_factory.mktemp("lab07"), lab, {"obs": obs})


def test_lab07_gptq_on_per_column_obs_loses_the_gptq_points(lab07):
    r = lab07["obs"]
    assert r.status == "graded", r.message
    msg = r.cells["check_gptq_quantize"]["message"]
    assert r.cells["check_gptq_quantize"]["score"] == 0 and "obs_quantize_columns" in msg, msg
    assert r.cells["check_obs_quantize_columns"]["score"] > 0  # the part it did write still counts
