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
