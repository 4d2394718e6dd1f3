"""Learnability check of the synthetic world: CPU-seconds for a small supervised probe to classify the categories.

A world is only useful if its categories can be seen quickly: the first design (random colours per shape) could not
be learnt even by a supervised linear head in 8 CPU minutes. Two probes are trained side by side, each on one
thread, to multi-label classify which categories an image holds (binary cross-entropy over the categories):

- `patch-mlp`: the view a patch-8 ViT starts from: every 8x8 patch -> linear -> GELU, max over patches, linear.
- `tiny-cnn`:  three 3x3 conv layers (16, 32, 64 channels) with pooling, global max, linear.

Printed per probe: CPU-seconds (process time, one thread) and steps until the held-out *exact-match* accuracy (every
category of an image right) first reaches the target, and the final exact-match and per-label accuracy. Also printed:
the patch-grid mIoU ceiling of the held-out images (every 8x8 patch labelled with its true majority class, scored
against the VOC-style masks with their ignore band), the best any patch-level segmentation at this size can reach.

    .venv/bin/python benchmarks/synth_probe.py [--size 64] [--train 4000] [--test 500] [--budget 240] [--quick]

Figures: benchmarks/results/synth_probe.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _results import Run, parse_args
from torch import nn

from groupvit.synth import CaptionStyle, WorldSpec, generate, ignore_borders


def make_data(spec: WorldSpec, n: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Normalised images [N, 3, S, S], multi-hot targets [N, categories] and label maps [N, S, S]."""
    images, targets, labels = [], [], []
    for i in range(n):
        scene, _ = generate(spec, CaptionStyle(), seed, split, i)
        images.append(scene.image)
        labels.append(scene.label)
        target = np.zeros(len(spec.categories), np.float32)
        target[[c - 1 for c in scene.class_indices()]] = 1
        targets.append(target)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
    return x, torch.from_numpy(np.stack(targets)), np.stack(labels)


def patch_ceiling(labels: np.ndarray, classes: int, patch: int = 8) -> float:
    """mIoU (%) of labelling every patch with its true majority class, against masks with the 255 border band."""
    n, size, _ = labels.shape
    g = size // patch
    blocks = labels[:, :g * patch, :g * patch].reshape(n, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
    votes = np.stack([(blocks == c).sum((-1, -2)) for c in range(classes)], -1)  # [N, g, g, classes]
    pred = np.repeat(np.repeat(votes.argmax(-1), patch, 1), patch, 2)  # [N, g*patch, g*patch]
    truth = np.stack([ignore_borders(m, 1) for m in labels])[:, :g * patch, :g * patch]
    valid = truth != 255
    ious = [((pred == c) & (truth == c) & valid).sum() / max((((pred == c) | (truth == c)) & valid).sum(), 1)
            for c in range(classes)]
    return 100 * float(np.mean(ious))


class PatchMLP(nn.Module):
    def __init__(self, classes: int, patch: int = 8, width: int = 96):
        super().__init__()
        self.embed = nn.Conv2d(3, width, patch, stride=patch)  # a ViT patch embedding
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = nn.functional.gelu(self.embed(x)).flatten(2)  # [B, C, N]
        return self.head(feats.amax(-1))


def tiny_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(64, classes))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    pred = (model(x) > 0).float()
    return (pred == y).all(1).float().mean().item(), (pred == y).float().mean().item()


def run(name: str, model: nn.Module, train: tuple, test: tuple, target: float, budget: float, seed: int) -> dict:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    start, step, reached = time.process_time(), 0, None
    exact = per_label = 0.0
    while time.process_time() - start < budget:
        for idx in torch.randperm(len(x), generator=gen).split(128):
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 25 == 0:
                exact, per_label = accuracy(model, *test)
                if reached is None and exact >= target:
                    reached = (time.process_time() - start, step)
            if reached is not None or time.process_time() - start >= budget:
                break
        if reached is not None:
            break
    exact, per_label = accuracy(model, *test)
    return {"probe": name, "params": sum(p.numel() for p in model.parameters()), "reached": reached,
            "steps": step, "exact": exact, "per_label": per_label}


QUICK = {"train": 300, "test": 100, "budget": 5.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--target", type=float, default=0.9, help="exact-match accuracy to reach")
    p.add_argument("--budget", type=float, default=240.0, help="CPU-seconds per probe")
    p.add_argument("--seed", type=int, default=0)
    args = parse_args(p, QUICK)
    run_record = Run("synth_probe", args)
    torch.set_num_threads(1)
    spec = WorldSpec(image_size=args.size)
    t = time.perf_counter()
    train = make_data(spec, args.train, "train", args.seed)
    test = make_data(spec, args.test, "test", args.seed)
    categories = train[1].sum(1).mean()
    print(f"world: {args.size} px, {len(spec.categories)} categories, {categories:.2f} categories per "
          f"image; {args.train} train / {args.test} held-out images generated in {time.perf_counter() - t:.1f} s")
    ceiling = patch_ceiling(test[2], len(spec.categories) + 1)
    print(f"patch-8 mIoU ceiling of the held-out images: {ceiling:.1f}")
    train, test = train[:2], test[:2]
    always_absent = 1.0 - test[1].mean().item()
    absent_exact = float((test[1].sum(1) == 0).float().mean())
    print(f"baseline (predict 'absent' everywhere): exact {absent_exact:.3f}, per-label {always_absent:.3f}")
    rows = [{"probe": "predict 'absent' everywhere", "exact": absent_exact, "per_label": always_absent}]
    print(f"{'probe':<10} {'params':>7} {'CPU-s to ' + format(args.target, '.0%'):>12} {'steps':>6} "
          f"{'exact':>6} {'per-label':>9}")
    for name, model in (("patch-mlp", PatchMLP(len(spec.categories))), ("tiny-cnn", tiny_cnn(len(spec.categories)))):
        r = run(name, model, train, test, args.target, args.budget, args.seed)
        cpu = f"{r['reached'][0]:.1f}" if r["reached"] else f"> {args.budget:.0f}"
        print(f"{name:<10} {r['params']:>7} {cpu:>12} {r['steps']:>6} {r['exact']:>6.3f} {r['per_label']:>9.3f}")
        rows.append({"probe": name, "params": r["params"], "cpu_s_to_target": r["reached"][0] if r["reached"] else None,
                     "steps": r["steps"], "exact": r["exact"], "per_label": r["per_label"]})
    run_record.write(rows, {"patch_ceiling_miou": ceiling, "categories_per_image": float(categories),
                            "target_exact": args.target, "budget_cpu_s": args.budget})


if __name__ == "__main__":
    main()
