"""Where per-epoch records go: a log line, WORKDIR/metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)
FILENAME = "metrics.jsonl"  # in the workdir


class MetricsLog:
    """Appends one JSON object per epoch to metrics.jsonl and writes TensorBoard scalars
    (skipped with a warning where minimal GPU images lack tensorboardX)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, FILENAME)
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        try:
            SummaryWriter = _import_summary_writer()
        except ImportError:
            logger.warning("tensorboardX is not installed: no TensorBoard events")
        else:
            self._tensorboard = SummaryWriter(logdir=workdir, flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(to_json(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "epoch" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(name, value, record["epoch"])
            self._tensorboard.flush()

    def truncate_after(self, epoch: int) -> None:
        """Drops records of epochs after `epoch` (a resumed run redoes them) and lines that
        are not whole records (cut short by a crash)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        entries = _read_records(self.path)
        kept = [line for line, record in entries if record and record["epoch"] <= epoch]
        if len(kept) != len(entries):
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def to_json(record: dict[str, Any]) -> str:
    """One JSON line; NaN and infinities (not JSON) are written as null."""
    clean = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
    return json.dumps(clean, allow_nan=False)


def _read_records(path: str) -> list[tuple[str | bytes, dict[str, Any] | None]]:
    """Each non-blank line of `path` and its record, or None (with a warning) for a line
    not UTF-8 (it stays bytes), not JSON or without a whole-number epoch."""
    with open(path, "rb") as f:
        lines = [line for line in f if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            line = line.decode("utf-8")
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            record = None
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            logger.warning(
                "%s line %d is not a whole record: dropped (%r)", path, number, line[:80]
            )
            record = None
        entries.append((line, record))
    return entries


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The whole records of WORKDIR/metrics.jsonl, in order."""
    return [record for _, record in _read_records(os.path.join(workdir, FILENAME)) if record]


def _import_summary_writer():
    """tensorboardX's SummaryWriter, without its import of torch wherever torch is
    installed (only to accept torch tensors, never passed here): seconds and hundreds of
    MB in every training process."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
