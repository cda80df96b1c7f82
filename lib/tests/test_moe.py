"""llmopt.moe against transformers' Mixtral (built offline from a config, no download)."""
import pytest
import torch
import torch.nn.functional as F

from llmopt import moe
from llmopt.testing import assert_close

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock, load_balancing_loss_func)


def _hf_block(d=32, f=48, E=6, k=2, impl="eager", seed=0):
    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def test_layout_of_transformers_mixtral():
    """transformers 5.x: the block is layer.mlp, gate.weight (E, d), gate_up_proj = cat(w1, w3)."""
    from transformers import MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    block = MixtralForCausalLM(cfg).model.layers[0].mlp
    assert isinstance(block, MixtralSparseMoeBlock)
    assert block.gate.weight.shape == (4, 32)
    assert block.experts.gate_up_proj.shape == (4, 96, 32)
    assert block.experts.down_proj.shape == (4, 32, 48)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize("E,k", [(6, 2), (8, 2), (4, 1), (5, 3)])
def test_from_hf_matches_mixtral_block(impl, dispatch, E, k):
    block = _hf_block(E=E, k=k, impl=impl)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        ref = block(x)
        y, logits = moe.SparseMoE.from_hf(block, dispatch=dispatch)(x)
    assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert_close(logits, block.gate(x)[0], rtol=1e-6, atol=1e-6)


def test_router_weights_sum_to_one_and_match_mixtral_renormalised_softmax():
    r = moe.TopKRouter(16, 8, 2)
    x = torch.randn(50, 16)
    w, e, logits = r(x)
    assert_close(w.sum(-1), torch.ones(50))
    probs = torch.softmax(logits.float(), -1)
    top, idx = probs.topk(2, -1)
    assert torch.equal(idx, e)
    assert_close(w, top / top.sum(-1, keepdim=True), rtol=1e-6, atol=1e-6)


def test_expert_is_w2_silu_w1_times_w3():
    ex = moe.SwiGLUExpert(8, 12)
    x = torch.randn(5, 8)
    ref = (F.silu(x @ ex.w1.weight.T) * (x @ ex.w3.weight.T)) @ ex.w2.weight.T
    assert_close(ex(x), ref)
    m = moe.SparseMoE(8, 12, 4, 2)
    assert_close(m.expert(2)(x), moe.swiglu(x, m.w1[2], m.w2[2], m.w3[2]))


@pytest.mark.parametrize("N,E,k", [(1, 4, 2), (37, 8, 2), (64, 3, 3), (20, 16, 1)])
def test_grouped_equals_loop_also_with_unused_experts(N, E, k):
    g = torch.Generator().manual_seed(N)
    d, f = 12, 20
    x = torch.randn(N, d, generator=g)
    w1, w3 = torch.randn(E, f, d, generator=g), torch.randn(E, f, d, generator=g)
    w2 = torch.randn(E, d, f, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    experts[experts == E - 1] = 0 if k == 1 else experts[experts == E - 1]   # an idle expert
    weights = torch.softmax(torch.randn(N, k, generator=g), -1)
    assert_close(moe.moe_grouped(x, weights, experts, w1, w2, w3),
                 moe.moe_loop(x, weights, experts, w1, w2, w3), rtol=1e-5, atol=1e-4)


def test_grouped_mm_path_matches_where_torch_has_it():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    x = torch.randn(40, 16, dtype=torch.bfloat16)
    w1, w3 = torch.randn(4, 24, 16, dtype=torch.bfloat16) / 4, torch.randn(4, 24, 16, dtype=torch.bfloat16) / 4
    w2 = torch.randn(4, 16, 24, dtype=torch.bfloat16) / 5
    experts = torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    weights = torch.softmax(torch.randn(40, 2), -1).bfloat16()
    try:
        got = moe.moe_grouped(x, weights, experts, w1, w2, w3, use_grouped_mm=True)
    except (RuntimeError, NotImplementedError) as exc:  # no CPU kernel in this build
        pytest.skip(str(exc)[:80])
    ref = moe.moe_loop(x.float(), weights.float(), experts, w1.float(), w2.float(), w3.float())
    assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("shape,k", [((4, 9, 6), 2), ((100, 8), 2), ((2, 50, 8), 1), ((30, 5), 3)])
def test_balancing_loss_equals_transformers(shape, k):
    logits = torch.randn(shape) * 2
    E = shape[-1]
    ref = load_balancing_loss_func((logits.reshape(-1, E),), E, k)
    assert_close(moe.load_balancing_loss(logits, k), ref, rtol=1e-6, atol=1e-6)


def test_balancing_loss_bounds():
    E, k = 8, 2
    balanced = torch.zeros(E * 10, E)                    # uniform probabilities: loss = k
    assert abs(float(moe.load_balancing_loss(balanced, k)) - k) < 1e-5
    collapsed = torch.zeros(64, E)
    collapsed[:, :2] = 20.0                              # everyone to experts 0, 1
    assert float(moe.load_balancing_loss(collapsed, k)) > E * 0.9


def test_capacity_drops_late_tokens_only():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    weights = torch.full((4, 2), 0.5)
    w, kept = moe.apply_capacity(experts, weights, 4, capacity=2)
    assert kept.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    assert float(w[2, 0]) == 0 and float(w[3, 1]) == 0
    m = moe.SparseMoE(8, 12, 4, 2, capacity_factor=100.0)   # large capacity: nothing dropped
    x = torch.randn(10, 8)
    m2 = moe.SparseMoE(8, 12, 4, 2)
    m2.load_state_dict(m.state_dict())
    assert_close(m(x)[0], m2(x)[0])


def test_gradients_flow_through_both_dispatches():
    m = moe.SparseMoE(8, 12, 4, 2, dispatch="grouped")
    x = torch.randn(2, 5, 8)
    y, logits = m(x)
    (y.square().sum() + moe.load_balancing_loss(logits, 2)).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_mixtral_8x7b_parameter_counts():
    total, active = moe.moe_param_counts(4096, 14336, 32, 8, 2, 32, 8, 32000)
    assert round(total / 1e9, 1) == 46.7 and round(active / 1e9, 1) == 12.9
