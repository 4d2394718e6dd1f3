"""mIoU from the accumulated confusion matrix equals a brute-force count; diagnostics on constructed cases."""
import math

import numpy as np
import pytest
import torch

from groupvit.errors import DataError
from groupvit.evaluation.classification import ClassificationAccuracy, class_embeddings, templates_of, topk_correct
from groupvit.evaluation.diagnostics import mean_pairwise_cosine, oracle_labels
from groupvit.evaluation.metrics import ConfusionMatrix, all_background_miou


def brute_force(preds, targets, num_classes, ignore=255):
    """Per-class IoU by counting pixels with plain loops over the whole dataset (NaN when a class never occurs)."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, t in zip(preds, targets, strict=True):
            for pv, tv in zip(p.ravel().tolist(), t.ravel().tolist(), strict=True):
                if tv == ignore:
                    continue
                inter += (pv == c and tv == c)
                union += (pv == c or tv == c)
        ious.append(inter / union if union else math.nan)
    correct = sum(int(((p == t) & (t != ignore)).sum()) for p, t in zip(preds, targets, strict=True))
    valid = sum(int((t != ignore).sum()) for t in targets)
    return ious, correct / valid


def test_miou_equals_brute_force_on_random_masks_with_ignore():
    rng = np.random.default_rng(0)
    n = 6
    preds, targets = [], []
    for shape in [(7, 9), (5, 5), (11, 4)]:
        t = rng.integers(0, n - 1, size=shape)  # class 5 never occurs in the ground truth...
        t[rng.random(shape) < 0.2] = 255
        p = rng.integers(0, n - 2, size=shape)  # ...nor in the predictions: no IoU, excluded from the mean
        preds.append(p)
        targets.append(t)
    cm = ConfusionMatrix(n)
    for p, t in zip(preds, targets, strict=True):
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    scores = cm.result([f"c{i}" for i in range(n)])
    ious, acc = brute_force(preds, targets, n)
    assert math.isnan(scores.iou["c5"]) and math.isnan(ious[5])
    for i in range(n - 1):
        assert abs(scores.iou[f"c{i}"] - ious[i]) < 1e-12
    assert abs(scores.miou - np.nanmean(ious)) < 1e-12
    assert abs(scores.pixel_accuracy - acc) < 1e-12
    assert scores.as_dict()["miou"] == round(100 * np.nanmean(ious), 4)


def test_perfect_and_all_background_predictions():
    t = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    cm = ConfusionMatrix(3)
    cm.update(t.clone(), t)
    assert cm.result().miou == 1.0
    bg = ConfusionMatrix(3)
    bg.update(torch.zeros_like(t), t)
    r = bg.result(["background", "a", "b"])
    assert r.iou == {"background": 3 / 7, "a": 0.0, "b": 0.0}  # 3 bg pixels of 7 valid ones, all predicted bg
    assert abs(r.miou - (3 / 7) / 3) < 1e-12


def test_all_background_miou_from_the_ground_truth_totals_of_any_prediction():
    # rows = ground truth: 6 background pixels, 3 of class 1, none of class 2, 1 of class 3; columns do not matter
    counts = torch.tensor([[4, 2, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    assert all_background_miou(counts) == pytest.approx((6 / 10 + 0 + 0) / 3)  # class 2 absent: not in the mean
    # the same as scoring an all-background prediction with the confusion matrix
    t = torch.tensor([0] * 6 + [1] * 3 + [3])
    cm = ConfusionMatrix(4)
    cm.update(torch.zeros_like(t), t)
    assert all_background_miou(counts) == pytest.approx(cm.result().miou)
    assert all_background_miou(torch.tensor([[0, 0], [2, 3]])) == 0.0  # no background: 0 for it and for class 1


def test_oracle_labels_groups_by_majority():
    groups = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    target = torch.tensor([[2, 2, 1, 0], [2, 255, 1, 1]])
    assert torch.equal(oracle_labels(groups, target, 3), torch.tensor([[2, 2, 1, 1], [2, 2, 1, 1]]))
    # a batch [B, H, W] with group ids offset per image gives the same as each image alone
    batch_groups = torch.stack([groups, groups + 2])
    batch_target = torch.stack([target, torch.full_like(target, 1)])
    out = oracle_labels(batch_groups, batch_target, 3)
    assert torch.equal(out[0], oracle_labels(groups, target, 3)) and (out[1] == 1).all()


def test_mean_pairwise_cosine():
    assert abs(mean_pairwise_cosine(torch.eye(4))) < 1e-7
    assert abs(mean_pairwise_cosine(torch.ones(3, 5)) - 1.0) < 1e-6  # collapsed prompts
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert abs(mean_pairwise_cosine(e) - 2 ** -0.5) < 1e-6


def test_class_embeddings_mean_of_unnormalised_templates():
    table = {"a photo of a cat.": [3.0, 0.0], "art of the cat.": [0.0, 1.0],
             "a photo of a dog.": [0.0, 2.0], "art of the dog.": [0.0, 5.0]}
    texts = []

    def tokenize(batch):
        texts.extend(batch)
        return torch.arange(len(batch))

    emb = class_embeddings(lambda tok: torch.tensor([table[texts[i]] for i in tok]), tokenize, ["cat", "dog"],
                           ["a photo of a {}.", "art of the {}."])
    # cat: mean of (3, 0) and (0, 1) = (1.5, 0.5), then normalised (not the mean of normalised vectors)
    assert torch.allclose(emb[0], torch.tensor([1.5, 0.5]) / math.hypot(1.5, 0.5))
    assert torch.allclose(emb[1], torch.tensor([0.0, 1.0]))


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 1, 2])
    assert topk_correct(logits, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    acc = ClassificationAccuracy(torch.eye(3))
    acc.update(logits, labels)
    assert acc.result()["top1"] == 100 / 3 and acc.result()["top5"] == 100.0


def test_templates_of_one_template_a_file_or_a_resource(tmp_path):
    assert templates_of("a photo of a {}.") == ["a photo of a {}."]
    f = tmp_path / "mine.txt"
    f.write_text("a {}.\n\n  itap of a {}.  \n")
    assert templates_of(str(f)) == ["a {}.", "itap of a {}."]  # stripped, blank lines dropped
    assert len(templates_of("imagenet_templates_subset_7.txt")) == 7
    assert all("{}" in t for t in templates_of("imagenet_templates_80.txt"))


@pytest.mark.parametrize("value, message", [
    ("a photo of a cat.", "'a photo of a cat.' has none"),
    ("none_such_templates.txt", "none_such_templates.txt: no such template file"),
    ("EMPTY", "the file is empty"),
    ("NOBRACES", "'art of the thing.' has none"),
])
def test_templates_of_names_the_key_and_the_problem(tmp_path, value, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "nobraces.txt").write_text("a {}.\nart of the thing.\n")
    value = {"EMPTY": str(tmp_path / "empty.txt"), "NOBRACES": str(tmp_path / "nobraces.txt")}.get(value, value)
    with pytest.raises(DataError, match=f"^evaluate.templates: .*{message}"):
        templates_of(value, "evaluate.templates")
