"""The experiment helpers: the curve writer and the plot."""

import csv
import importlib.util
import json

import pytest
from conftest import REPO


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curve_accumulates_epoch_seconds_and_plot_is_written(tmp_path):
    records = [
        {"epoch": 1, "epoch_seconds": 30.0, "test_accuracy": 0.3},
        {"epoch": 2, "epoch_seconds": 20.0, "test_accuracy": 0.5, "test_accuracy_flip_tta": 0.52},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = load_script("run_experiment").write_curve(str(tmp_path))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["seconds"]) for r in rows] == [30.0, 50.0]
    assert rows[1]["test_accuracy_flip_tta"] == "0.52"
    out = tmp_path / "curve.png"
    load_script("plot_curves").plot({"a": str(tmp_path), "b": str(tmp_path)}, str(out), "t")
    assert out.stat().st_size > 5000


def test_budget_stops_a_run_with_sigterm():
    runner = load_script("run_experiment")
    import sys

    status = runner.run_with_budget(
        [
            sys.executable,
            "-c",
            "import signal,sys,time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\ntime.sleep(60)",
        ],
        budget_seconds=1,
    )
    assert status == 0


@pytest.mark.slow
def test_step_faults_times_the_train_step():
    from conftest import CONFIGS, run_cli

    result = run_cli(
        "-c",
        "import runpy, sys; sys.argv[0] = 'step_faults'; "
        "runpy.run_path('experiments/step_faults.py', run_name='__main__')",
        f"--config={CONFIGS / 'smoke.py'}",
        "--config.batch_size=16",
        "--steps=2",
        "--warmup=1",
    )
    assert result.returncode == 0, result.stderr
    assert "minor page faults" in result.stdout
    assert len(result.stdout.split("step seconds:")[1].splitlines()[0].split()) == 2


def test_cifar_subset_links_the_first_files_of_each_class(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog", "frog"):
            folder = tmp_path / "all" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}.jpg").write_bytes(b"x")
    subset = load_script("cifar_subset")
    subset.make_subset(tmp_path / "all", tmp_path / "few", ["dog", "frog"], {"train": 2, "test": 1})
    train = sorted(p.relative_to(tmp_path / "few") for p in (tmp_path / "few").rglob("*.jpg"))
    assert [str(p) for p in train] == [
        "test/dog/0.jpg",
        "test/frog/0.jpg",
        "train/dog/0.jpg",
        "train/dog/1.jpg",
        "train/frog/0.jpg",
        "train/frog/1.jpg",
    ]
    linked = (tmp_path / "few/train/dog/1.jpg").resolve()
    assert linked == (tmp_path / "all/train/dog/1.jpg").resolve()
    with pytest.raises(SystemExit, match="has 3 files, not 5"):
        subset.make_subset(tmp_path / "all", tmp_path / "more", ["cat"], {"train": 5})
