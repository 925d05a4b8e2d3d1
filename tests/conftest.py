"""Test set-up: fake CPU devices (set before jax is initialised) and small helpers."""

import os

# This process has eight fake CPU devices (the in-process sharding tests); the processes
# the tests start (the CLIs) have two: still a sharded run, with gradients summed across
# devices, for much less compile and start-up time than eight (experiments/RESULTS.md).
# A test that needs another count sets JAX_NUM_CPU_DEVICES for its process.
TEST_PROCESS_DEVICES = 8
CLI_DEVICES = 2
os.environ["JAX_NUM_CPU_DEVICES"] = str(CLI_DEVICES)
# Fake devices share 2 cores here, and collectives wait for all of them: on a busy
# machine one device's share can lag past XLA:CPU's 40 s rendezvous limit, so raise it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The CLIs the tests start skip their malloc restart (a second interpreter start each:
# it serves step speed, not results); tests/test_cpu.py tests the restart itself.
os.environ.setdefault("VGG_JAX_KEEP_MEMORY", "0")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _session_folder(variable: str, prefix: str) -> str:
    """$variable, or a temporary folder made for this test session by its first pytest
    process (pytest-xdist's workers inherit the controller's environment, so they share
    it) and removed when that process exits."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)
    return os.environ[variable]


# Most of a CLI test's time is XLA compiling the same small programs again in each new
# process: one persistent compilation cache for the session (this process and every
# process the tests start) compiles each once. A cache hit runs the identical
# executable, so bitwise comparisons between runs are unaffected.
_session_folder("JAX_COMPILATION_CACHE_DIR", "vgg-jax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", TEST_PROCESS_DEVICES)

import ast  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

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


def modules_imported_by(import_line: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after running `import_line`."""
    code = f"import sys; {import_line}; print([m for m in {modules!r} if m in sys.modules])"
    result = run_cli("-c", code)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def smoke_training_command(workdir, *overrides: str) -> list[str]:
    """`python -m vgg_jax.main` on the smoke config, as an argument list for subprocess."""
    return [
        sys.executable,
        "-m",
        "vgg_jax.main",
        f"--config={CONFIGS / 'smoke.py'}",
        f"--workdir={workdir}",
        *overrides,
    ]


# Runs that several tests need as they are, made once per session for all its workers.
SHARED_RUNS = pathlib.Path(_session_folder("VGG_JAX_TEST_SHARED_RUNS", "vgg-jax-test-runs-"))
SMOKE_RUN = SHARED_RUNS / "smoke"


def start_smoke_run() -> None:
    """Starts the README's smoke command, `python -m vgg_jax.main
    --config=configs/smoke.py --workdir=~/smoke` (HOME a folder of the session), in the
    background, once per session whichever worker asks first: the worker goes on with
    its tests meanwhile. A wrapper process records its exit status and stderr."""
    with open(SHARED_RUNS / "smoke.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if SMOKE_RUN.exists():
            return
        (SMOKE_RUN / "home").mkdir(parents=True)
        record = """
import json, os, subprocess, sys
folder, command = sys.argv[1], sys.argv[2:]
env = {**os.environ, "HOME": os.path.join(folder, "home")}
result = subprocess.run(command, env=env, capture_output=True, text=True)
with open(os.path.join(folder, "result.tmp"), "w") as out:
    json.dump({"returncode": result.returncode, "stderr": result.stderr}, out)
os.replace(os.path.join(folder, "result.tmp"), os.path.join(folder, "result.json"))
"""
        subprocess.Popen(
            [sys.executable, "-c", record, str(SMOKE_RUN), *smoke_training_command("~/smoke")],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@pytest.fixture(scope="session")
def smoke_run() -> dict:
    """The README's smoke command run to its end (see `start_smoke_run`): {"workdir",
    "home", "returncode", "stderr"}. Its checkpoints are what that command leaves, so a
    test may compare another run of it with them bitwise. Tests read it or copy it;
    none writes to it."""
    start_smoke_run()  # already under way if collection saw a test that needs it
    result = SMOKE_RUN / "result.json"
    deadline = time.monotonic() + 600
    while not result.exists():
        assert time.monotonic() < deadline, "the shared smoke run did not finish in 600 s"
        time.sleep(0.2)
    run = json.loads(result.read_text())
    assert run["returncode"] == 0, run["stderr"][-3000:]
    home = SMOKE_RUN / "home"
    return {**run, "workdir": home / "smoke", "home": home}


def make_tiny_config():
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
def tiny_config():
    """A vgg_tiny on the synthetic dataset, small enough for a step in milliseconds."""
    return make_tiny_config()


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir=None,
    image_size: int = 16,
    class_names=None,
    process_index: int = 0,
    process_count: int = 1,
    **fields,
):
    """One process's share of a split, decoded through the evaluation view of a config
    with these fields, as the device input loads it."""
    from vgg_jax.configuration import default_config
    from vgg_jax.data import sources, views

    config = default_config()
    config.update(dataset=dataset, data_dir=data_dir, image_size=image_size, **fields)
    source = sources.open_split(config, split, class_names)
    return sources.load_split(source, views.eval_view(config), process_index, process_count)


def write_image_folder(
    root,
    classes=("a", "b", "c"),
    per_class=(12, 4),
    size=(40, 56),
    suffix=".jpg",
    seed: int = 0,
    draw=None,
):
    """root/{train,test}/<class>/<i><suffix>, `per_class` images per class in each split:
    class k's mostly colour channel k % 3 (noise in 0..70, plus 180), or what
    `draw(rng, label, size)` returns. Returns root."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if draw is None:
                    pixels = rng.integers(0, 70, (*size, 3), dtype=np.uint8)
                    pixels[..., label % 3] += 180
                else:
                    pixels = draw(rng, label, size)
                Image.fromarray(pixels).save(folder / f"{i}{suffix}", quality=90)
    return root


def in_private_mount(mount: str, command: list[str]) -> list[str]:
    """`command` in a mount namespace of its own (unshare: no root needed where user
    namespaces are allowed), after the shell command `mount` there."""
    return [
        "unshare",
        "--mount",
        "--map-root-user",
        "sh",
        "-c",
        f'{mount} && exec "$@"',
        "sh",
        *command,
    ]


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


# ------------------------------------------------------------- torchvision references


def randomise_torch_(module, seed: int = 0):
    """Fills a torch module with random weights that keep activations near unit scale,
    nonzero biases (so the BN variants' conv biases matter) and random BN statistics;
    returns it in eval mode."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                bound = (6 / layer.weight[0].numel()) ** 0.5  # He-uniform
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-0.1, 0.1, generator=generator)
            elif isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5, generator=generator)
                layer.bias.uniform_(-0.2, 0.2, generator=generator)
                layer.running_mean.uniform_(-0.5, 0.5, generator=generator)
                layer.running_var.uniform_(0.5, 2.0, generator=generator)
                layer.num_batches_tracked.zero_()
    return module.eval()


def random_torchvision(arch: str, seed: int = 0, num_classes: int = 1000):
    """torchvision.models.<arch> with random weights (built on the meta device first, so
    torchvision's own initialisation is not paid for)."""
    import torch
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(num_classes=num_classes)
    return randomise_torch_(model.to_empty(device="cpu"), seed)


def tiny_torchvision(stages, batch_norm: bool, num_classes: int = 10, seed: int = 0):
    """A real torchvision VGG module (its features, avgpool, classifier and forward) with
    narrow stages: the first classifier layer resized to the last stage's width."""
    import torch
    from torch import nn
    from torchvision.models import vgg

    config = [c for block in stages for c in (*block, "M")]
    with torch.device("meta"):
        model = vgg.VGG(vgg.make_layers(config, batch_norm), num_classes, init_weights=False)
        model.classifier[0] = nn.Linear(stages[-1][-1] * 49, 4096)
    return randomise_torch_(model.to_empty(device="cpu"), seed)


def torch_input(images, mean, std):
    """uint8 NHWC images -> the normalised float NCHW tensor a torchvision model takes."""
    import torch

    x = (torch.from_numpy(images).float() - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).contiguous()


def random_variables(model, image_size: int, seed: int = 0):
    """Random variables for `model` at `image_size`, drawn with numpy (no JAX compile):
    He-uniform kernels, small biases, BN scales near 1 and random running statistics."""
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            bound = (6 / np.prod(leaf.shape[:-1])) ** 0.5
            return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}.get(path[-1].key, (-0.2, 0.2))
        return rng.uniform(low, high, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    """The slow tests (end-to-end runs, tens of seconds each) first: pytest-xdist hands
    tests out in this order, so the two workers end on short tests together instead of
    one waiting for the other's last long one. And the shared smoke run starts now if a
    selected test needs it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if any("smoke_run" in item.fixturenames for item in items):
        start_smoke_run()
