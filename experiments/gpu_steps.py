"""What the GPU session's runs share: carried wheels, processes under a deadline, the data
written out for each trainer, and the rows made of a training curve."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"
SITE = Path("/tmp/site")
# A wheel's distribution name -> its module, where they differ.
MODULE_OF = {"tensorboardx": "tensorboardX"}
TARGET_ACCURACY = 0.93  # issue 23's goal for vgg16_fast: final accuracy without TTA
START = time.time()  # the session's start: this module is imported first


def log(message: str) -> None:
    print(f"[gpu_session {time.time() - START:6.1f}s] {message}", flush=True)


# What the environment step prints: versions and devices, as one JSON line.
ENV_PROBE = (
    "import json, jax, flax, optax, orbax.checkpoint as ocp, grain, ml_collections\n"
    "info = {'python': __import__('sys').version.split()[0], 'jax': jax.__version__,\n"
    "  'flax': flax.__version__, 'optax': optax.__version__, 'grain': grain.__version__,\n"
    "  'orbax_checkpoint': ocp.__version__, 'backend': jax.default_backend(),\n"
    "  'devices': [d.device_kind for d in jax.devices()],\n"
    "  'cpus': __import__('os').cpu_count()}\n"
    "try:\n  import torch\n  info['torch'] = torch.__version__\n"
    "  info['cuda_available'] = torch.cuda.is_available()\n"
    "except ImportError:\n  info['torch'] = None\n"
    "print('ENV ' + json.dumps(info))\n"
)


def find_archive() -> Path | None:
    """The CIFAR-10 JPEG archive: CIFAR_NPZ, .devdata/ (carried), or ../shared/data."""
    for candidate in (
        os.environ.get("CIFAR_NPZ"),
        REPO / ".devdata" / "cifar10-jpeg.npz",
        REPO.parent / "shared" / "data" / "cifar10-jpeg.npz",
    ):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


# ------------------------------------------------------------------------ carried wheels


def install_carried_wheels(python: str) -> list[str]:
    """Installs each wheel in .whl/ whose module this Python lacks into /tmp/site, and puts
    /tmp/site on the path of this process and of the processes it starts. Returns the
    installed wheels' names."""
    missing = []
    for wheel in sorted(WHEELS.glob("*.whl")):
        dist = wheel.name.split("-")[0].lower()
        module = MODULE_OF.get(dist, dist.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(wheel)
    if missing:
        command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        command += ["--no-compile", "--no-cache-dir", "--disable-pip-version-check"]
        command += ["--target", str(SITE), *map(str, missing)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"pip could not install {missing}: {result.stderr.strip()}")
    if SITE.exists():
        sys.path.insert(0, str(SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(SITE), os.environ.get("PYTHONPATH")])
        )
    return [wheel.name for wheel in missing]


def missing_modules(python: str, modules: list[str]) -> dict[str, str]:
    """{module: the import's error} for each module `python` cannot import (with the
    wheels installed: a wheel's own missing dependency shows up here, by name)."""
    problems = {}
    for module in modules:
        result = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO
        )
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            problems[module] = lines[-1] if lines else f"exit status {result.returncode}"
    return problems


# ---------------------------------------------------------------------------- processes


def run_processes(
    commands: list[list[str]], timeout: float, envs: list[dict] | None = None, cwd: Path = REPO
) -> list[tuple[int, float]]:
    """Runs the commands at once, output passed through. At `timeout` each one still
    running gets SIGTERM (our CLIs save a checkpoint and exit), then SIGKILL 30 s later.
    Returns (status, seconds) per command; status 124: the timeout stopped it."""
    envs = envs or [{} for _ in commands]
    start = time.time()
    processes = []
    for command, env in zip(commands, envs, strict=True):
        log("$ " + " ".join(command) + f"   (limit {timeout:.0f} s)")
        processes.append(subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}))
    results = []
    for process in processes:
        try:
            status = process.wait(timeout=max(1.0, start + timeout - time.time()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            status = 124
        results.append((status, time.time() - start))
        log(f"exit status {status} after {results[-1][1]:.1f} s")
    return results


# --------------------------------------------------------------------------------- data


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def write_image_folder(archive: Path, root: Path) -> Path:
    """The JPEG archive -> root/{train,test}/<class>/NNNNN.jpg (the bytes as stored)."""
    if (root / "complete").exists():
        return root
    with np.load(archive) as z:
        names = [str(n) for n in z["label_names"]]
        for split in ("train", "test"):
            data, offsets, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_label"]
            for name in names:
                (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, label in enumerate(labels):
                blob = data[offsets[i] : offsets[i + 1]]
                (root / split / names[label] / f"{i:05d}.jpg").write_bytes(blob.tobytes())
    (root / "complete").write_text("")
    return root


def _upscale_one(task: tuple[np.ndarray, int, str]) -> None:
    import cv2

    image, size, path = task
    large = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
    ok, encoded = cv2.imencode(".jpg", large[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError(f"could not encode {path}")
    Path(path).write_bytes(encoded.tobytes())


def write_upscaled_folder(
    arrays_path: Path, root: Path, counts: tuple[int, int], size: int
) -> Path:
    """The first counts[0] training and counts[1] test images, upscaled to size x size and
    stored as JPEG (q90) in root/{train,test}/<class>/: an ImageNet-style folder on the
    machine's own disk, encoded by all its cores."""
    if (root / "complete").exists():
        return root
    import cifar_arrays

    arrays = cifar_arrays.load(arrays_path)
    tasks = []
    for split, count in zip(("train", "test"), counts, strict=True):
        images, labels = getattr(arrays, f"{split}_images"), getattr(arrays, f"{split}_labels")
        for name in arrays.classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(min(count, len(labels))):
            path = root / split / arrays.classes[labels[i]] / f"{i:05d}.jpg"
            tasks.append((images[i], size, str(path)))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_upscale_one, tasks, chunksize=64))
    (root / "complete").write_text("")
    return root


def stream_arguments(folder: Path, train_count: int, small: bool) -> dict[str, list[str]]:
    """The training command's arguments of the stream item's two runs: VGG16-224 streamed
    from `folder` by the host's cores (every CPU but one), and the same steps on
    synthetic data already on the device (no input work at all)."""
    common = ["--config=configs/vgg16_imagenet.py", "--config.progress_bar=False"]
    common += ["--config.checkpoint_every_epochs=100", "--config.learning_rate=0.005"]
    common += ["--config.eval_split=test"]
    if small:
        common += ["--config.width=0.125", "--config.image_size=48", "--config.batch_size=8"]
        common += ["--config.max_steps_per_epoch=3", "--config.num_epochs=2"]
        common += ["--config.dtype=float32", "--config.input_workers=1"]
    else:
        common += ["--config.batch_size=128", "--config.max_steps_per_epoch=100"]
        common += ["--config.num_epochs=3"]
    synthetic = ["--config.dataset=synthetic", "--config.input=device", "--config.augment=none"]
    synthetic += [f"--config.synthetic_train_size={train_count}", "--config.synthetic_eval_size=16"]
    return {
        "streamed": [*common, "--config.dataset=image_folder", f"--config.data_dir={folder}"],
        "synthetic": [*common, *synthetic],
    }


def stream_row(records: list[dict], batch: int) -> dict:
    """Images/s of the epochs after the first (compilation), evaluation included (a few
    hundred images), and the largest fraction of an epoch spent waiting for input."""
    later = records[1:] or records
    if not later:
        return {"epochs_done": 0}
    steps = records[0]["step"]
    return {
        "epochs_done": len(records),
        "images_per_s_with_eval": round(steps * batch / min(r["epoch_seconds"] for r in later), 1),
        "input_wait_fraction": max(r["input_wait_fraction"] for r in later),
    }


# ---------------------------------------------------------------------------- curves


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_row(records: list[dict], launch: float) -> dict:
    """The figures of a training curve (metrics.jsonl records): final, flip-TTA, best,
    seconds from launch to the last epoch and to the target accuracy."""
    if not records:
        return {"epochs_done": 0}
    for record in records:
        record["since_launch_s"] = round(record["wall_time"] - launch, 2)
    last = records[-1]
    best = max(records, key=lambda r: r["test_accuracy"])
    hit = next((r for r in records if r["test_accuracy"] >= TARGET_ACCURACY), None)
    later = [r["epoch_seconds"] for r in records[1:]] or [records[0]["epoch_seconds"]]
    return {
        "epochs_done": len(records),
        "final_epoch": last["epoch"],
        "final_test_accuracy": last["test_accuracy"],
        "final_test_accuracy_flip_tta": last.get("test_accuracy_flip_tta"),
        "final_train_accuracy": last.get("train_accuracy"),
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "target_accuracy": TARGET_ACCURACY,
        "seconds_to_target_since_launch": hit and hit["since_launch_s"],
        "launch_to_last_epoch_s": last["since_launch_s"],
        "first_epoch_seconds": round(records[0]["epoch_seconds"], 2),
        "median_epoch_seconds": round(float(np.median(later)), 3),
    }


def speed_row(results: dict) -> dict:
    """The RESULTS.md row of one `vgg_jax.benchmark` JSON."""
    ours = results["jax"]["forward_backward"]
    row = {
        "config": results["config"],
        "device": results["jax"]["device"],
        "jax_train_images_per_s": round(ours["images_per_s"], 1),
        "jax_train_step_ms": round(1000 * ours["median_s"], 3),
        "jax_train_mfu": ours["fraction_of_peak"],
        "jax_forward_images_per_s": round(results["jax"]["forward"]["images_per_s"], 1),
        "jax_compile_s": round(ours["compile_s"], 1),
    }
    if "torch" in results:
        theirs = results["torch"]["forward_backward"]
        row.update(
            {
                "torch_mode": results["torch"]["mode"],
                "torch_train_images_per_s": round(theirs["images_per_s"], 1),
                "torch_train_mfu": theirs["fraction_of_peak"],
                "train_ratio_ours_over_torch": round(
                    ours["images_per_s"] / theirs["images_per_s"], 3
                ),
            }
        )
    return row


def lazy(function: Callable[[], object]) -> Callable[[], object]:
    """`function`'s value, computed on the first call only."""
    cache: list = []

    def value():
        if not cache:
            cache.append(function())
        return cache[0]

    return value


def print_table(summary: dict) -> None:
    """The figures, last in the output (the device tool returns the output's tail)."""
    log("summary:")
    drop = ("definition", "command", "files", "date", "key", "gpu", "sanity")
    for item_id, entry in summary["items"].items():
        keep = {k: v for k, v in entry.items() if k not in drop}
        print(f"  {item_id}: {json.dumps(keep, default=str)}", flush=True)
