"""llmopt.mixed_precision: the scaler follows torch.amp.GradScaler step for step, master weights
keep updates fp16 would lose, and train_step's accumulation gives the full batch's gradient on
unequal micro-batches (checkpointed or not)."""
import pytest
import torch

from llmopt.gpt import GPT, GPTConfig
from llmopt.mixed_precision import GradScaler, MasterWeightOptimizer, train_step


def _stream(n_steps, inf_at, nan_at=(), seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_steps):
        v = torch.randn(n, generator=g) * 1e-3
        if i in inf_at:
            v[i % n] = float("inf")
        if i in nan_at:
            v[(i + 1) % n] = float("nan")
        out.append(v)
    return out


def _run(scaler, grads, unscale_at=()):
    p = torch.nn.Parameter(torch.zeros(grads[0].numel()))
    opt = torch.optim.SGD([p], lr=0.5)
    scales, params = [], []
    for i, g in enumerate(grads):
        opt.zero_grad()
        scaler.scale((p * g).sum()).backward()
        if i in unscale_at:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(p, 1e9)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        params.append(p.detach().clone())
    return scales, torch.stack(params)


@pytest.mark.parametrize("kw", [dict(init_scale=2.0 ** 10, growth_interval=3),
                                dict(init_scale=1e3, growth_factor=3.0, backoff_factor=0.3, growth_interval=2),
                                dict(init_scale=3e38, growth_interval=1)])
def test_scaler_matches_torch(kw):
    grads = _stream(20, inf_at={2, 3, 9, 15}, nan_at={12})
    ours = _run(GradScaler(**kw), grads, unscale_at={4, 9, 10})
    ref = _run(torch.amp.GradScaler("cpu", **kw), grads, unscale_at={4, 9, 10})
    assert ours[0] == ref[0]
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=0)


def test_unscale_twice_raises():
    s = GradScaler()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1)
    s.scale(p.sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError):
        s.unscale_(opt)


def test_master_weights_keep_small_updates():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = MasterWeightOptimizer([p], torch.optim.SGD, lr=1e-4)
    naive = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    nopt = torch.optim.SGD([naive], lr=1e-4)
    for _ in range(40):
        p.grad = torch.ones(4, dtype=torch.float16)
        naive.grad = torch.ones(4, dtype=torch.float16)
        opt.step()
        opt.zero_grad()
        nopt.step()
    assert torch.equal(naive.detach(), torch.ones(4, dtype=torch.float16))            # lost in fp16
    assert opt.master_params[0].dtype == torch.float32
    torch.testing.assert_close(opt.master_params[0], torch.full((4,), 1 - 40e-4), rtol=1e-5, atol=0)
    assert p.dtype == torch.float16 and float(p[0].detach()) < 0.9965


def test_master_weights_with_scaler_and_adam_state_in_fp32():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8).half())
    opt = MasterWeightOptimizer([p], torch.optim.Adam, lr=1e-3)
    s = GradScaler(init_scale=2.0 ** 20)
    for _ in range(3):
        s.scale((p.float() * 1e-7).sum()).backward()       # 1e-7 · 2^20 is representable in fp16
        opt.grads_to_master()
        s.unscale_(opt)
        s.step(opt)
        s.update()
        opt.zero_grad()
    st = opt.state[opt.master_params[0]]
    assert st["exp_avg"].dtype == torch.float32 and float(st["exp_avg_sq"].min()) > 0


def _tiny(dropout=0.0):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, max_position_embeddings=32, n_layer=4, n_head=2, d_model=32, d_ff=64,
                    dropout=dropout)
    return GPT(cfg).train()


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("accum,ckpt", [(2, False), (3, False), (5, False), (3, True)])
def test_accumulation_on_unequal_micro_batches_equals_full_batch(accum, ckpt):
    model = _tiny()
    batch = torch.randint(0, 64, (7, 9), generator=torch.Generator().manual_seed(1))
    full = train_step(model, batch)
    g_full = _grads(model)
    loss = train_step(model, batch, accum_steps=accum, checkpoint=ckpt)
    assert loss == pytest.approx(full, rel=1e-5)
    torch.testing.assert_close(_grads(model), g_full, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_is_close():
    model = _tiny()
    batch = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    full = train_step(model, batch)
    g = _grads(model)
    low = train_step(model, batch, dtype=torch.bfloat16, checkpoint=True)
    assert low == pytest.approx(full, rel=2e-2)
    assert float((_grads(model) - g).norm() / g.norm()) < 0.1
