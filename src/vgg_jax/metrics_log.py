"""Where per-epoch records go: a log line, WORKDIR/metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per epoch to metrics.jsonl and writes TensorBoard scalars.

    Only process 0 writes. TensorBoard is skipped with a warning where tensorboardX is
    not installed (it is a dependency; minimal GPU images sometimes lack it).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logger.warning("tensorboardX is not installed: no TensorBoard events")
        else:
            self._tensorboard = SummaryWriter(logdir=workdir, flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "epoch" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(name, value, record["epoch"])
            self._tensorboard.flush()

    def truncate_after(self, epoch: int) -> None:
        """Drops records of epochs after `epoch`: a resumed run redoes those epochs (their
        checkpoint was not complete when the previous run stopped)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
        if len(kept) != len(lines):
            with open(self.path, "w") as f:
                f.writelines(kept)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
