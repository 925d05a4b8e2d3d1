"""Test set-up: eight fake CPU devices (set before jax is imported) and small helpers."""

import os

# Eight fake devices share 2 cores here, and collectives wait for all eight: on a busy
# machine one device's share can lag past XLA:CPU's 40 s rendezvous limit, so raise it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Runs `python -m ARGS...` (or `python -c CODE ARGS...`) in a fresh process from the
    repository root."""
    command = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", *args]
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def tiny_config():
    """A vgg_tiny on the synthetic dataset, small enough for a step in milliseconds."""
    from vgg_jax.configuration import load_config_file

    config = load_config_file(CONFIGS / "smoke.py")
    config.synthetic_train_size = 256
    config.synthetic_eval_size = 100
    config.batch_size = 32
    config.num_epochs = 2
    config.progress_bar = False
    return config


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class image folder: class k images are mostly colour channel k, as PNG and JPEG."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 9)):
        for label, name in enumerate(("cat", "dog", "frog")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count // 3):
                pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
                pixels[..., label] += 180
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return tmp_path
