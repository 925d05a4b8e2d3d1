"""Plot test accuracy against epoch and against training time for several runs.

  python experiments/plot_curves.py --out experiments/cifar10_w025.png \
      "seed recipe=/tmp/seed" "fast recipe=/tmp/fast"

Each run is LABEL=WORKDIR with a curve.csv written by run_experiment.py.
"""

from __future__ import annotations

import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(workdir: str) -> dict[str, list[float]]:
    with open(os.path.join(workdir, "curve.csv")) as f:
        rows = list(csv.DictReader(f))
    return {
        "epoch": [int(r["epoch"]) for r in rows],
        "minutes": [float(r["seconds"]) / 60 for r in rows],
        "accuracy": [100 * float(r["test_accuracy"]) for r in rows],
    }


def plot(runs: dict[str, str], out: str, title: str) -> None:
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, workdir in runs.items():
        curve = read_curve(workdir)
        by_epoch.plot(curve["epoch"], curve["accuracy"], marker="o", label=label)
        by_time.plot(curve["minutes"], curve["accuracy"], marker="o", label=label)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training time (minutes)")
    by_epoch.set_ylabel("test accuracy (%, no flip TTA)")
    for axis in (by_epoch, by_time):
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
    args = parser.parse_args()
    plot(dict(run.split("=", 1) for run in args.runs), args.out, args.title)


if __name__ == "__main__":
    main()
