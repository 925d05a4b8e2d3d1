"""experiments/colab.ipynb runs top to bottom on CPU (its code cells, without Jupyter)."""

import importlib.util
import json
import shutil

import pytest
from conftest import REPO, run_cli

from vgg_jax import pretrained


def notebook_code(path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.slow
def test_colab_notebook_runs_on_cpu(tmp_path, smoke_run):
    # The notebook trains the smoke config with the command the suite has already run
    # (tests/conftest.py's smoke_run): in a copy of that run its training cell runs the
    # command again and finds the run finished, as a rerun of the notebook would.
    demo = tmp_path / "demo"
    shutil.copytree(smoke_run["workdir"], demo)
    code = notebook_code(REPO / "experiments" / "colab.ipynb")
    code += "\nfig.savefig(os.path.join(os.environ['OUT_DIR'], 'predictions.png'))\n"
    result = run_cli(
        "-c",
        code,
        env={
            "VGG_JAX_SOURCE": str(REPO),
            "WORKDIR": "",
            "DEMO_WORKDIR": str(demo),
            "MPLBACKEND": "Agg",
            "OUT_DIR": str(tmp_path),
            "JAX_NUM_CPU_DEVICES": "1",  # a notebook runtime has one device
            "HOME": str(tmp_path),  # keep HOME clean
            "VGG_JAX_OFFLINE": "1",  # the ImageNet section falls back to random weights
        },
        timeout=420,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy on these 8 images" in result.stdout
    # The ImageNet section, offline: the download refused, random weights, five names
    # from ImageNet's list, and distances that grow from the image itself outwards.
    assert "VGG_JAX_OFFLINE=1" in result.stdout and "random weights instead" in result.stdout
    distances = {
        line.split(" to ")[1].rsplit(":", 1)[0]: float(line.rsplit(":", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("perceptual distance to ")
    }
    assert distances["itself"] == 0.0 < distances["another image"]
    # LPIPS on the same random VGG16, its learned layers from the lpips package if
    # installed; otherwise the offline error says how to get them.
    lpips_distances = {
        line.split(" to ")[1].rsplit(":", 1)[0]: float(line.rsplit(":", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("LPIPS distance to ")
    }
    if importlib.util.find_spec("lpips"):
        assert lpips_distances["itself"] == 0.0 < lpips_distances["another image"]
    else:
        assert "vgg-jax[lpips]" in result.stdout and not lpips_distances
    names = set(pretrained.imagenet_class_names())
    lines = result.stdout.splitlines()
    assert sum(line.rsplit(" ", 1)[0].strip() in names for line in lines) == 5
    assert (tmp_path / "predictions.png").stat().st_size > 10_000
    assert "step 128 | vgg_tiny" in result.stdout
