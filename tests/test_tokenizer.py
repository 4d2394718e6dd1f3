"""The CLIP BPE tokenizer gives the same ids as two independent implementations: the reference CLIP
`simple_tokenizer.py` (loaded from its file, without importing the torchvision-dependent `clip` package) and the
`tokenizers`-backed `transformers.CLIPTokenizer` built from vocab/merges files derived here from the same .gz."""
import gzip
import importlib.util
import json
import pickle

import pytest
import torch

import groupvit
from groupvit.tokenizer import (
    CONTEXT_LENGTH,
    EOT_ID,
    NUM_MERGES,
    SOT_ID,
    VOCAB_SIZE,
    SimpleTokenizer,
    bytes_to_unicode,
    default_tokenizer,
    default_vocab_path,
    tokenize,
)

CAPTIONS = [
    "a photo of a cat.",
    "Two dogs, playing in the snow!!! (at 3:45pm) -- isn't it great?",
    "Café crème brûlée à Zürich; naïve façade",
    "東京タワーの夜景 and 北京",
    "sunset 🌅 over the sea 🐬🐬 #travel",
    "multiple   spaces\tand\ttabs\nand newlines",
    "It's what we've got, they'll say; I'm sure you'd agree",
    "numbers 1234567 and 3.14159",
    "UPPER case WORDS",
    "",
]
# CLIP unescapes HTML entities; the tokenizers-backed CLIPTokenizer does not, so it gets the unescaped text.
HTML = [("fish &amp; chips", "fish & chips"), ("&quot;quoted&quot; text", '"quoted" text'),
        ("double &amp;amp; escaped", "double & escaped"), ("a &lt;tag&gt;", "a <tag>")]
LONG = "a very long caption about " + " ".join(f"object{i}" for i in range(120))


@pytest.fixture(scope="module")
def clip_reference():
    """CLIP's own SimpleTokenizer, imported from the file (its package __init__ needs torchvision)."""
    path = default_vocab_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tok")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # A local folder, never a hub id: the test runs offline.
    return transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def hf_ids(tok, text: str, length: int = CONTEXT_LENGTH) -> list[int]:
    return tok(text, truncation=True, max_length=length)["input_ids"]


def row(ids: torch.Tensor) -> list[int]:
    """The ids up to and including the first EOT (our padding is zeros, CLIPTokenizer's is EOT)."""
    ids = ids.tolist()
    return ids[:ids.index(EOT_ID) + 1]


def test_vocabulary_layout():
    tok = default_tokenizer()
    assert len(tok.encoder) == VOCAB_SIZE
    assert tok.encoder["<|startoftext|>"] == SOT_ID and tok.encoder["<|endoftext|>"] == EOT_ID
    assert len(tok.bpe_ranks) == NUM_MERGES == 48894


def test_matches_clip_reference(clip_reference):
    tok = default_tokenizer()
    for text in CAPTIONS + [h for h, _ in HTML] + [LONG]:
        assert tok.encode(text) == clip_reference.encode(text), text


def test_matches_transformers_clip_tokenizer(hf_tokenizer):
    tokens = tokenize(CAPTIONS)
    for text, ids in zip(CAPTIONS, tokens, strict=True):
        assert row(ids) == hf_ids(hf_tokenizer, text), text
    for escaped, plain in HTML:
        assert row(tokenize(escaped)[0]) == hf_ids(hf_tokenizer, plain), escaped


def test_overlong_text_keeps_eot_last(hf_tokenizer):
    ids = tokenize(LONG)[0]
    assert ids.shape == (CONTEXT_LENGTH,)
    assert ids[0] == SOT_ID and ids[-1] == EOT_ID and (ids != 0).all()
    assert ids.tolist() == hf_ids(hf_tokenizer, LONG)  # HF truncation also keeps EOT at position 76
    assert ids[:-1].tolist() == [SOT_ID, *default_tokenizer().encode(LONG)[:CONTEXT_LENGTH - 2]]
    with pytest.raises(ValueError, match="more than context_length=77"):
        tokenize(LONG, truncate=False)


def test_padding_shape_and_empty_caption():
    tokens = tokenize(["", "a cat"], context_length=16)
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    assert tokens[0].tolist() == [SOT_ID, EOT_ID] + [0] * 14  # empty caption: SOT + EOT, zero padding
    n = len(default_tokenizer().encode("a cat"))
    assert tokens[1, n + 1] == EOT_ID and (tokens[1, n + 2:] == 0).all()
    assert tokens.argmax(dim=-1).tolist() == [1, n + 1]  # the text encoder pools at argmax = first EOT
    assert groupvit.tokenize("a cat").shape == (1, CONTEXT_LENGTH)


def test_decode_round_trip():
    tok = default_tokenizer()
    assert tok.decode(tokenize("Café &amp; 東京 🌅, ok?")[0]) == "café & 東京 🌅, ok ?"


def test_pickles_for_loader_workers():
    tok = default_tokenizer()
    tok.encode(CAPTIONS[1])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._text_ids.cache_info().currsize == 0  # caches are rebuilt, not shipped
    assert clone.encode(CAPTIONS[1]) == tok.encode(CAPTIONS[1])


def test_cached_and_uncached_paths_agree():
    tok = SimpleTokenizer(cache_size=0)  # lru_cache(maxsize=0) never stores: every call takes the plain path
    cached = default_tokenizer()
    for text in CAPTIONS + [LONG, LONG]:
        assert tok.encode(text) == cached.encode(text) == cached.encode(text)
    assert tok._word_ids.cache_info().currsize == 0


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        SimpleTokenizer(tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="48894 merge lines"):
        SimpleTokenizer(bad)
