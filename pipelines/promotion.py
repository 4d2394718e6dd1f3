"""Champion/challenger promotion in the MLflow model registry (no Prefect here; the `retrain` flow calls it).

The registry alias `champion` points at the best model version so far. A new version takes the alias only when its
mIoU is strictly higher than the champion's. Each compared version carries its mIoU as the version tag `miou`, so the
comparison never depends on which run or experiment produced the champion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METRIC_TAG = "miou"


@dataclass(frozen=True)
class Decision:
    """What `promote_if_better` decided, and why (shown in the Prefect artifact and logs)."""

    promoted: bool
    model: str
    version: str
    miou: float
    champion_version: str | None
    champion_miou: float | None
    alias: str

    @property
    def reason(self) -> str:
        new = f"{self.model} v{self.version} (mIoU {self.miou:.4f})"
        if self.champion_version is None:
            return f"promoted {new} to @{self.alias}: there was no {self.alias} yet"
        old = f"v{self.champion_version} (mIoU {self._champion_text})"
        if self.champion_version == self.version:
            return f"kept {new} as @{self.alias}: it already is the {self.alias}"
        if self.promoted:
            return f"promoted {new} to @{self.alias}: beats the previous {self.alias} {old}"
        return f"kept @{self.alias} {old}: {new} does not beat it"

    @property
    def _champion_text(self) -> str:
        return "unknown" if self.champion_miou is None else f"{self.champion_miou:.4f}"

    def as_dict(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "model": self.model, "version": self.version, "miou": self.miou,
                "champion_version": self.champion_version, "champion_miou": self.champion_miou, "alias": self.alias,
                "reason": self.reason}


def _champion(client: Any, model: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:  # no such alias (or model) yet
        return None


def promote_if_better(client: Any, model: str, version: str | int, miou: float, alias: str = "champion") -> Decision:
    """Give `alias` to `model` version `version` when `miou` beats the current holder's; record `miou` on it.

    Args:
        client: an `mlflow.MlflowClient` pointing at the registry.
        model: registered model name.
        version: the candidate version.
        miou: the candidate's mIoU (higher is better).
        alias: the registry alias marking the champion.
    """
    version = str(version)
    client.get_model_version(model, version)  # fails clearly when the candidate does not exist
    client.set_model_version_tag(model, version, METRIC_TAG, repr(float(miou)))
    champion = _champion(client, model, alias)
    champion_version = None if champion is None else str(champion.version)
    champion_miou = None
    if champion is not None and METRIC_TAG in (champion.tags or {}):
        champion_miou = float(champion.tags[METRIC_TAG])
    # A champion without a recorded mIoU (aliased by hand) is only replaced by a measured model, never kept blindly.
    better = champion is None or champion_miou is None or miou > champion_miou
    promoted = better and champion_version != version
    if promoted:
        client.set_registered_model_alias(model, alias, version)
    return Decision(promoted, model, version, float(miou), champion_version, champion_miou, alias)
