"""One prepared GPU session: what a lent device's few minutes are spent on, in order.

  bash experiments/gpu_session.sh            # on the device, from the repository root
  SMALL=1 bash experiments/gpu_session.sh    # tiny settings on any machine (tests run this)

Steps, each writing its results to OUT as soon as it ends (a session cut short keeps
what it finished), each given what is left of the total budget:
  1. environment (GPU, driver, versions) and a sanity run of the training command (the
     smoke config, bf16, two steps, one checkpoint): a version problem stops the session
     here, seconds in, with the error;
  2. speed: VGG16-CIFAR bf16 batch 512 and VGG16-224 bf16 batch 128, ours against the
     same network in PyTorch (torch.compile), images/s, ratio, MFU (`vgg_jax.benchmark`);
  3. accuracy: configs/vgg16_fast.py at full width on CIFAR-10 (JPEG q75) read from an
     image folder made from the JPEG archive (no TensorFlow): final and flip-TTA test
     accuracy, and the wall-clock from launch to the first epoch at >= 94%;
  4. with what is left: the seed recipe configs/vgg16.py for as many epochs as fit
     (stopped with SIGTERM, which saves a checkpoint), its curve and seconds per epoch.

Environment: OUT (results folder; default experiments/results/gpu_session), BUDGET_S
(total seconds, default 540), SKIP_DONE=1 (skip a step whose result is already
committed in experiments/results/gpu/), SMALL=1, CIFAR_NPZ (the JPEG archive; default
.devdata/cifar10-jpeg.npz, else ../shared/data/cifar10-jpeg.npz), TORCH_COMPILE=0,
WORK (scratch folder; default /tmp/vgg_gpu_session).

OUT receives at most 7 files (the device tool returns 8): session.log (from the shell
wrapper), env.json, the two speed JSONs, the two training curves (metrics.jsonl records)
and summary.json, whose rows are what experiments/RESULTS.md tables are built from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "experiments" / "results" / "gpu"
TARGET_ACCURACY = 0.94
ACCURACY_RESERVE_S = 180.0


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


SMALL = env_flag("SMALL")
OUT = Path(os.environ.get("OUT") or REPO / "experiments" / "results" / "gpu_session")
WORK = Path(os.environ.get("WORK", "/tmp/vgg_gpu_session"))
BUDGET_S = float(os.environ.get("BUDGET_S", "540"))
PYTHON = os.environ.get("PYTHON", sys.executable)
TORCH_COMPILE = os.environ.get("TORCH_COMPILE", "0" if SMALL else "1") == "1"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
START = time.time()
DEADLINE = START + BUDGET_S

# (file name, config, overrides) of the speed step; SMALL shrinks them to seconds on CPU.
SPEED_RUNS = [
    ("speed_vgg16_cifar_bf16_b512.json", "configs/vgg16.py", ["--config.batch_size=512"]),
    ("speed_vgg16_224_bf16_b128.json", "configs/tf_benchmark.py", ["--config.batch_size=128"]),
]
SPEED_SETTINGS = ["--config.dtype=bfloat16", "--steps=20", "--burn_in=10"]
SMALL_SPEED_SETTINGS = [
    "--config.dtype=float32",
    "--config.model=vgg_tiny",
    "--config.batch_size=8",
    "--steps=2",
    "--burn_in=1",
]
# Overrides that shrink the training steps in SMALL mode.
SMALL_TRAIN = [
    "--config.model=vgg_tiny",
    "--config.num_epochs=2",
    "--config.warmup_epochs=0.5",
    "--config.max_steps_per_epoch=3",
    "--config.batch_size=16",
    "--config.dtype=float32",
]


def remaining() -> float:
    return DEADLINE - time.time()


def log(message: str) -> None:
    print(f"[gpu_session {time.time() - START:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------- bookkeeping


class Summary:
    """summary.json: one entry per step, rewritten after every step."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}

    def record(self, step: str, entry: dict) -> None:
        self.data["steps"][step] = entry
        self.data["elapsed_s"] = round(time.time() - START, 1)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def already_done(name: str, epochs: int | None = None, accuracy: float = 0.0) -> bool:
    """Whether SKIP_DONE=1 and `name` is committed in experiments/results/gpu/; for a
    training curve, only when its last record reached `epochs` and `accuracy` (a recipe
    that has not reached its goal yet is run again: it has presumably changed)."""
    if not env_flag("SKIP_DONE") or not (COMMITTED / name).exists():
        return False
    if epochs is None:
        return True
    records = read_records(COMMITTED / name)
    return (
        bool(records)
        and records[-1]["epoch"] >= epochs
        and records[-1]["test_accuracy"] >= accuracy
    )


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Runs `command` with output passed through; at `timeout` sends SIGTERM (our CLIs
    save a checkpoint and exit), then SIGKILL 30 s later. Returns (status, seconds);
    status 124 means the timeout stopped it."""
    log("$ " + " ".join(command) + f"   (limit {timeout:.0f} s)")
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})})
    try:
        status = process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        status = 124
    seconds = time.time() - start
    log(f"exit status {status} after {seconds:.1f} s")
    return status, seconds


# ------------------------------------------------------------------------------- steps


def environment_and_sanity(summary: Summary) -> bool:
    """Versions, devices and two bf16 steps of the real training command. False: stop."""
    probe = (
        "import json, jax, flax, optax, orbax.checkpoint as ocp, ml_collections\n"
        "info = {'python': __import__('sys').version.split()[0], 'jax': jax.__version__,\n"
        "  'flax': flax.__version__, 'optax': optax.__version__,\n"
        "  'orbax_checkpoint': ocp.__version__, 'backend': jax.default_backend(),\n"
        "  'devices': [d.device_kind for d in jax.devices()]}\n"
        "try:\n  import torch\n  info['torch'] = torch.__version__\n"
        "  info['cuda_available'] = torch.cuda.is_available()\n"
        "except ImportError:\n  info['torch'] = None\n"
        "print('ENV ' + json.dumps(info))\n"
    )
    entry: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        entry["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        entry["gpu"] = f"no nvidia-smi ({type(error).__name__})"
    result = subprocess.run(
        [PYTHON, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("ENV ")]
    if result.returncode or not lines:
        entry["error"] = result.stderr.strip()[-3000:]
        summary.record("environment", entry)
        log("STOP: the import check failed:\n" + entry["error"])
        return False
    entry.update(json.loads(lines[0][4:]))
    log("environment: " + json.dumps(entry))
    workdir = WORK / "sanity"
    shutil.rmtree(workdir, ignore_errors=True)
    status, seconds = run(
        [
            PYTHON,
            "-m",
            "vgg_jax.main",
            "--config=configs/smoke.py",
            f"--workdir={workdir}",
            "--config.num_epochs=1",
            "--config.max_steps_per_epoch=2",
            # bfloat16 is what the device runs; on a CPU (SMALL) it is slow to compile.
            "--config.dtype=float32" if SMALL else "--config.dtype=bfloat16",
            "--config.progress_bar=False",
            *(["--config.synthetic_eval_size=64"] if SMALL else []),
        ],
        timeout=min(150.0, remaining()),
    )
    records = read_records(workdir / "metrics.jsonl")
    entry["sanity"] = {"status": status, "seconds": round(seconds, 1), "records": records}
    summary.record("environment", entry)
    (OUT / "env.json").write_text(json.dumps(entry, indent=2) + "\n")
    if status != 0 or not records:
        log("STOP: the sanity run of the training command failed (see above)")
        return False
    return True


def speed(summary: Summary) -> None:
    """Our train step and forward pass against PyTorch's, for both shapes."""
    for name, config, overrides in SPEED_RUNS:
        if already_done(name):
            log(f"skip {name}: committed in {COMMITTED}")
            continue
        # Keep ACCURACY_RESERVE_S for the accuracy run, the headline figure.
        limit = min(170.0, remaining() - ACCURACY_RESERVE_S)
        if limit < 60:
            summary.record(name, {"skipped": f"{remaining():.0f} s left"})
            continue
        settings = SMALL_SPEED_SETTINGS if SMALL else [*SPEED_SETTINGS, *overrides]
        if SMALL and config == "configs/tf_benchmark.py":
            settings = [*settings, "--config.image_size=64"]  # 224 px takes a CPU minutes
        out = OUT / name
        status, seconds = run(
            [
                PYTHON,
                "-m",
                "vgg_jax.benchmark",
                f"--config={config}",
                *settings,
                "--compare=torch" if HAVE_TORCH else "--compare=none",
                "--torch_compile" if TORCH_COMPILE else "--notorch_compile",
                f"--json={out}",
            ],
            # PyTorch runs in the same process after JAX: JAX must not take the memory.
            timeout=limit,
            env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        )
        entry = {"status": status, "seconds": round(seconds, 1)}
        if out.exists():
            entry.update(speed_row(json.loads(out.read_text())))
        summary.record(name, entry)


def speed_row(results: dict) -> dict:
    """The RESULTS.md row of one benchmark JSON."""
    ours = results["jax"]["forward_backward"]
    row = {
        "config": results["config"],
        "device": results["jax"]["device"],
        "jax_train_images_per_s": round(ours["images_per_s"], 1),
        "jax_train_step_ms": round(1000 * ours["median_s"], 2),
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
                "forward_ratio_ours_over_torch": round(
                    results["jax"]["forward"]["images_per_s"]
                    / results["torch"]["forward"]["images_per_s"],
                    3,
                ),
            }
        )
    return row


def cifar_archive() -> Path | None:
    for candidate in (
        os.environ.get("CIFAR_NPZ"),
        REPO / ".devdata" / "cifar10-jpeg.npz",
        REPO.parent / "shared" / "data" / "cifar10-jpeg.npz",
    ):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


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


def train_curve(
    step: str, out_name: str, config: str, overrides: list[str], timeout: float, summary: Summary
) -> list[dict]:
    """Trains `config` under `timeout`; copies its metrics.jsonl to OUT/out_name; returns
    the records, with each one's seconds since launch (`since_launch_s`)."""
    workdir = WORK / step
    shutil.rmtree(workdir, ignore_errors=True)
    launch = time.time()
    command = [
        PYTHON,
        "-m",
        "vgg_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.progress_bar=False",
        *overrides,
        *(SMALL_TRAIN if SMALL else []),
    ]
    status, seconds = run(command, timeout)
    records = read_records(workdir / "metrics.jsonl")
    for record in records:
        record["since_launch_s"] = round(record["wall_time"] - launch, 2)
    (OUT / out_name).write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = {
        "command": " ".join(command),
        "status": status,
        "seconds": round(seconds, 1),
        "epochs_done": len(records),
    }
    if records:
        last = records[-1]
        first_hit = next((r for r in records if r["test_accuracy"] >= TARGET_ACCURACY), None)
        best = max(records, key=lambda r: r["test_accuracy"])
        entry.update(
            {
                "final_epoch": last["epoch"],
                "final_test_accuracy": last["test_accuracy"],
                "final_test_accuracy_flip_tta": last.get("test_accuracy_flip_tta"),
                "best_test_accuracy": best["test_accuracy"],
                "best_epoch": best["epoch"],
                "first_epoch_at_target": first_hit and first_hit["epoch"],
                "seconds_to_target_since_launch": first_hit and first_hit["since_launch_s"],
                "training_seconds": round(sum(r["epoch_seconds"] for r in records), 1),
                "first_epoch_seconds": round(records[0]["epoch_seconds"], 1),
                "median_epoch_seconds": round(
                    float(np.median([r["epoch_seconds"] for r in records[1:] or records])), 2
                ),
            }
        )
    summary.record(step, entry)
    return records


def accuracy_and_seed(summary: Summary) -> None:
    archive = cifar_archive()
    if archive is None:
        summary.record("data", {"skipped": "no CIFAR-10 JPEG archive (set CIFAR_NPZ)"})
        log("no CIFAR-10 JPEG archive: skipping the training steps")
        return
    start = time.time()
    folder = write_image_folder(archive, WORK / "cifar10_folder")
    summary.record("data", {"archive": str(archive), "folder_s": round(time.time() - start, 1)})
    data = ["--config.dataset=image_folder", f"--config.data_dir={folder}"]

    name = "accuracy_vgg16_fast.jsonl"
    if already_done(name, epochs=2 if SMALL else 30, accuracy=TARGET_ACCURACY):
        log(f"skip {name}: committed in {COMMITTED}")
    elif remaining() > 60:
        train_curve(
            "accuracy_vgg16_fast",
            name,
            "configs/vgg16_fast.py",
            data,
            timeout=remaining() - 15,
            summary=summary,
        )

    name = "seed_vgg16.jsonl"
    if already_done(name, epochs=2 if SMALL else 200):
        log(f"skip {name}: committed in {COMMITTED}")
    elif remaining() > 60:
        train_curve(
            "seed_vgg16", name, "configs/vgg16.py", data, timeout=remaining() - 15, summary=summary
        )
    else:
        summary.record("seed_vgg16", {"skipped": f"{remaining():.0f} s left"})


def print_table(summary: Summary) -> None:
    """The figures, last in the output (the device tool returns the output's tail)."""
    log("summary:")
    for step, entry in summary.data["steps"].items():
        keep = {k: v for k, v in entry.items() if k not in ("records", "command")}
        print(f"  {step}: {json.dumps(keep, default=str)}", flush=True)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    summary = Summary(OUT / "summary.json")
    summary.data.update({"small": SMALL, "budget_s": BUDGET_S, "torch_compile": TORCH_COMPILE})
    log(f"budget {BUDGET_S:.0f} s; results in {OUT}")
    if not environment_and_sanity(summary):
        print_table(summary)
        return 3
    speed(summary)
    accuracy_and_seed(summary)
    print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
