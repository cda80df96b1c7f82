"""lab01's hidden checks, tested both ways: the reference passes; stubs and the mistakes of
course/mistakes.md fail, each with a message that points at the mistake."""
import math

import pytest
import torch

from autograder import grade_functions
from llmopt import kv_cache as ref

LAB = "lab01_kv_cache"


def stub(*args, **kwargs):
    raise NotImplementedError()


def grade(name, fn, seed=1):
    return grade_functions(LAB, {name: fn}, seed=seed)[name]


@pytest.mark.parametrize("name,fn", [("kv_cache_bytes", ref.kv_cache_bytes), ("KVCache", ref.KVCache),
                                     ("max_batch_size", ref.max_batch_size),
                                     ("reservation_waste", ref.reservation_waste),
                                     ("cached_attention", ref.cached_attention), ("generate", ref.generate)])
@pytest.mark.parametrize("seed", [0, 12345])
def test_reference_passes(name, fn, seed):
    result = grade(name, fn, seed)
    assert result.ok, result.summary()


@pytest.mark.parametrize("name", ["kv_cache_bytes", "KVCache", "cached_attention", "generate",
                                  "max_batch_size", "reservation_waste"])
def test_stub_fails(name):
    result = grade(name, stub)
    assert result.passed == 0 and "NotImplementedError" in result.messages[0]


# --- kv_cache_bytes --------------------------------------------------------------------

def test_bytes_without_values_fails_with_hint():
    result = grade("kv_cache_bytes", lambda c, b, t, dt: ref.kv_cache_bytes(c, b, t, dt) // 2)
    assert result.passed == 0 and "keys AND values" in result.messages[0]


def test_bytes_of_one_layer_fails():
    result = grade("kv_cache_bytes", lambda c, b, t, dt: ref.kv_cache_bytes(c, b, t, dt) // c.n_layer)
    assert not result.ok


# --- KVCache -----------------------------------------------------------------------------

class ValuesNotStored(ref.KVCache):
    def update(self, layer, k, v):
        t0, t1 = self.seq_len, self.seq_len + k.shape[2]
        self.k[layer, :, :, t0:t1] = k
        if layer == self.n_layer - 1:
            self.seq_len = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class AppendedAfterAttention(ref.KVCache):
    def update(self, layer, k, v):
        t0 = self.seq_len
        k_old, v_old = self.k[layer, :, :, :t0].clone(), self.v[layer, :, :, :t0].clone()
        ref.KVCache.update(self, layer, k, v)
        return k_old, v_old


class NotSliced(ref.KVCache):
    def update(self, layer, k, v):
        ref.KVCache.update(self, layer, k, v)
        return self.k[layer], self.v[layer]


class AdvancesEveryLayer(ref.KVCache):
    def update(self, layer, k, v):
        t0, t1 = self.seq_len, self.seq_len + k.shape[2]
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        self.seq_len = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class NeverAdvances(ref.KVCache):
    """Positions restart at 0 on every decode step."""
    def update(self, layer, k, v):
        out = ref.KVCache.update(self, layer, k, v)
        if layer == self.n_layer - 1:
            self._stored = self.seq_len
            self.seq_len = 0
        return out


@pytest.mark.parametrize("cls,hint", [
    (ValuesNotStored, "values"), (AppendedAfterAttention, "BEFORE returning"),
    (NotSliced, "sliced to the current length"), (AdvancesEveryLayer, "middle of a forward call"),
    (NeverAdvances, "seq_len")])
def test_broken_cache_fails_with_hint(cls, hint):
    result = grade("KVCache", cls)
    assert result.passed == 0
    assert any(hint in m for m in result.messages), result.summary()


# --- cached_attention ----------------------------------------------------------------------

def attention_no_mask(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def attention_mask_without_offset(q, k, v):
    T, S = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def attention_no_scale(q, k, v):
    return ref.cached_attention(q * math.sqrt(q.shape[-1]), k, v)


@pytest.mark.parametrize("fn,hint", [(attention_no_mask, "future is not masked"),
                                     (attention_mask_without_offset, "S−T+i"),
                                     (attention_no_scale, "out of tolerance")])
def test_broken_attention_fails(fn, hint):
    result = grade("cached_attention", fn)
    assert not result.ok
    assert any(hint in m for m in result.messages), result.summary()


# --- generate --------------------------------------------------------------------------------

def generate_cache_ignored(model, input_ids, max_new_tokens, use_cache=True, eos_id=None):
    return ref.generate(model, input_ids, max_new_tokens, use_cache=False, eos_id=eos_id)


def generate_positions_restart(model, input_ids, max_new_tokens, use_cache=True, eos_id=None):
    """Decode steps with a cache whose length is reported as 0: positions restart."""
    if not use_cache:
        return ref.generate(model, input_ids, max_new_tokens, use_cache=False, eos_id=eos_id)
    import llmopt.kv_cache as kv
    saved = kv.KVCache
    kv.KVCache = NeverAdvancesButAttends
    try:
        return ref.generate(model, input_ids, max_new_tokens, use_cache=True, eos_id=eos_id)
    finally:
        kv.KVCache = saved


class NeverAdvancesButAttends(ref.KVCache):
    """Stores and returns the right keys, but reports seq_len 0 to the model's positions."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._len = 0

    @property
    def seq_len(self):
        return 0

    @seq_len.setter
    def seq_len(self, value):
        pass

    def update(self, layer, k, v):
        t0, t1 = self._len, self._len + k.shape[2]
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        if layer == self.n_layer - 1:
            self._len = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


def generate_one_short(model, input_ids, max_new_tokens, use_cache=True, eos_id=None):
    return ref.generate(model, input_ids, max_new_tokens, use_cache, eos_id)[:, :-1]


def generate_ignores_eos(model, input_ids, max_new_tokens, use_cache=True, eos_id=None):
    return ref.generate(model, input_ids, max_new_tokens, use_cache, None)


@pytest.mark.parametrize("fn,hint", [(generate_cache_ignored, "use_cache=True"),
                                     (generate_positions_restart, "not the greedy"),
                                     (generate_one_short, "new tokens"),
                                     (generate_ignores_eos, "eos")])
def test_broken_generate_fails(fn, hint):
    result = grade("generate", fn)
    assert not result.ok
    assert any(hint in m for m in result.messages), result.summary()


def test_token_by_token_prefill_is_graded_as_correct_output():
    """course/mistakes.md: a token-by-token prompt phase is slow, not wrong (the lab's timing
    question is about it); re-running the whole sequence with a cache passed is wrong."""
    def token_by_token(model, input_ids, max_new_tokens, use_cache=True, eos_id=None):
        if not use_cache or eos_id is not None:
            return ref.generate(model, input_ids, max_new_tokens, use_cache, eos_id)
        B, T = input_ids.shape
        cache = ref.KVCache.for_model(model.config, B, T + max_new_tokens)
        ids = input_ids
        with torch.no_grad():
            for t in range(T):
                logits = model(input_ids[:, t:t + 1], kv_cache=cache)
            for _ in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                logits = model(nxt, kv_cache=cache)
        return ids
    result = grade("generate", token_by_token)
    assert result.ok, result.summary()


# --- the form of a record is checked before anything is computed --------------------------

def test_outputs_of_the_wrong_form_fail_before_verification():
    wrong_shape = grade("cached_attention", lambda q, k, v: ref.cached_attention(q, k, v)[None])
    assert wrong_shape.passed == 0 and "o: shape" in wrong_shape.messages[0]
    huge = grade("generate", lambda model, ids, n, use_cache=True, eos_id=None:
                 torch.zeros(4_000_000, dtype=torch.int64))
    assert huge.passed == 0 and "ids: shape (4000000,)" in huge.messages[0]
    wrong_kind = grade("cached_attention", lambda q, k, v: ref.cached_attention(q, k, v) > 0)
    assert wrong_kind.passed == 0 and "expected a float tensor" in wrong_kind.messages[0]



# --- capacity -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,hint", [
    (lambda c, gpu, t, w, dt: gpu // ref.kv_cache_bytes(c, 1, t, dt), "weights take memory too"),
    (lambda c, gpu, t, w, dt: max(0, gpu - w) // (ref.kv_cache_bytes(c, 1, t, dt) // 2), "keys AND values"),
    (lambda c, gpu, t, w, dt: ref.max_batch_size(c, gpu, t, w, dt) + 1, "off by one"),
    (lambda c, gpu, t, w, dt: (gpu - w) // ref.kv_cache_bytes(c, 1, t, dt), "weights alone do not fit"),
])
def test_broken_max_batch_size_fails(fn, hint):
    result = grade("max_batch_size", fn)
    assert not result.ok and any(hint in m for m in result.messages), result.summary()


def test_broken_reservation_waste_fails():
    used = grade("reservation_waste", lambda lengths, m: 1 - ref.reservation_waste(lengths, m))
    assert used.passed <= 1 and any("fraction USED" in m for m in used.messages), used.summary()
    nan = grade("reservation_waste", lambda lengths, m: float("nan"))
    assert nan.passed == 0


# --- the method, read from the notebook's code ---------------------------------------------

def test_the_solution_follows_the_method():
    import labkit
    assert labkit.verdicts(LAB, labkit.solution_nb(LAB)) == {}


@pytest.mark.parametrize("body", [
    "    return _recompute(model, input_ids, max_new_tokens, eos_id)",   # a helper that never caches
    "    cache = None\n    return _recompute(model, input_ids, max_new_tokens, eos_id)",
])
def test_generate_that_never_passes_a_cache_fails_the_method(body):
    import labkit
    helper = ("def _recompute(model, ids, n, eos_id=None):\n"
              "    for _ in range(n):\n"
              "        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)\n"
              "    return ids\n")
    nb = labkit.with_body(labkit.solution_nb(LAB), "generate", body, extra_cell=helper)
    assert "never builds your KVCache" in labkit.verdicts(LAB, nb)["generate"]
