"""Class text embeddings and zero-shot classification (reference: mean of unnormalised projected template
embeddings, then L2-normalise; score = normalised image embedding . class embedding, top-1 / top-5)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from groupvit.errors import DataError
from groupvit.evaluation.datasets import read_lines, resource_lines

SEGMENTATION_TEMPLATE = "a photo of a {}."


def templates_of(value: str, where: str = "templates") -> list[str]:
    """Prompt templates: `value` itself, or the lines of a `.txt` file (or of a resource in `groupvit/resources/`).

    Args:
        value: one template with `{}` for the class name, or a `.txt` file/resource name with one per line.
        where: the params key it came from, for the error message.

    Raises:
        DataError: the `.txt` is neither a file nor a resource, is empty, or a template lacks `{}`.
    """
    if not value.endswith(".txt"):
        templates = [value]
    else:
        try:
            templates = read_lines(Path(value)) if Path(value).is_file() else resource_lines(value)
        except FileNotFoundError:
            raise DataError(f"{where}: {value}: no such template file (nor a resource in groupvit/resources)") from None
    without = [t for t in templates if "{}" not in t]
    if not templates or without:
        found = f"{without[0]!r} has none" if without else "the file is empty"
        raise DataError(f"{where}: {value}: expected prompt templates with '{{}}' for the class name; {found}")
    return templates


@torch.no_grad()
def class_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor],
                     tokenize: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str] = (SEGMENTATION_TEMPLATE,)) -> torch.Tensor:
    """[C, D] L2-normalised class embeddings, computed once per class list.

    Args:
        encode_text: tokens [N, L] -> projected, unnormalised embeddings [N, D] (`model.encode_text`).
        tokenize: texts -> tokens [N, L].
        class_names: one name per class (background excluded).
        templates: prompt templates with `{}` for the name; several are averaged before normalising.
    """
    if not class_names:
        raise DataError("class list is empty: expected at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise DataError(f"prompt templates {list(templates)!r}: expected at least one, each containing '{{}}'")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = encode_text(tokenize(texts)).float()  # [C * T, D]
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(emb, dim=-1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k scores, for each k (k capped at the class count)."""
    ranked = logits.argsort(dim=-1, descending=True)
    hits = ranked == labels[:, None]  # [B, C]
    return {k: int(hits[:, :min(k, logits.shape[-1])].any(dim=-1).sum()) for k in ks}


class ClassificationAccuracy:
    """Accumulates top-1 / top-5 accuracy of zero-shot classification."""

    def __init__(self, text: torch.Tensor):
        self.text = text  # [C, D] normalised
        self.total = 0
        self.correct = {1: 0, 5: 0}

    def update(self, image_embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """image_embeddings [B, D] (normalised inside), labels [B] class indices."""
        logits = F.normalize(image_embeddings.float(), dim=-1) @ self.text.t()
        for k, n in topk_correct(logits, labels).items():
            self.correct[k] += n
        self.total += labels.numel()

    def result(self) -> dict[str, float]:
        """Accuracies in percent."""
        if self.total == 0:
            return {"top1": float("nan"), "top5": float("nan"), "num_images": 0}
        return {"top1": 100.0 * self.correct[1] / self.total, "top5": 100.0 * self.correct[5] / self.total,
                "num_images": self.total}
