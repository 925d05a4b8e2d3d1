"""vgg_jax.benchmark: the CLI on a tiny config, its JSON, the FLOP count, and the PyTorch
twin (same parameters, same logits)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLI_DEVICES, CONFIGS, modules_imported_by, random_variables, run_cli

from vgg_jax import models
from vgg_jax.bench import profiling
from vgg_jax.configuration import load_config_file
from vgg_jax.data import DatasetInfo

# vgg_tiny on 16x16 synthetic images: compiles and runs in seconds.
TINY = (
    f"--config={CONFIGS / 'smoke.py'}",
    "--config.batch_size=16",
    "--steps=2",
    "--burn_in=1",
)
FIGURE_KEYS = {
    "mean_s",
    "std_s",
    "median_s",
    "times_s",
    "images_per_s",
    "tflops",
    "fraction_of_peak",
    "compile_s",
    "flops_per_image_analytic",
    "peak_memory_bytes",
}


def _check_figures(result):
    for name in ("forward", "forward_backward"):
        assert set(result[name]) >= FIGURE_KEYS, name
        assert result[name]["mean_s"] > 0
        assert min(result[name]["times_s"]) <= result[name]["median_s"]
        assert result[name]["images_per_s"] > 0


@pytest.mark.slow
def test_cli_writes_every_number(tmp_path):
    # With torch installed, the same run also times the PyTorch twin (one run of the
    # CLI for both: its JAX half is the same either way).
    try:
        import torch  # noqa: F401

        compare = ["--compare=torch", "--torch_compile=false"]
    except ImportError:
        compare = []
    out = tmp_path / "bench.json"
    result = run_cli("vgg_jax.benchmark", *TINY, f"--json={out}", *compare)
    assert result.returncode == 0, result.stderr
    assert "forward_backward:" in result.stdout and "images/s" in result.stdout
    assert "TFLOP/s" in result.stdout and "peak assumed" in result.stdout
    numbers = json.loads(out.read_text())
    assert {"config", "num_classes", "steps", "burn_in", "jax"} <= set(numbers)
    ours = numbers["jax"]
    assert {"parameters", "peak_flops", "peak_assumption", "devices", "conv_impl"} <= set(ours)
    assert ours["devices"] == CLI_DEVICES  # the training path's mesh over every device
    _check_figures(ours)
    assert ours["forward_backward"]["flops_per_image_xla"] > 0
    if compare:
        assert "ratio ours/PyTorch" in result.stdout
        _check_figures(numbers["torch"])
        assert numbers["torch"]["parameters"] == ours["parameters"]
        assert numbers["ratio"]["forward_backward"]["images_per_s"] > 0


@pytest.mark.slow
def test_cli_rejects_bad_flags_in_one_line():
    result = run_cli("vgg_jax.benchmark", *TINY, "--config.batch_sizee=3")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: unknown config field")
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("vgg_jax.benchmark", *TINY, f"--config.batch_size={CLI_DEVICES + 1}")
    assert result.returncode != 0 and f"does not divide over {CLI_DEVICES} devices" in result.stderr


def test_benchmark_does_not_import_tensorflow():
    heavy = ("tensorflow", "tensorflow_datasets", "tensorboardX", "torch")
    assert modules_imported_by("import vgg_jax.benchmark", heavy) == []


def test_analytic_flops_vgg16():
    # VGG16 at 224x224 with the paper's head: the well-known ~15.5 GFLOPs (2 x MACs).
    model = models.create_model("vgg16", 1000, head="imagenet", batch_norm=False)
    assert profiling.analytic_flops(model, 224) == pytest.approx(30.94e9, rel=0.01)


def test_imagenet_config_is_the_tf_benchmark_shape():
    config = load_config_file(CONFIGS / "tf_benchmark.py")
    assert (config.image_size, config.batch_size, config.head) == (224, 128, "tf_benchmark")
    assert not config.batch_norm and config.conv_dropout == "none"
    info = DatasetInfo.without_data(config)
    assert config.dataset == "synthetic" and len(info.class_names) == 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # BN, per-conv dropout, the cifar head (dropout, fc-BN, fc512).
        {"conv_dropout": "0.3", "head": "cifar"},
        # No BN, the TF reference's head; 32x32 input leaves 4x4 maps: the NHWC flatten.
        {"batch_norm": False, "head": "tf_benchmark", "image_size": 32},
    ],
)
def test_torch_twin_has_the_same_parameters_and_logits(overrides):
    torch = pytest.importorskip("torch")
    from vgg_jax.bench import torch_reference

    config = load_config_file(CONFIGS / "smoke.py")  # vgg_tiny: 3 blocks, 16 to 64 channels
    for key, value in overrides.items():
        config[key] = value
    vgg = models.build_model(config, DatasetInfo.without_data(config))
    variables = random_variables(vgg, config.image_size)  # numpy draws: nothing to compile
    twin = torch_reference.build_torch_model(vgg, config.image_size)
    assert sum(parameter.numel() for parameter in twin.parameters()) == sum(
        leaf.size for leaf in jax.tree.leaves(variables["params"])
    )
    torch_reference.load_flax_variables(twin, variables)
    images = np.random.default_rng(0).integers(0, 256, (3, config.image_size, config.image_size, 3))
    images = images.astype(np.uint8)
    ours = np.asarray(jax.jit(vgg.apply)(variables, jnp.asarray(images)))
    twin.eval()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(images)).numpy()
    assert np.abs(ours).max() > 0.1  # the comparison means something
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(ours).max())
