"""lab03's hidden checks, tested both ways: the reference passes; stubs, the mistakes of
course/mistakes.md and the shortcuts of the issue fail, each with a message that points at it."""
import pytest
import torch

from autograder import grade_functions
from autograder.notebook import grade_cells
from llmopt import scheduler as ref

from labkit import assert_outputs_match_reference, fails, solution_nb, stub, verdicts, with_body

LAB = "lab03_serving"
CHECKS = {"pass_time": ref.pass_time, "splitfuse_batch": ref.splitfuse_batch,
          "continuous_batch": ref.continuous_batch, "simulate": ref.simulate, "run_engine": ref.run_engine}


@pytest.mark.parametrize("seed", [0, 12345])
def test_reference_passes(seed):
    for name, result in grade_functions(LAB, CHECKS, seed=seed).items():
        assert result.ok, result.summary()


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_stub_fails(name):
    r = grade_functions(LAB, {name: stub}, seed=1)[name]
    assert r.passed == 0 and "NotImplementedError" in r.messages[0]


def test_records_have_the_declared_form():
    assert_outputs_match_reference(LAB, CHECKS)


def test_grade_cells_and_points():
    cells = [gc for gc in grade_cells(solution_nb(LAB)) if gc.checks]
    auto = sum(gc.points for gc in cells)
    assert auto == 14 and len(cells) >= 5
    assert max(gc.points for gc in cells) <= auto / 3


# --- part 1: pass_time --------------------------------------------------------------------------

def test_pass_time_sum_instead_of_roofline_fails():
    def summed(cost, batch):
        N = sum(n for *_, n in batch)
        return cost.weights_ms + cost.token_ms * N, ref.pass_time(cost, batch)[1]
    fails(LAB, "pass_time", summed, "not their sum")


def test_pass_time_without_weight_floor_fails():
    fails(LAB, "pass_time", lambda c, b: (c.token_ms * sum(n for *_, n in b), ref.pass_time(c, b)[1]),
          "memory-bound")


def test_pass_time_ignoring_the_cached_prefix_fails():
    def no_start(cost, batch):
        attn = sum(max(cost.pair_ms * n * (n + 1) / 2, cost.kv_ms * n) for _, s, n in batch)
        return ref.pass_time(cost, batch)[0], attn
    fails(LAB, "pass_time", no_start, "already cached")


# --- part 2: the SplitFuse composer: the mistakes and the shortcuts -----------------------------

def over_budget(decoding, prefilling, budget):          # the last chunk not cut to the room left
    batch = [(r, c, 1) for r, c in decoding[:budget]]
    room = budget - len(batch)
    for rid, P, done in prefilling:
        if room <= 0:
            break
        batch.append((rid, done, min(P - done, room + 5)))
        room -= P - done
    return batch


def never_splits(decoding, prefilling, budget):         # whole prompts only, when they fit
    batch = [(r, c, 1) for r, c in decoding[:budget]]
    room = budget - len(batch)
    for rid, P, done in prefilling:
        if P - done <= room:
            batch.append((rid, done, P - done))
            room -= P - done
    return batch


def whole_prompts(decoding, prefilling, budget):        # whole prompts regardless of the budget
    return [(r, c, 1) for r, c in decoding] + [(rid, d, P - d) for rid, P, d in prefilling[:2]]


def tail_first(decoding, prefilling, budget):           # chunks taken from the END of the prompt
    batch = [(r, c, 1) for r, c in decoding[:budget]]
    room = budget - len(batch)
    for rid, P, done in prefilling:
        if room <= 0:
            break
        n = min(room, P - done)
        batch.append((rid, P - done - n, n))
        room -= n
    return batch


def prefill_then_decodes(decoding, prefilling, budget):  # decodes only if a chunk leaves room
    batch, room = [], budget
    for rid, P, done in prefilling:
        if room <= 0:
            break
        n = min(room, P - done)
        batch.append((rid, done, n))
        room -= n
    return batch + [(r, c, 1) for r, c in decoding[:room]]


def newest_first(decoding, prefilling, budget):         # LIFO: an old long prompt starves
    return ref.splitfuse_batch(decoding, prefilling[::-1], budget)


def test_splitfuse_over_budget_fails():
    fails(LAB, "splitfuse_batch", over_budget, "over the token budget")


def test_splitfuse_that_never_splits_fails():
    fails(LAB, "splitfuse_batch", never_splits, "starvation")


def test_splitfuse_with_whole_prompts_fails():
    fails(LAB, "splitfuse_batch", whole_prompts, "over the token budget")


def test_splitfuse_chunks_out_of_order_fail():
    fails(LAB, "splitfuse_batch", tail_first, "in order")


def test_splitfuse_dropping_decodes_fails():
    fails(LAB, "splitfuse_batch", prefill_then_decodes, "decode tokens dropped")


def test_splitfuse_lifo_starves_fails():
    fails(LAB, "splitfuse_batch", newest_first, "starvation")


def test_splitfuse_leaving_room_fails():
    def half(decoding, prefilling, budget):
        return ref.splitfuse_batch(decoding, prefilling, max(len(decoding) + 1, budget // 2))
    fails(LAB, "splitfuse_batch", half, "left unused")


def test_splitfuse_forged_rows_gain_nothing():
    # a composer that reports a request not running, or decodes for a prompt still prefilling
    def forged(decoding, prefilling, budget):
        return [(rid, P, 1) for rid, P, d in prefilling][:budget]
    fails(LAB, "splitfuse_batch", forged, "in order")


def test_continuous_composer_is_not_splitfuse():
    fails(LAB, "splitfuse_batch", ref.continuous_batch, "")
    fails(LAB, "continuous_batch", ref.splitfuse_batch, "mixes prompts and decodes")


# --- part 3: continuous batching ------------------------------------------------------------

def test_continuous_decodes_first_fails():
    def decodes_first(decoding, prefilling, budget):
        return [(r, c, 1) for r, c in decoding] or ref.continuous_batch([], prefilling, budget)
    fails(LAB, "continuous_batch", decodes_first, "prefill first")


def test_continuous_splitting_fails():
    def split(decoding, prefilling, budget):
        b = ref.splitfuse_batch([], prefilling, budget)
        return b or ref.continuous_batch(decoding, [], budget)
    fails(LAB, "continuous_batch", split, "split")


# --- part 4: the simulator --------------------------------------------------------------------

def test_simulate_ignoring_arrivals_fails():
    def at_zero(reqs, policy, budget, cost=None):
        return ref.simulate([ref.Request(r.id, r.prompt_len, r.max_new_tokens, 0.0) for r in reqs],
                            policy, budget, cost)
    fails(LAB, "simulate", at_zero, "arrival times ignored")


def test_simulate_in_milliseconds_fails():
    def ms(reqs, policy, budget, cost):
        return ref.simulate([ref.Request(*r) for r in reqs], policy, budget,
                            ref.CostModel(*(x * 1e3 for x in cost)))
    fails(LAB, "simulate", ms, "milliseconds")


def test_simulate_on_another_workload_fails():
    def own_workload(reqs, policy, budget, cost):   # metrics of a fixed workload, not the one given
        m = ref.simulate(ref.poisson_workload(len(reqs), 2.0, seed=0), policy, budget, cost)
        return m
    fails(LAB, "simulate", own_workload, "exactly the requests given")


def test_simulate_reported_numbers_are_recomputed():
    def forged(reqs, policy, budget, cost):
        m = ref.simulate([ref.Request(*r) for r in reqs], policy, budget, cost)
        m["throughput_tokens_per_s"] *= 1.5          # a better number than the schedule gives
        return m
    fails(LAB, "simulate", forged, "throughput_tokens_per_s")


def test_simulate_ttft_of_the_first_chunk_fails():
    def first_chunk(reqs, policy, budget, cost):
        m = ref.simulate([ref.Request(*r) for r in reqs], policy, budget, cost)
        m["ttft"] = [t * 0.5 for t in m["ttft"]]
        m["ttft_p50"] *= 0.5
        m["ttft_p95"] *= 0.5
        return m
    fails(LAB, "simulate", first_chunk, "TTFT ends with the pass that finishes")


# --- part 5: the engine -------------------------------------------------------------------------

def test_engine_stub_policy_generate_fails():
    from llmopt.kv_cache import generate

    def sequential(model, prompts, n_new, policy="splitfuse", token_budget=64, block_size=16, **kw):
        return [generate(model, p[None], n)[0] for p, n in zip(prompts, n_new)]
    fails(LAB, "run_engine", sequential, "policy's schedule")


def test_engine_first_token_from_a_middle_chunk_fails():
    def early(decoding, prefilling, budget):
        return ref.splitfuse_batch(decoding, prefilling, budget)

    def engine(model, prompts, n_new, policy="splitfuse", token_budget=64, block_size=16, **kw):
        out = ref.run_engine(model, prompts, n_new, policy, token_budget, block_size)
        return [torch.cat([o[:len(p)], (o[len(p):] + 1) % 61]) for o, p in zip(out, prompts)]
    fails(LAB, "run_engine", engine, "greedy")


def test_engine_over_budget_fails():
    def engine(model, prompts, n_new, policy="splitfuse", token_budget=64, block_size=16, **kw):
        return ref.run_engine(model, prompts, n_new, policy, 10 ** 6 if policy == "splitfuse" else token_budget,
                              block_size)
    fails(LAB, "run_engine", engine, "over the token budget")


def test_engine_policy_ignored_fails():
    def engine(model, prompts, n_new, policy="splitfuse", token_budget=64, block_size=16, **kw):
        return ref.run_engine(model, prompts, n_new, "continuous", token_budget, block_size)
    fails(LAB, "run_engine", engine, "token budget")


# --- METHOD rules on notebooks with a planted shortcut -----------------------------------------

def test_solution_follows_the_method():
    assert verdicts(LAB, solution_nb(LAB)) == {}


def test_engine_through_generate_fails_its_rule():
    nb = with_body(solution_nb(LAB), "run_engine",
                   "    return [generate(model, torch.as_tensor(p)[None], max_new_tokens)[0] for p in prompts]\n")
    out = verdicts(LAB, nb)
    assert "run_engine" in out and "generate" in out["run_engine"], out


def test_engine_through_lab02_serve_fails_its_rule():
    nb = with_body(solution_nb(LAB), "run_engine",
                   "    from llmopt.paged_attention import serve\n"
                   "    return serve(model, prompts, max_new_tokens, block_size=block_size)\n")
    assert "run_engine" in verdicts(LAB, nb)


def test_simulate_without_the_cost_model_fails_its_rule():
    nb = with_body(solution_nb(LAB), "simulate",
                   "    return dict(throughput_tokens_per_s=1.0, ttft=[], latency=[], ttft_p50=0.0,\n"
                   "                ttft_p95=0.0, latency_p50=0.0, latency_p95=0.0)\n")
    assert "pass_time" in verdicts(LAB, nb)["simulate"]


def test_splitfuse_through_continuous_fails_its_rule():
    nb = with_body(solution_nb(LAB), "splitfuse_batch",
                   "    return continuous_batch(decoding, prefilling, token_budget)\n")
    assert "continuous_batch" in verdicts(LAB, nb)["splitfuse_batch"]
