"""Training augmentation with PIL, numpy and torch (no torchvision, which does not import beside torch 2.13 CPU).

The reference (timm `create_transform(224, is_training, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
re_mode='pixel', interpolation='bilinear')`): RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)) -> horizontal flip
0.5 -> RandAugment (2 ops, magnitude 9, std 0.5, increasing) -> ImageNet normalisation -> random erasing (per-pixel
normal noise) with probability 0.25. Colour jitter is not applied (timm skips it when auto-augment is on).
Here RandomResizedCrop and flip are always on; RandAugment and random erasing are switches (`DataConfig`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """Crop a random area fraction `scale` with aspect ratio `ratio` (log-uniform), resized to size x size (bilinear).

    Ten tries as in the usual implementation, then a central crop clamped to the allowed ratio.
    """
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    # One resampling step straight from the crop box (no intermediate crop copy).
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() < 0.5 else v


# RandAugment ops ("inc" variants: stronger with magnitude). Each takes (img, level in [0, 10], rng).
def _shear(axis: int):
    def op(img, level, rng):
        s = _signed(level / _MAX_LEVEL * 0.3, rng)
        coeffs = (1, s, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=_FILL)
    return op


def _translate(axis: int):
    def op(img, level, rng):
        t = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[axis]
        coeffs = (1, 0, t, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, t)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=_FILL)
    return op


def _enhance(cls):
    def op(img, level, rng):
        return cls(img).enhance(1.0 + _signed(level / _MAX_LEVEL * 0.9, rng))
    return op


RAND_AUGMENT_OPS = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": lambda img, level, rng: img.rotate(_signed(level / _MAX_LEVEL * 30, rng), Image.BILINEAR,
                                                 fillcolor=_FILL),
    "PosterizeIncreasing": lambda img, level, rng: ImageOps.posterize(img, max(1, 4 - int(level / _MAX_LEVEL * 4))),
    "SolarizeIncreasing": lambda img, level, rng: ImageOps.solarize(img, 256 - int(level / _MAX_LEVEL * 256)),
    "SolarizeAdd": lambda img, level, rng: _solarize_add(img, int(level / _MAX_LEVEL * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5) -> Image.Image:
    """RandAugment: `num_ops` ops drawn uniformly with replacement, level ~ N(magnitude, std) clipped to [0, 10]."""
    names = list(RAND_AUGMENT_OPS)
    for i in rng.integers(len(names), size=num_ops):
        level = magnitude if magnitude_std <= 0 else rng.normal(magnitude, magnitude_std)
        img = RAND_AUGMENT_OPS[names[i]](img, float(np.clip(level, 0.0, _MAX_LEVEL)), rng)
    return img


_SCALE = (1.0 / (255.0 * np.array(IMAGENET_STD, dtype=np.float32)))  # x / 255 - mean) / std = x * scale - offset
_OFFSET = np.array(IMAGENET_MEAN, dtype=np.float32) / np.array(IMAGENET_STD, dtype=np.float32)


def to_normalised_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W], ImageNet-normalised (one fused numpy pass; no torch threads in workers)."""
    x = np.asarray(img, dtype=np.float32) * _SCALE - _OFFSET  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, H, W]


def random_erasing(x: torch.Tensor, rng: np.random.Generator, prob: float = 0.25,
                   scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """With probability `prob`, replace one random rectangle of a normalised [3, H, W] image by N(0, 1) noise."""
    if rng.random() >= prob:
        return x
    _, h, w = x.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            noise = torch.from_numpy(rng.standard_normal((x.shape[0], eh, ew), dtype=np.float32))
            x[:, top:top + eh, left:left + ew] = noise
            break
    return x
