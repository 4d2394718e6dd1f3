"""The embedded synthetic captioned-scene world: consistent object categories on textured backgrounds, web-style
captions led by the object nouns, and exact segmentation masks in PASCAL VOC layout.

Modules: `categories` (shape, colour family and texture of each category), `backgrounds`, `scene` (compose a scene
and its label map), `captions`, `writer` (splits on disk, url list for img2dataset, VOC layout).
"""
from groupvit.synth.captions import CaptionStyle, make_caption
from groupvit.synth.categories import CATEGORIES, CATEGORY_NAMES
from groupvit.synth.scene import IGNORE_INDEX, Scene, WorldSpec, ignore_borders, make_scene
from groupvit.synth.writer import generate, write_world

__all__ = ["CATEGORIES", "CATEGORY_NAMES", "CaptionStyle", "IGNORE_INDEX", "Scene", "WorldSpec", "generate",
           "ignore_borders", "make_caption", "make_scene", "write_world"]
