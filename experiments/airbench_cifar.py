"""airbench94 (PyPI `airbench==0.1.8`, PyTorch) trained on our CIFAR-10 (JPEG q75) data:
how much of its 94% this data allows, timed on the same GPU as ours.

  python experiments/airbench_cifar.py --data ARCHIVE_OR_ARRAYS --folder DIR --json FILE \
      [--runs 5]

Writes DIR/cifar10/train.pt and test.pt in the format airbench's `CifarLoader` reads
({'images': uint8 N x 32 x 32 x 3, 'labels': int64 N, 'classes': names}) and checks them
with `torch.load(weights_only=True)`, as the loader loads them. With CUDA: one warm-up
step (`airbench.warmup94`), then `--runs` trainings (`airbench.train94(verbose=False)`,
its own recipe: 9.9 epochs, batch 1024, flips + 2-pixel translation), each timed
(synchronised wall-clock, training only), then evaluated without TTA, with mirror TTA
and with its mirror + translate TTA (level 2, its reported figure). airbench's loader
and network call `.cuda()`: without CUDA (a CPU rehearsal) the run is skipped, said in
the JSON's `skipped`, after the files are checked (with airbench's own `CifarLoader` on
the CPU when airbench is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import cifar_arrays  # noqa: E402


def write_airbench_files(arrays: cifar_arrays.CifarArrays, folder: Path) -> list[Path]:
    """folder/train.pt and folder/test.pt as airbench's `CifarLoader` reads them (the
    format above; airbench writes the same from torchvision's CIFAR-10)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "test"):
        payload = {
            "images": torch.from_numpy(np.ascontiguousarray(getattr(arrays, f"{split}_images"))),
            "labels": torch.from_numpy(getattr(arrays, f"{split}_labels").astype(np.int64)),
            "classes": list(arrays.classes),
        }
        torch.save(payload, folder / f"{split}.pt")
        paths.append(folder / f"{split}.pt")
    return paths


def check_airbench_file(path: Path) -> dict[str, object]:
    """Reads one airbench file the way its loader does and checks the layout it relies on;
    returns a description."""
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    images, labels, classes = data["images"], data["labels"], data["classes"]
    problems = []
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        problems.append(f"images {tuple(images.shape)} {images.dtype}, not uint8 (N, H, W, 3)")
    if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        problems.append(f"labels {tuple(labels.shape)} {labels.dtype}, not int64 (N,)")
    elif len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        problems.append(f"labels outside 0..{len(classes) - 1}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return {"images": list(images.shape), "classes": len(classes)}


def prepare(data: str, folder: Path) -> dict:
    paths = write_airbench_files(cifar_arrays.load(data), folder / "cifar10")
    return {path.name: check_airbench_file(path) for path in paths}


def loader_on_cpu(folder: Path) -> str:
    """One augmented batch from airbench's own CifarLoader on the CPU (no CUDA needed)."""
    import airbench

    loader = airbench.CifarLoader(
        str(folder / "cifar10"), train=True, batch_size=4, aug={"flip": True, "translate": 2},
        gpu="cpu",
    )  # fmt: skip
    images, labels = next(iter(loader))
    shape = tuple(images.shape)
    return f"airbench.CifarLoader read it on the CPU: a batch {shape}, {len(labels)} labels"


def train_and_evaluate(folder: Path, runs: int) -> dict:
    import airbench
    import torch

    os.chdir(folder)  # airbench reads the test split from ./cifar10
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    airbench.warmup94()
    rows = []
    for run in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = airbench.train94(verbose=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        accuracy = {
            f"tta{level}": airbench.evaluate(model, test_loader, level) for level in (0, 1, 2)
        }
        rows.append({"run": run, "train_seconds": seconds, **accuracy})
        print(f"airbench94 run {run}: {json.dumps(rows[-1])}", flush=True)
    mean = {key: statistics.fmean(row[key] for row in rows) for key in rows[0] if key != "run"}
    return {"runs": rows, "mean": mean, "device": torch.cuda.get_device_name()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--folder", required=True, type=Path)
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    result: dict = {"files": prepare(args.data, args.folder)}
    try:
        import airbench

        result["airbench_version"] = getattr(airbench, "__version__", "0.1.8 (no __version__)")
    except ImportError:
        airbench = None
    import torch

    if not torch.cuda.is_available():
        if airbench is not None:
            result["cpu_check"] = loader_on_cpu(args.folder)
        result["skipped"] = "no CUDA: airbench94 runs on a GPU only; its data files were checked"
    elif airbench is None:
        result["error"] = "airbench is not installed (carry its wheel in .whl/)"
    else:
        result.update(train_and_evaluate(args.folder, args.runs))
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
