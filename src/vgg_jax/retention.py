"""Which checkpoint steps a trainer's manager keeps: the latest ones (orbax's LatestN)
and the best by test accuracy (below)."""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any

from orbax.checkpoint import checkpoint_managers


def accuracy_of(metrics: dict[str, Any]) -> float:
    return metrics["test_accuracy"]


@dataclasses.dataclass
class BestTestAccuracy:
    """Orbax's BestN(n=1) by test accuracy. Steps without orbax's metrics (written by an
    older version) are ranked by the accuracy in their meta item, so that the best of an
    old run is not dropped at its first resume."""

    directory: str

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        filled = []  # orbax's PolicyCheckpointInfo is a protocol: step, time, metrics
        for info in checkpoints:
            metrics = self._stored(info.step) if info.metrics is None else info.metrics
            filled.append(types.SimpleNamespace(step=info.step, time=info.time, metrics=metrics))
        best = checkpoint_managers.BestN(
            get_metric_fn=accuracy_of, n=1, keep_checkpoints_without_metrics=False
        )
        return best.should_preserve(filled, context=context)

    def _stored(self, step: int) -> dict[str, float] | None:
        try:
            with open(os.path.join(self.directory, str(step), "meta", "metadata")) as f:
                accuracy = json.load(f).get("test_accuracy")
        except (OSError, ValueError, AttributeError):
            return None
        return None if accuracy is None else {"test_accuracy": float(accuracy)}
