"""The reference zero-shot segmentation algorithm on constructed assignment maps and embeddings."""
import math

import pytest
import torch
import torch.nn.functional as F

from groupvit.evaluation.segmentation import (
    SegmentationSettings,
    Segmenter,
    assignment_maps,
    class_affinity,
    group_index,
    pixel_scores,
    resize_short_side,
    segment_crops,
    slide_windows,
    stage_group_maps,
    with_background,
)

CAT, DOG, SKY = torch.eye(3)  # class embeddings: cat, dog, sky (background excluded); class index = 1 + row


def two_column_outputs(right_group: torch.Tensor, image: torch.Tensor) -> dict:
    """A 2x2 patch grid; stage 1 puts the left column in group 0 and the right column in group 1 (soft, 0.9/0.1);
    stage 2 keeps the two groups. Group 0 is a cat; group 1's embedding is `right_group`."""
    a1 = torch.tensor([[0.9, 0.1, 0.9, 0.1],
                       [0.1, 0.9, 0.1, 0.9]])[None]  # [B=1, G_1=2, N_0=4], softmax over groups: columns sum to 1
    a2 = torch.tensor([[0.8, 0.3], [0.2, 0.7]])[None]  # [1, G_2=2, G_1=2]
    groups = torch.stack([CAT, F.normalize(right_group, dim=0)])[None]  # [1, 2, 3]
    return {"image": F.normalize(image, dim=0)[None], "groups": groups, "soft_maps": [a1, a2], "grid": (2, 2)}


def segment(outputs: dict, bg_thresh: float, top_k: int = 5, hard: bool = True, size=(4, 4)) -> torch.Tensor:
    text = torch.stack([CAT, DOG, SKY])
    crop = segment_crops(lambda _: outputs, torch.zeros(1, 3, *size), text, logit_scale=10.0, top_k=top_k,
                         hard=hard)
    return with_background(crop.scores, crop.max_affinity.clamp(max=bg_thresh)).argmax(dim=1)[0]


def halves(left: int, right: int) -> torch.Tensor:
    expected = torch.full((4, 4), right)
    expected[:, :2] = left
    return expected


def test_assignment_is_product_of_stage_maps():
    a1 = torch.rand(2, 5, 12).softmax(dim=1)
    a2 = torch.rand(2, 3, 5).softmax(dim=1)
    a = assignment_maps([a1, a2])
    assert a.shape == (2, 12, 3)
    assert torch.allclose(a, torch.einsum("bgn,bhg->bnh", a1, a2))
    assert torch.allclose(a.sum(dim=-1), torch.ones(2, 12))  # still a distribution over final groups
    assert assignment_maps([]) is None


def test_confident_groups_give_expected_mask():
    out = two_column_outputs(right_group=DOG, image=CAT + DOG)
    assert torch.equal(segment(out, bg_thresh=0.95), halves(1, 2))


def test_background_threshold():
    # The right group is torn between dog and sky: its best affinity (about 0.3) is under 0.95 -> background; a
    # threshold of 0.2 keeps it as dog, the slightly closer class.
    out = two_column_outputs(right_group=DOG + 0.9 * SKY, image=CAT + DOG + SKY)
    assert torch.equal(segment(out, bg_thresh=0.95), halves(1, 0))
    assert torch.equal(segment(out, bg_thresh=0.2), halves(1, 2))


def test_threshold_never_exceeds_best_affinity():
    # Both groups are weak; min(thr, best affinity) keeps the best group as foreground instead of all background.
    out = two_column_outputs(right_group=DOG + 0.9 * SKY, image=CAT + DOG + SKY)
    # Left group: cat + 0.95 sky (best affinity about 0.35); right group: dog + 0.9 sky (about 0.46, the best).
    out["groups"][0, 0] = F.normalize(CAT + 0.95 * SKY, dim=0)
    assert torch.equal(segment(out, bg_thresh=0.95), halves(0, 2))


def test_topk_class_filter_uses_whole_image_embedding():
    # The image looks like cat + sky: with top-2, dog is filtered out and the right group falls back to sky.
    out = two_column_outputs(right_group=DOG + 0.9 * SKY, image=CAT + SKY)
    assert torch.equal(segment(out, bg_thresh=0.2, top_k=3), halves(1, 2))
    assert torch.equal(segment(out, bg_thresh=0.2, top_k=2), halves(1, 3))


def test_background_prompts_become_background():
    # A fourth text row names a kind of background ("grass"); the right group matches it and turns background even
    # at a low threshold, while the cat stays. Without the switch grass would be an ordinary class (index 4).
    grass = torch.tensor([0.0, 0.0, 0.0, 1.0])
    out = two_column_outputs(right_group=DOG, image=CAT)
    out["groups"] = torch.stack([torch.cat([CAT, torch.zeros(1)]), grass])[None]
    out["image"] = F.normalize(torch.tensor([1.0, 0.0, 0.0, 1.0]), dim=0)[None]
    text = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)
    text = torch.cat([text, grass[None]])
    settings = SegmentationSettings(mode="whole", short_side=0)
    plain = Segmenter(lambda _: out, text, 10.0, settings, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(plain.predict(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 0.2)[0], halves(1, 4))
    seg = Segmenter(lambda _: out, text, 10.0, settings, mean=(0, 0, 0), std=(1, 1, 1), background_prompts=1)
    logits, _ = seg.logits(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [0.2])
    assert logits[0].shape == (1, 4, 4, 4)  # background + 3 classes: the prompt folded into background
    assert torch.equal(logits[0].argmax(dim=1)[0], halves(1, 0))


def test_class_affinity_formula():
    torch.manual_seed(0)
    groups = F.normalize(torch.randn(2, 4, 8), dim=-1)
    image = F.normalize(torch.randn(2, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    aff = class_affinity(groups, image, text, 20.0, top_k=2)
    for b in range(2):
        keep = (20.0 * image[b] @ text.t()).topk(2).indices
        for g in range(4):
            logits = 20.0 * groups[b, g] @ text.t()
            masked = torch.full_like(logits, -math.inf)
            masked[keep] = logits[keep]
            assert torch.allclose(aff[b, g], masked.softmax(0) * logits.softmax(0), atol=1e-6)
    assert (aff[:, :, :].gt(0).sum(dim=-1) == 2).all()  # only the kept classes score


def test_soft_maps_are_upsampled_mixture():
    torch.manual_seed(1)
    a = torch.rand(2, 12, 3).softmax(dim=-1)  # [B, N_0 = 3 x 4, G]
    aff = torch.rand(2, 3, 5)
    scores = pixel_scores(a, aff, (3, 4), (9, 16), hard=False)
    maps = F.interpolate(a.transpose(1, 2).reshape(2, 3, 3, 4), size=(9, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(scores, torch.einsum("bghw,bgc->bchw", maps, aff), atol=1e-6)


def test_hard_maps_take_argmax_group():
    torch.manual_seed(2)
    a = torch.rand(1, 12, 3).softmax(dim=-1)
    aff = torch.rand(1, 3, 5)
    idx = group_index(a, (3, 4), (9, 16))[0]
    scores = pixel_scores(a, aff, (3, 4), (9, 16), hard=True)[0]
    assert torch.equal(scores, aff[0][idx].permute(2, 0, 1))


@pytest.mark.parametrize("grid, size", [((4, 4), (32, 32)), ((3, 5), (17, 23)), ((2, 2), (64, 48))])
def test_pixelwise_fast_path_matches_identity_maps(grid, size):
    # The plain-ViT baseline has no soft maps: each patch is a group. The fast path (nearest-exact index of the
    # patch grid) equals the reference algorithm with explicit identity assignment maps.
    n = grid[0] * grid[1]
    aff = torch.rand(2, n, 4)
    fast = pixel_scores(None, aff, grid, size, hard=True)
    plain = pixel_scores(torch.eye(n).expand(2, n, n), aff, grid, size, hard=True)
    assert torch.equal(fast, plain)
    soft = pixel_scores(None, aff, grid, size, hard=False)
    assert torch.allclose(soft, pixel_scores(torch.eye(n).expand(2, n, n), aff, grid, size, hard=False))


def test_slide_windows_cover_image_like_mmseg():
    boxes = slide_windows(448, 600, crop=448, stride=224)
    assert boxes == [(0, 448, 0, 448), (0, 448, 152, 600)]
    boxes = slide_windows(700, 500, crop=448, stride=224)
    covered = torch.zeros(700, 500)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (448, 448)
        covered[y1:y2, x1:x2] = 1
    assert covered.all() and len(boxes) == 6
    assert slide_windows(100, 80, crop=448, stride=224) == [(0, 100, 0, 80)]  # smaller than a crop: one window


def test_resize_short_side_keeps_ratio_and_caps_long_side():
    x = torch.rand(1, 3, 375, 500)
    assert resize_short_side(x, 448, 2048).shape[-2:] == (448, 597)
    assert resize_short_side(x, 448, 500).shape[-2:] == (375, 500)  # long side cap wins
    assert resize_short_side(x, 0, 2048) is x


def colour_encoder(patch: int = 4):
    """A stand-in model: each patch's embedding is its mean colour (a pixel-wise model without grouping)."""
    def encode(pixels):
        b, _, h, w = pixels.shape
        cells = F.avg_pool2d(pixels, patch)  # [B, 3, h/p, w/p]
        groups = F.normalize(cells.flatten(2).transpose(1, 2) + 2.0, dim=-1)  # [B, N, 3], offset undoes the mean
        return {"image": F.normalize(groups.mean(dim=1), dim=-1), "groups": groups, "soft_maps": [],
                "grid": (h // patch, w // patch)}
    return encode


def colour_segmenter(mode: str, **kw) -> Segmenter:
    text = F.normalize(torch.eye(3) + 2.0, dim=-1)  # red, green, blue as the stand-in encodes them
    settings = SegmentationSettings(mode=mode, short_side=kw.pop("short_side", 0), crop=kw.pop("crop", 16),
                                    stride=kw.pop("stride", 8), **kw)
    return Segmenter(colour_encoder(), text, 50.0, settings, mean=(0, 0, 0), std=(1, 1, 1))


def two_colour_image(h=24, w=40) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(1, 3, h, w, dtype=torch.uint8)
    image[0, 0, :, : w // 2] = 255  # red left
    image[0, 1, :, w // 2:] = 255  # green right
    expected = torch.full((1, h, w), 2)
    expected[..., : w // 2] = 1
    return image, expected


def test_segmenter_whole_and_slide_on_patch_local_model():
    image, expected = two_colour_image()
    whole = colour_segmenter("whole").predict(image, bg_thresh=0.3)
    slide = colour_segmenter("slide").predict(image, bg_thresh=0.3)
    assert torch.equal(whole, expected)
    assert torch.equal(slide, expected)
    # an upscale before the model, then back to the original size
    assert torch.equal(colour_segmenter("whole", short_side=48).predict(image, bg_thresh=0.3), expected)


def test_threshold_sweep_equals_separate_predictions():
    image, _ = two_colour_image()
    image[0, :, :8, :8] = 128  # a grey patch: weak for every class
    seg = colour_segmenter("slide")
    sweep, _ = seg.logits(image, [0.2, 0.5, 0.99])
    for t, lg in zip([0.2, 0.5, 0.99], sweep, strict=True):
        assert torch.equal(lg.argmax(dim=1), seg.predict(image, t))


def test_group_maps_per_stage():
    out = two_column_outputs(right_group=DOG, image=CAT)
    seg = Segmenter(lambda _: out, torch.stack([CAT, DOG, SKY]), 10.0, SegmentationSettings(mode="whole",
                    short_side=0), mean=(0, 0, 0), std=(1, 1, 1))
    maps = stage_group_maps(seg, torch.zeros(3, 4, 4, dtype=torch.uint8))
    assert len(maps) == 2
    assert torch.equal(maps[0], halves(0, 1)) and torch.equal(maps[1], halves(0, 1))


def test_dataset_loop_counts_the_groups_each_image_uses():
    from groupvit.evaluation.datasets import Sample
    from groupvit.evaluation.runner import evaluate_segmentation

    image, expected = two_colour_image()  # 24 x 40 px: 6 x 10 patches of the stand-in, each its own group

    class TwoImages:
        class_names, num_classes = ["background", "red", "green", "blue"], 4

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Sample(str(i), image[0], expected[0])

    run = evaluate_segmentation(colour_segmenter("whole"), TwoImages(), [0.3], batch_size=2)
    assert run.groups_per_image == 60.0 and run.scores[0.3].miou > 0
    assert evaluate_segmentation(colour_segmenter("slide"), TwoImages(), [0.3]).groups_per_image is None


# ---- the size limits every caller shares (inference_size) ---------------------------------------------------------

def test_inference_size_keeps_reference_sizes_and_caps_the_rest():
    from groupvit.evaluation.segmentation import MAX_LONG_SIDE, MAX_PIXELS, inference_size

    # what the reference computes (mmseg keep-ratio resize) is unchanged wherever it stays inside the limits
    for (h, w), short, long in [((375, 500), 448, 2048), ((500, 90), 448, 2048), ((64, 64), 128, 2048),
                                ((32, 32), 0, 2048), ((281, 500), 448, 500)]:
        scale = min(short / min(h, w), long / max(h, w)) if short else 1.0
        assert inference_size(h, w, short, long) == (int(h * scale + 0.5), int(w * scale + 0.5))
    # a long strip: 64 x 4000 at short side 448 would be 448 x 28000 px; the long side is capped
    h, w = inference_size(64, 4000, 448, 10 ** 6)
    assert w <= MAX_LONG_SIDE and h * w <= MAX_PIXELS and abs(w / h - 4000 / 64) < 1
    # a big square at a big short side: the pixel count is capped
    h, w = inference_size(3000, 3000, 3000, 10 ** 6)
    assert (h, w) == (2048, 2048) and h * w <= MAX_PIXELS


def test_extreme_aspect_ratio_is_refused_with_the_limit_named():
    from groupvit.evaluation.segmentation import ImageSizeError, inference_size

    with pytest.raises(ImageSizeError, match=r"strip\.png: 1 x 20000 px \(height x width\) has an aspect ratio of "
                                             r"20000:1, over the limit of 64:1"):
        inference_size(1, 20000, 448, 10 ** 6, "strip.png")
    with pytest.raises(ImageSizeError, match="125:1, over the limit of 64:1"):  # classification resizes too
        from groupvit.evaluation.runner import classification_pixels
        classification_pixels(torch.zeros(1, 3, 8, 1000, dtype=torch.uint8), 256, 224, (0, 0, 0), (1, 1, 1))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_segmenter_never_hands_the_encoder_more_than_the_limits(mode):
    max_long_side, max_pixels = 4096, 2048 * 2048  # the documented limits (MAX_LONG_SIDE, MAX_PIXELS)
    seen = []
    colour = colour_encoder()

    def encode(pixels):
        seen.append(tuple(pixels.shape[-2:]) * pixels.shape[0])  # one (h, w) per crop of the batch
        return colour(pixels)

    # 40 x 2000 px at short side 448 and no long-side cap: 448 x 22400 px (10 M) without the limits
    settings = SegmentationSettings(mode=mode, short_side=448, long_side=10 ** 6, crop=448, stride=448)
    seg = Segmenter(encode, F.normalize(torch.eye(3) + 2.0, dim=-1), 50.0, settings, mean=(0, 0, 0), std=(1, 1, 1))
    image = torch.zeros(1, 3, 40, 2000, dtype=torch.uint8)
    pred = seg.predict(image, bg_thresh=0.3)
    assert pred.shape == (1, 40, 2000)  # back at the original size
    crops = [s[i:i + 2] for s in seen for i in range(0, len(s), 2)]
    assert crops and all(max(c) <= max_long_side and c[0] * c[1] <= max_pixels for c in crops)
    assert sum(c[0] * c[1] for c in crops) <= max_pixels  # the windows cover the capped image only


def test_image_over_pils_pixel_limit_is_a_named_error(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from groupvit.errors import DataError
    from groupvit.evaluation.datasets import read_image

    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice its limit (a "bomb")
    with pytest.raises(DataError, match=r"big\.png: not a readable image \(Image size \(400 pixels\) exceeds"):
        read_image(tmp_path / "big.png")
