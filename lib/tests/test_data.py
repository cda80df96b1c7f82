"""Tests for llmopt.data: the corpus, its splits, the tokenizer and the batches."""
import hashlib
import json
import os
import warnings

import numpy as np
import pytest
import torch

from llmopt import data


def test_source_files_fixed_and_sorted():
    a, b = data.source_files(), data.source_files()
    assert a == b, "the list of source files must not change between calls"
    origins = [f[0] for f in a]
    assert origins[0] == "stdlib" and set(origins) == {"stdlib", *data.PACKAGES}
    assert all(not os.sep + "tests" + os.sep in f[2] for f in a), "test folders are skipped"


def test_corpus_build_is_deterministic(tmp_path, monkeypatch):
    files = data.source_files()[:: max(1, len(data.source_files()) // 150)]  # a sample
    monkeypatch.setattr(data, "source_files", lambda: files)
    digests = []
    for run in ("one", "two"):
        monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / run))
        m = data.build_corpus(jobs=1)
        digests.append({s: m["splits"][s]["sha256"] for s in data.SPLITS})
        assert os.path.exists(tmp_path / run / f"corpus-v{data.CORPUS_VERSION}" / "train.txt")
    assert digests[0] == digests[1], "two builds of the same files must give the same text"


def test_local_corpus_matches_manifest_when_versions_match():
    with open(data.MANIFEST_PATH) as f:
        ref = json.load(f)
    local = data._local_manifest()
    if local["packages"] != ref["packages"] or local["python"] != ref["python"]:
        pytest.skip("other package versions than the reference build")
    for s in data.SPLITS:
        text = data.load_corpus(s).encode("utf-8")
        assert hashlib.sha256(text).hexdigest() == ref["splits"][s]["sha256"], s


def test_splits_disjoint_and_sizes():
    paras = {s: set(data.load_corpus(s).strip().split("\n\n")) for s in data.SPLITS}
    assert not paras["train"] & paras["val"], "a paragraph is in train and val"
    assert not paras["train"] & paras["test"], "a paragraph is in train and test"
    assert not paras["val"] & paras["test"], "a paragraph is in val and test"
    for s in data.SPLITS:  # the hash rule decides the split
        sample = sorted(paras[s])[:50]
        assert all(data.split_of(p) == s for p in sample), s
    chars = {s: len(data.load_corpus(s)) for s in data.SPLITS}
    assert chars["train"] > 5_000_000, chars
    assert chars["val"] > 100_000 and chars["test"] > 100_000, chars
    assert "the" in data.load_corpus("val").split(), "the corpus should be English prose"


def test_manifest_mismatch_warns_once(tmp_path, monkeypatch):
    fake = {"packages": {"numpy": "0"}, "python": "0",
            "splits": {s: {"sha256": "0" * 64} for s in data.SPLITS}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(fake))
    monkeypatch.setattr(data, "MANIFEST_PATH", str(path))
    monkeypatch.setattr(data, "_warned", False)
    local = data._local_manifest()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data._check_against_shipped(local)
        data._check_against_shipped(local)
    assert len(caught) == 1 and "differs" in str(caught[0].message)


@pytest.mark.parametrize("text", [
    "Return a new array of given shape and type, filled with zeros.",
    "Привет, мир! Кэш ключей и значений ускоряет генерацию.",
    "  mixed\tText\n\nwith ёжик, 日本語 and emoji 🙂 ",
])
def test_tokenizer_round_trip(text):
    tok = data.get_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids, "byte-level BPE never needs <unk>"


def test_tokenizer_special_ids_and_autotokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = data.get_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == data.VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    auto = AutoTokenizer.from_pretrained(data.TOKENIZER_DIR)
    text = "The quick brown fox. Быстрая лиса."
    assert auto.encode(text) == tok.encode(text)
    # English compresses well: a trained BPE, not raw bytes
    english = data.load_corpus("val")[:20000]
    assert len(english) / len(tok.encode(english)) > 3.0


def test_token_arrays():
    for s in data.SPLITS:
        arr = data.load_tokens(s)
        assert arr.dtype == np.uint16 and arr.max() < data.VOCAB_SIZE
    assert len(data.load_tokens("test")) > 30_000


def test_calibration_batches_deterministic():
    a = data.calibration_batches(4, 64, seed=1)
    b = data.calibration_batches(4, 64, seed=1)
    c = data.calibration_batches(4, 64, seed=2)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b), "the same seed must give the same batches"
    assert not torch.equal(a, c), "another seed should give other windows"
    train = torch.from_numpy(np.asarray(data.load_tokens("train")[:]).astype(np.int64))
    first = a[0]
    starts = (train[: len(train) - 64] == first[0]).nonzero().flatten()
    assert any(torch.equal(train[s:s + 64], first) for s in starts.tolist()), \
        "each row must be a window of the train split"


def test_token_batches():
    it = data.token_batches("val", seq_len=32, batch_size=3, seed=0)
    x, y = next(it), next(it)
    assert x.shape == (3, 33) and x.dtype == torch.long and not torch.equal(x, y)
    assert torch.equal(x, next(data.token_batches("val", 32, 3, seed=0)))


def test_unigram_baseline():
    ppl = data.unigram_perplexity("test")
    assert 100 < ppl < data.VOCAB_SIZE, ppl
