"""experiments/gpu_session.sh end to end with SMALL=1 on the CPU, on a tiny CIFAR-style
JPEG archive: the script a lent GPU runs must not rot between sessions."""

import io
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

CLASSES = ("airplane", "automobile", "bird")


def write_archive(path, per_class=(8, 3)):
    """An archive in cifar10-jpeg.npz's format: per split, the JPEG bytes concatenated,
    their offsets and the labels; and the class names."""
    rng = np.random.default_rng(0)
    arrays = {"label_names": np.asarray(CLASSES)}
    for split, count in zip(("train", "test"), per_class, strict=True):
        blobs, labels = [], []
        for label in range(len(CLASSES)):
            for _ in range(count):
                pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
                pixels[..., label] += 170
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
                blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
                labels.append(label)
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
        arrays[f"{split}_label"] = np.asarray(labels, np.uint8)
    np.savez(path, **arrays)


@pytest.mark.slow
@pytest.mark.gpu_session
def test_small_session_runs_every_step_and_writes_its_results(tmp_path):
    archive = tmp_path / "tiny.npz"
    write_archive(archive)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "SMALL": "1",
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "CIFAR_NPZ": str(archive),
        "BUDGET_S": "900",
        "PYTHON": os.environ.get("PYTHON", "python"),
    }
    env["JAX_NUM_CPU_DEVICES"] = "1"  # one device, as on the GPU machine
    result = subprocess.run(
        ["bash", "experiments/gpu_session.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8  # what the device tool returns from $OUT
    assert {
        "session.log",
        "env.json",
        "summary.json",
        "speed_vgg16_cifar_bf16_b512.json",
        "speed_vgg16_224_bf16_b128.json",
        "accuracy_vgg16_fast.jsonl",
        "seed_vgg16.jsonl",
    } <= files
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["environment"]["sanity"]["status"] == 0
    for name in ("speed_vgg16_cifar_bf16_b512.json", "speed_vgg16_224_bf16_b128.json"):
        assert steps[name]["status"] == 0
        assert steps[name]["jax_train_images_per_s"] > 0
    for name in ("accuracy_vgg16_fast", "seed_vgg16"):
        assert steps[name]["status"] == 0
        assert steps[name]["epochs_done"] == 2
        assert 0.0 <= steps[name]["final_test_accuracy"] <= 1.0
    curve = [json.loads(line) for line in (out / "accuracy_vgg16_fast.jsonl").open()]
    assert [r["epoch"] for r in curve] == [1, 2]
    assert 0 < curve[0]["since_launch_s"] < curve[1]["since_launch_s"]
    assert "summary:" in (out / "session.log").read_text()


def test_image_folder_from_archive_keeps_every_image_and_label(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_session", REPO / "experiments" / "gpu_session.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    archive = tmp_path / "tiny.npz"
    write_archive(archive, per_class=(2, 1))
    root = module.write_image_folder(archive, tmp_path / "folder")
    for split, count in (("train", 2), ("test", 1)):
        for label, name in enumerate(CLASSES):
            files = sorted((root / split / name).iterdir())
            assert len(files) == count
            image = np.asarray(Image.open(files[0]).convert("RGB"))
            assert image.shape == (32, 32, 3)
            assert image[..., label].mean() > 150  # the class's own colour
