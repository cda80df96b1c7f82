"""Sparse MoE dispatch: loop vs grouped, against transformers' own Mixtral experts, in one run.

    PYTHONPATH=lib python3 bench/moe.py --out $OUT          # GPU: the full table and the sweeps
    PYTHONPATH=lib python bench/moe.py --small              # CPU: a small smoke run

1. The Mixtral-like layer of the issue — E = 8 experts, top-2, d_model 1024, d_ff 3584, 4,096
   tokens, bf16, router weights from ``llmopt.moe.TopKRouter`` on random tokens — dispatched by
   ``llmopt.moe.moe_loop``, ``moe_grouped`` (contiguous slices, one ``F.linear`` per expert) and
   ``moe_grouped`` on ``torch._grouped_mm``, a fused-w13 variant (w1 and w3 pre-concatenated, as
   transformers stores ``gate_up_proj``), the same under ``torch.compile``, and transformers'
   ``MixtralExperts`` with ``config._experts_implementation`` = ``eager``, ``batched_mm``,
   ``grouped_mm`` on the same weights (``SparseMoE.from_hf`` layout). Also the two ``_grouped_mm``
   kernels alone on pre-sorted rows, and one dense GEMM pair of the same FLOPs (the ceiling).
   Ratios are against the loop and against transformers' ``grouped_mm``, in the same process.
2. Sweeps: tokens 512 … 16,384 at E = 8, and E = 8 … 64 at 4,096 tokens (same d, d_ff): loop vs
   grouped (``_grouped_mm``) vs transformers' ``grouped_mm``.
3. The whole block (router + experts): ``llmopt.moe.SparseMoE`` vs ``MixtralSparseMoeBlock``.

Writes ``moe_dispatch.json`` (and ``moe_sweep.json``) via ``llmopt.bench.write_results``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt import moe  # noqa: E402
from llmopt.bench import device_name, time_ms, tflops, write_results  # noqa: E402


def layer(N, E, d, f, k=2, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    x = rn(N, d)
    router = moe.TopKRouter(d, E, k).to(device)
    with torch.no_grad():
        router.weight.copy_(rn(E, d) * d ** -0.5)
        weights, experts, _ = router(x)
    w1, w3, w2 = rn(E, f, d) * d ** -0.5, rn(E, f, d) * d ** -0.5, rn(E, d, f) * f ** -0.5
    to = dict(device=device, dtype=dtype)
    return dict(x=x.to(**to), weights=weights.to(**to), experts=experts,
                w1=w1.to(**to), w2=w2.to(**to), w3=w3.to(**to))


def grouped_fused(x, weights, experts, w13, w2):
    """moe_grouped with w1, w3 stored fused (E, 2·d_ff, d) as transformers' gate_up_proj."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).to(torch.int32)
    g, u = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    ys = torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)
    ys = ys * weights.reshape(-1)[order, None]
    out = torch.empty_like(ys)
    out[order] = ys
    return out.view(N, k, -1).sum(1)


def hf_experts(L, impl):
    """transformers' MixtralExperts on L's weights with the given experts implementation, or None."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as exc:
        print("transformers unavailable:", exc)
        return None
    E, f, d = L["w1"].shape
    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E,
                        num_experts_per_tok=L["experts"].shape[1])
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).to(L["x"].device, L["x"].dtype).eval()
    if not hasattr(block.experts, "gate_up_proj"):
        print("this transformers stores Mixtral experts differently: skipped")
        return None
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.cat([L["w1"], L["w3"]], 1))
        block.experts.down_proj.copy_(L["w2"])
    block.experts.config._experts_implementation = impl
    return block


def flops_of(N, k, d, f):
    return 2 * N * k * 3 * d * f


def dispatch_table(N, E, d, f, k, device, rep, compile_too):
    L = layer(N, E, d, f, k, device=device)
    args = (L["x"], L["weights"], L["experts"], L["w1"], L["w2"], L["w3"])
    w13 = torch.cat([L["w1"], L["w3"]], 1).contiguous()
    fl = flops_of(N, k, d, f)
    on_gpu = device == "cuda"
    fns = {
        "llmopt moe_loop": lambda: moe.moe_loop(*args),
        "llmopt moe_grouped (slices, F.linear per expert)": lambda: moe.moe_grouped(*args, use_grouped_mm=False),
    }
    if on_gpu and hasattr(torch, "_grouped_mm"):
        fns["llmopt moe_grouped (torch._grouped_mm)"] = lambda: moe.moe_grouped(*args, use_grouped_mm=True)
        fns["grouped, w13 fused (torch._grouped_mm)"] = lambda: grouped_fused(L["x"], L["weights"], L["experts"], w13, L["w2"])
    for impl in ("eager", "batched_mm", "grouped_mm"):
        block = hf_experts(L, impl)
        if block is not None:
            fns[f"transformers experts '{impl}'"] = (lambda b=block: b.experts(L["x"], L["experts"], L["weights"]))
    ref = moe.moe_loop(*(a.float() if a.is_floating_point() else a for a in args))
    rows = []
    with torch.no_grad():
        for name, fn in fns.items():
            try:
                err = float((fn().float() - ref).abs().max())
                ms = time_ms(fn, warmup=3, rep=rep)
            except Exception as exc:  # noqa: BLE001
                print(f"{name}: failed: {str(exc)[:200]}")
                continue
            rows.append({"variant": name, "ms": ms, "tflops": tflops(fl, ms), "max_abs_err_vs_fp32": err})
            print(f"{name:50s} {ms:8.3f} ms {tflops(fl, ms):7.1f} TFLOP/s  err {err:.2e}", flush=True)
        if on_gpu and hasattr(torch, "_grouped_mm"):           # the kernels alone, and the ceiling
            order = torch.argsort(L["experts"].reshape(-1), stable=True)
            xs = L["x"][order // k].contiguous()
            offs = torch.cumsum(torch.bincount(L["experts"].reshape(-1), minlength=E), 0).to(torch.int32)
            h = torch.randn(N * k, f, device=device, dtype=xs.dtype)
            kern = lambda: (torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs),   # noqa: E731
                            torch._grouped_mm(h, L["w2"].transpose(1, 2), offs=offs))
            a = torch.randn(N * k, d, device=device, dtype=xs.dtype)
            b1 = torch.randn(d, 2 * f, device=device, dtype=xs.dtype)
            b2 = torch.randn(f, d, device=device, dtype=xs.dtype)
            dense = lambda: (a @ b1, h @ b2)                                        # noqa: E731
            for name, fn in (("_grouped_mm kernels alone (pre-sorted rows)", kern),
                             ("dense GEMM pair, same FLOPs (ceiling)", dense)):
                ms = time_ms(fn, warmup=3, rep=rep)
                rows.append({"variant": name, "ms": ms, "tflops": tflops(fl, ms)})
                print(f"{name:50s} {ms:8.3f} ms {tflops(fl, ms):7.1f} TFLOP/s", flush=True)
    base = {r["variant"]: r["ms"] for r in rows}
    loop = base.get("llmopt moe_loop")
    hf = base.get("transformers experts 'grouped_mm'")
    for r in rows:
        if loop:
            r["speedup_vs_loop"] = loop / r["ms"]
        if hf:
            r["speedup_vs_transformers_grouped_mm"] = hf / r["ms"]
    return rows


def compiled_row(N, E, d, f, k, device, rep):
    """grouped_fused under torch.compile (fuses silu·mul, the gate weights and the unsort)."""
    L = layer(N, E, d, f, k, device=device)
    w13 = torch.cat([L["w1"], L["w3"]], 1).contiguous()
    ref = moe.moe_loop(L["x"].float(), L["weights"].float(), L["experts"], L["w1"].float(), L["w2"].float(), L["w3"].float())
    try:
        cf = torch.compile(grouped_fused, dynamic=False)
        fn = lambda: cf(L["x"], L["weights"], L["experts"], w13, L["w2"])  # noqa: E731
        with torch.no_grad():
            err = float((fn().float() - ref).abs().max())
            ms = time_ms(fn, warmup=3, rep=rep)
    except Exception as exc:  # noqa: BLE001
        print("torch.compile failed:", str(exc)[:300], flush=True)
        return []
    name = "grouped, w13 fused, torch.compile"
    print(f"{name:50s} {ms:8.3f} ms {tflops(flops_of(N, k, d, f), ms):7.1f} TFLOP/s  err {err:.2e}", flush=True)
    return [{"variant": name, "ms": ms, "tflops": tflops(flops_of(N, k, d, f), ms), "max_abs_err_vs_fp32": err}]


def sweep(device, d, f, k, rep, Ns, Es):
    rows = []
    for N, E in [(N, 8) for N in Ns] + [(4096 if device == "cuda" else Ns[-1], E) for E in Es[1:]]:
        L = layer(N, E, d, f, k, device=device)
        args = (L["x"], L["weights"], L["experts"], L["w1"], L["w2"], L["w3"])
        row = {"tokens": N, "experts": E}
        fns = {"loop": lambda: moe.moe_loop(*args), "grouped": lambda: moe.moe_grouped(*args)}
        block = hf_experts(L, "grouped_mm")
        if block is not None:
            fns["transformers_grouped_mm"] = lambda: block.experts(L["x"], L["experts"], L["weights"])
        with torch.no_grad():
            for name, fn in fns.items():
                try:
                    row[f"{name}_ms"] = time_ms(fn, warmup=2, rep=rep)
                except Exception as exc:  # noqa: BLE001
                    print(name, "failed:", str(exc)[:120])
        row["loop_over_grouped"] = row["loop_ms"] / row["grouped_ms"]
        row["grouped_tflops"] = tflops(flops_of(N, k, d, f), row["grouped_ms"])
        print(row, flush=True)
        rows.append(row)
        del L, block
    return rows


def block_rows(N, E, d, f, k, device, rep):
    L = layer(N, E, d, f, k, device=device)
    block = hf_experts(L, "grouped_mm")
    if block is None:
        return []
    with torch.no_grad():
        block.gate.weight.normal_(0, d ** -0.5)
    ours = moe.SparseMoE.from_hf(block, dispatch="grouped")
    x = L["x"][None]
    rows = []
    with torch.no_grad():
        y_hf, y_ours = block(x), ours(x)[0]
        err = float((y_hf.float() - y_ours.float()).abs().max())
        for name, fn in (("transformers MixtralSparseMoeBlock (grouped_mm)", lambda: block(x)),
                         ("llmopt SparseMoE (grouped)", lambda: ours(x))):
            ms = time_ms(fn, warmup=3, rep=rep)
            rows.append({"variant": name, "ms": ms, "max_abs_diff_between_them": err})
            print(f"{name:50s} {ms:8.3f} ms   |Δ| {err:.2e}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="CPU-sized smoke run")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(device_name(), torch.__version__, flush=True)
    if args.small or device == "cpu":
        N, E, d, f, rep = 512, 8, 128, 256, 5
        Ns, Es = [128, 512, 2048], [8, 16, 32]
    else:
        N, E, d, f, rep = 4096, 8, 1024, 3584, 30
        Ns, Es = [512, 1024, 2048, 4096, 8192, 16384], [8, 16, 32, 64]
    k = 2
    meta = dict(tokens=N, experts=E, top_k=k, d_model=d, d_ff=f, dtype="bfloat16",
                flops=flops_of(N, k, d, f))
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    rows = dispatch_table(N, E, d, f, k, device, rep, compile_too=False)
    rows += block_rows(N, E, d, f, k, device, rep)
    write_results("moe_dispatch", rows, args.out, **meta)
    sw = sweep(device, d, f, k, max(5, rep // 3), Ns, Es)
    write_results("moe_sweep", sw, args.out, d_model=d, d_ff=f, top_k=k, dtype="bfloat16")
    if not args.no_compile and device == "cuda":      # last: compiling may take a while
        extra = compiled_row(N, E, d, f, k, device, rep)
        if extra:
            hf = next((r["ms"] for r in rows if r["variant"] == "transformers experts 'grouped_mm'"), None)
            loop = next((r["ms"] for r in rows if r["variant"] == "llmopt moe_loop"), None)
            for r in extra:
                if loop:
                    r["speedup_vs_loop"] = loop / r["ms"]
                if hf:
                    r["speedup_vs_transformers_grouped_mm"] = hf / r["ms"]
            write_results("moe_dispatch", rows + extra, args.out, **meta)


if __name__ == "__main__":
    main()
