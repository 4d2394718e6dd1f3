"""From a model folder to zero-shot segmentations: the one code path of `groupvit evaluate`, `groupvit segment` and a
web demo. Load the model (`LoadedModel`), embed the class prompts and build the reference segmenter for them
(`make_segmenter`), or do all of it for one image with any class list (`segment_image`)."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from groupvit.checkpoint import weights_digest
from groupvit.errors import DataError
from groupvit.evaluation.classification import class_embeddings, templates_of
from groupvit.evaluation.config import EvaluateConfig, ModelSpec, SegmentationSpec
from groupvit.evaluation.limits import MAX_LONG_SIDE
from groupvit.evaluation.segmentation import SegmentationSettings, Segmenter, stage_group_maps
from groupvit.evaluation.visualize import segmentation_figure
from groupvit.model import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


class LoadedModel:
    """A model with the callables evaluation needs (no grad, eval mode, optional bf16 autocast)."""

    def __init__(self, spec: ModelSpec, precision: str):
        import groupvit

        self.name, self.path = spec.name, Path(spec.path)
        self.model = groupvit.load_pretrained(self.path).eval()
        self.bf16 = precision == "bf16"
        self.logit_scale = float(self.model.logit_scales()[0].detach())
        self.context_length = self.model.cfg.context_length

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the weights, which ties a tuned threshold to them (thresholds.json); computed when asked."""
        return weights_digest(self.model)

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def segmentation_outputs(self, pixels: torch.Tensor) -> dict[str, Any]:
        """Normalised pixels [B, 3, H, W] -> the model's grouping outputs in fp32 (see `Segmenter`)."""
        with self._autocast():
            out = self.model.segmentation_outputs(pixels)
        return {"image": out["image"].float(), "groups": out["groups"].float(),
                "soft_maps": [a.float() for a in out["soft_maps"]], "grid": out["grid"]}

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> image embeddings [B, D] in fp32 (unnormalised)."""
        with self._autocast():
            return self.model.encode_image(pixels).float()

    @torch.no_grad()
    def text_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[C, D] normalised class embeddings of `names`, each the mean over `templates`."""
        import groupvit

        return class_embeddings(self.model.encode_text, lambda t: groupvit.tokenize(t, self.context_length),
                                list(names), list(templates))


def load_models(specs: Sequence[ModelSpec], precision: str) -> list[LoadedModel]:
    """Load every model folder; an optional one that does not exist is skipped with a log line.

    Raises:
        DataError: a non-optional folder is missing, or no model is left.
    """
    models = []
    for spec in specs:
        if not Path(spec.path).exists():
            if spec.optional:
                log.info("model %s: %s not found, skipped (optional)", spec.name, spec.path)
                continue
            raise DataError(f"evaluate.models: model folder {spec.path} ({spec.name}) not found")
        models.append(LoadedModel(spec, precision))
    if not models:
        raise DataError("evaluate.models: no model to evaluate")
    return models


def segmentation_settings(cfg: EvaluateConfig, spec: SegmentationSpec) -> SegmentationSettings:
    """How the images of data set `spec` reach the model (resize, whole / slide) and the class assignment."""
    return SegmentationSettings(spec.mode, spec.short_side, spec.long_side, spec.crop, spec.stride, cfg.top_k,
                                cfg.assignment == "hard")


def make_segmenter(model: LoadedModel, class_names: Sequence[str], templates: Sequence[str],
                   settings: SegmentationSettings, background_prompts: Sequence[str] = ()) -> Segmenter:
    """The reference segmenter of `model` for a class list.

    Args:
        model: the loaded model.
        class_names: the foreground classes (background excluded: it is what no class claims).
        templates: prompt templates with `{}` (`templates_of`).
        settings: resize, mode and assignment.
        background_prompts: kinds of background prompted as extra classes whose pixels become background.
    """
    text = model.text_embeddings([*class_names, *background_prompts], templates)  # [C + E, D]
    return Segmenter(model.segmentation_outputs, text, model.logit_scale, settings, IMAGENET_MEAN, IMAGENET_STD,
                     background_prompts=len(background_prompts))


class ReuseLastForward:
    """An encoder that returns its previous outputs when called again with equal pixels.

    `segment_image` needs one whole-image forward twice: for the prediction (`Segmenter.predict`) and for the groups
    of each stage (`stage_group_maps`), both of `Segmenter.prepare(image[None])`. The second call gets the very
    tensors of the first, so the results are those of two forwards at the cost of one (about half the time of a
    released model at 448 px). One output is kept, and only while the segmenter is.
    """

    def __init__(self, encode: Callable[[torch.Tensor], Mapping[str, Any]]):
        self.encode = encode
        self._last: tuple[torch.Tensor, Mapping[str, Any]] | None = None

    def __call__(self, pixels: torch.Tensor) -> Mapping[str, Any]:
        """Normalised pixels [B, 3, H, W] -> the encoder's outputs (those of the last call when `pixels` equal its)."""
        if self._last is not None and self._last[0].shape == pixels.shape and torch.equal(self._last[0], pixels):
            return self._last[1]
        out = self.encode(pixels)
        self._last = (pixels, out)
        return out


@dataclass(frozen=True)
class ImageSegmentation:
    """The segmentation of one image: classes per pixel, their names, the groups of each stage, the picture and the
    segmenter that made them (a demo re-thresholds with `segmenter.predict(image[None], bg_thresh)` without
    embedding the prompts again)."""

    pred: torch.Tensor  # [H, W] class indices, 0 = background
    class_names: list[str]  # background first
    picture: bytes  # PNG: image, prediction with a legend, the groups of each stage (b"" when not asked for)
    segmenter: Segmenter
    stage_groups: list[torch.Tensor] = field(default_factory=list)  # [H, W] group index after each grouping stage

    def fractions(self) -> list[tuple[str, float]]:
        """(class name, share of the pixels) of every predicted class, in class order."""
        return [(self.class_names[c], float((self.pred == c).float().mean())) for c in self.pred.unique().tolist()]


def segment_image(model: LoadedModel, image: torch.Tensor, class_names: Sequence[str], cfg: EvaluateConfig,
                  bg_thresh: float, short_side: int | None = None, title: str = "",
                  picture: bool = True) -> ImageSegmentation:
    """Zero-shot segmentation of one image with any class list, whole-image mode as the reference demo: the code
    path of `groupvit segment` and `groupvit demo`.

    Args:
        model: the loaded model.
        image: uint8 [3, H, W].
        class_names: the foreground classes (background excluded).
        cfg: prompt templates, top-k and assignment (`evaluate` section).
        bg_thresh: background threshold.
        short_side: resize the short side first; None = 2x the model's training size (448 for 224).
        title: picture title.
        picture: draw the PNG (`ImageSegmentation.picture`; a page that shows the parts itself skips it).

    Raises:
        ImageSizeError: the image is more elongated than the limits of `inference_size` allow.
    """
    short = short_side if short_side is not None else 2 * model.model.cfg.image_size
    settings = SegmentationSettings("whole", short, MAX_LONG_SIDE, 1, 1, cfg.top_k, cfg.assignment == "hard")
    seg = make_segmenter(model, class_names, templates_of(cfg.templates, "evaluate.templates"), settings)
    seg.encode = ReuseLastForward(seg.encode)  # the prediction's forward serves the group maps too
    pred = seg.predict(image[None], bg_thresh)[0]
    groups = stage_group_maps(seg, image)
    names = ["background", *class_names]
    png = segmentation_figure(image, pred, names, None, groups, title=title) if picture else b""
    return ImageSegmentation(pred, names, png, seg, groups)
