"""FlashAttention on Hopper: the climb from the lab's FA2 kernel towards cuDNN, step by step.

    PYTHONPATH=lib:. python3 bench/flash_attention_hopper.py --out $OUT/flash_attention_hopper.json
    PYTHONPATH=lib:. python3 bench/flash_attention_hopper.py --quick          # CPU smoke run
    PYTHONPATH=lib:. python3 bench/flash_attention_hopper.py --plot FILE.json  # the climb's plot
    PYTHONPATH=lib:. python3 bench/flash_attention_hopper.py --compile-check   # sm_90, no GPU

One command, ≤ 5 minutes on one H200 (``--budget`` seconds, default 240, for the whole run).
bf16, H = 16, d = 128, B·H·N = 256k tokens (B = 4 at N = 4k), FLOPs counted as in
bench/flash_attention.py (forward 4·B·H·N²·d, forward+backward 3.5× that, halved when causal).

1. Baselines at N = 4k causal (and non-causal, 8k, 16k causal): SDPA's flash and cuDNN
   backends and the lab's kernel ``llmopt.flash_attention``.
2. The climb (``llmopt.flash_attention_hopper.STEPS``) at N = 4k, d = 128, causal: each step adds
   its technique to the best configuration so far and times a few tile configurations
   (forward tiles if the step touches the forward, backward tiles if it touches the backward;
   the first of each list is the one tried when time runs short). The step's best is kept only
   if it is faster than the best so far (``kept_fwd`` / ``kept_bwd``), so a technique that does
   not pay, does not compile, or is wrong (max relative error ≥ 1e-2), does not hold back the
   next one. Per step: forward and forward+backward TFLOP/s through the autograd function (as
   the baselines are timed; ``fwd_kernel_tflops``: the forward launcher alone), backward-only
   TFLOP/s, the errors against fp32 math (O, dQ, dK, dV, relative Frobenius, N = 1024), and
   every tile configuration tried with its TFLOP/s or its error string.
3. The best configuration at the baselines' other shapes, and its errors at a ragged N = 1000.

Every step runs in its own subprocess with a timeout (a kernel that does not compile is
recorded with its error; one that hangs or corrupts the CUDA context costs only its step);
before it, the step's candidates are compiled in parallel subprocesses (one per candidate,
on a small input that specialises like the timed one), so the step itself finds its kernels
in Triton's on-disk cache.
The JSON (``llmopt.bench.write_results``, the card's name included) is rewritten after every
step, so an interrupted run still leaves the steps it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "lib"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmopt import bench  # noqa: E402
from llmopt import flash_attention_hopper as fh  # noqa: E402

TOKENS = 256 * 1024
H = 16
D = 128
N_MAIN = 4096

# tile candidates, most promising first: (BLOCK_M, BLOCK_N, warps, stages)
# (64 × … with 4 warps: two CTAs per SM, one's softmax overlapping the other's matmuls)
FWD_TILES = [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 128, 4, 2),
             (128, 128, 8, 3), (64, 64, 4, 3)]
# ((dK/dV: BLOCK_M1, BLOCK_N1, warps, stages), (dQ: BLOCK_M2, BLOCK_N2, warps, stages))
# (checked with ptxas for sm_90, Triton 3.6: no spills except dQ-atomic with 64 × 128; 4-warp
#  configurations do not compile with warp_specialize, 32 × 128 with 4 warps spills 2 KB)
BWD_TILES = [((64, 128, 8, 2), (128, 64, 8, 2)), ((32, 128, 8, 2), (128, 32, 8, 2)),
             ((64, 128, 8, 3), (128, 64, 8, 3)), ((64, 64, 4, 3), (64, 64, 4, 3)),
             ((32, 64, 4, 3), (64, 32, 4, 3)), ((32, 128, 8, 3), (128, 32, 8, 3))]
# a step is kept only if it is also right: bf16 reaches ≈ 2–4e-3 against fp32 math
MAX_REL_ERR = 1e-2
QUICK_FWD_TILES = [(32, 32, 4, 1), (16, 32, 4, 1)]
QUICK_BWD_TILES = [((32, 32, 4, 1), (32, 32, 4, 1))]


def flops(B, N, d, causal, mode):
    f = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sizes(quick, N=None):
    """(B, N, d, dtype) of a timed shape."""
    if quick:
        return 1, 64, 64, torch.bfloat16
    N = N or N_MAIN
    return max(1, TOKENS // (H * N)), N, D, torch.bfloat16


def _inputs(B, N, d, dtype, requires_grad=False, seed=0):
    g = torch.Generator(device=_device()).manual_seed(seed)
    heads = H if _device() == "cuda" else 2
    return [torch.randn(B, heads, N, d, device=_device(), dtype=dtype, generator=g)
            .requires_grad_(requires_grad) for _ in range(3)]


def _time(fn, quick):
    return bench.time_ms(fn, warmup=1 if quick else 5, rep=3 if quick else 30)


def _err(e):
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


def _tflops(B, N, d, causal, mode, ms, quick):
    heads = H if not quick else 2
    return bench.tflops(flops(B, N, d, causal, mode) * heads / H, ms)


# --------------------------------------------------------------------------------------
# what one subprocess measures
# --------------------------------------------------------------------------------------

def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def time_pair(fn, B, N, d, dtype, causal, quick):
    """(forward ms, forward+backward ms) of fn(q, k, v, causal), as bench/flash_attention.py."""
    q, k, v = _inputs(B, N, d, dtype, requires_grad=True)
    do = torch.randn_like(q)
    with torch.no_grad():
        fwd = _time(lambda: fn(q, k, v, causal), quick)

    def step():
        o = fn(q, k, v, causal)
        o.backward(do)
        q.grad = k.grad = v.grad = None
    return fwd, _time(step, quick)


def errors_vs_fp32(fn, causal, N=1024, quick=False):
    """Relative Frobenius errors of O, dQ, dK, dV against fp32 math, bf16 inputs."""
    B, _, d, dtype = _sizes(quick)
    N = 48 if quick else N
    q, k, v = _inputs(2, N, d, dtype, requires_grad=True, seed=1)
    o = fn(q, k, v, causal)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    of = fh_reference(qf, kf, vf, causal)
    gf = torch.autograd.grad(of, (qf, kf, vf), do.float())
    return {name: ((a.float() - b).norm() / b.norm()).item()
            for name, a, b in zip(("o", "dq", "dk", "dv"), (o,) + g, (of,) + gf)}


def fh_reference(q, k, v, causal):
    from llmopt.flash_attention import attention_reference
    return attention_reference(q, k, v, causal)


def hopper_fn(fcfg, bcfg):
    return lambda q, k, v, causal: fh.HopperAttention.apply(q, k, v, causal, None, fcfg, bcfg)


def work_baselines(job, quick):
    """SDPA flash, SDPA cuDNN and the lab's kernel at the job's shapes."""
    from llmopt.flash_attention import flash_attention
    if quick:
        impls = {"sdpa_math": _sdpa(None),
                 "lab": lambda q, k, v, c: flash_attention(q, k, v, causal=c)}
    else:
        from torch.nn.attention import SDPBackend
        impls = {"sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
                 "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
                 "lab": lambda q, k, v, c: flash_attention(q, k, v, causal=c)}
    rows = []
    for N, causal in job["shapes"]:
        B, N, d, dtype = _sizes(quick, N)
        for name, fn in impls.items():
            row = {"kind": "baseline", "impl": name, "B": B, "N": N, "d": d, "causal": causal}
            try:
                fwd, both = time_pair(fn, B, N, d, dtype, causal, quick)
                row.update(fwd_ms=fwd, fwd_bwd_ms=both,
                           fwd_tflops=_tflops(B, N, d, causal, "fwd", fwd, quick),
                           fwd_bwd_tflops=_tflops(B, N, d, causal, "fwd_bwd", both, quick))
            except Exception as e:  # a backend not available for this shape
                row["error"] = _err(e)
            rows.append(row)
            _sync_or_die()
    return {"rows": rows}


def _sync_or_die():
    """A kernel that faulted leaves the CUDA context unusable: stop this subprocess."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def work_step(job, quick):
    """One climb step: time the candidates, keep the fastest, measure fwd+bwd and errors."""
    t_end = time.time() + job["seconds"]
    fwd_base = fh.FwdConfig(**job["fwd"])
    bwd_base = fh.BwdConfig(**job["bwd"])
    causal = True
    B, N, d, dtype = _sizes(quick)
    q, k, v = _inputs(B, N, d, dtype)
    do = torch.randn_like(q)
    out = {"sweep_fwd": [], "sweep_bwd": []}

    def sweep(kind, tiles_list, make_cfg, run, skip=lambda tiles: False):
        """Time ``run(cfg)`` for each tile candidate into out["sweep_<kind>"]; the fastest (cfg, ms)."""
        best = (None, float("inf"))
        for i, tiles in enumerate(tiles_list):
            if skip(tiles):
                continue
            if json.dumps(tiles) in job.get("failed", {}):
                out[f"sweep_{kind}"].append({"tiles": tiles, "error": job["failed"][json.dumps(tiles)]})
                continue
            if i > 0 and time.time() > t_end:
                out[f"sweep_{kind}"].append({"tiles": tiles, "skipped": "time budget"})
                continue
            cfg = make_cfg(tiles)
            try:
                ms = _time(lambda: run(cfg), quick)
                out[f"sweep_{kind}"].append({"tiles": tiles, f"{kind}_tflops": _tflops(B, N, d, causal, kind, ms, quick)})
                if ms < best[1]:
                    best = (cfg, ms)
            except Exception as e:
                out[f"sweep_{kind}"].append({"tiles": tiles, "error": _err(e)})
                _sync_or_die()
        return best

    best_f = sweep("fwd", job["fwd_tiles"] or [fwd_base.tiles()],
                   lambda t: dataclasses.replace(fwd_base, **dict(zip(("block_m", "block_n", "num_warps",
                                                                       "num_stages"), t))),
                   lambda cfg: fh.flash_attention_hopper_fwd(q, k, v, causal, None, cfg))
    if best_f[0] is not None:
        o, lse = fh.flash_attention_hopper_fwd(q, k, v, causal, None, best_f[0])
    else:  # the forward does not compile: the backward runs on the base forward's output
        o, lse = fh.flash_attention_hopper_fwd(q, k, v, causal, None, fh.FwdConfig(
            **{**job["fallback_fwd"]}))
    seen = set()

    def same_dkdv_tiles(tiles):  # with dQ in the dK/dV pass the dQ pass's tiles do not matter
        if not bwd_base.dq_atomic:
            return False
        if tuple(tiles[0]) in seen:
            return True
        seen.add(tuple(tiles[0]))
        return False
    best_b = sweep("bwd", job["bwd_tiles"] or [bwd_base.tiles()],
                   lambda t: dataclasses.replace(bwd_base, **dict(zip(
                       ("block_m1", "block_n1", "num_warps1", "num_stages1",
                        "block_m2", "block_n2", "num_warps2", "num_stages2"), [*t[0], *t[1]]))),
                   lambda cfg: fh.flash_attention_hopper_bwd(q, k, v, o, lse, do, causal, None, cfg),
                   skip=same_dkdv_tiles)
    if best_f[0] is not None:
        out["fwd_config"] = dataclasses.asdict(best_f[0])
        out["fwd_ms"] = best_f[1]                                       # the launcher alone
        out["fwd_kernel_tflops"] = _tflops(B, N, d, causal, "fwd", best_f[1], quick)
        out["fwd_tflops"] = out["fwd_kernel_tflops"]
    if best_b[0] is not None:
        out["bwd_config"] = dataclasses.asdict(best_b[0])
        out["bwd_ms"] = best_b[1]
        out["bwd_tflops"] = _tflops(B, N, d, causal, "bwd", best_b[1], quick)
    if best_f[0] is not None and best_b[0] is not None:
        fn = hopper_fn(best_f[0], best_b[0])
        try:
            fwd, both = time_pair(fn, B, N, d, dtype, causal, quick)
            # through the autograd.Function, as the baselines are timed
            out["fwd_tflops"] = _tflops(B, N, d, causal, "fwd", fwd, quick)
            out["fwd_bwd_tflops"] = _tflops(B, N, d, causal, "fwd_bwd", both, quick)
            out["fwd_bwd_ms"] = both
            out["errors_vs_fp32_math"] = errors_vs_fp32(fn, causal, quick=quick)
        except Exception as e:
            out["fwd_bwd_error"] = _err(e)
    return out


def work_final(job, quick):
    """The best configuration at the other shapes, and its errors at a ragged N."""
    fcfg, bcfg = fh.FwdConfig(**job["fwd"]), fh.BwdConfig(**job["bwd"])
    fn = hopper_fn(fcfg, bcfg)
    rows = []
    for N, causal in job["shapes"]:
        B, N, d, dtype = _sizes(quick, N)
        row = {"kind": "hopper_best", "impl": "hopper", "B": B, "N": N, "d": d, "causal": causal}
        try:
            fwd, both = time_pair(fn, B, N, d, dtype, causal, quick)
            row.update(fwd_ms=fwd, fwd_bwd_ms=both,
                       fwd_tflops=_tflops(B, N, d, causal, "fwd", fwd, quick),
                       fwd_bwd_tflops=_tflops(B, N, d, causal, "fwd_bwd", both, quick))
        except Exception as e:
            row["error"] = _err(e)
            _sync_or_die()
        rows.append(row)
    errs = {}
    for causal in (True, False):
        try:
            errs[f"causal{int(causal)}"] = errors_vs_fp32(fn, causal, N=1000 if not quick else 45,
                                                          quick=quick)
        except Exception as e:
            errs[f"causal{int(causal)}"] = _err(e)
    return {"rows": rows, "errors_ragged_N1000": errs}


def work_compile(job, quick):
    """Compile one candidate (forward or backward) by running it once on a small input whose
    integer arguments specialise like the timed shapes' (B·H and N multiples of 16 and of the
    tiles): the binary lands in Triton's on-disk cache, where the step's worker finds it."""
    B, N, d, dtype = (1, 64, 64, torch.bfloat16) if quick else (1, 256, D, torch.bfloat16)
    q, k, v = _inputs(B, N, d, dtype)
    if job.get("fwd"):
        fh.flash_attention_hopper_fwd(q, k, v, True, None, fh.FwdConfig(**job["fwd"]))
    if job.get("bwd"):
        lse = torch.zeros(q.shape[:3], device=q.device, dtype=torch.float32)
        fh.flash_attention_hopper_bwd(q, k, v, q, lse, q, True, None, fh.BwdConfig(**job["bwd"]))
    _sync_or_die()
    return {"ok": True}


WORK = {"baselines": work_baselines, "step": work_step, "final": work_final,
        "compile": work_compile}


def worker(job_path, quick):
    """Subprocess entry: run the job in ``job_path``, print one JSON line prefixed RESULT."""
    with open(job_path) as f:
        job = json.load(f)
    try:
        res = WORK[job["kind"]](job, quick)
    except Exception as e:
        res = {"error": _err(e), "traceback": traceback.format_exc()[-2000:]}
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------

def run_job(job, quick, timeout):
    """Run ``job`` in a subprocess; its result dict, or {"error": ...}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path]
    cmd += ["--quick"] if quick else []
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s (hang or slow compile)",
                "wall_s": time.time() - t0}
    finally:
        os.unlink(path)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = round(time.time() - t0, 1)
            return res
    return {"error": f"exit {p.returncode}: {p.stderr.strip()[-600:]}",
            "wall_s": time.time() - t0}


def precompile(jobs, quick, timeout):
    """Compile a step's candidates in parallel subprocesses (compiling, not timing, is what
    costs a bench like this its minutes); returns {index: error} for the ones that failed."""
    procs = []
    for job in jobs:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"kind": "compile", **job}, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f.name]
        cmd += ["--quick"] if quick else []
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), f.name))
    t_end = time.time() + timeout
    errors = {}
    for i, (p, path) in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(1.0, t_end - time.time()))
            res = json.loads(out.split("RESULT ")[-1]) if "RESULT " in out else {"error": err}
            if "error" in res:
                errors[i] = res["error"][-400:]
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            errors[i] = f"compile timeout after {timeout:.0f} s"
        os.unlink(path)
    return errors


def _candidates(fcfg, bcfg, fwd_tiles, bwd_tiles):
    """The (forward, backward) configurations a step will time, for ``precompile``."""
    jobs = []
    for t in fwd_tiles or []:
        jobs.append({"fwd": dataclasses.asdict(dataclasses.replace(
            fcfg, **dict(zip(("block_m", "block_n", "num_warps", "num_stages"), t))))})
    for (a, b, c, e), (f, g, h, i) in bwd_tiles or []:
        jobs.append({"bwd": dataclasses.asdict(dataclasses.replace(
            bcfg, block_m1=a, block_n1=b, num_warps1=c, num_stages1=e, block_m2=f,
            block_n2=g, num_warps2=h, num_stages2=i))})
    return jobs


def climb(quick, budget, out_dir, name, meta):
    t0 = time.time()
    left = lambda: budget - (time.time() - t0)  # noqa: E731
    rows = []

    def save():
        return bench.write_results(name, rows, out_dir=out_dir, quick=quick, **meta)

    big = [] if quick else [(8192, True), (16384, True)]
    shapes = [(N_MAIN, True), (N_MAIN, False)] + big
    base = run_job({"kind": "baselines", "shapes": shapes}, quick, timeout=min(90, left()))
    rows += base.get("rows", [])
    if "error" in base:
        meta["baselines_error"] = base["error"]
    print(json.dumps(base)[:2000], flush=True)
    save()

    fwd_tiles = QUICK_FWD_TILES if quick else FWD_TILES
    bwd_tiles = QUICK_BWD_TILES if quick else BWD_TILES
    best_f, best_b = fh.step_configs(0)
    if quick:
        best_f = dataclasses.replace(best_f, block_m=32, block_n=32, num_warps=4, num_stages=1)
        best_b = fh.BwdConfig(32, 32, 4, 1, 32, 32, 4, 1)
    best_fwd_ms = best_bwd_ms = float("inf")
    n_steps = len(fh.STEPS)
    for i, (step, adds, fsw, bsw) in enumerate(fh.STEPS):
        fcfg = dataclasses.replace(best_f, **fsw)
        bcfg = dataclasses.replace(best_b, **bsw)
        share = max(20.0, (left() - 45) / (n_steps - i + 1))  # leave time for the final job
        job = {"kind": "step", "fwd": dataclasses.asdict(fcfg), "bwd": dataclasses.asdict(bcfg),
               "fallback_fwd": dataclasses.asdict(best_f),
               "fwd_tiles": fwd_tiles if (i == 0 or fsw) else None,
               "bwd_tiles": bwd_tiles if (i == 0 or bsw) else None,
               "seconds": share}
        if left() < 30:
            res = {"error": "skipped: time budget"}
        else:
            t_c = time.time()
            failed = precompile(_candidates(fcfg, bcfg, job["fwd_tiles"], job["bwd_tiles"]),
                                quick, timeout=min(90, max(20, left() / 3)))
            compile_s = round(time.time() - t_c, 1)
            # candidates that failed to compile (not merely timed out) are not tried again
            tiles = (job["fwd_tiles"] or []) + (job["bwd_tiles"] or [])
            job["failed"] = {json.dumps(tiles[i]): e for i, e in failed.items()
                             if "timeout" not in e}
            res = run_job(job, quick, timeout=min(share + 40, max(15, left() - 10)))
            res["precompile_s"] = compile_s
            if failed:
                res["precompile_errors"] = {str(k): v for k, v in failed.items()}
        row = {"kind": "step", "step": i, "name": step, "adds": adds, **res}
        errs = res.get("errors_vs_fp32_math") or {}
        row["correct"] = bool(errs) and max(errs.values()) < MAX_REL_ERR
        row["kept_fwd"] = (row["correct"] and bool(fsw or i == 0)
                           and res.get("fwd_ms", float("inf")) < best_fwd_ms)
        row["kept_bwd"] = (row["correct"] and bool(bsw or i == 0)
                           and res.get("bwd_ms", float("inf")) < best_bwd_ms)
        if row["kept_fwd"]:
            best_f, best_fwd_ms = fh.FwdConfig(**res["fwd_config"]), res["fwd_ms"]
        if row["kept_bwd"]:
            best_b, best_bwd_ms = fh.BwdConfig(**res["bwd_config"]), res["bwd_ms"]
        row["best_fwd_config_so_far"] = dataclasses.asdict(best_f)
        row["best_bwd_config_so_far"] = dataclasses.asdict(best_b)
        rows.append(row)
        print(f"step {i} {step}: fwd {res.get('fwd_tflops', float('nan')):.0f} "
              f"bwd {res.get('bwd_tflops', float('nan')):.0f} "
              f"fwd+bwd {res.get('fwd_bwd_tflops', float('nan')):.0f} TFLOP/s "
              f"max err {max(errs.values()) if errs else float('nan'):.1e} "
              f"kept fwd={row['kept_fwd']} bwd={row['kept_bwd']} "
              f"({res.get('wall_s', 0):.0f} s) {res.get('error', '')}", flush=True)
        save()

    meta["best_fwd_config"] = dataclasses.asdict(best_f)
    meta["best_bwd_config"] = dataclasses.asdict(best_b)
    final_shapes = shapes if left() > 60 else shapes[:1]
    res = run_job({"kind": "final", "fwd": dataclasses.asdict(best_f),
                   "bwd": dataclasses.asdict(best_b), "shapes": final_shapes},
                  quick, timeout=max(20, min(90, left() + 40)))
    rows += res.get("rows", [])
    meta["best_errors_ragged_N1000"] = res.get("errors_ragged_N1000", res.get("error"))
    meta["wall_s"] = round(time.time() - t0, 1)
    path = save()
    summary(rows, meta)
    print("wrote", path)
    return path


def summary(rows, meta):
    """The table of bench/README.md, printed."""
    n_main = next((r["N"] for r in rows if r.get("kind") == "baseline"), N_MAIN)

    def pick(impl, N=n_main, causal=True):
        for r in rows:
            if r.get("impl") == impl and r.get("N") == N and r.get("causal") == causal:
                return r
        return {}
    cudnn = pick("sdpa_cudnn")
    cf, cb = cudnn.get("fwd_tflops", float("nan")), cudnn.get("fwd_bwd_tflops", float("nan"))
    print(f"\nN={n_main}, causal, bf16, TFLOP/s (ratio to cuDNN)")
    for impl in ("sdpa_flash", "sdpa_cudnn", "sdpa_math", "lab"):
        r = pick(impl)
        if r:
            print(f"  {impl:24s} fwd {r.get('fwd_tflops', float('nan')):6.0f} "
                  f"fwd+bwd {r.get('fwd_bwd_tflops', float('nan')):6.0f}")
    for r in rows:
        if r.get("kind") == "step":
            f, b = r.get("fwd_tflops", float("nan")), r.get("fwd_bwd_tflops", float("nan"))
            print(f"  step {r['step']} {r['name']:17s} fwd {f:6.0f} ({f / cf:.2f}×) "
                  f"fwd+bwd {b:6.0f} ({b / cb:.2f}×) kept {r['kept_fwd']}/{r['kept_bwd']}"
                  f" {r.get('error', '')[:80]}")
    for r in rows:
        if r.get("kind") == "hopper_best":
            f, b = r.get("fwd_tflops", float("nan")), r.get("fwd_bwd_tflops", float("nan"))
            print(f"  best N={r['N']} causal={r['causal']}: fwd {f:.0f} fwd+bwd {b:.0f} "
                  f"{r.get('error', '')}")
    print("best configs:", json.dumps({k: meta.get(k) for k in ("best_fwd_config",
                                                                 "best_bwd_config")}))


def plot(json_path, png_path=None):
    """The climb as bars (forward, forward+backward) against cuDNN's and SDPA-flash's lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as f:
        rec = json.load(f)
    rows = rec["rows"]
    base = {r["impl"]: r for r in rows if r.get("kind") == "baseline" and r.get("N") == N_MAIN
            and r.get("causal")}
    steps = [r for r in rows if r.get("kind") == "step"]
    labels = ["lab"] + [f"{r['step']}: {r['name']}" for r in steps]
    fwd = [base.get("lab", {}).get("fwd_tflops", 0)] + [r.get("fwd_tflops", 0) for r in steps]
    both = [base.get("lab", {}).get("fwd_bwd_tflops", 0)] + [r.get("fwd_bwd_tflops", 0)
                                                             for r in steps]
    kept = [True] + [r.get("kept_fwd", False) or r.get("kept_bwd", False) for r in steps]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(labels))
    for i in x:  # a step that was not kept (slower, failed or wrong) is drawn faded
        a = 1.0 if kept[i] else 0.35
        ax.bar(i - 0.2, fwd[i], 0.4, color="C0", alpha=a, label="forward" if i == 0 else None)
        ax.bar(i + 0.2, both[i], 0.4, color="C1", alpha=a,
               label="forward+backward (faded: step not kept)" if i == 0 else None)
    for impl, style in (("sdpa_cudnn", "-"), ("sdpa_flash", ":")):
        r = base.get(impl, {})
        if "fwd_tflops" in r:
            ax.axhline(r["fwd_tflops"], color="C0", ls=style, lw=1, label=f"{impl} fwd")
            ax.axhline(r["fwd_bwd_tflops"], color="C1", ls=style, lw=1, label=f"{impl} fwd+bwd")
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"FlashAttention climb, N={N_MAIN}, d={D}, causal, bf16 ({rec['device']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png_path = png_path or json_path[:-5] + ".png"
    fig.savefig(png_path, dpi=120)
    return png_path


# --------------------------------------------------------------------------------------
# compiling for sm_90 without a GPU
# --------------------------------------------------------------------------------------

def compile_check():
    """Compile every step's candidates for sm_90 (Hopper) with the installed Triton, on any
    machine (no GPU: ``triton.compile`` with a ``GPUTarget``), and print shared memory,
    registers and spills (``ptxas -v``) and whether warp specialisation made partitions.
    Runs in a subprocess with TRITON_INTERPRET=0 (``import llmopt`` turns it on without CUDA)."""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert not fh._interpreting(), "run through --compile-check (TRITON_INTERPRET=0)"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    types = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    rows = []

    def compile_launch(fn, tag, args, kwargs):
        """What a launch would compile: the signature and specialisations the JIT derives."""
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        vals = {**dict(zip(fn.arg_names, args)), **kwargs}
        sig, consts, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = vals[p.name]
            if p.is_constexpr or (isinstance(v, int) and v == 1):
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name], attrs[(i,)] = types[v.dtype], [["tt.divisibility", 16]]
            elif isinstance(v, int):
                sig[p.name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[p.name] = "fp32"
        row = {"kernel": fn.__name__, **tag}
        try:
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=opts)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(k.asm["ptx"])
            for ptxas in ("ptxas", "ptxas-blackwell"):  # the one that reads this PTX version
                log = subprocess.run([os.path.join(bin_dir, ptxas), "-arch=sm_90a", "-v", f.name,
                                      "-o", os.devnull], capture_output=True, text=True).stderr
                if "registers" in log:
                    break
            os.unlink(f.name)
            row.update(smem=k.metadata.shared,
                       regs=int((re.findall(r"Used (\d+) registers", log) or [-1])[0]),
                       spill=int((re.findall(r"(\d+) bytes spill stores", log) or [-1])[0]),
                       ws_partitions="ttg.warp_specialize" in k.asm["ttgir"])
        except Exception as e:
            row["error"] = _err(e)
        rows.append(row)
        print(json.dumps(row), flush=True)

    class Launch:
        def __init__(self, fn):
            self.fn, self.tag = fn, {}

        def __getitem__(self, grid):
            return lambda *a, **k: compile_launch(self.fn, self.tag, a, dict(k))

    kernels = {n: Launch(getattr(fh, n)) for n in (
        "_hopper_fwd_kernel", "_bwd_preprocess_kernel", "_hopper_bwd_dkdv_kernel",
        "_hopper_bwd_dq_kernel", "_hopper_bwd_fused_kernel")}
    for n, launch in kernels.items():
        setattr(fh, n, launch)
    fh._use_tma = lambda flag, d: flag and d == triton.next_power_of_2(d)   # no allocator here
    q = torch.empty(1, H, 256, D, dtype=torch.bfloat16)
    lse = torch.empty(1, H, 256, dtype=torch.float32)
    for i, (step, _, fsw, bsw) in enumerate(fh.STEPS):
        f, b = fh.step_configs(i, fh.FwdConfig(), fh.BwdConfig())
        for t in FWD_TILES if (i == 0 or fsw) else []:
            for launch in kernels.values():
                launch.tag = {"step": step, "tiles": t}
            fh.flash_attention_hopper_fwd(q, q, q, True, None, dataclasses.replace(
                f, **dict(zip(("block_m", "block_n", "num_warps", "num_stages"), t))))
        for (a, b_, c, e), (g, h, m, n) in BWD_TILES if (i == 0 or bsw) else []:
            for launch in kernels.values():
                launch.tag = {"step": step, "tiles": [[a, b_, c, e], [g, h, m, n]]}
            fh.flash_attention_hopper_bwd(q, q, q, q, lse, q, True, None, dataclasses.replace(
                b, block_m1=a, block_n1=b_, num_warps1=c, num_stages1=e, block_m2=g,
                block_n2=h, num_warps2=m, num_stages2=n))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--out", default=None,
                    help="folder for the JSON, or a path ending in .json (default bench/results)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--plot", default=None, help="draw FILE.json's climb into FILE.png and exit")
    ap.add_argument("--compile-check", action="store_true",
                    help="compile every step's candidates for sm_90 here (no GPU needed) and "
                         "print shared memory, registers, spills")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_check:
        if fh._interpreting():  # kernels were defined for the interpreter: start afresh
            env = {**os.environ, "TRITON_INTERPRET": "0"}
            sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__),
                                      "--compile-check"], env=env))
        compile_check()
        return
    quick = args.quick or not torch.cuda.is_available()
    if args.worker:
        worker(args.worker, quick)
        return
    if args.plot:
        print("wrote", plot(args.plot))
        return
    out_dir, name = args.out, None
    if out_dir and out_dir.endswith(".json"):
        out_dir, name = os.path.dirname(out_dir) or ".", os.path.basename(out_dir)[:-5]
    name = name or ("flash_attention_hopper_quick" if quick else "flash_attention_hopper")
    if quick:
        out_dir = out_dir or tempfile.gettempdir()
    meta = {"tokens_per_batch": TOKENS, "heads": H, "head_dim": D, "dtype": "bfloat16",
            "flops": "fwd 4·B·H·N²·d, bwd 2.5× that, fwd+bwd 3.5×, halved when causal",
            "steps": [{"name": s, "adds": a, "fwd": f, "bwd": b} for s, a, f, b in fh.STEPS],
            "fwd_tiles": FWD_TILES, "bwd_tiles": BWD_TILES}
    if quick:
        meta["note"] = "CPU interpreter smoke run: timings mean nothing"
    print("device:", bench.device_name(), flush=True)
    path = climb(quick, max(args.budget, 600.0) if quick else args.budget, out_dir, name, meta)
    if not quick:
        try:
            print("wrote", plot(path))
        except Exception as e:  # no matplotlib on the device: draw it later with --plot
            print("no plot:", _err(e))


if __name__ == "__main__":
    main()
