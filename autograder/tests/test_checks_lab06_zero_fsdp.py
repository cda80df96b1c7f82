"""lab06's hidden checks, tested both ways: the reference passes; stubs and the mistakes of
course/mistakes.md fail, each with a message that points at the mistake. The distributed checks
run real gloo processes (2, 4 and 8 ranks); broken variants reach the ranks by fork.

The memory cases of zero_stage1/2/3 are judged by the operating system, as in the grading
sandbox: here each runs in a subprocess inside a fresh cgroup-v1 memory cgroup with the
sandbox's limit (joined before Python starts, so the interpreter and torch count too), and
a variant that holds the weaker stage's memory is killed by the cgroup's OOM killer. Those
tests need root and the v1 memory controller; elsewhere they are skipped.
"""
import json
import math
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch
import torch.distributed as dist

import llmopt.zero as zero
from autograder import grade_functions
from autograder.cases import lab06_zero_fsdp as cases
from autograder.checks import lab06_zero_fsdp as checks
from llmopt import parallel

LAB = "lab06_zero_fsdp"
REF = (zero.shard_model, zero.gather_full_params)
STAGE_CHECKS = ("zero_stage1", "zero_stage2", "zero_stage3")
MEMCG = "/sys/fs/cgroup/memory"
KERNEL_BALLAST = 384 * 2**20   # a Jupyter kernel holds more than a bare interpreter: count it


def stub(*args, **kwargs):
    raise NotImplementedError()


def grade(name, fn, seed=1):
    return grade_functions(LAB, {name: fn}, seed=seed)[name]


def only(kind, monkeypatch):
    """Keep only the training (or memory) case of every stage check, in this process."""
    for name in STAGE_CHECKS:
        full = getattr(cases, f"inputs_{name}")
        monkeypatch.setattr(cases, f"inputs_{name}",
                            lambda seed, full=full: [c for c in full(seed) if c["kind"] == kind])


# --- OUTPUTS: the declared form of every record ------------------------------------------

def test_every_check_declares_its_outputs():
    names = {n[len("verify_"):] for n in dir(checks) if n.startswith("verify_")}
    assert names == set(checks.OUTPUTS), "OUTPUTS must cover exactly the checks"


def _form_ok(spec, out):
    from autograder.verify import check_form
    got = {k: ({torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}[v.dtype], tuple(v.shape))
           for k, v in out.items()}
    return check_form(got, spec, None)


@pytest.mark.parametrize("name,fn", [("model_state_bytes", zero.model_state_bytes),
                                     ("shard_flat", zero.shard_flat)])
def test_reference_records_match_the_declared_outputs(name, fn):
    """Explicitly for the quick checks; every "reference passes" test below shows it for the
    distributed ones too: grade_functions' verify_check refuses a record whose keys, dtypes
    or shapes differ from OUTPUTS before judging it."""
    from autograder.record import _to_tensors
    run = getattr(cases, f"run_{name}")
    for inp in getattr(cases, f"inputs_{name}")(3):
        out = _to_tensors(run(fn, inp))
        assert _form_ok(checks.OUTPUTS[name](inp), out) is None, (name, _form_ok(checks.OUTPUTS[name](inp), out))


def test_memory_case_record_form_is_declared():
    case = cases.inputs_zero_stage3(0)[1]
    spec = checks.OUTPUTS["zero_stage3"](case)
    ref = checks.memory_reference(dict(case, depth=2))
    out = {"probe": ref["probe"], "loss": ref["loss"].reshape(()),
           "rank_spread": torch.tensor(0.0, dtype=torch.float64)}
    assert _form_ok(spec, out) is None


def _solution_nb():
    from autograder import course
    with open(course.source_notebook(LAB)) as f:
        return json.load(f)


def test_solution_notebook_meets_the_method_rules():
    from autograder import static
    assert static.method_verdicts(LAB, _solution_nb()) == {}


def test_averaging_without_a_collective_fails_the_method_rule():
    from autograder import static
    nb = _solution_nb()
    for c in nb["cells"]:
        src = "".join(c["source"])
        if "def bucketed_all_reduce" in src:
            c["source"] = [src.replace("dist.all_reduce(buffer[:fill])", "buffer[:fill].mul_(1)")]
    verdicts = static.method_verdicts(LAB, nb)
    assert set(verdicts) == {"bucketed_all_reduce"} and "never calls" in verdicts["bucketed_all_reduce"], verdicts


# --- model_state_bytes ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 12345])
def test_formula_reference_passes(seed):
    result = grade("model_state_bytes", zero.model_state_bytes, seed)
    assert result.ok, result.summary()


def test_formula_stub_fails():
    result = grade("model_state_bytes", stub)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0]


def test_formula_with_optimizer_state_not_divided_at_stage_1_fails_with_hint():
    def whole(psi, stage, n, k=12, param_bytes=2, grad_bytes=2):
        if stage == 1:
            return (param_bytes + grad_bytes + k) * psi
        return zero.model_state_bytes(psi, stage, n, k, param_bytes, grad_bytes)
    result = grade("model_state_bytes", whole)
    assert not result.ok and "divides the optimizer state" in " ".join(result.messages)


# --- shard_flat ------------------------------------------------------------------------

def test_shard_flat_reference_passes():
    assert grade("shard_flat", zero.shard_flat).ok


def test_shard_flat_stub_fails():
    assert grade("shard_flat", stub).passed == 0


def uneven(flat, rank, world_size):                     # the last rank gets the remainder
    return torch.tensor_split(flat, world_size)[rank].clone()


def test_uneven_shards_fail_with_hint():
    result = grade("shard_flat", uneven)
    assert not result.ok and "same size" in " ".join(result.messages), result.summary()


def floor_shards(flat, rank, world_size):               # the ragged tail is dropped
    S = flat.numel() // world_size
    return flat[rank * S:(rank + 1) * S].clone()


def test_dropped_tail_fails():
    result = grade("shard_flat", floor_shards)
    assert not result.ok and "⌈numel/N⌉" in " ".join(result.messages)


# --- average_gradients -------------------------------------------------------------------

def test_average_gradients_reference_passes():
    result = grade("average_gradients", parallel.average_gradients)
    assert result.ok, result.summary()


def test_average_gradients_stub_fails():
    result = grade("average_gradients", stub)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0], result.summary()


def summed_gradients(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)


def test_summed_gradients_fail_with_hint():
    result = grade("average_gradients", summed_gradients)
    assert result.passed == 0 and "SUMMED" in result.messages[0], result.summary()


def raise_on_rank_1(model):
    if dist.get_rank() == 1:
        raise ValueError("shape mismatch in my all-reduce")
    parallel.average_gradients(model)


def test_a_raising_rank_is_reported_quickly_not_a_hang():
    t0 = time.monotonic()
    result = grade("average_gradients", raise_on_rank_1)
    assert result.passed == 0 and "rank 1: shape mismatch" in result.messages[0], result.summary()
    assert time.monotonic() - t0 < 30, "a raising rank must end the case at once"


# --- zero_stage1/2/3: training (the stage equals one process on the whole batch) ----------

@pytest.mark.parametrize("name", STAGE_CHECKS)
def test_stage_training_reference_passes(name, monkeypatch):
    only("training", monkeypatch)
    result = grade(name, REF, seed=7)
    assert result.ok, result.summary()


def test_stage_stubs_fail_every_case():
    for name in STAGE_CHECKS:
        result = grade(name, (stub, stub))
        assert result.total == 2 and result.passed == 0, result.summary()
        assert all("NotImplementedError" in m for m in result.messages), result.summary()


def test_summed_gradients_in_shard_model_fail_with_hint(monkeypatch):
    only("training", monkeypatch)
    real_rs, real_ar = zero.reduce_scatter_flat, dist.all_reduce

    def rs_summed(out, inp):
        real_rs(out, inp)
        out.mul_(dist.get_world_size())                 # cancels the division: a sum

    def ar_summed(t, *a, **k):
        real_ar(t, *a, **k)
        t.mul_(dist.get_world_size())
    monkeypatch.setattr(zero, "reduce_scatter_flat", rs_summed)
    monkeypatch.setattr(zero.dist, "all_reduce", ar_summed)
    for name in ("zero_stage1", "zero_stage3"):
        result = grade(name, REF)
        assert result.passed == 0 and "SUMMED" in result.messages[0], result.summary()


def test_uneven_shards_in_shard_model_fail(monkeypatch):
    only("training", monkeypatch)
    monkeypatch.setattr(zero.math, "ceil", math.floor)  # S = ⌊Ψ/N⌋: the tail has no owner
    result = grade("zero_stage2", REF)
    assert result.passed == 0, result.summary()


def test_memory_reference_equals_autograd_on_a_small_case():
    """The verifier's structured reference = plain autograd + torch Adam on the whole model."""
    case = dict(cases.inputs_zero_stage1(5)[1], width=96, depth=3, world_size=4)
    model = cases.build_memory_mlp(case)
    x, probe = cases.memory_batch(case)
    opt = torch.optim.Adam(model.parameters(), **cases.MEMORY_ADAM)
    loss0 = cases.memory_loss(model(x[:1])).detach()          # rank 0's rows, before the step
    cases.memory_loss(model(x)).backward()
    opt.step()
    ref = checks.memory_reference(case)
    torch.testing.assert_close(model(probe).detach(), ref["probe"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss0, ref["loss"], atol=1e-5, rtol=1e-5)


# --- zero_stage1/2/3: memory, judged by a cgroup's limit -----------------------------------

def test_memory_cases_are_sized_between_the_stage_and_the_weaker_one():
    for name in STAGE_CHECKS:
        case = getattr(cases, f"inputs_{name}")(0)[1]
        budget = checks.memory_budget(case)
        assert budget["weaker"] > checks.SANDBOX_MEMORY_BYTES, \
            f"{name}: the weaker stage's model state alone must not fit the sandbox"
        assert budget["stage"] < 0.75 * checks.SANDBOX_MEMORY_BYTES, \
            f"{name}: the stage's own model state must leave room for the kernel and the ranks"


def test_no_check_reads_an_in_kernel_memory_probe():
    src = open(cases.__file__).read()
    for name in ("measured_state_bytes", "live_storages", "reachable_tensors", "llmopt.parallel",
                 "llmopt.viz", "max_usage", "getrusage", "/proc/"):
        assert name not in src, f"the cases must not rely on {name}: the kernel can fake it"


def _memcg_available() -> bool:
    return os.geteuid() == 0 and os.access(MEMCG, os.W_OK) and \
        os.path.exists(os.path.join(MEMCG, "memory.limit_in_bytes"))


needs_memcg = pytest.mark.skipif(not _memcg_available(), reason="needs root and the cgroup-v1 memory controller")


def grade_under_limit(names, variant, ballast=0, limit=checks.SANDBOX_MEMORY_BYTES) -> dict:
    """Grade the memory cases of ``names`` with ``variant`` in a subprocess held to ``limit``
    bytes by a fresh memory cgroup; {name: result dict} plus the cgroup's peak and OOM kills."""
    cg = os.path.join(MEMCG, f"llmopt-test-{uuid.uuid4().hex[:8]}")
    os.makedirs(cg)
    try:
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        for knob, value in (("memory.memsw.limit_in_bytes", limit), ("memory.swappiness", 0)):
            if os.path.exists(os.path.join(cg, knob)):      # no swap to escape into
                with open(os.path.join(cg, knob), "w") as f:
                    f.write(str(value))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", sys.executable, "-m",
               "autograder.tests.test_checks_lab06_zero_fsdp", variant, str(ballast), *names]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(os.path.join(cg, "memory.max_usage_in_bytes")) as f:
            out["peak_bytes"] = int(f.read())
        with open(os.path.join(cg, "memory.oom_control")) as f:
            out["oom_kills"] = int(dict(line.split() for line in f).get("oom_kill", 0))
        return out
    finally:
        for _ in range(100):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.1)


@needs_memcg
def test_reference_fits_every_stage_under_the_sandbox_limit():
    out = grade_under_limit(STAGE_CHECKS, "reference", ballast=KERNEL_BALLAST)
    for name in STAGE_CHECKS:
        assert out[name]["passed"] == 1, (name, out[name]["messages"], out["peak_bytes"])
    assert out["oom_kills"] == 0
    assert out["peak_bytes"] < checks.SANDBOX_MEMORY_BYTES - 512 * 2**20, \
        f"peak {out['peak_bytes'] / 2**30:.2f} GiB: too little room left under the limit"


@needs_memcg
def test_plain_data_parallel_with_a_forged_probe_fails_every_stage():
    out = grade_under_limit(STAGE_CHECKS, "dp_forged_probe")
    for name in STAGE_CHECKS:
        assert out[name]["passed"] == 0, (name, out[name])
        assert "ran out of memory" in out[name]["messages"][0], (name, out[name]["messages"])
    assert out["oom_kills"] >= 3


@needs_memcg
def test_optimizer_state_whole_on_every_rank_fails_stage_1_memory():
    out = grade_under_limit(["zero_stage1"], "whole_optimizer")
    msg = out["zero_stage1"]["messages"]
    assert out["zero_stage1"]["passed"] == 0 and "ran out of memory at stage 1" in msg[0], msg
    assert "optimizer state" in msg[0], msg


@needs_memcg
def test_params_not_freed_after_the_all_gather_fail_stage_3_memory():
    out = grade_under_limit(["zero_stage3"], "not_freed")
    msg = out["zero_stage3"]["messages"]
    assert out["zero_stage3"]["passed"] == 0 and "ran out of memory at stage 3" in msg[0], msg
    assert "freed" in msg[0], msg


def test_params_not_freed_still_train_right(monkeypatch):
    """Right answer, wrong memory: only the memory case can tell this one apart."""
    only("training", monkeypatch)
    monkeypatch.setattr(zero._Unit, "free", _keep)
    assert grade("zero_stage3", REF).ok


# --- bucketed_all_reduce (ZeRO-R's C_B) ---------------------------------------------------

def test_bucketed_all_reduce_reference_passes():
    result = grade("bucketed_all_reduce", zero.bucketed_all_reduce)
    assert result.ok, result.summary()


def test_bucketed_all_reduce_stub_fails():
    assert grade("bucketed_all_reduce", stub).passed == 0


def one_collective_per_tensor(tensors, buffer):
    for t in tensors:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())


def test_no_bucketing_fails_with_hint():
    result = grade("bucketed_all_reduce", one_collective_per_tensor)
    assert result.passed == 0 and "buffer" in result.messages[0], result.summary()


def summed_buckets(tensors, buffer):
    zero.bucketed_all_reduce(tensors, buffer)
    for t in tensors:
        t.mul_(dist.get_world_size())


def test_summed_buckets_fail_with_hint():
    result = grade("bucketed_all_reduce", summed_buckets)
    assert result.passed == 0 and "SUM" in result.messages[0], result.summary()


def does_nothing(tensors, buffer):
    pass


def test_a_bucketed_all_reduce_that_does_nothing_fails():
    result = grade("bucketed_all_reduce", does_nothing)
    assert result.passed == 0, result.summary()


def no_collective_seen(tensors, buffer):
    """Right values without a collective the spy sees: each rank rebuilds its peers' tensors
    from the public case (the spy saw zero calls: that must fail, not pass)."""
    import inspect
    frame = inspect.currentframe().f_back
    case = frame.f_locals["case"]
    n = dist.get_world_size()
    mean = [sum(ts) / n for ts in zip(*(cases.bucket_tensors(case, r) for r in range(n)))]
    for t, m in zip(tensors, mean):
        t.copy_(m)


def test_a_bucketed_all_reduce_that_calls_no_collective_fails():
    result = grade("bucketed_all_reduce", no_collective_seen)
    assert result.passed == 0 and "no call to torch.distributed.all_reduce" in result.messages[0], \
        result.summary()


# --- partitioned_checkpoint: PartitionedCheckpoint's backward (ZeRO-R's P_a) ---------------

class _CheckpointBase(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x):
        rank, ws = dist.get_rank(), dist.get_world_size()
        ctx.fn, ctx.shape, ctx.ws = fn, x.shape, ws
        ctx.save_for_backward(zero.shard_flat(x.detach().reshape(-1), rank, ws))
        with torch.no_grad():
            return fn(x)


def _gathered(ctx):
    (shard,) = ctx.saved_tensors
    full = torch.empty(shard.numel() * ctx.ws, dtype=shard.dtype)
    zero.all_gather_flat(full, shard)
    return full


class OnlyDx(_CheckpointBase):                      # autograd.grad: dx only, no dW
    @staticmethod
    def backward(ctx, grad):
        x = _gathered(ctx)[:math.prod(ctx.shape)].view(ctx.shape).detach().requires_grad_(True)
        with torch.enable_grad():
            y = ctx.fn(x)
        (dx,) = torch.autograd.grad(y, x, grad)
        return None, dx


class NoEnableGrad(_CheckpointBase):                # recomputed without autograd: no graph
    @staticmethod
    def backward(ctx, grad):
        x = _gathered(ctx)[:math.prod(ctx.shape)].view(ctx.shape).detach().requires_grad_(True)
        return None, x.grad


class PaddingKept(_CheckpointBase):                 # the padded buffer, not cut to numel
    @staticmethod
    def backward(ctx, grad):
        full = _gathered(ctx)
        x = full.view(-1, ctx.shape[-1]) if full.numel() % ctx.shape[-1] == 0 else full
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = ctx.fn(x)
        torch.autograd.backward(y, grad)
        return None, x.grad


def test_partitioned_checkpoint_reference_passes():
    for seed in (0, 12345):
        result = grade("partitioned_checkpoint", zero.PartitionedCheckpoint, seed=seed)
        assert result.passed == result.total == 2, result.summary()


def test_partitioned_checkpoint_stub_fails():
    class Stub(_CheckpointBase):
        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError()
    result = grade("partitioned_checkpoint", Stub)
    assert result.passed == 0, result.summary()


def test_partitioned_checkpoint_without_parameter_gradients_fails_with_hint():
    result = grade("partitioned_checkpoint", OnlyDx)
    assert result.passed == 0 and "torch.autograd.backward" in result.messages[0], result.summary()


def test_partitioned_checkpoint_without_enable_grad_fails_with_hint():
    result = grade("partitioned_checkpoint", NoEnableGrad)
    assert result.passed == 0 and "torch.enable_grad()" in result.messages[0], result.summary()


def test_partitioned_checkpoint_with_the_padding_kept_fails():
    result = grade("partitioned_checkpoint", PaddingKept)
    assert result.passed == 0, result.summary()


def test_a_checkpoint_that_keeps_x_whole_fails_the_method_rule():
    """The lazy P_a: the forward saves all of x and the backward never gathers — right
    gradients, none of the memory saving; the notebook's source shows it."""
    from autograder import static
    nb = _solution_nb()
    for c in nb["cells"]:
        src = "".join(c["source"])
        if "class PartitionedCheckpoint" in src:
            src = src.replace("ctx.save_for_backward(shard_flat(x.detach().reshape(-1), rank, ws))",
                              "ctx.save_for_backward(x.detach())")
            a = src.index("        (shard,) = ctx.saved_tensors")
            b = src.index("        with torch.enable_grad():", a)
            src = src[:a] + "        (x,) = ctx.saved_tensors\n        x = x.detach().requires_grad_(True)\n" + src[b:]
            c["source"] = [src]
    verdicts = static.method_verdicts(LAB, nb)
    assert set(verdicts) == {"partitioned_checkpoint"} and "never calls" in verdicts["partitioned_checkpoint"], verdicts


# --- the variants, reached by the subprocess above ----------------------------------------

def _keep(self):                                       # marks it free, keeps the memory
    self.gathered = False


def whole_optimizer(model, stage, optimizer_cls, **kw):      # the stage 0 optimizer: whole
    return zero.shard_model(model, 0, optimizer_cls, **kw)


class _Hidden:
    state = []                                          # a class attribute: no probe follows it


def dp_forged_probe(model, stage, optimizer_cls, **kw):
    """Plain data parallelism, its real state parked where a probe does not look, and the
    in-kernel probe replaced by one that reports the formula — the attacks that passed."""
    import llmopt.viz.zero as vz
    psi = sum(p.numel() for p in model.parameters())
    n = dist.get_world_size()

    def forged(optimizer, model=None, baseline=None):
        parts = {"params": 4 * psi / (n if stage == 3 else 1), "grads": 4 * psi / (n if stage >= 2 else 1),
                 "optimizer": 12 * psi / n}
        return dict(parts, total=sum(parts.values()))
    vz.measured_state_bytes = parallel.measured_state_bytes = zero.measured_state_bytes = forged
    opt = optimizer_cls(model.parameters(), **kw)
    _Hidden.state.append(opt)

    class DP:
        param_groups, state = [], {}

        def step(self):
            parallel.average_gradients(model)
            opt.step()

        def zero_grad(self):
            opt.zero_grad()
    return model, DP()


def dp_gather(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def solution_notebook():
    """(shard_model, gather_full_params) as the solution notebook defines them."""
    from autograder import course
    with open(course.source_notebook(LAB)) as f:
        nb = json.load(f)
    ns = {}
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "code" and ("import llmopt" in src or "def units_of" in src or
                                        "class ShardedUnit" in src or "def shard_model" in src):
            exec(compile(src, f"<cell {c['id']}>", "exec"), ns)
    return ns["shard_model"], ns["gather_full_params"]


VARIANTS = {"reference": REF, "whole_optimizer": (whole_optimizer, zero.gather_full_params),
            "not_freed": REF, "dp_forged_probe": (dp_forged_probe, dp_gather),
            "solution_notebook": None}


def _main(variant, ballast, names):
    keep = torch.ones(ballast // 4) if ballast else None     # touched: it counts  # noqa: F841
    if variant == "not_freed":
        zero._Unit.free = _keep
    if variant == "solution_notebook":
        VARIANTS[variant] = solution_notebook()
    for name in names:
        full = getattr(cases, f"inputs_{name}")
        setattr(cases, f"inputs_{name}",
                lambda seed, full=full: [c for c in full(seed) if c["kind"] == "memory"])
    out = {}
    for name in names:
        t0 = time.monotonic()
        r = grade(name, VARIANTS[variant], seed=2)
        out[name] = {"passed": r.passed, "total": r.total, "messages": r.messages,
                     "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
