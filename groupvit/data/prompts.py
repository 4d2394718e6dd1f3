"""Prompted multi-label texts: K candidate words of an image, each in one of CLIP's 80 ImageNet prompt templates.

Reference semantics (`WordAugTokenizeWrapper`): draw min(K, n) of the image's n candidate words without replacement
(a word repeated in the caption can be drawn twice), put each in a template drawn uniformly, and pad with copies of
the caption when fewer than K words exist. The caption comes first: `[caption, prompt_1, ..., prompt_K]`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_TEMPLATES_FILE = Path(__file__).resolve().parent.parent / "resources" / "imagenet_templates_80.txt"


@functools.lru_cache(maxsize=1)
def prompt_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates (`{}` = the word), in the reference order."""
    templates = tuple(line.strip() for line in _TEMPLATES_FILE.read_text().splitlines() if line.strip())
    assert len(templates) == 80 and all("{}" in t for t in templates), _TEMPLATES_FILE
    return templates


def prompted_texts(caption: str, words: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """`[caption, prompt_1, ..., prompt_k]` for one image.

    Args:
        caption: the image's caption.
        words: its candidate words (from the noun sidecar), possibly empty.
        k: prompts per image (the reference's `multi_label`, 3); 0 returns just the caption.
        rng: the caller's seeded generator (one per loader worker).
    """
    templates = prompt_templates()
    n = min(k, len(words))
    chosen = rng.choice(len(words), size=n, replace=False) if n else []
    prompts = [templates[rng.integers(len(templates))].format(words[i]) for i in chosen]
    return [caption, *prompts, *([caption] * (k - n))]
