"""experiments/gpu_session.sh end to end with SMALL=1 on the CPU, on a tiny CIFAR-style
JPEG archive: the script a lent GPU runs must not rot between sessions."""

import io
import json
import os
import shutil
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


def session_env(tmp_path, archive, out, **extra):
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("COMMITTED", "SKIP_DONE", "ONLY")},
        "SMALL": "1",
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "CIFAR_NPZ": str(archive),
        "BUDGET_S": "900",
        "PYTHON": os.environ.get("PYTHON", "python"),
        "JAX_NUM_CPU_DEVICES": "1",  # one device, as on the GPU machine
        **extra,
    }
    return env


def run_session(env):
    return subprocess.run(
        ["bash", "experiments/gpu_session.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.gpu_session
def test_small_session_runs_the_queue_writes_each_result_and_skips_what_is_done(tmp_path):
    """What the CPU rehearses: every item kind of the queue with tiny settings (the
    environment check, the PyTorch twin's training loop, ours, two runs at once, a
    variant, a speed row against PyTorch (eager), the streamed path with grain workers,
    the seed recipe), airbench's data files (written, and read by airbench's own loader
    where airbench is installed; its training needs CUDA and is skipped, said so), and
    SKIP_DONE against the first run's results. Not rehearsed: anything's speed or
    accuracy, CUDA, torch.compile (TORCH_COMPILE=0 on the CPU)."""
    archive = tmp_path / "tiny.npz"
    write_archive(archive)
    out = tmp_path / "out"
    result = run_session(session_env(tmp_path, archive, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8  # what the device tool returns from $OUT
    assert files == {"session.log", "env.json", "summary.json", "results.jsonl"} | {
        "curves.jsonl",
        "raw.jsonl",
    }
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").open())}
    ran = {"environment", "torch_twin_fast", "ours_fast", "ours_fast_seed1", "ours_fast_seed2"}
    ran |= {"pair_throughput", "fast_crop4", "speed_cifar_b512"}
    ran |= {"stream_224", "seed_vgg16_200"}
    for name in ran:
        assert rows[name]["status"] == "done", rows[name]
        assert len(rows[name]["key"]) == 16 and rows[name]["definition"]["small"] is True
    assert rows["airbench94"]["status"] == "skipped"  # no CUDA here
    assert rows["airbench94"]["files"]["train.pt"]["images"] == [24, 32, 32, 3]
    for name in ("ours_fast", "torch_twin_fast", "fast_crop4", "seed_vgg16_200"):
        assert rows[name]["epochs_done"] == 2
        assert 0.0 <= rows[name]["final_test_accuracy"] <= 1.0
    assert rows["fast_crop4"]["command"].endswith("--config.dtype=float32")
    assert "--config.crop_padding=4" in rows["fast_crop4"]["command"]
    assert rows["ours_fast_seed1"]["runs_at_once"] == 2
    assert rows["pair_throughput"]["throughput_gain_wall"] > 0
    assert rows["speed_cifar_b512"]["jax_train_images_per_s"] > 0
    for source in ("streamed", "synthetic"):
        assert rows["stream_224"][source]["images_per_s_with_eval"] > 0
    assert 0 <= rows["stream_224"]["streamed"]["input_wait_fraction"] < 1
    curves = [json.loads(line) for line in (out / "curves.jsonl").open()]
    ours = [c for c in curves if c["item"] == "ours_fast"]
    assert [c["epoch"] for c in ours] == [1, 2]
    assert 0 < ours[0]["since_launch_s"] < ours[1]["since_launch_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"]["fast_ls02"]["skipped"].startswith("not in the SMALL rehearsal")
    assert "summary:" in (out / "session.log").read_text()

    # The next window: the first one's results committed; only what is not done runs.
    committed = tmp_path / "committed" / "20261206_0000"
    committed.mkdir(parents=True)
    shutil.copy(out / "results.jsonl", committed)
    again = tmp_path / "again"
    env = session_env(tmp_path, archive, again, SKIP_DONE="1", COMMITTED=str(committed.parent))
    result = run_session(env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    items = json.loads((again / "summary.json").read_text())["items"]
    for name in ran - {"environment", "ours_fast_seed1", "ours_fast_seed2"}:
        assert items[name].get("skipped", "").startswith("done: committed in"), (name, items[name])
    assert items["environment"]["status"] == "done"  # always checked
    assert items["airbench94"]["status"] == "skipped"  # not done, so tried again


def test_image_folder_from_archive_keeps_every_image_and_label(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_steps", REPO / "experiments" / "gpu_steps.py"
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
