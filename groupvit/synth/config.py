"""`SynthConfig`: the `synth` section of params.yaml (sizes, object and caption statistics of the synthetic world).

`preset` fills the sizes left unset (`PRESETS`); `url_base` must be a loopback `http://host:port`
(`check_url_base`), because the download stage serves the images there itself and must never reach out.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from groupvit.config import param
from groupvit.synth.captions import CaptionStyle
from groupvit.synth.categories import CATEGORY_NAMES
from groupvit.synth.scene import WorldSpec

# Sizes a preset fills in when the params leave them unset. `default` fits the CPU training budget (tens of
# thousands of 64 px images); `tiny` is for tests and smoke runs.
PRESETS = {
    "default": {"num_train": 40000, "num_val": 200, "num_test": 500, "image_size": 64},
    "tiny": {"num_train": 64, "num_val": 8, "num_test": 8, "image_size": 32},
}


@dataclass(frozen=True)
class SynthConfig:
    """The `synth` section of params.yaml."""
    preset: str = param("default", choices=tuple(PRESETS), help="fills num_train/num_val/num_test/image_size")
    out_dir: str = param("data/synth", help="output folder")
    url_base: str = param("http://127.0.0.1:18765", help="loopback http://host:port the download stage serves")
    num_train: int | None = param(None, ge=1, help="captioned training images (null: from preset)")
    num_val: int | None = param(None, ge=1, help="validation images with masks, for tuning (null: from preset)")
    num_test: int | None = param(None, ge=1, help="held-out evaluation images with masks (null: from preset)")
    image_size: int | None = param(None, ge=32, le=256, help="image side in pixels (null: from preset)")
    categories: tuple[str, ...] = param(CATEGORY_NAMES, choices=CATEGORY_NAMES, help="object categories in use")
    min_objects: int = param(2, ge=1, le=8, help="fewest objects attempted per image")
    max_objects: int = param(4, ge=1, le=8, help="most objects attempted per image")
    object_scale: tuple[float, ...] = param((0.35, 0.6), gt=0, le=1, help="[min, max] object diameter / image side")
    min_visible: float = param(0.5, gt=0, le=1, help="smallest visible fraction of an object under occlusion")
    omit_prob: float = param(0.1, ge=0, le=1, help="chance a category in view goes unmentioned")
    no_object_prob: float = param(0.03, ge=0, le=1, help="chance a caption names no object")
    synonym_prob: float = param(0.3, ge=0, le=1, help="chance a synonym replaces the class name")
    size_prob: float = param(0.2, ge=0, le=1, help="chance of a (true) size word in a mention")
    background_prob: float = param(0.3, ge=0, le=1, help="chance a caption names the background")
    tag_prob: float = param(0.3, ge=0, le=1, help="chance of a distractor tag ('stock photo')")
    jpeg_quality: int = param(90, ge=50, le=100, help="JPEG quality of all images")
    ignore_border: int = param(1, ge=0, le=4, help="width of the 255 (ignore) band on object borders in masks")
    workers: int = param(0, ge=0, help="processes (0: all usable cores); output bytes do not depend on it")

    def __post_init__(self) -> None:
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if len(set(self.categories)) != len(self.categories) or len(self.categories) < 2:
            raise ValueError(f"categories: expected at least 2 distinct names, found {list(self.categories)}")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects: expected <= max_objects ({self.max_objects}), found {self.min_objects}")
        if len(self.object_scale) != 2 or self.object_scale[0] > self.object_scale[1]:
            raise ValueError(f"object_scale: expected [min, max] with min <= max, found {list(self.object_scale)}")
        object.__setattr__(self, "url_base", check_url_base(self.url_base))

    def world_spec(self) -> WorldSpec:
        return WorldSpec(image_size=self.image_size, categories=self.categories, min_objects=self.min_objects,
                         max_objects=self.max_objects, object_scale=self.object_scale, min_visible=self.min_visible)

    def caption_style(self) -> CaptionStyle:
        return CaptionStyle(omit_prob=self.omit_prob, no_object_prob=self.no_object_prob,
                            synonym_prob=self.synonym_prob, size_prob=self.size_prob,
                            background_prob=self.background_prob, tag_prob=self.tag_prob)


def check_url_base(url: str) -> str:
    """`url` without a trailing slash, if it is `http://<loopback host>:<port>`; else ValueError saying why.

    Loopback only: the download stage serves the images itself on this address and must never reach out.
    """
    parts = urlsplit(url)
    expected = "expected http://<loopback host>:<port> (e.g. http://127.0.0.1:18765)"
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"url_base: {expected}, found {url!r}")
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise ValueError(f"url_base: {expected}; {host!r} is not a loopback address")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None or port == 0:
        raise ValueError(f"url_base: {expected}; no valid port in {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"url_base: {expected}; found a path, query or credentials in {url!r} (image urls must be "
                         "{url_base}/<key>.jpg)")
    return url.rstrip("/")
