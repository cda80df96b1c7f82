"""llmopt.lora and llmopt.instructions: LoRA against peft's layer, merge, QLoRA against the
dequantized base, the freezing, and the Russian dataset's grammar and splits."""
import warnings

import pytest
import torch
import torch.nn as nn

from llmopt import instructions as I
from llmopt import lora
from llmopt import nf4
from llmopt.gpt import GPT, GPTConfig


def tiny(seed=0, d_model=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, max_position_embeddings=64, n_layer=2, n_head=2,
                         d_model=d_model, d_ff=4 * d_model, dropout=0.0)).eval()


def test_lora_linear_matches_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    ours = lora.LoRALinear(base, r=4, alpha=12)
    assert ours.A.shape == (4, 24) and ours.B.shape == (16, 4) and ours.scaling == 3.0
    assert torch.equal(ours.B, torch.zeros(16, 4)) and ours.A.abs().sum() > 0
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), base(x))                    # B = 0: unchanged
    with torch.no_grad():
        ours.A.normal_()
        ours.B.normal_()
    theirs = PeftLinear(nn.Linear(24, 16), "default", LoraConfig(r=4, lora_alpha=12), r=4, lora_alpha=12)
    theirs.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.A)
        theirs.lora_B["default"].weight.copy_(ours.B)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert not base.weight.requires_grad and ours.A.requires_grad and ours.B.requires_grad


def test_apply_merge_and_freeze():
    model = tiny()
    ids = torch.randint(3, 97, (2, 8))
    ref = model(ids)
    lora.apply_lora(model, ("q_proj", "v_proj"), r=4, alpha=8)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear))
    assert wrapped == ["layers.0.attn.q_proj", "layers.0.attn.v_proj",
                       "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    assert lora.trainable_parameters(model) == 4 * 4 * (32 + 32)
    torch.testing.assert_close(model(ids), ref)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            with torch.no_grad():
                m.B.normal_()
    adapted = model(ids)
    assert (adapted - ref).abs().max() > 1e-3
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)


def test_qlora_linear_is_dequantized_base_plus_lora():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    q = lora.QLoRALinear(lin, r=8, alpha=16, double_quant=True)
    with torch.no_grad():
        q.B.normal_()
    x = torch.randn(2, 3, 128)
    packed, state = nf4.quantize_4bit(W, 64, "nf4", True)
    Wd = nf4.dequantize_4bit(packed, state)
    expected = x @ Wd.T + b + 2.0 * (x @ q.A.T) @ q.B.T
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    held = [t for t in q.state_dict().values() if t.is_floating_point()]
    assert max(t.numel() for t in held) < W.numel()                  # no full-precision copy
    assert sorted(n for n, p in q.named_parameters() if p.requires_grad) == ["A", "B"]


def test_prepare_qlora_trains_only_adapters_and_saves_memory():
    model = tiny(d_model=64)
    lora.prepare_qlora(model, lora.ALL_LINEAR, r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 97, (4, 9))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.endswith((".A", ".B")), n
    fp16 = sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, lora.QLoRALinear))
    assert lora.qlora_base_bytes(model) <= 0.3 * fp16


def test_grammar():
    assert [I.plural_form(n) for n in (1, 2, 4, 5, 11, 12, 14, 21, 22, 25, 101, 111)] == \
        [0, 1, 1, 2, 2, 2, 2, 0, 1, 2, 0, 2]
    assert I.number_words(47) == "сорок семь" and I.number_words(90) == "девяносто"
    assert I.number_words(13) == "тринадцать" and I.number_words(0) == "ноль"


def test_splits_are_disjoint_and_fixed():
    ds = I.make_dataset(0)
    prompts = {k: {ex.prompt for ex in v} for k, v in ds.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["val"] & prompts["test"]
    assert len(ds["test"]) > 150 and len(ds["train"]) > 900
    assert {ex.task for ex in ds["test"]} == set(I.TASKS)
    assert I.make_dataset(0)["test"] == ds["test"]
    words_test = [ex for ex in ds["test"] if ex.task == "words"]
    assert all(int(ex.instruction.split()[-1]) > 20 for ex in words_test)


def test_collate_masks_the_prompt():
    from llmopt.gpt import load_model
    _, tok = load_model()
    ex = I.Example("plural", "Согласуй: 5 яблоко", "5 яблок")
    ids, tgt = I.collate(tok, [ex])
    n_prompt = len(I.encode(tok, ex.prompt))
    assert (tgt[0, : n_prompt - 1] == -100).all()
    answer = tgt[0][tgt[0] != -100].tolist()
    assert answer == I.encode(tok, "5 яблок") + [I.EOS_ID]
