"""The course corpus, its tokenizer, batches and perplexity (README.md: the course model and data).

Every lab needs text to measure a model on (GPTQ's perplexity table, Wanda's calibration
inputs, QLoRA's before/after) and no lab may download anything. So the corpus is English
prose that already ships with the course's own environment:

- Python's ``pydoc_data.topics`` (the language reference pages ``help()`` shows);
- the docstrings (module, class, function) of the standard library and of the pinned
  packages numpy, torch, sympy, matplotlib and transformers, read with ``ast`` from a
  fixed, sorted list of ``.py`` files (nothing is imported, so the build has no side
  effects and runs in well under a minute on two cores).

Design:
- Docstrings are dedented and cut into paragraphs; only paragraphs that read like prose
  are kept (no doctest lines, parameter tables, reST directives or code), each reflowed to
  one line. Paragraphs are de-duplicated by their hash (transformers copies docstrings
  between its models) and split by that hash: 2% val, 2% test, 96% train (2%, not 1%,
  so that each held-out split has about 50k tokens for a stable perplexity), so a
  paragraph never lands in two splits and the split does not depend on file order.
- The built corpus and its token arrays (uint16 per split) are cached under
  ``$LLMOPT_CACHE``, else ``<repo>/.cache/llmopt``, else ``~/.cache/llmopt``.
  ``corpus_manifest.json`` (committed in ``assets/``) records the package versions, sizes
  and the sha256 of each split of the reference build; a local build with other package
  versions gives other text, and ``load_corpus`` warns once when the checksums differ.
- The tokenizer is a byte-level BPE (8192 tokens) trained on the train split, shipped as
  ``assets/tiny-opt/tokenizer.json``. Special tokens follow OPT: ``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2 (bos = eos = 2, as OPT's config says), ``<unk>`` 3. Byte-level BPE encodes
  any UTF-8 text, Cyrillic included, without unknown tokens (but the corpus is English,
  so Russian costs about 1.8 tokens per character).
- Token arrays: each paragraph's ids followed by ``</s>``. ``token_batches`` yields
  ``(batch_size, seq_len + 1)`` windows (inputs ``[:, :-1]``, targets ``[:, 1:]``);
  ``calibration_batches`` gives ``(n, seq_len)`` windows of train.

``python -m llmopt.data`` builds the corpus and token arrays and prints the manifest;
``--train-tokenizer`` (re)trains the shipped tokenizer, ``--write-manifest`` (re)writes
the committed manifest.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import sys
import sysconfig
import time
import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOKENIZER_DIR = os.path.join(ASSETS, "tiny-opt")
MANIFEST_PATH = os.path.join(ASSETS, "corpus_manifest.json")
SPLITS = ("train", "val", "test")
PACKAGES = ("numpy", "torch", "sympy", "matplotlib", "transformers")
CORPUS_VERSION = 1  # bump when the gathering rules change: it names the cache folder
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in OPT
BOS_ID, PAD_ID, EOS_ID = 2, 1, 2

# Folders that hold tests, vendored code or generated tables rather than documentation.
_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "site-packages", "__pycache__",
              "lib2to3", "idlelib", "turtledemo", "ensurepip", "_vendor", "third_party",
              "benchmarks", "encodings", "pydoc_data"}


# --------------------------------------------------------------------------- cache dir
def cache_dir() -> str:
    """``$LLMOPT_CACHE``, else ``<repo>/.cache/llmopt`` when writable, else ``~/.cache/llmopt``."""
    env = os.environ.get("LLMOPT_CACHE")
    if env:
        os.makedirs(env, exist_ok=True)
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for base in (os.path.join(repo, ".cache", "llmopt"),
                 os.path.join(os.path.expanduser("~"), ".cache", "llmopt")):
        try:
            os.makedirs(base, exist_ok=True)
            if os.access(base, os.W_OK):
                return base
        except OSError:
            continue
    raise RuntimeError("no writable cache directory: set LLMOPT_CACHE")


def _corpus_dir() -> str:
    return os.path.join(cache_dir(), f"corpus-v{CORPUS_VERSION}")


# --------------------------------------------------------------------------- gathering
def source_files() -> list[tuple[str, str, str]]:
    """The fixed, sorted list of ``(origin, relative_path, absolute_path)`` to read."""
    roots = [("stdlib", sysconfig.get_paths()["stdlib"])]
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)  # finds the folder without importing it
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name!r} is not installed; the corpus needs it")
        roots.append((name, list(spec.submodule_search_locations)[0]))
    files = []
    for origin, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
            for f in filenames:
                if f.endswith(".py") and not f.startswith("test_"):
                    path = os.path.join(dirpath, f)
                    files.append((origin, os.path.relpath(path, root), path))
    return sorted(files, key=lambda t: (PACKAGES.index(t[0]) + 1 if t[0] != "stdlib" else 0,
                                        t[1]))


def _docstrings(path: str) -> list[str]:
    """Module, class and function docstrings of one file, in source order."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                docs.append(doc)
    return docs


_RE_NONPROSE = re.compile(
    r"^(>>>|\.\.\.|\.\. |:param|:type|:return|:rtype|:raises|[-=~^*#_]{3,}|\||\+[-=]+\+|@|"
    r"def |class |import |from \S+ import|\$ |%|In \[)")
# a parameter header ("x : array_like", "input_ids (`torch.LongTensor`):", "Args:")
_RE_HEADER = re.compile(r"^(\*{0,2}[\w.]+( \(.*\))? ?:( .*)?|[\w ]+:|[\w.]+ \(.*\):.*)$")
_RE_WORD = re.compile(r"[A-Za-z]+")


def _prose_line(line: str) -> bool:
    """One stripped line that could belong to prose: mostly letters, not code or a header."""
    if _RE_NONPROSE.match(line) or (_RE_HEADER.match(line) and len(line.split()) <= 6):
        return False
    letters = sum(c.isalpha() or c == " " for c in line)
    return letters >= 0.6 * len(line)


def _is_prose(text: str) -> bool:
    """A paragraph reads like prose: sentences of plain words, not identifiers or symbols."""
    if len(text) < 40 or not text[0].isalpha():
        return False
    words = text.split()
    if len(words) < 6 or (text.endswith(":") and len(words) < 15):  # a header, not a sentence
        return False
    plain = sum(1 for w in words if _RE_WORD.fullmatch(w.strip(".,;:()'\"!?`*")))
    return plain >= 0.6 * len(words)


def _paragraphs(doc: str) -> list[str]:
    """Cut a docstring into paragraphs of prose lines, each reflowed to one line.

    A paragraph ends at a blank line, a change of indentation or a line that is not prose
    (a section or parameter header, a doctest, a table row); the description under a
    parameter header is indented, so it becomes a paragraph of its own.
    """
    out, cur, indent = [], [], None

    def flush():
        text = re.sub(r"[^\S ]", " ", " ".join(cur))  # stray \r, \x0c, \u2028 -> space
        if cur and _is_prose(text):
            out.append(text)
        cur.clear()

    for raw in inspect.cleandoc(doc).expandtabs().split("\n"):
        line = raw.strip()
        ind = len(raw) - len(raw.lstrip())
        if not line or ind != indent or not _prose_line(line):
            flush()
            indent = ind
            if not line or not _prose_line(line):
                continue
        cur.append(line)
    flush()
    return out


def _file_paragraphs(path: str) -> list[str]:
    return [p for doc in _docstrings(path) for p in _paragraphs(doc)]


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics  # a dict of plain strings: safe and fast to import
    return [p for key in sorted(topics) for p in _paragraphs(topics[key])]


def split_of(paragraph: str) -> str:
    """The split a paragraph belongs to, from its hash: 2% val, 2% test, 96% train."""
    h = int.from_bytes(hashlib.sha256(paragraph.encode()).digest()[:8], "little") % 100
    return "val" if h < 2 else "test" if h < 4 else "train"


def build_corpus(jobs: int | None = None, verbose: bool = False) -> dict:
    """Gather, clean, de-duplicate and split the corpus; write it to the cache; return the manifest."""
    t0 = time.perf_counter()
    files = source_files()
    paths = [f[2] for f in files]
    jobs = jobs or min(os.cpu_count() or 1, 8)
    if jobs > 1:
        import multiprocessing as mp
        ctx = mp.get_context("fork") if sys.platform != "win32" else mp.get_context()
        with ctx.Pool(jobs) as pool:
            per_file = pool.map(_file_paragraphs, paths, chunksize=16)
    else:
        per_file = [_file_paragraphs(p) for p in paths]
    seen, parts = set(), {s: [] for s in SPLITS}
    n_raw = 0
    for paras in [_pydoc_topics()] + per_file:  # pydoc topics first, then files in order
        for p in paras:
            n_raw += 1
            key = hashlib.sha256(p.encode()).digest()
            if key in seen:
                continue
            seen.add(key)
            parts[split_of(p)].append(p)
    out = _corpus_dir()
    os.makedirs(out, exist_ok=True)
    manifest = {
        "corpus_version": CORPUS_VERSION,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "sources": ["pydoc_data.topics", "stdlib"] + list(PACKAGES),
        "n_files": len(files),
        "n_paragraphs_raw": n_raw,
        "n_paragraphs_unique": len(seen),
        "split_rule": "sha256(paragraph)[:8] little-endian % 100: 0-1 -> val, 2-3 -> test, else train",
        "splits": {},
    }
    for s in SPLITS:
        text = "\n\n".join(parts[s]) + "\n"
        data = text.encode("utf-8")
        with open(os.path.join(out, f"{s}.txt"), "wb") as f:
            f.write(data)
        manifest["splits"][s] = {"paragraphs": len(parts[s]), "chars": len(text),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    if verbose:
        print(json.dumps(manifest, indent=2))
    return manifest


def _version(name: str) -> str:
    from importlib.metadata import version
    try:
        return version(name)
    except Exception:  # pragma: no cover
        return "unknown"


def _local_manifest() -> dict:
    path = os.path.join(_corpus_dir(), "manifest.json")
    if not all(os.path.exists(os.path.join(_corpus_dir(), f"{s}.txt")) for s in SPLITS) \
            or not os.path.exists(path):
        return build_corpus()
    with open(path) as f:
        return json.load(f)


_warned = False


def _check_against_shipped(local: dict) -> None:
    """Warn once when the local build differs from the committed reference build."""
    global _warned
    if _warned or not os.path.exists(MANIFEST_PATH):
        return
    with open(MANIFEST_PATH) as f:
        ref = json.load(f)
    diff = [s for s in SPLITS
            if ref.get("splits", {}).get(s, {}).get("sha256") != local["splits"][s]["sha256"]]
    if diff:
        _warned = True
        warnings.warn(
            f"llmopt corpus: the local build differs from the reference build in {diff} "
            f"(reference packages {ref.get('packages')}, python {ref.get('python')}; local "
            f"{local.get('packages')}, python {local.get('python')}). Perplexities will differ "
            f"slightly from the published ones.", stacklevel=3)


@lru_cache(maxsize=None)
def load_corpus(split: str) -> str:
    """The text of one split ("train", "val" or "test"); built and cached on first use."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    local = _local_manifest()
    _check_against_shipped(local)
    with open(os.path.join(_corpus_dir(), f"{split}.txt"), encoding="utf-8", newline="") as f:
        return f.read()


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(out_dir: str = TOKENIZER_DIR, vocab_size: int = VOCAB_SIZE) -> None:
    """Train the byte-level BPE on the train split and save it as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    paras = load_corpus("train").split("\n\n")
    tok.train_from_iterator(paras, trainer=trainer, length=len(paras))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=2048, add_bos_token=False)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)


@lru_cache(maxsize=None)
def get_tokenizer():
    """The shipped byte-level BPE as a ``transformers.PreTrainedTokenizerFast``.

    ``encode(text)`` adds no special tokens (unlike OPT's tokenizer, which prepends
    ``</s>``); ``eos_token_id == bos_token_id == 2``, ``pad_token_id == 1``.
    """
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(TOKENIZER_DIR, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m llmopt.data --train-tokenizer`")
    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=2048)


# --------------------------------------------------------------------------- tokens
def token_file(split: str, directory: str | None = None) -> str:
    return os.path.join(directory or os.path.join(_corpus_dir(), "tokens"), f"{split}.npy")


def build_tokens(directory: str | None = None) -> dict[str, np.ndarray]:
    """Tokenize each split (paragraphs joined by ``</s>``) into a uint16 ``.npy`` array."""
    tok = get_tokenizer()
    out = {}
    for split in SPLITS:
        paras = load_corpus(split).split("\n\n")
        ids = tok(paras, add_special_tokens=False)["input_ids"]
        arr = np.fromiter((t for p in ids for t in (*p, EOS_ID)), dtype=np.uint16)
        path = token_file(split, directory)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, arr)
        out[split] = arr
    return out


_TOKENS: dict[str, np.ndarray] = {}


def load_tokens(split: str, directory: str | None = None) -> np.ndarray:
    """The token ids of a split as a uint16 array (built and cached on first use)."""
    path = token_file(split, directory)
    if path not in _TOKENS:
        if not os.path.exists(path):
            if directory is not None:
                raise FileNotFoundError(f"{path} is missing")
            build_tokens()
        _TOKENS[path] = np.load(path, mmap_mode="r")
    return _TOKENS[path]


def token_batches(split: str, seq_len: int, batch_size: int, seed: int = 0):
    """Endless iterator of ``(batch_size, seq_len + 1)`` LongTensor windows at random offsets.

    Inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``. Deterministic in ``seed``.
    """
    data = load_tokens(split)
    g = np.random.default_rng(seed)
    while True:
        starts = g.integers(0, len(data) - seq_len - 1, size=batch_size)
        yield torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def calibration_batches(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``(n, seq_len)`` LongTensor of random windows of the train split (GPTQ, Wanda, ...)."""
    data = load_tokens("train")
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(data) - seq_len, size=n)
    return torch.from_numpy(np.stack([data[s:s + seq_len] for s in starts]).astype(np.int64))


def unigram_perplexity(split: str = "test", max_tokens: int | None = None) -> float:
    """Perplexity of an add-one smoothed unigram model fitted on train: the baseline."""
    counts = np.bincount(load_tokens("train"), minlength=VOCAB_SIZE).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    ids = np.asarray(load_tokens(split)[:max_tokens])
    return float(math.exp(-logp[ids].mean()))


def perplexity(model, split: str = "test", seq_len: int = 256, max_tokens: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``seq_len`` tokens.

    Works for an llmopt ``GPT`` (forward returns logits) and an HF ``OPTForCausalLM``
    (output has ``.logits``). Runs in eval mode, without gradients, on the model's device;
    restores the model's mode. ``max_tokens`` evaluates only the first tokens of the split.
    """
    return perplexity_of_tokens(model, load_tokens(split), seq_len, max_tokens)


@torch.no_grad()
def perplexity_of_tokens(model, tokens, seq_len: int = 256, max_tokens: int | None = None,
                         batch_size: int = 8) -> float:
    """``perplexity`` on a given 1-D array of token ids (the training script uses this)."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    data = torch.as_tensor(np.asarray(tokens[:n]).astype(np.int64))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # window w predicts tokens w*seq_len+1 .. (w+1)*seq_len from the ones before them
    n_full = (n - 1) // seq_len
    windows = [data[i * seq_len: (i + 1) * seq_len + 1] for i in range(n_full)]
    groups = [torch.stack(windows[i:i + batch_size]) for i in range(0, n_full, batch_size)]
    if (n - 1) % seq_len:
        groups.append(data[n_full * seq_len:][None])  # the last, shorter window
    nll, count = 0.0, 0
    try:
        for x in groups:
            x = x.to(device)  # (b, L + 1)
            out = model(x[:, :-1])
            logits = out.logits if hasattr(out, "logits") else out  # (b, L, V)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                   x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-tokenizer", action="store_true", help="retrain the shipped tokenizer")
    p.add_argument("--write-manifest", action="store_true", help="rewrite assets/corpus_manifest.json")
    p.add_argument("--tokens", default=None, help="also write the token arrays to this folder")
    p.add_argument("--rebuild", action="store_true", help="rebuild the corpus even if cached")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    manifest = build_corpus() if args.rebuild else _local_manifest()
    print(f"corpus: {time.perf_counter() - t0:.1f} s in {_corpus_dir()}")
    if args.train_tokenizer:
        t0 = time.perf_counter()
        train_tokenizer()
        get_tokenizer.cache_clear()
        print(f"tokenizer: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    arrays = build_tokens()
    if args.tokens:
        build_tokens(args.tokens)
    manifest["tokens"] = {s: int(len(a)) for s, a in arrays.items()}
    manifest["tokenizer_sha256"] = hashlib.sha256(
        open(os.path.join(TOKENIZER_DIR, "tokenizer.json"), "rb").read()).hexdigest()
    print(f"tokens: {time.perf_counter() - t0:.1f} s")
    if args.write_manifest:  # the build time depends on the machine: not committed
        with open(MANIFEST_PATH, "w") as f:
            json.dump({k: v for k, v in manifest.items() if k != "build_seconds"}, f, indent=2)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
