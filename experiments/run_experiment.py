"""Run a config (optionally under a wall-clock budget) and write its learning curve.

  python experiments/run_experiment.py --config=configs/vgg16_fast.py \
      --workdir=/tmp/fast --budget_minutes=40 -- --config.width=0.25

Everything after `--` goes to `python -m vgg_jax.main` unchanged. At the budget the run
is stopped with SIGTERM (it saves a checkpoint and exits cleanly; rerunning the same
command resumes it). Writes WORKDIR/curve.csv: epoch, cumulative training seconds
(the sum of epoch_seconds, compilation included), test accuracy, and the flip-TTA
accuracy where the run reports it.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time

from vgg_jax.metrics_log import read_metrics


def run_with_budget(command: list[str], budget_seconds: float | None) -> int:
    """Runs `command`; SIGTERM at the budget; returns its exit status."""
    process = subprocess.Popen(command)
    try:
        process.wait(timeout=budget_seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait()
    return process.returncode


def write_curve(workdir: str) -> str:
    """WORKDIR/metrics.jsonl -> WORKDIR/curve.csv; returns the csv path."""
    path = os.path.join(workdir, "curve.csv")
    elapsed = 0.0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "seconds", "test_accuracy", "test_accuracy_flip_tta"])
        for record in read_metrics(workdir):
            elapsed += record["epoch_seconds"]
            tta = record.get("test_accuracy_flip_tta", "")
            writer.writerow([record["epoch"], round(elapsed, 1), record["test_accuracy"], tta])
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--budget_minutes", type=float, default=None)
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    command = [
        sys.executable,
        "-m",
        "vgg_jax.main",
        f"--config={args.config}",
        f"--workdir={args.workdir}",
        "--config.progress_bar=False",
        *overrides,
    ]
    start = time.time()
    budget = None if args.budget_minutes is None else args.budget_minutes * 60
    status = run_with_budget(command, budget)
    curve = write_curve(args.workdir)
    print(f"exit status {status} after {time.time() - start:.0f} s; curve: {curve}")
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
