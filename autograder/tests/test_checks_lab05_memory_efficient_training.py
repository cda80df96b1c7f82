"""The hidden checks of lab05_memory_efficient_training, both ways: the reference passes, a stub and
each broken variant of course/mistakes.md (lab05 rows) fail with a message that points at the
mistake, and the METHOD rules refuse torch's checkpoint and amp (and the course library) in
place of the student's own code."""
import pathlib

import pytest
import torch
import torch.nn.functional as F

import labkit
from autograder import grade_functions
from llmopt import checkpointing as ck
from llmopt import mixed_precision as mp

LAB = "lab05_memory_efficient_training"
SOLUTION = pathlib.Path(__file__).parents[2] / "solutions" / LAB / f"{LAB}.ipynb"

REFERENCE = {"checkpoint": ck.checkpoint, "checkpoint_sequential": ck.checkpoint_sequential,
             "saved_activation_bytes": ck.saved_activation_bytes, "train_step": mp.train_step,
             "GradScaler": mp.GradScaler, "MasterWeightOptimizer": mp.MasterWeightOptimizer}


def _grade(name, fn, seed=0):
    return labkit.grade(LAB, name, fn, seed)


_stub = labkit.stub


def _fails(name, fn, hint, all_cases=False):
    return labkit.fails(LAB, name, fn, hint, all_cases)


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_passes(seed):
    res = grade_functions(LAB, REFERENCE, seed)
    for name, r in res.items():
        assert r.ok, (name, r.summary())


def test_stubs_fail():
    res = grade_functions(LAB, {name: _stub for name in REFERENCE})
    for name, r in res.items():
        assert r.passed == 0 and "not implemented" in r.messages[0], (name, r.messages)


# --------------------------------------------------------------------------- checkpoint
def _make_checkpoint(no_grad_backward=False, restore_rng=True, detach_inputs=True):
    """checkpoint(fn, *args) as a student writes it, with one optional bug."""
    class Ckpt(torch.autograd.Function):
        @staticmethod
        def forward(ctx, fn, *args):
            ctx.fn, ctx.rng = fn, torch.get_rng_state()
            ctx.flags = [isinstance(a, torch.Tensor) for a in args]
            ctx.others = [None if f else a for a, f in zip(args, ctx.flags)]
            ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
            with torch.no_grad():
                return fn(*args)

        @staticmethod
        def backward(ctx, grad):
            it = iter(ctx.saved_tensors)
            xs = [next(it).detach().requires_grad_(True) if f else o for f, o in zip(ctx.flags, ctx.others)]
            with torch.random.fork_rng():
                if restore_rng:
                    torch.set_rng_state(ctx.rng)
                with torch.set_grad_enabled(not no_grad_backward):
                    out = ctx.fn(*xs)
            torch.autograd.backward(out, grad)
            return (None, *[x.grad if isinstance(x, torch.Tensor) else None for x in xs])

    return lambda fn, *args: Ckpt.apply(fn, *args)


def test_a_students_checkpoint_passes():
    for seed in (0, 1):
        assert _grade("checkpoint", _make_checkpoint(), seed).ok


def test_checkpoint_mutants():
    _fails("checkpoint", _make_checkpoint(no_grad_backward=True), "torch.enable_grad()", all_cases=True)
    r = _fails("checkpoint", _make_checkpoint(restore_rng=False), "restore it before recomputing")
    assert r.passed >= 1                                   # the case without dropout passes
    _fails("checkpoint", lambda fn, *args: fn(*args), "nothing was recomputed", all_cases=True)

    def torch_nonreentrant(fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    _fails("checkpoint", torch_nonreentrant, "with grad enabled in the forward pass", all_cases=True)


# --------------------------------------------------------------------------- checkpoint_sequential
def _sequential(ckpt, segments_default=None, checkpoint_last=False, order="ref"):
    def run(blocks, x, segments=None):
        blocks = list(blocks)
        s = segments or segments_default or round(len(blocks) ** 0.5)
        bounds = ck.segment_bounds(len(blocks), s)

        def seg(a, b):
            def f(x):
                for blk in blocks[a:b]:
                    x = blk(x)
                return x
            return f
        for i, (a, b) in enumerate(bounds):
            x = ckpt(seg(a, b), x) if (i < len(bounds) - 1 or checkpoint_last) else seg(a, b)(x)
        return x
    return run


def test_a_students_checkpoint_sequential_passes():
    assert _grade("checkpoint_sequential", _sequential(_make_checkpoint())).ok
    assert _grade("checkpoint_sequential", _sequential(_make_checkpoint(), checkpoint_last=True)).ok


def test_checkpoint_sequential_mutants():
    _fails("checkpoint_sequential", _sequential(_make_checkpoint(restore_rng=False)), "restore it before recomputing")
    _fails("checkpoint_sequential", _sequential(_make_checkpoint(no_grad_backward=True)), "torch.enable_grad()",
           all_cases=True)
    _fails("checkpoint_sequential", _sequential(_make_checkpoint(), segments_default=2), "round(√n) segments")

    def plain(blocks, x, segments=None):
        for b in blocks:
            x = b(x)
        return x
    _fails("checkpoint_sequential", plain, "no block was recomputed", all_cases=True)

    def per_block(blocks, x, segments=None):              # every block its own checkpoint
        for b in blocks:
            x = ck.checkpoint(b, x)
        return x
    _fails("checkpoint_sequential", per_block, "segment(s) of sizes", all_cases=True)


# --------------------------------------------------------------------------- saved_activation_bytes
def test_saved_activation_bytes_mutants():
    def with_params(fn, *args):
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        return sum(seen.values())
    _fails("saved_activation_bytes", with_params, "parameters are not activations", all_cases=True)

    def per_tensor(fn, *args):
        total = [0]

        def pack(t):
            base = t if t._base is None else t._base
            if not isinstance(base, torch.nn.Parameter):
                total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        return total[0]
    _fails("saved_activation_bytes", per_tensor, "count each storage once")

    def elements(fn, *args):
        return ck.saved_activation_bytes(fn, *args) // 4
    assert not _grade("saved_activation_bytes", elements).ok


# --------------------------------------------------------------------------- train_step
def _student_step(weighting="size", zero=True):
    def step(model, batch, *, accum_steps=1, dtype=None, checkpoint=False):
        if zero:
            model.zero_grad(set_to_none=True)
        x, y = batch[:, :-1], batch[:, 1:]
        total = 0.0
        for xb, yb in zip(x.tensor_split(accum_steps), y.tensor_split(accum_steps)):
            logits = mp.forward(model, xb, checkpoint)
            loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten())
            w = {"size": xb.shape[0] / x.shape[0], "k": 1 / accum_steps, "none": 1.0}[weighting]
            (loss * w).backward()
            total += loss.item() * xb.shape[0] / x.shape[0]
        return total
    return step


def test_train_step_mutants():
    assert _grade("train_step", _student_step()).ok
    _fails("train_step", _student_step("none"), "the loss was not divided")
    r = _fails("train_step", _student_step("k"), "weight each by its share b_i / B")
    assert r.passed >= 1                                  # accum_steps=1 is right either way
    _fails("train_step", _student_step(zero=False), "previous step's gradients", all_cases=True)


# --------------------------------------------------------------------------- GradScaler
class _Scaler(mp.GradScaler):
    """Broken variants of the reference, one flag each."""
    no_reset = no_backoff = step_unscales_again = no_raise = no_skip = False

    def unscale_(self, optimizer):
        if self.no_raise:
            self._found_inf.pop(id(optimizer), None)
        return super().unscale_(optimizer)

    def step(self, optimizer):
        if self.step_unscales_again and id(optimizer) in self._found_inf:
            inv = 1.0 / self.get_scale()
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad.mul_(inv)
        if self.no_skip:
            if id(optimizer) not in self._found_inf:
                self.unscale_(optimizer)
            self._stepped.add(id(optimizer))
            return optimizer.step()
        return super().step(optimizer)

    def update(self):
        found = any(self._found_inf.values())
        if found and (self.no_reset or self.no_backoff):
            tracker = self._growth_tracker
            if not self.no_backoff:
                self._scale = mp._fp32(float(self._scale) * self.backoff_factor)
            self._found_inf, self._stepped = {}, set()
            self._growth_tracker = tracker + (1 if self.no_backoff else 0)
            if self._growth_tracker >= self.growth_interval:
                self._scale = mp._fp32(float(self._scale) * self.growth_factor)
                self._growth_tracker = 0
            return
        super().update()


def _variant(**flags):
    return type("Variant", (_Scaler,), flags)


def test_grad_scaler_mutants():
    _fails("GradScaler", _variant(no_reset=True), "restarts at 0 after a skipped step")
    _fails("GradScaler", _variant(no_backoff=True), "multiply the scale by backoff_factor")
    _fails("GradScaler", _variant(step_unscales_again=True), "unscale_ once per step")
    _fails("GradScaler", _variant(no_raise=True), "did not raise")
    _fails("GradScaler", _variant(no_skip=True), "skip optimizer.step()")


# --------------------------------------------------------------------------- MasterWeightOptimizer
class _HalfMaster(mp.MasterWeightOptimizer):
    """Master weights kept in the model's dtype: the mistake of the lab."""

    def __init__(self, params, optimizer_cls=torch.optim.SGD, **kw):
        self.model_params = list(params)
        self.master_params = [p.detach().clone().requires_grad_(True) for p in self.model_params]
        self.optimizer = optimizer_cls(self.master_params, **kw)
        self._synced = False

    def grads_to_master(self):
        for p, m in zip(self.model_params, self.master_params):
            m.grad = None if p.grad is None else p.grad.detach().clone()
        self._synced = True


def test_master_weight_mutants():
    _fails("MasterWeightOptimizer", _HalfMaster, "must be fp32", all_cases=True)

    class NoMaster:                                        # steps the half model directly
        def __init__(self, params, optimizer_cls=torch.optim.SGD, **kw):
            self.opt = optimizer_cls(list(params), **kw)

        def step(self):
            self.opt.step()

        def zero_grad(self):
            self.opt.zero_grad()
    _fails("MasterWeightOptimizer", NoMaster, "no master_params", all_cases=True)

    class NoCopyBack(mp.MasterWeightOptimizer):
        def step(self):
            if not self._synced:
                self.grads_to_master()
            self.optimizer.step()
            self._synced = False
    _fails("MasterWeightOptimizer", NoCopyBack, "copy the fp32 master weights into the model", all_cases=True)


# --------------------------------------------------------------------------- output specs
def test_output_specs_match_the_reference_records():
    from autograder.checks import lab05_memory_efficient_training as checks
    assert set(checks.METHOD) == set(REFERENCE)
    labkit.assert_outputs_match_reference(LAB, REFERENCE)


# --------------------------------------------------------------------------- the method
def _solution_nb():
    return labkit.solution_nb(LAB)


def _with_body(fn, body, extra_cell=None):
    """The solution notebook with ``fn``'s solution block replaced by ``body``."""
    return labkit.with_body(_solution_nb(), fn, body, extra_cell)


def _verdicts(nb):
    return labkit.verdicts(LAB, nb)


def test_solution_follows_the_method():
    assert _verdicts(_solution_nb()) == {}


@pytest.mark.parametrize("fn,extra,body,check,shown", [
    ("checkpoint", "import torch.utils.checkpoint as tuc",
     "    return tuc.checkpoint(fn, *args, use_reentrant=True)", "checkpoint", "torch.utils.checkpoint"),
    ("checkpoint", None,
     "    from torch.utils.checkpoint import checkpoint as c\n    return c(fn, *args, use_reentrant=True)",
     "checkpoint", "torch.utils.checkpoint"),
    ("checkpoint", None, "    return fn(*args)", "checkpoint", "torch.autograd.Function of your own"),
    ("checkpoint", "from llmopt.checkpointing import checkpoint as ref_checkpoint",
     "    return ref_checkpoint(fn, *args)", "checkpoint", "llmopt.checkpointing"),
    ("checkpoint_sequential", None,
     "    return torch.utils.checkpoint.checkpoint_sequential(blocks, segments or 2, x, use_reentrant=True)",
     "checkpoint_sequential", "torch.utils.checkpoint"),
    ("saved_activation_bytes", "from llmopt.viz.memory import record_step",
     "    return record_step(fn, *args)", "saved_activation_bytes", "llmopt.viz"),
    ("train_step", "from llmopt.mixed_precision import train_step as ts",
     "    return ts(model, batch, accum_steps=accum_steps)", "train_step", "llmopt.mixed_precision"),
])
def test_library_shortcuts_are_refused(fn, extra, body, check, shown):
    msg = _verdicts(_with_body(fn, body, extra)).get(check)
    assert msg and shown in msg, msg


@pytest.mark.parametrize("src", [
    "class GradScaler(torch.amp.GradScaler):\n    def __init__(self, init_scale=2.0**16, growth_factor=2.0, "
    "backoff_factor=0.5, growth_interval=2000):\n        super().__init__('cpu', init_scale, growth_factor, "
    "backoff_factor, growth_interval)\n",
    "from torch.cuda.amp import GradScaler as _G\n\nclass GradScaler:\n    def __init__(self, **kw):\n"
    "        self.s = _G(**kw)\n    def scale(self, loss):\n        return self.s.scale(loss)\n",
    "import torch.amp\nGradScaler = torch.amp.GradScaler\n",
])
def test_torch_grad_scaler_is_refused(src):
    nb = _solution_nb()
    nb["cells"].append({"cell_type": "code", "metadata": {}, "source": src})
    msg = _verdicts(nb).get("GradScaler")
    assert msg and "amp" in msg, msg


def test_hidden_access_is_refused():
    nb = _with_body("checkpoint", "    return getattr(__import__('torch.utils.checkpoint'), 'utils').checkpoint.checkpoint(fn, *args)")
    assert "checkpoint" in _verdicts(nb)
