"""The hidden checks of lab09_qlora, both ways: the reference passes, a stub and each broken
variant of course/mistakes.md (lab09 rows) fail with a message that points at the mistake, a
QLoRALinear that keeps a full-precision copy fails, and the METHOD rules refuse peft inside the
student's LoRA."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit
from autograder import grade_functions
from llmopt import lora as ref
from llmopt import nf4

LAB = "lab09_qlora"


def _grade(name, fn, seed=0):
    return labkit.grade(LAB, name, fn, seed)


def _fails(name, fn, hint, all_cases=False):
    return labkit.fails(LAB, name, fn, hint, all_cases)


def _merge_ref(model):
    return ref.merge_lora(model)


REFERENCE = {"LoRALinear": ref.LoRALinear, "apply_lora": ref.apply_lora,
             "merge_lora": (ref.LoRALinear, ref.merge_lora), "QLoRALinear": ref.QLoRALinear,
             "prepare_qlora": ref.prepare_qlora}


@pytest.mark.parametrize("seed", [0, 7])
def test_reference_passes(seed):
    res = grade_functions(LAB, REFERENCE, seed)
    for name, r in res.items():
        assert r.ok, (name, r.summary())


def test_outputs_match_the_spec():
    labkit.assert_outputs_match_reference(LAB, REFERENCE)


def test_stubs_fail():
    res = grade_functions(LAB, {"LoRALinear": labkit.stub, "apply_lora": labkit.stub,
                                "merge_lora": (ref.LoRALinear, labkit.stub), "QLoRALinear": labkit.stub,
                                "prepare_qlora": labkit.stub})
    for name, r in res.items():
        assert r.passed == 0, (name, r.messages)


# --------------------------------------------------------------------------- mistakes
class RandomB(ref.LoRALinear):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.normal_(self.B, std=0.02)


class ScaleAlpha(ref.LoRALinear):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.scaling = alpha


class BaseTrainable(ref.LoRALinear):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        for p in self.base.parameters():
            p.requires_grad_(True)


def test_random_B_fails():
    _fails("LoRALinear", RandomB, "B = 0", all_cases=True)


def test_scale_alpha_fails():
    _fails("LoRALinear", ScaleAlpha, "alpha instead of scaling = alpha / r")


def test_base_trainable_fails():
    _fails("LoRALinear", BaseTrainable, "freeze the base", all_cases=True)


def test_apply_lora_wrong_projections_fails():
    def wrong(model, target_modules, r, alpha):  # always q and v, whatever was asked
        return ref.apply_lora(model, ("q_proj", "v_proj"), r, alpha)
    _fails("apply_lora", wrong, "wrong projections")

    def all_attention(model, target_modules, r, alpha):
        return ref.apply_lora(model, ref.ATTENTION, r, alpha)
    _fails("apply_lora", all_attention, "wrong projections")


def test_apply_lora_base_left_trainable_fails():
    def trainable(model, target_modules, r, alpha):
        ref.apply_lora(model, target_modules, r, alpha)
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    _fails("apply_lora", trainable, "base weights are left trainable", all_cases=True)


def test_apply_lora_scale_alpha_fails():
    def scaled(model, target_modules, r, alpha):
        ref.apply_lora(model, target_modules, r, alpha)
        for m in model.modules():
            if isinstance(m, ref.LoRALinear):
                m.scaling = alpha
        return model
    _fails("apply_lora", scaled, "alpha instead of alpha / r")


def test_merge_without_scale_fails():
    @torch.no_grad()
    def merge_no_scale(model):
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, ref.LoRALinear)]:
            m.base.weight += m.B @ m.A
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
        return model
    _fails("merge_lora", (ref.LoRALinear, merge_no_scale), "merge without the scale", all_cases=True)


def test_merge_that_keeps_the_wrappers_fails():
    _fails("merge_lora", (ref.LoRALinear, lambda model: model), "not plain nn.Linear", all_cases=True)


class QLoRAFullCopy(ref.QLoRALinear):
    """The shortcut: keeps the fp32 weight (as a frozen parameter) and computes with it."""

    def __init__(self, linear, r, alpha, dropout=0.0, double_quant=True, **kw):
        super().__init__(linear, r, alpha, dropout, double_quant, **kw)
        self.W = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = F.linear(x, self.W, self.base.bias)
        return y + (x @ self.A.t()) @ self.B.t() * self.scaling


class QLoRAHiddenCopy(ref.QLoRALinear):
    """Keeps the weight as a plain attribute (not in the state_dict) but computes with NF4."""

    def __init__(self, linear, r, alpha, dropout=0.0, double_quant=True, **kw):
        super().__init__(linear, r, alpha, dropout, double_quant, **kw)
        self.w_copy = linear.weight.detach().clone()


class QLoRAScaleAlpha(ref.QLoRALinear):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.scaling = self.alpha


def test_qlora_full_precision_copy_fails():
    _fails("QLoRALinear", QLoRAFullCopy, "full-precision copy", all_cases=True)
    _fails("QLoRALinear", QLoRAHiddenCopy, "full-precision copy", all_cases=True)


def test_qlora_scale_alpha_fails():
    _fails("QLoRALinear", QLoRAScaleAlpha, "alpha instead of alpha / r")


def test_qlora_base_trainable_fails():
    class Trainable(ref.QLoRALinear):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if self.base.bias is not None:
                self.base.bias.requires_grad_(True)
    r = _grade("QLoRALinear", Trainable)
    assert not r.ok and any("frozen" in m for m in r.messages if m), r.messages


def test_prepare_qlora_base_trainable_fails():
    def trainable(model, target_modules, r, alpha):
        ref.prepare_qlora(model, target_modules, r, alpha)
        for n, p in model.named_parameters():
            if "norm" in n or "embed" in n:
                p.requires_grad_(True)
        return model
    _fails("prepare_qlora", trainable, "freeze the base", all_cases=True)


def test_prepare_qlora_wrong_projections_fails():
    def wrong(model, target_modules, r, alpha):
        return ref.prepare_qlora(model, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), r, alpha)
    _fails("prepare_qlora", wrong, "not the targets")


# --------------------------------------------------------------------------- METHOD rules
def _with_body(fn, body, extra_cell=None):
    return labkit.with_body(labkit.solution_nb(LAB), fn, body, extra_cell)


def test_solution_satisfies_the_rules():
    assert labkit.verdicts(LAB, labkit.solution_nb(LAB)) == {}


def test_get_peft_model_in_apply_lora_is_refused():
    body = ("    from peft import LoraConfig, get_peft_model\n"
            "    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules)))")
    msg = labkit.verdicts(LAB, _with_body("apply_lora", body)).get("apply_lora")
    assert msg and "peft" in msg, msg


def test_peft_layer_in_LoRALinear_is_refused():
    body = ("        super().__init__()\n"
            "        self.inner = PeftLinear(base, 'default', Cfg(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)\n")
    extra = "from peft.tuners.lora import Linear as PeftLinear\nfrom peft import LoraConfig as Cfg"
    nb = labkit.solution_nb(LAB)
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if src.startswith("class LoRALinear"):
            import re
            cell["source"] = re.sub(r"### BEGIN SOLUTION.*?### END SOLUTION", lambda m: "pass", src, count=1, flags=re.S)
            cell["source"] = cell["source"].replace("        pass", body, 1)
            break
    nb["cells"].insert(0, {"cell_type": "code", "metadata": {}, "source": extra})
    msg = labkit.verdicts(LAB, nb).get("LoRALinear")
    assert msg and "peft" in msg, msg


def test_qlora_without_nf4_is_refused():
    nb = labkit.solution_nb(LAB)
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if src.startswith("class QLoRALinear"):
            cell["source"] = src.replace("Linear4bit(linear, \"nf4\", double_quant, 64, compute_dtype)",
                                         "linear")
    msg = labkit.verdicts(LAB, nb).get("QLoRALinear")
    assert msg and "NF4" in msg, msg
