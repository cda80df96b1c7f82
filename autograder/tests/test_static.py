"""autograder.static: reading a notebook's code on the trusted side (aliases, helpers in other
cells, renaming, dynamic access, magics, unparsable cells)."""
import pytest

from autograder import static
from autograder.static import (Code, calls, does_not_reach, forbids, imports_only,
                               launches_triton_kernel, no_dynamic_access, no_llmopt_imports, verdicts)

IMPORTS = """
import math
import torch
import triton
import triton.language as tl
import torch.nn.functional as F
"""

KERNEL = """
@triton.jit
def _kernel(X, Y, O, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i[:, None] * N + i[None, :])
    y = tl.load(Y + i[:, None] * N + i[None, :])
    tl.store(O + i[:, None] * N + i[None, :], tl.dot(x, y))
"""

HOST = """
def fwd(q, k, v, causal=False, scale=None):
    q = q.contiguous()
    o = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _kernel[(triton.cdiv(q.shape[2], 16),)](q, k, o, N=16)
    return o
"""

RULES = [no_dynamic_access(), no_llmopt_imports(), launches_triton_kernel(),
         forbids("*attention*", "*softmax*", "softmax", "exp", "matmul", "torch.nn", "@", "**", why=" — no")]


def nb(*cells):
    return {"cells": [{"cell_type": "code", "source": c} for c in cells]}


def verdict(*cells, rules=RULES, fn="fwd"):
    """The message for ``fn`` under ``rules``, or None."""
    return verdicts(Code(nb(*cells)), {fn: rules}).get(fn)


def test_honest_kernel_passes():
    assert verdict(IMPORTS, KERNEL, HOST) is None


def test_source_as_list_of_lines_and_markdown_cells():
    cells = nb(IMPORTS, KERNEL, HOST)["cells"]
    cells[2]["source"] = HOST.splitlines(keepends=True)
    cells.insert(0, {"cell_type": "markdown", "source": "# def fwd(): exec('x')"})
    assert verdicts(Code({"cells": cells}), {"fwd": RULES}) == {}


def test_no_kernel_at_all_fails():
    msg = verdict(IMPORTS, "def fwd(q, k, v):\n    return q + k + v\n")
    assert "launches no Triton kernel of your own" in msg


@pytest.mark.parametrize("cells,shown", [
    ((IMPORTS, KERNEL, HOST.replace("return o", "return F.scaled_dot_product_attention(q, k, v)")),
     "torch.nn.functional.scaled_dot_product_attention"),
    ((IMPORTS, "import torch.nn.functional as G", KERNEL,
      HOST.replace("return o", "return G.scaled_dot_product_attention(q, k, v)")),
     "torch.nn.functional.scaled_dot_product_attention"),
    ((IMPORTS, "from torch.nn.functional import scaled_dot_product_attention as a", KERNEL,
      HOST.replace("return o", "return a(q, k, v)")), "torch.nn.functional.scaled_dot_product_attention"),
    ((IMPORTS, "from torch.nn import functional", KERNEL,
      HOST.replace("return o", "return functional.softmax(q, -1)")), "softmax"),
    ((IMPORTS, KERNEL, "def helper(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)\n",
      HOST.replace("return o", "return helper(q, k, v)")), "scaled_dot_product_attention"),
    ((IMPORTS, KERNEL, "attn = F.scaled_dot_product_attention\nmine = attn\n",
      HOST.replace("return o", "return mine(q, k, v)")), "scaled_dot_product_attention"),
    ((IMPORTS, KERNEL, HOST.replace("return o", "return getattr(F, 'softmax')(q, -1)")), "softmax"),
    ((IMPORTS, KERNEL, HOST.replace("return o", "return q.softmax(-1)")), "softmax"),
    ((IMPORTS, KERNEL, HOST.replace("return o", "return torch.exp(q)")), "torch.exp"),
    ((IMPORTS, KERNEL, HOST.replace("return o", "return (q @ k) * o")), "the @ operator"),
    ((IMPORTS, KERNEL, HOST.replace("return o", "return math.e ** q")), "computed exponent"),
    ((IMPORTS, KERNEL, HOST.replace("def fwd(q, k, v,", "def fwd(q, k, v, f=F.softmax,")), "softmax"),
    ((IMPORTS, "from torch.nn.functional import *", KERNEL,
      HOST.replace("return o", "return scaled_dot_product_attention(q, k, v)")), "scaled_dot"),
    ((IMPORTS, KERNEL, "def setup():\n    global g\n    g = F.scaled_dot_product_attention\n",
      HOST.replace("return o", "return g(q, k, v)")), "scaled_dot_product_attention"),
    ((IMPORTS, KERNEL, "class A:\n    @staticmethod\n    def go(q):\n        return torch.softmax(q, -1)\n",
      HOST.replace("return o", "return A.go(q)")), "softmax"),
    ((IMPORTS, KERNEL, "def deco(f):\n    return lambda *a, **k: F.scaled_dot_product_attention(*a[:3])\n",
      "@deco\n" + HOST), "scaled_dot_product_attention"),
])
def test_torch_attention_is_found_through_aliases_helpers_and_renames(cells, shown):
    msg = verdict(*cells)
    assert msg is not None and shown in msg and "(in " in msg, msg


def test_local_names_are_not_followed():
    """A top-level variable s = q @ k does not taint a function's own local s."""
    top = "q = k = torch.ones(2, 2)\ns = q @ k\no = torch.softmax(s, -1)\n"
    host = HOST.replace("o = torch.empty_like(q)", "s = q\n    o = torch.empty_like(s)")
    assert verdict(IMPORTS, top, KERNEL, host) is None


def test_comprehension_variable_does_not_hide_a_global():
    cells = ("def obs_update(w):\n    return w\n",
             "def gptq(W):\n    [obs_update for obs_update in ()]\n    return obs_update(W)\n")
    assert "obs_update" in verdict(*cells, rules=[does_not_reach("obs_update")], fn="gptq")


@pytest.mark.parametrize("body,shown", [
    ("return getattr(F, 'scaled_dot' + '_product_attention')(q, k, v)", "getattr() with a computed name"),
    ("return eval('q')", "eval()"),
    ("return vars(F)['softmax'](q)", "vars()"),
    ("return F.__dict__['softmax'](q)", ".__dict__"),
    ("import importlib\n    return importlib.import_module('torch').softmax(q, -1)", "importlib"),
    ("import inspect\n    return inspect.getmodule(q)", "inspect"),
    ("return undefined_helper(q)", "undefined_helper"),
])
def test_dynamic_access_in_reachable_code_fails(body, shown):
    msg = verdict(IMPORTS, KERNEL, HOST.replace("return o", body))
    assert msg is not None and shown in msg, msg


@pytest.mark.parametrize("cell,shown", [
    ("exec('fwd = lambda q, k, v: q')", "exec()"),
    ("globals()['fwd'] = print", "globals()"),
    ("torch.softmax = print", "an assignment to torch.softmax"),
    ("F.scaled_dot_product_attention = print", "an assignment to F.scaled_dot_product_attention"),
    ("fwd.__code__ = (lambda q, k, v: q).__code__", ".__code__"),
    ("setattr(F, 'softmax', print)", "an assignment to F.softmax"),
    ("import sys\nsys.modules['torch'].softmax", "sys.modules"),
    ("%run evil.py", "%run"),
    ("%%writefile evil.py\nprint(1)", "%writefile"),
    ("%time exec('fwd = print')", "exec()"),
])
def test_rebinding_anywhere_in_the_notebook_fails(cell, shown):
    msg = verdict(IMPORTS, KERNEL, HOST, cell)
    assert msg is not None and shown in msg, msg


def test_harmless_magics_and_shell_lines_pass():
    assert verdict("%matplotlib inline\n" + IMPORTS, "!nvidia-smi", KERNEL, "%%time\n" + HOST,
                   "%timeit -n 3 fwd(1, 2, 3)", "torch.backends.cuda.matmul.allow_tf32 = True") is None


def test_time_magic_statement_is_read():
    assert verdict(IMPORTS, KERNEL, "%time " + HOST.strip().splitlines()[0] + " pass") is not None
    code = Code(nb("%time x = 1", "%%capture out\ny = 2"))
    assert code.bindings["x"] and code.bindings["y"]


def test_unparsable_cell_defining_the_function_fails():
    msg = verdict(IMPORTS, KERNEL, HOST, "def fwd(q, k, v:\n    return q")
    assert msg.startswith("could not read the code of fwd")
    assert verdict(IMPORTS, KERNEL, HOST, "x = = 1") is None     # another broken cell: skipped


def test_missing_function():
    assert "not defined" in verdict(IMPORTS, KERNEL)


@pytest.mark.parametrize("imports", [
    "from triton import jit as J\nfrom triton import language as tl2",
    "import triton as T\nimport triton.language as tl2\nJ = T.jit",
])
def test_kernel_decorator_and_tl_under_aliases(imports):
    kernel = KERNEL.replace("@triton.jit", "@J").replace("tl.", "tl2.")
    assert verdict(IMPORTS, imports, kernel, HOST) is None


@pytest.mark.parametrize("kernel,text", [
    (KERNEL.replace("tl.dot(x, y)", "x * y"), "launches no Triton kernel"),      # no tl.dot
    (KERNEL.replace("@triton.jit\n", ""), "launches no Triton kernel"),          # not a kernel
    (KERNEL + "\n_kernel = print\n", "launches no Triton kernel"),               # rebound
    (KERNEL.replace("tl.dot(x, y)", "torch.matmul(x, y)"), "may only use triton.language"),
])
def test_what_is_not_an_own_kernel(kernel, text):
    msg = verdict(IMPORTS, kernel, HOST)
    assert msg is not None and text in msg, msg


def test_kernel_helpers_count_and_alias_launch():
    kernel = KERNEL.replace("tl.store(O + i[:, None] * N + i[None, :], tl.dot(x, y))",
                            "tl.store(O + i[:, None] * N + i[None, :], _mm(x, y))")
    helper = "@triton.jit\ndef _mm(a, b):\n    return tl.dot(a, b)\n"
    assert verdict(IMPORTS, helper, kernel, HOST) is None
    assert verdict(IMPORTS, KERNEL, "K2 = _kernel", HOST.replace("_kernel[", "K2[")) is None


def test_llmopt_imports_and_imports_only():
    rules = [no_llmopt_imports(allowed=("llmopt.testing",)), imports_only("torch", "math", "llmopt.testing")]
    assert "llmopt.gptq.obs_update" in verdict(
        "from llmopt.gptq import obs_update", "def f(W):\n    return obs_update(W)", rules=rules, fn="f")
    assert "llmopt.viz.quant" in verdict(
        "def f(W):\n    import llmopt.viz.quant as vq\n    return vq._gptq_state(W)", rules=rules, fn="f")
    assert verdict("from llmopt.testing import compare", "def f(W):\n    return compare(W, W)",
                   rules=rules, fn="f") is None
    assert "os.system" in verdict("import os", "def f(W):\n    return os.system('x')", rules=rules, fn="f")


def test_calls_rule():
    rule = [calls("torch.linalg.cholesky", what="a Cholesky")]
    assert verdict("import torch", "def f(H):\n    return torch.linalg.cholesky(H)", rules=rule, fn="f") is None
    assert verdict("from torch import linalg as la", "def f(H):\n    return la.cholesky(H)", rules=rule, fn="f") is None
    assert "never calls a Cholesky" in verdict("import torch", "def f(H):\n    return torch.linalg.inv(H)",
                                               rules=rule, fn="f")


def test_method_verdicts_reads_the_lab_and_tuple_specs():
    assert static.method_verdicts("lab01_kv_cache", nb("x = 1")) == {
        "generate": "generate is not defined in the notebook"}  # lab01 declares a rule for generate
    code = Code(nb(IMPORTS, KERNEL, HOST, "def g(q, k, v):\n    return F.softmax(q, -1)"))
    out = verdicts(code, {"check_a": ("fwd", RULES), "check_b": ("g", RULES), "g": [does_not_reach("fwd")]})
    assert set(out) == {"check_b"} and "launches no Triton kernel" in out["check_b"]


def test_value_attributes_named_like_ops_are_fine_but_method_calls_are_not():
    host = HOST.replace("return o", "ctx.softmax_scale = scale\n    return o")
    assert verdict(IMPORTS, KERNEL, host, rules=[forbids("*softmax*", "softmax")]) is None
    assert "softmax" in verdict(IMPORTS, KERNEL, HOST.replace("return o", "return o.softmax(-1)"),
                                rules=[forbids("*softmax*", "softmax")])
    assert "torch._softmax" in verdict(IMPORTS, KERNEL, HOST.replace("return o", "return torch._softmax(o)"),
                                       rules=[forbids("*softmax*")])


@pytest.mark.parametrize("cell", [
    "from torch.overrides import TorchFunctionMode\nclass M(TorchFunctionMode):\n    pass\n",
    "import torch\nm = torch.overrides.TorchFunctionMode()\nm.__enter__()",
    "from torch.utils._python_dispatch import TorchDispatchMode",
    "torch.library.impl('aten::empty_like', 'CPU')",
])
def test_global_torch_interception_fails(cell):
    assert verdict(IMPORTS, KERNEL, HOST, cell) is not None


def test_module_lists_match_modules_not_attribute_names():
    host = HOST.replace("return o", "err = o\n    print(err.code, err.types, err.inspect)\n    return o")
    assert verdict(IMPORTS, KERNEL, host) is None
    assert "inspect" in verdict(IMPORTS, "import inspect as ins", KERNEL,
                                HOST.replace("return o", "return ins.stack()"))


def test_annotations_settings_and_odd_statements_are_read():
    cells = ("x: int", "y: int = 3", "import matplotlib.pyplot as plt\nplt.rcParams['figure.dpi'] = 80",
             "import matplotlib as mpl\nmpl.rcParams = mpl.rcParams", "try:\n    import numpy as np\nexcept ImportError as e:\n    np = None",
             "with open('/dev/null') as fh:\n    pass", "for i, j in [(1, 2)]:\n    pass", "if (n := 3):\n    pass")
    assert verdict(IMPORTS, KERNEL, HOST, *cells) is None
    code = Code(nb(*cells))
    assert {"y", "np", "e", "fh", "i", "j", "n"} <= set(code.bindings) and "x" not in code.bindings


def test_autoreload_is_fine_other_extensions_are_not():
    assert verdict("%load_ext autoreload\n%autoreload 2", IMPORTS, KERNEL, HOST) is None
    assert "%load_ext" in verdict("%load_ext my_extension", IMPORTS, KERNEL, HOST)
