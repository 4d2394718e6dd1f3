"""Web alt-text-like captions for synthetic scenes, whose distinguishing content is the object nouns.

A caption names the objects in view with counts ("two tomatoes"), sometimes a synonym ("a tyre") or a size word
("a small lemon"), in shuffled order, joined in varied ways, inside varied templates, with distractor words that
carry no information ("stock photo", "#nofilter"). Some objects go unmentioned, as in real alt-text, and some
captions name nothing at all ("my photo from the weekend").

What captions never do, because a first design failed on it (see the synthetic-world notes): carry information
that lets a caption be matched to its image without the object words. There are no colour words; background words
appear only next to object words and backgrounds are independent of the objects; distractor words are drawn
independently of the image.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from groupvit.synth.backgrounds import BACKGROUNDS
from groupvit.synth.categories import BY_NAME
from groupvit.synth.scene import Scene, WorldSpec

NUMBER_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3"), 4: ("four", "4"), 5: ("five", "5")}
MANY_WORDS = ("some", "several", "a few")
SMALL_WORDS = ("small", "little", "tiny")
LARGE_WORDS = ("big", "large", "huge")
# Independent of the image, shared by all categories: noise the model must learn to ignore.
ADJECTIVES = ("nice", "fresh", "old", "shiny", "lovely", "single", "cute", "new")
TAGS = ("stock photo", "free image", "hd", "4k wallpaper", "#nofilter", "#photooftheday", "royalty free",
        "high resolution", "via instagram", "close up", "download", "photo")
NO_OBJECT = ("nice picture", "my photo from the weekend", "untitled", "image", "what a day", "so beautiful",
             "summer memories", "click to enlarge", "photo by a friend", "free stock photo", "just because",
             "a great shot", "DSC {n}", "IMG_{n}.jpg", "look at this")
TEMPLATES = ("{o}{b}", "a photo of {o}{b}", "photo of {o}{b}", "picture of {o}{b}", "close-up of {o}{b}",
             "an image with {o}{b}", "{o}{b}, stock photo", "{o}{b} - image", "here we have {o}{b}",
             "I found {o}{b}", "look at {o}{b}!", "{o}{b} in the morning light", "{o}{b}. taken with my phone",
             "IMG {n}: {o}{b}", "{o}{b} #photography", "what I saw: {o}{b}", "just {o}{b}")
BACKGROUND_FIRST = ("{b}: {o}", "{b}, {o}", "{b} - {o}")


@dataclass(frozen=True)
class CaptionStyle:
    """How captions are written.

    Attributes:
        omit_prob: chance that a category in view goes unmentioned (at least one is always named).
        no_object_prob: chance that a caption names no object at all.
        synonym_prob: chance that a synonym replaces the class name in a mention.
        size_prob: chance that a mention gets a size word matching the object's size.
        background_prob: chance that a caption names the (true) background.
        tag_prob: chance of a distractor tag at the end.
    """
    omit_prob: float = 0.1
    no_object_prob: float = 0.03
    synonym_prob: float = 0.3
    size_prob: float = 0.2
    background_prob: float = 0.3
    tag_prob: float = 0.3


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _mention(name: str, count: int, size: float, lo: float, hi: float, style: CaptionStyle,
             rng: np.random.Generator) -> str:
    """A noun phrase for `count` objects of category `name`: 'a tomato', 'two small cherry tomatoes'."""
    category = BY_NAME[name]
    singular, plural = category.name, category.plural
    if category.synonyms and rng.random() < style.synonym_prob:
        singular, plural = category.synonyms[int(rng.integers(len(category.synonyms)))]
    words = []
    r = rng.random()
    if r < style.size_prob:  # a size word that is true: the object's diameter in the lower or upper third
        third = (size - lo) / max(hi - lo, 1e-6)
        if third < 1 / 3:
            words.append(_pick(rng, SMALL_WORDS))
        elif third > 2 / 3:
            words.append(_pick(rng, LARGE_WORDS))
    elif r < style.size_prob + 0.1:
        words.append(_pick(rng, ADJECTIVES))
    words.append(singular if count == 1 else plural)
    phrase = " ".join(words)
    if count == 1:
        article = _pick(rng, ("a", "a", "one", "the"))
        if article == "a" and phrase[0] in "aeiou":
            article = "an"
        return f"{article} {phrase}"
    counted = NUMBER_WORDS.get(count, MANY_WORDS)
    return f"{_pick(rng, counted if rng.random() < 0.8 else MANY_WORDS)} {phrase}"


def _join(phrases: list[str], rng: np.random.Generator) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return _pick(rng, (" and ", " and ", " with ", ", ", " next to ", " & ")).join(phrases)
    last = _pick(rng, (" and ", ", ", " & "))
    return ", ".join(phrases[:-1]) + last + phrases[-1]


def make_caption(scene: Scene, spec: WorldSpec, style: CaptionStyle, rng: np.random.Generator) -> str:
    """A caption for `scene`, drawn from `rng` (a stream separate from the scene's, so styles do not move images)."""
    n = int(rng.integers(10000))
    if not scene.objects or rng.random() < style.no_object_prob:
        return _pick(rng, NO_OBJECT).format(n=n)
    counts = Counter(o.class_index for o in scene.objects if o.visible > 0)
    sizes: dict[int, list[float]] = {}
    for o in scene.objects:
        sizes.setdefault(o.class_index, []).append(2 * o.radius / spec.image_size)
    classes = list(counts)
    rng.shuffle(classes)
    named = [c for c in classes if rng.random() >= style.omit_prob] or [classes[0]]
    lo, hi = spec.object_scale
    phrases = [_mention(spec.categories[c - 1], counts[c], float(np.mean(sizes[c])), lo, hi, style, rng)
               for c in named]
    objects = _join(phrases, rng)
    if rng.random() < style.background_prob:
        where = _pick(rng, BACKGROUNDS[scene.background].phrases)
        if rng.random() < 0.25:
            text = _pick(rng, BACKGROUND_FIRST).format(b=where, o=objects)
        else:
            text = _pick(rng, TEMPLATES).format(o=objects, b=" " + where, n=n)
    else:
        text = _pick(rng, TEMPLATES).format(o=objects, b="", n=n)
    if rng.random() < style.tag_prob:
        text = f"{text} {_pick(rng, ('|', '-', '·', ''))} {_pick(rng, TAGS)}".replace("  ", " ")
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text
