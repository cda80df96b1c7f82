"""ZeRO stages 0–3 (llmopt.zero) vs PyTorch FSDP2 ``fully_shard``: equivalence, memory, time.

    PYTHONPATH=lib python3 bench/zero.py            # GPUs: NCCL, one process per GPU
    PYTHONPATH=lib python3 bench/zero.py --cpu      # smoke test: gloo, 2 ranks, tiny model

1. Equivalence: 5 steps (fp32, AdamW) of every stage on a small transformer, the batch split
   over the ranks, against one process on the whole batch: max |Δparam|.
2. Speed and memory: OPT-125m-, 1.3b-, 2.7b- and 6.7b-sized transformers (bf16 weights,
   fp32 master copy and AdamW state), batch per GPU × 1,024 tokens: per-GPU peak memory
   (``torch.cuda.max_memory_allocated``, each mode in fresh processes) and median step time
   (CUDA events) of stages 0–3
   and of ``fully_shard`` per block (bf16 parameters, bf16 reduction, fp32 sharded
   master params), measured in the same run on the same GPUs. At the 1.3b size also:
   ``+overlap`` (``shard_model(..., overlap=True)``: the next unit's all-gather prefetched,
   reduce-scatters in flight behind the backward), ``@8``/``@16`` (8 or 16 sequences per GPU
   instead of 4), the peak per phase (forward, backward, optimizer step) and the model FLOPs
   utilisation MFU = 6·Ψ·tokens per GPU / step time / the GPU's dense bf16 peak (989 TFLOP/s
   on an H100/H200; attention's FLOPs are not counted).
Results: ``bench/results/zero.json`` (or ``$OUT/zero.json``).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib"))

from llmopt.launch import launch  # noqa: E402

CONFIGS = {  # OPT's shapes (vocab 50272, learned positions)
    "tiny": dict(vocab=512, d=64, layers=2, heads=4, ffn=256, batch=4, seq=32),
    "opt-125m": dict(vocab=50272, d=768, layers=12, heads=12, ffn=3072, batch=8, seq=1024),
    "opt-1.3b": dict(vocab=50272, d=2048, layers=24, heads=32, ffn=8192, batch=4, seq=1024),
    "opt-2.7b": dict(vocab=50272, d=2560, layers=32, heads=32, ffn=10240, batch=2, seq=1024),
    "opt-6.7b": dict(vocab=50272, d=4096, layers=32, heads=32, ffn=16384, batch=1, seq=1024),
}
# 6.7B: 16 bytes of model state per parameter is 107 GB at stage 0 — only the sharded modes
MODES = {"opt-6.7b": ["stage2", "stage3", "fully_shard"],
         "opt-1.3b": ["stage0", "stage1", "stage2", "stage3", "stage2+overlap", "stage3+overlap",
                      "stage3@8", "stage3+overlap@8", "stage3+overlap@16", "fully_shard",
                      "fully_shard@8", "fully_shard@16"]}
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}   # dense, no sparsity


def _peak_tflops():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def _parse_mode(mode, batch):
    """'stage3+overlap@8' -> ('stage3', True, 8): stage, overlap, sequences per rank."""
    mode, _, b = mode.partition("@")
    base, _, flag = mode.partition("+")
    return base, flag == "overlap", int(b) if b else batch


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # k-bias grads are pure rounding noise
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):                                                   # (B, T, d)
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B, H, T, dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """OPT-shaped decoder: pre-LN blocks in a ModuleList, tied embedding and head."""

    def __init__(self, vocab, d, layers, heads, ffn, max_pos=2048, **_):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_pos, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids):                                                 # (B, T)
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.t()                           # (B, T, V)


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _device(rank):
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def equivalence(rank, world_size, steps=5):
    """max |Δparam| of every stage (and fully_shard) vs one process on the whole batch."""
    from llmopt.zero import gather_full_params, shard_model
    dev = _device(rank)
    cfg = CONFIGS["tiny"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"] * world_size, cfg["seq"]), generator=g).to(dev)
    b = cfg["batch"]

    def fresh():
        torch.manual_seed(0)
        return Transformer(**cfg).to(dev)

    ref = fresh()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(steps):
        lm_loss(ref, ids).backward()
        opt.step()
        opt.zero_grad()
    ref = {k: v.detach() for k, v in ref.named_parameters()}
    out = {}
    for stage in range(4):
        model, opt = shard_model(fresh(), stage, torch.optim.AdamW, lr=1e-3)
        for _ in range(steps):
            lm_loss(model, ids[rank * b:(rank + 1) * b]).backward()
            opt.step()
            opt.zero_grad()
        full = gather_full_params(model)
        out[f"stage{stage}"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
    return out


def speed(rank, world_size, name, modes, steps=5):
    from llmopt.bench import time_ms
    from llmopt.zero import shard_model
    dev = _device(rank)
    cfg = CONFIGS[name]
    rows = []
    for mode_name in modes:
        mode, overlap, batch = _parse_mode(mode_name, cfg["batch"])
        ids = torch.randint(0, cfg["vocab"], (batch, cfg["seq"] + 1), device=dev,
                            generator=torch.Generator(dev).manual_seed(rank))
        torch.manual_seed(0)
        gc.collect()                    # the last mode's model lives in hook cycles
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if mode == "fully_shard":
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
                with torch.device(dev):
                    model = Transformer(**cfg)                     # fp32 master params
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
                for blk in model.blocks:
                    fully_shard(blk, mp_policy=mp)
                fully_shard(model, mp_policy=mp)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            else:
                with torch.device(dev):
                    model = Transformer(**cfg).to(torch.bfloat16)  # bf16 weights + fp32 master
                model, opt = shard_model(model, int(mode[-1]), torch.optim.AdamW, overlap=overlap,
                                         lr=1e-4)

            def step():
                lm_loss(model, ids).backward()
                opt.step()
                opt.zero_grad()

            ms = time_ms(step, warmup=2, rep=steps, device=dev)
            peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
            phases = {}
            if dev.type == "cuda":            # where the peak is: forward, backward or step
                for phase in ("forward", "backward", "step"):
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    if phase == "forward":
                        loss = lm_loss(model, ids)
                    elif phase == "backward":
                        loss.backward()
                        del loss
                    else:
                        opt.step()
                        opt.zero_grad()
                    torch.cuda.synchronize(dev)
                    phases[phase] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
            lm_loss(model, ids).backward()          # model state after backward, before step
            state = _state_bytes(model, opt, mode)
            opt.zero_grad()
            n_params = sum(v.numel() for v in gather_params_count(model, mode))
            tokens = batch * cfg["seq"]                                   # per rank
            achieved = 6 * n_params * tokens / (ms / 1e3) / 1e12         # 6Ψ per token (PaLM's MFU)
            peak_tf = _peak_tflops()
            rows.append(dict(config=name, mode=mode_name, world_size=world_size, rank=rank,
                             step_ms=round(ms, 2), peak_gib=round(peak / 2**30, 3),
                             peak_gib_by_phase=phases,
                             state_gib={k: round(v / 2**30, 3) for k, v in state.items()},
                             params=n_params, tokens_per_step=tokens * world_size,
                             tflops_per_gpu=round(achieved, 1),
                             mfu=round(achieved / peak_tf, 4) if peak_tf else None))
        except torch.OutOfMemoryError:
            rows.append(dict(config=name, mode=mode_name, world_size=world_size, rank=rank, oom=True))
        finally:
            model = opt = None
    return rows


def gather_params_count(model, mode):
    """The model's parameters at full size (ours: the units' flat buffers' real elements)."""
    units = getattr(model, "_zero_units", None)
    if units is not None:
        return [torch.empty(u.numel, device="meta") for u in units]
    if mode.startswith("fully_shard"):                # DTensors: the global shapes
        return [torch.empty(p.shape, device="meta") for p in model.parameters()]
    return list(model.parameters())


def _state_bytes(model, opt, mode) -> dict:
    """Model-state bytes on this rank: measured_state_bytes, or the DTensor shards of FSDP2."""
    from llmopt.viz.zero import measured_state_bytes
    if mode != "fully_shard":
        return measured_state_bytes(opt, model)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    nbytes = lambda t: local(t).numel() * local(t).element_size()     # noqa: E731
    out = {"params": sum(nbytes(p) for p in model.parameters()),
           "grads": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
           "optimizer": sum(nbytes(v) for st in opt.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor))}
    out["total"] = sum(out.values())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--configs", default="opt-125m,opt-1.3b,opt-2.7b,opt-6.7b")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    from llmopt.bench import write_results
    gpus = torch.cuda.device_count() if not args.cpu else 0
    world_size = gpus if gpus >= 2 else 2
    backend = "nccl" if gpus >= 2 else "gloo"
    t0 = time.time()
    eq = launch(equivalence, world_size, backend=backend, timeout=300)
    print("equivalence (max |Δparam| vs one process):", eq[0], f"{time.time() - t0:.0f}s", flush=True)
    modes = ["stage0", "stage1", "stage2", "stage3", "fully_shard"]
    rows, path = [], None
    for name in (["tiny"] if args.cpu else args.configs.split(",")):
        # one fresh set of processes per mode: what a mode leaves behind in the caching
        # allocator (or in objects a cycle keeps alive) must not count in the next mode's peak
        for mode in MODES.get(name, modes):
            try:
                res = launch(speed, world_size, name, [mode], backend=backend,
                             timeout=150 if name in ("opt-2.7b", "opt-6.7b") else 120)
            except Exception as exc:  # one mode failing (OOM on one rank, time-out) keeps the rest
                print(f"{name} {mode} failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                rows.append(dict(config=name, mode=mode, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                continue
            for r in res:
                rows.extend(r)
            print(res[0][0], flush=True)
        print(f"{name} done {time.time() - t0:.0f}s", flush=True)
        path = write_results(   # after every config: a later time-out keeps what is done
            "zero", rows, out_dir=args.out, world_size=world_size, backend=backend,
            equivalence=eq[0], equivalence_dtype="float32", equivalence_optimizer="AdamW, 5 steps",
            setup="AdamW; stages 0-3: bf16 model + fp32 master shard, bf16 reduction; "
                  "fully_shard: bf16 param/reduce dtype, fp32 sharded params; one unit per block")
    print("wrote", path)


if __name__ == "__main__":
    main()
