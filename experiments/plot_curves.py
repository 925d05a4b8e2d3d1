"""Plot test accuracy against epoch and against training time for several runs.

  python experiments/plot_curves.py --out experiments/cifar10_w025.png \
      "seed recipe=/tmp/seed" "fast recipe=/tmp/fast"

Each run is LABEL=WORKDIR with a curve.csv written by run_experiment.py, or else the
metrics.jsonl that training writes. --epochs_only leaves out the time panel (for runs
timed on a shared machine).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(workdir: str) -> dict[str, list[float]]:
    if not os.path.exists(os.path.join(workdir, "curve.csv")):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return {
            "epoch": [r["epoch"] for r in records],
            "minutes": list(itertools.accumulate(r["epoch_seconds"] / 60 for r in records)),
            "accuracy": [100 * r["test_accuracy"] for r in records],
        }
    with open(os.path.join(workdir, "curve.csv")) as f:
        rows = list(csv.DictReader(f))
    return {
        "epoch": [int(r["epoch"]) for r in rows],
        "minutes": [float(r["seconds"]) / 60 for r in rows],
        "accuracy": [100 * float(r["test_accuracy"]) for r in rows],
    }


def plot(runs: dict[str, str], out: str, title: str, epochs_only: bool = False) -> None:
    if epochs_only:
        fig, by_epoch = plt.subplots(figsize=(6.5, 4.2))
        axes = [by_epoch]
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        by_epoch, by_time = axes
        by_time.set_xlabel("training time (minutes)")
    for label, workdir in runs.items():
        curve = read_curve(workdir)
        by_epoch.plot(curve["epoch"], curve["accuracy"], marker="o", label=label)
        if not epochs_only:
            by_time.plot(curve["minutes"], curve["accuracy"], marker="o", label=label)
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel("test accuracy (%, no flip TTA)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="CIFAR-10 (JPEG q75) test accuracy")
    parser.add_argument("--epochs_only", action="store_true")
    args = parser.parse_args()
    runs = dict(run.split("=", 1) for run in args.runs)
    plot(runs, args.out, args.title, args.epochs_only)


if __name__ == "__main__":
    main()
