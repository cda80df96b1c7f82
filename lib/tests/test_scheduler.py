"""llmopt.scheduler: the cost model against the lecture's table, the composers' rules, the
simulator's metrics, and the real paged engine against greedy generation."""
import pytest
import torch

from llmopt.gpt import GPT, GPTConfig, load_model
from llmopt.kv_cache import generate
from llmopt.scheduler import (LECTURE_TABLE, POLICIES, CostModel, Request, Scheduler, continuous_batch,
                              fit_cost_model, lecture_cost_model, measure_cost_model, pass_time,
                              poisson_workload, run_engine, simulate, splitfuse_batch,
                              table_from_cost_model)


def test_cost_model_reproduces_the_lecture_table():
    rows = table_from_cost_model(lecture_cost_model())
    for got, want in zip(rows, LECTURE_TABLE):
        assert abs(got["linear_ms"] - want["linear_ms"]) / want["linear_ms"] < 0.01, got
        assert abs(got["attn_ms"] - want["attn_ms"]) / want["attn_ms"] < 0.03, got
    assert abs(rows[0]["per_token_prefill"] - 0.229) < 0.002
    assert abs(rows[1]["per_token_decode"] - 12.49) < 0.01
    assert rows[2]["per_token_decode"] < 2.0     # fused: ~10x cheaper than a decode-only pass
    cost = lecture_cost_model()
    assert 190 < cost.weights_ms / cost.token_ms < 215   # the A6000's ridge point, ~200 tokens


def test_pass_time_regimes():
    c = CostModel(weights_ms=40.0, token_ms=0.2, pair_ms=2e-5, kv_ms=1e-3)
    assert pass_time(c, []) == (0.0, 0)
    assert pass_time(c, [(0, 10, 1)])[0] == 40.0                       # memory-bound floor
    assert pass_time(c, [(0, 0, 1000)])[0] == pytest.approx(200.0)     # compute-bound
    assert pass_time(c, [(0, 99, 1)])[1] == pytest.approx(0.1)         # a decode reads 100 keys
    assert pass_time(c, [(0, 100, 50)])[1] == pytest.approx(1e-3 * 150)            # memory-bound chunk
    assert pass_time(c, [(0, 100, 200)])[1] == pytest.approx(2e-5 * 200 * (100 + 100.5))  # compute-bound


def _drive(compose, reqs, budget):
    sched = Scheduler(reqs, "splitfuse", budget)
    sched.compose = compose
    passes = []
    while not sched.finished():
        sched.admit(0.0)
        batch = sched.next_batch()
        passes.append((batch, sched.queues()))
        sched.complete(batch, 0.0)
    return passes


def test_splitfuse_fills_the_budget_decodes_first_chunks_in_order():
    reqs = [Request(0, 100, 3), Request(1, 7, 5), Request(2, 40, 2), Request(3, 3, 4)]
    seen = {r.id: 0 for r in reqs}
    sched = Scheduler(reqs, "splitfuse", 16)
    while not sched.finished():
        sched.admit(0.0)
        dec, pre = sched.queues()
        batch = sched.next_batch()
        assert sum(n for *_, n in batch) <= 16
        remaining = sum(p - d for _, p, d in pre)
        assert sum(n for *_, n in batch) == min(16, len(dec) + remaining)   # full when work is there
        assert {rid for rid, _ in dec} <= {rid for rid, _, _ in batch}       # no decode dropped
        for rid, start, n in batch:
            if sched.done[rid] < reqs[rid].prompt_len:
                assert start == seen[rid]                                    # chunks in order
                seen[rid] += n
        sched.complete(batch, 0.0)
    assert all(seen[r.id] == r.prompt_len for r in reqs)


def test_continuous_is_prefill_first_and_never_splits():
    b = continuous_batch([(9, 5)], [(1, 10, 0), (2, 5, 0), (3, 8, 0)], 16)
    assert b == [(1, 0, 10), (2, 0, 5)]
    assert continuous_batch([(9, 5)], [(1, 100, 0)], 16) == [(1, 0, 100)]
    assert continuous_batch([(9, 5), (8, 2)], [], 16) == [(9, 5, 1), (8, 2, 1)]
    assert splitfuse_batch([(9, 5)], [(1, 100, 0)], 16) == [(9, 5, 1), (1, 0, 15)]


def test_simulate_metrics_one_request():
    m = simulate([Request(0, 1024, 3, 2.0)], "splitfuse", 2048)
    cost = lecture_cost_model()
    prefill = sum(pass_time(cost, [(0, 0, 1024)])) / 1e3
    d1 = sum(pass_time(cost, [(0, 1024, 1)])) / 1e3
    d2 = sum(pass_time(cost, [(0, 1025, 1)])) / 1e3
    assert m["ttft_p50"] == pytest.approx(prefill)
    assert m["latency_p95"] == pytest.approx(prefill + d1 + d2)
    assert m["throughput_tokens_per_s"] == pytest.approx(3 / (prefill + d1 + d2))


def test_simulate_policies_order_under_load():
    w = poisson_workload(120, 4.0, seed=0)
    res = {p: simulate(w, p, 512) for p in POLICIES}
    assert res["static"]["latency_p50"] > res["continuous"]["latency_p50"]
    assert res["splitfuse"]["latency_p50"] < res["continuous"]["latency_p50"]
    assert res["splitfuse"]["throughput_tokens_per_s"] >= res["continuous"]["throughput_tokens_per_s"]
    assert len(res["static"]["ttft"]) == 120


def test_simulate_idles_until_arrival():
    a = simulate([Request(0, 64, 2, 0.0)], "continuous", 128)
    b = simulate([Request(0, 64, 2, 5.0)], "continuous", 128)
    assert a["latency_p50"] == pytest.approx(b["latency_p50"])


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=61, max_position_embeddings=96, n_layer=2, n_head=2, d_model=32,
                         d_ff=64)).eval()


@pytest.mark.parametrize("policy", POLICIES)
def test_engine_equals_greedy(small, policy):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 61, (n,), generator=g) for n in (4, 30, 9, 2, 17)]
    n_new = [3, 5, 1, 7, 4]
    sizes = []
    out = run_engine(small, prompts, n_new, policy=policy, token_budget=12, block_size=4,
                     step_hook=lambda b: sizes.append(sum(n for *_, n in b)))
    for p, n, o in zip(prompts, n_new, out):
        assert torch.equal(o, generate(small, p[None], n)[0])
    if policy == "splitfuse":
        assert max(sizes) <= 12


def test_engine_with_little_memory(small):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 61, (n,), generator=g) for n in (10, 12, 6, 9)]
    out = run_engine(small, prompts, 6, policy="splitfuse", token_budget=8, block_size=4, num_blocks=9)
    for p, o in zip(prompts, out):
        assert torch.equal(o, generate(small, p[None], 6)[0])


def test_engine_on_tiny_opt_and_measured_cost_model():
    model, _ = load_model("tiny-opt")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=g) for n in (40, 5, 20)]
    out = run_engine(model, prompts, 4, policy="splitfuse", token_budget=16)
    for p, o in zip(prompts, out):
        assert torch.equal(o, generate(model, p[None], 4)[0])
    cost, rows = measure_cost_model(model, prompt_len=32, rep=1)
    assert cost.weights_ms > 0 and cost.token_ms > 0 and len(rows) == 3


def test_fit_recovers_a_known_cost_model():
    true = CostModel(weights_ms=30.0, token_ms=0.1, pair_ms=3e-5, kv_ms=2e-3)
    rows = [dict(batch=b, linear_ms=pass_time(true, b)[0], attn_ms=pass_time(true, b)[1])
            for b in ([(0, 0, 2048)], [(i, 511, 1) for i in range(8)], [(0, 0, 1500), (1, 700, 1)])]
    fit = fit_cost_model(rows)
    assert fit.weights_ms == pytest.approx(30.0) and fit.token_ms == pytest.approx(0.1)
    assert fit.kv_ms == pytest.approx(2e-3) and fit.pair_ms == pytest.approx(3e-5, rel=1e-6)


@pytest.mark.parametrize("graphed", ["decode", "all"])
@pytest.mark.parametrize("policy", ["continuous", "splitfuse"])
def test_fixed_shape_engine_passes_equal_greedy(small, policy, graphed):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 61, (n,), generator=g) for n in (4, 30, 9, 2, 17)]
    n_new = [3, 9, 1, 7, 4]
    out = run_engine(small, prompts, n_new, policy=policy, token_budget=12, block_size=4, graphed=graphed)
    for p, n, o in zip(prompts, n_new, out):
        assert torch.equal(o, generate(small, p[None], n)[0])


def test_engine_passes_built_once_and_reused(small):
    from llmopt.scheduler import EnginePasses
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 61, (n,), generator=g) for n in (6, 20, 3)]
    ep = EnginePasses.build(small, num_blocks=12, block_size=4, mode="all", max_seqs=3, max_tokens=8)
    for policy in ("splitfuse", "continuous"):
        out = run_engine(small, prompts, 5, policy=policy, token_budget=8, block_size=4, graphed=ep)
        for p, o in zip(prompts, out):
            assert torch.equal(o, generate(small, p[None], 5)[0])
    with pytest.raises(ValueError, match="mode"):
        EnginePasses.build(small, num_blocks=4, block_size=4, mode="sometimes")


def test_padded_pass_equals_the_exact_one(small):
    """What a graph replays -- a pass padded to its (N, S) bucket -- gives the tokens of the
    exact-size pass, and the padding writes only the scratch block."""
    from llmopt.scheduler import EnginePasses
    g = torch.Generator().manual_seed(6)
    chunks = [torch.randint(3, 61, (n,), generator=g) for n in (5, 1, 7)]
    outs, pools = [], []
    for pad in (False, True):
        ep = EnginePasses.build(small, num_blocks=16, block_size=4, mode="all", use_graph=False)
        for i in range(3):
            ep.cache.add_sequence(i)
        if pad:                                     # run the step on buffers of a bigger bucket
            ep._buffers_exact = ep._buffers
            ep._buffers = lambda n, s, f=ep._buffers_exact: f(16, 4)
        outs.append(ep(list(range(3)), chunks))
        used = sorted(b for t in ep.cache.tables.values() for b in t)
        pools.append(ep.cache.k[:, used].clone())
        assert ep.cache.k[:, [b for b in range(16) if b not in used and b != ep.scratch]].abs().sum() == 0
    assert outs[0] == outs[1]
    assert torch.equal(pools[0], pools[1])


def test_effective_throughput_counts_requests_within_the_sla():
    from llmopt.scheduler import effective_throughput
    reqs = [Request(0, 100, 11, 0.0), Request(1, 100, 11, 1.0), Request(2, 50, 1, 2.0)]
    first = {0: 0.1, 1: 1.5, 2: 2.05}          # TTFT 0.1 s, 0.5 s, 0.05 s
    finish = {0: 1.1, 1: 2.0, 2: 4.0}          # 10 tokens in 1 s and in 0.5 s
    # prompt SLA 100/200 = 0.5 s for 0 and 1, 0.25 s for 2; generation >= 10 tokens/s
    m = effective_throughput(reqs, first, finish, prompt_rate=200, gen_rate=10)
    assert m["met"] == 3 and m["effective_rps"] == pytest.approx(3 / 4.0)
    m = effective_throughput(reqs, first, finish, prompt_rate=400, gen_rate=10)   # 0.25 s: 1 misses
    assert m["met"] == 2
    m = effective_throughput(reqs, first, finish, prompt_rate=200, gen_rate=15)   # 0 generates too slowly
    assert m["met"] == 2 and m["fraction"] == pytest.approx(2 / 3)


def test_effective_throughput_ema_counts_a_stall_the_average_hides():
    from llmopt.scheduler import effective_throughput
    reqs = [Request(0, 10, 21, 0.0)]
    steady = [0.01 + 0.1 * i for i in range(21)]                    # 10 tokens/s throughout
    stall = [0.01 + 0.05 * i for i in range(10)] + [0.46 + 0.6] + [1.06 + 0.05 * i for i in range(1, 11)]
    for times, ok in ((steady, True), (stall, False)):
        first, finish = {0: times[0]}, {0: times[-1]}
        mean = effective_throughput(reqs, first, finish, prompt_rate=100, gen_rate=9)
        assert mean["met"] == 1                                       # 20 tokens in <= 2 s on average
        m = effective_throughput(reqs, first, finish, prompt_rate=100, gen_rate=9,
                                 token_times={0: times}, ema=0.5)
        assert m["met"] == int(ok)
