"""Speed of the forward pass and of the full training step on random data.

  python -m vgg_jax.benchmark --config=configs/vgg16.py [--config.batch_size=256] \
      [--steps=20] [--burn_in=10] [--compare=torch] [--json=FILE]

Like the TF seed's benchmark: random uint8 images at the config's size and class count,
`burn_in` untimed steps, then mean +- std seconds per batch over `steps` steps, each
step waited for. Forward is the eval-mode apply; forward-backward is the full jitted
`train.train_step` (loss, gradients, BN statistics, momentum SGD update), both on the
training path's mesh: state replicated, batch sharded over the `data` axis.

Reported per figure: seconds per batch, images/s, achieved TFLOP/s and the fraction of
the device's assumed peak, compile time, peak device memory (where the device reports
it). FLOPs per image are counted analytically (2 x the multiply-adds of every conv and
dense layer; training = 3 x forward: the backward pass costs two forward passes) and
also read from XLA's `compiled.cost_analysis()`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import host_memory, input_pipeline, models, optim, train
from vgg_jax import main as cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags; defined on demand so that importing this module (as
    torch_reference does, also when this file runs as __main__) defines none twice."""
    flags.DEFINE_integer("steps", 20, "Timed steps per figure (after the burn-in).")
    flags.DEFINE_integer("burn_in", 10, "Untimed steps before timing (the TF seed used 10).")
    flags.DEFINE_enum("compare", "none", ["none", "torch"], "Also time the same net in PyTorch.")
    flags.DEFINE_string("json", None, "Write every number to this JSON file.")
    flags.DEFINE_bool("torch_compile", True, "With --compare=torch: try torch.compile first.")
    # vgg_jax.main (whose flag parser we reuse) requires --workdir; we write none.
    FLAGS.set_default("workdir", "unused")


# Class counts of the datasets whose configs we ship; 'synthetic' uses its own field.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}

# Dense bf16 / fp32 (non-tensor-core) peaks, FLOP/s, by device-kind substring (SXM
# spec sheets; the H200 has the H100's compute).
GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
}


def num_classes(config: ml_collections.ConfigDict) -> int:
    """The class count the config's dataset implies."""
    if config.dataset == "synthetic":
        return config.synthetic_classes
    if config.dataset in DATASET_CLASSES:
        return DATASET_CLASSES[config.dataset]
    raise ValueError(
        f"unknown class count for dataset {config.dataset!r}; use "
        "--config.dataset=synthetic --config.synthetic_classes=N"
    )


def dataset_info(config: ml_collections.ConfigDict) -> train.DatasetInfo:
    """What build_model needs, without loading any data (ImageNet statistics)."""
    classes = num_classes(config)
    return train.DatasetInfo(
        class_names=tuple(str(index) for index in range(classes)),
        mean=models.DEFAULT_MEAN,
        std=models.DEFAULT_STD,
        image_size=config.image_size,
        num_train_examples=0,
        num_eval_examples=0,
    )


def analytic_flops(model: models.VGG, image_size: int) -> int:
    """Forward FLOPs per image: 2 x multiply-adds of the conv (3x3, SAME) and dense layers,
    padding taps included (as the usual VGG counts do)."""
    flops, size, channels = 0, image_size, 3
    for block in model.stages:
        for features in block:
            flops += 2 * size * size * 9 * channels * features
            channels = features
        size //= 2
    width = size * size * channels
    head = models.HEADS[model.head]["hidden"]
    if model.head == "cifar":
        head = (*head, 512)
    for features in (*head, model.num_classes):
        flops += 2 * width * features
        width = features
    return flops


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _cpu_mhz(info: dict[str, str]) -> float | None:
    if info.get("CPU max MHz"):
        return float(info["CPU max MHz"])
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo.read())
    except OSError:
        return None
    return float(match.group(1)) if match else None


def cpu_peak(dtype: str) -> tuple[float | None, str]:
    """Estimated peak FLOP/s of this CPU (all cores) and how it was estimated.

    FLOPs/cycle/core for float32: AVX-512 on AMD Zen 4 runs on two 256-bit FMA pipes
    (2 x 8 lanes x 2 = 32), on Intel server cores on two 512-bit FMA units (64); AVX2+FMA
    gives 32. bfloat16 doubles it where the CPU has AVX512_BF16 (dot-product instructions).
    """
    info = _lscpu()
    cpu_flags = set(info.get("Flags", "").split())
    cores = int(info.get("Core(s) per socket", "0") or 0) * int(info.get("Socket(s)", "1") or 1)
    cores = cores or os.cpu_count() or 1
    mhz = _cpu_mhz(info)
    if mhz is None:
        return None, "unknown (no CPU frequency)"
    amd = info.get("Vendor ID") == "AuthenticAMD"
    if "avx512f" in cpu_flags:
        per_cycle, isa = (32, "AVX-512 (Zen 4: 2x256-bit FMA)") if amd else (64, "AVX-512")
    elif "avx2" in cpu_flags and "fma" in cpu_flags:
        per_cycle, isa = 32, "AVX2+FMA"
    else:
        per_cycle, isa = 8, "SSE"
    if dtype == "bfloat16" and "avx512_bf16" in cpu_flags:
        per_cycle, isa = per_cycle * 2, isa + " + AVX512_BF16"
    peak = cores * mhz * 1e6 * per_cycle
    model_name = info.get("Model name", platform.processor())
    how = (
        f"{model_name}: {cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} {dtype} "
        f"FLOPs/cycle ({isa})"
    )
    return peak, how


def device_peak(device: jax.Device, dtype: str) -> tuple[float | None, str]:
    """Assumed peak FLOP/s of one device and where the figure comes from."""
    if device.platform == "cpu":
        return cpu_peak(dtype)
    for kind, peaks in GPU_PEAKS.items():
        if kind in device.device_kind:
            return peaks[dtype], f"{device.device_kind}: {kind} SXM dense {dtype} spec sheet"
    return None, f"{device.device_kind}: unknown peak"


def peak_memory_bytes(device: jax.Device) -> int | None:
    """Peak bytes in use on the device, where the backend reports it (not on CPU)."""
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_steps(step: Callable[[], Any], steps: int, burn_in: int) -> list[float]:
    """Seconds of each of `steps` calls after `burn_in` untimed ones; each call waited for."""
    for _ in range(burn_in):
        jax.block_until_ready(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return times


def summarise_times(
    times: list[float], batch_size: int, flops_per_image: float, peak: float | None
) -> dict[str, float | None]:
    """mean/std (and median) seconds per batch, images/s, achieved TFLOP/s and fraction of
    peak, from the mean as the TF seed did. The median and every step's time are kept
    too: on a shared 2-core machine one slow step can move the mean."""
    mean = statistics.fmean(times)
    achieved = flops_per_image * batch_size / mean
    return {
        "mean_s": mean,
        "std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "median_s": statistics.median(times),
        "times_s": list(times),
        "images_per_s": batch_size / mean,
        "tflops": achieved / 1e12,
        "fraction_of_peak": achieved / peak if peak else None,
    }


def random_batch(
    config: ml_collections.ConfigDict, classes: int, sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Random uint8 images and labels, made on the devices with the batch axis sharded."""
    shape = (config.batch_size, config.image_size, config.image_size, 3)

    @functools.partial(jax.jit, out_shardings=sharding)
    def make(key):
        image_key, label_key = jax.random.split(key)
        return {
            "image": jax.random.randint(image_key, shape, 0, 256, jnp.int32).astype(jnp.uint8),
            "label": jax.random.randint(label_key, shape[:1], 0, classes, jnp.int32),
        }

    return make(jax.random.key(config.seed))


def _compile(function, *args) -> tuple[Any, float, float | None]:
    """AOT-compiles `function` for `args`: (executable, seconds, XLA's FLOP count)."""
    start = time.perf_counter()
    compiled = function.lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and cost.get("flops") else None
    return compiled, seconds, flops


def _figure(
    name: str,
    times: list[float],
    compile_s: float,
    xla_flops: float | None,
    analytic_per_image: float,
    context: dict[str, Any],
) -> dict[str, Any]:
    batch_size, peak = context["batch_size"], context["peak_flops"]
    figure = summarise_times(times, batch_size, analytic_per_image, peak)
    # XLA counts the whole (global) batch; shards on several devices are each counted.
    xla_per_image = xla_flops * context["devices"] / batch_size if xla_flops else None
    figure.update(
        {
            "name": name,
            "compile_s": compile_s,
            "flops_per_image_analytic": analytic_per_image,
            "flops_per_image_xla": xla_per_image,
            "peak_memory_bytes": peak_memory_bytes(jax.devices()[0]),
        }
    )
    return figure


def setup(config: ml_collections.ConfigDict) -> tuple[Mesh, models.VGG, train.TrainState, dict]:
    """The mesh, model, initial train state and one random batch a benchmark times."""
    mesh = input_pipeline.create_mesh()
    train.check_batch_size(config.batch_size, jax.device_count())
    info = dataset_info(config)
    model = train.build_model(config, info)
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=1000)
    state = train.create_train_state(config, model, config.image_size, schedule, mesh)
    batch = random_batch(config, len(info.class_names), NamedSharding(mesh, P("data")))
    return mesh, model, state, batch


def jitted_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable[..., Any]:
    """The same step as training (train.make_step_functions): state donated, replicated."""
    step = train.configured_train_step(config)
    return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def repeated_step(step: Callable[..., Any], state: Any, batch: dict) -> Callable[[], Any]:
    """A call without arguments that runs `step` on the state the previous call returned
    (the state is donated) and returns the step's metrics."""
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    return one_step


def benchmark_jax(config: ml_collections.ConfigDict, steps: int, burn_in: int) -> dict[str, Any]:
    """Times our forward pass and full train step; returns every number."""
    mesh, model, state, batch = setup(config)
    replicated = NamedSharding(mesh, P())
    forward_flops = analytic_flops(model, config.image_size)
    device = jax.devices()[0]
    peak, peak_how = device_peak(device, config.dtype)
    if peak is not None and device.platform != "cpu":
        # CPU 'devices' (fake or not) share one CPU, whose peak is already the total.
        peak, peak_how = peak * mesh.devices.size, f"{mesh.devices.size} x {peak_how}"
    context = {"batch_size": config.batch_size, "peak_flops": peak, "devices": mesh.devices.size}

    @functools.partial(jax.jit, out_shardings=replicated)
    def forward(state, images):
        return state.apply_fn(state.eval_variables(), images, train=False)

    train_jit = jitted_train_step(config, mesh)
    forward_exe, forward_compile, forward_xla = _compile(forward, state, batch["image"])
    forward_times = time_steps(lambda: forward_exe(state, batch["image"]), steps, burn_in)
    train_exe, train_compile, train_xla = _compile(train_jit, state, batch)
    train_times = time_steps(repeated_step(train_exe, state, batch), steps, burn_in)
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    return {
        "framework": "jax",
        "jax_version": jax.__version__,
        "device": device.device_kind,
        "platform": device.platform,
        "devices": mesh.devices.size,
        "conv_impl": config.get("conv_impl", "auto"),
        "parameters": params,
        "peak_flops": peak,
        "peak_assumption": peak_how,
        "forward": _figure(
            "forward", forward_times, forward_compile, forward_xla, forward_flops, context
        ),
        "forward_backward": _figure(
            "forward_backward", train_times, train_compile, train_xla, 3 * forward_flops, context
        ),
    }


def _format_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def format_figure(figure: dict[str, Any]) -> str:
    """One line per figure, as the TF seed printed it, plus throughput and efficiency."""
    fraction = figure["fraction_of_peak"]
    return (
        f"{figure['name']:>16}: {figure['mean_s']:.4f} +- {figure['std_s']:.4f} s/batch "
        f"(median {figure['median_s']:.4f}), "
        f"{figure['images_per_s']:.1f} images/s, {figure['tflops']:.3f} TFLOP/s"
        f" ({'n/a' if fraction is None else f'{100 * fraction:.1f}%'} of peak), "
        f"compile {figure['compile_s']:.1f} s, peak memory "
        f"{_format_bytes(figure['peak_memory_bytes'])}"
    )


# Figures whose ratio ours/theirs is printed; for seconds lower is better, else higher.
RATIO_FIELDS = ("mean_s", "images_per_s", "tflops", "compile_s", "peak_memory_bytes")


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """ours / theirs for each figure of each pass."""
    result = {}
    for name in ("forward", "forward_backward"):
        result[name] = {}
        for field in RATIO_FIELDS:
            a, b = ours[name].get(field), theirs[name].get(field)
            result[name][field] = a / b if a is not None and b else None
    return result


def report(results: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The human-readable summary."""
    ours = results["jax"]
    lines = [
        f"{config.model} width {config.width} {config.dtype}, batch {config.batch_size}, "
        f"{config.image_size}x{config.image_size}, {results['num_classes']} classes; "
        f"{ours['devices']} x {ours['device']} ({ours['platform']}), conv_impl "
        f"{ours['conv_impl']}; {results['steps']} steps after {results['burn_in']} burn-in",
        f"parameters: {ours['parameters']:,}",
        f"FLOPs/image (forward): {ours['forward']['flops_per_image_analytic'] / 1e9:.3f} G "
        f"analytic (2 x conv+dense MACs; train step = 3 x forward); XLA cost_analysis: "
        f"forward {_gflops(ours['forward']['flops_per_image_xla'])}, train step "
        f"{_gflops(ours['forward_backward']['flops_per_image_xla'])}",
        f"peak assumed: {_gflops(ours['peak_flops'], 'FLOP/s')} = {ours['peak_assumption']}",
        "JAX (ours):",
        format_figure(ours["forward"]),
        format_figure(ours["forward_backward"]),
    ]
    if "torch" in results:
        lines.append(report_torch(results))
    return "\n".join(lines)


def report_torch(results: dict[str, Any]) -> str:
    """The PyTorch figures and the ratios ours/theirs."""
    theirs = results["torch"]
    lines = [
        f"PyTorch {theirs['torch_version']} ({theirs['mode']}; parameters "
        f"{theirs['parameters']:,}):",
        format_figure(theirs["forward"]),
        format_figure(theirs["forward_backward"]),
        "ratio ours/PyTorch (images/s > 1: we are faster; seconds < 1: we are faster):",
    ]
    for name, values in results["ratio"].items():
        parts = ", ".join(
            f"{field} {'n/a' if value is None else f'{value:.2f}'}"
            for field, value in values.items()
        )
        lines.append(f"{name:>16}: {parts}")
    return "\n".join(lines)


def _gflops(value: float | None, unit: str = "G") -> str:
    if value is None:
        return "n/a"
    if unit == "G":
        return f"{value / 1e9:.3f} G"
    return f"{value / 1e12:.1f} T{unit}" if value >= 1e12 else f"{value / 1e9:.1f} G{unit}"


def run_benchmark(
    config: ml_collections.ConfigDict,
    steps: int,
    burn_in: int,
    compare: str = "none",
    torch_compile: bool = True,
    on_jax_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every number of one benchmark run (what --json writes). `on_jax_done` sees the
    results before the (slower, optional) PyTorch part starts."""
    if steps < 1 or burn_in < 0:
        raise ValueError(f"need steps >= 1 and burn_in >= 0, got {steps} and {burn_in}")
    results: dict[str, Any] = {
        "config": {
            key: config[key]
            for key in ("model", "width", "dtype", "batch_size", "image_size", "head")
        },
        "num_classes": num_classes(config),
        "steps": steps,
        "burn_in": burn_in,
        "host": platform.node(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["jax"] = benchmark_jax(config, steps, burn_in)
    if on_jax_done is not None:
        on_jax_done(results)
    if compare == "torch":
        from vgg_jax import torch_reference  # torch is optional: import it only here

        results["torch"] = torch_reference.benchmark_torch(config, steps, burn_in, torch_compile)
        results["ratio"] = ratios(results["jax"], results["torch"])
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.configure_logging()
    logging.getLogger("vgg_jax").setLevel(logging.WARNING)
    config = FLAGS.config

    def write_json(results: dict[str, Any]) -> None:
        if FLAGS.json:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
            with open(FLAGS.json, "w") as out:
                json.dump(results, out, indent=2, default=str)
                out.write("\n")

    def jax_done(results: dict[str, Any]) -> None:
        # Print and save our numbers now: they survive a PyTorch part that fails or hangs.
        if FLAGS.compare != "none":
            print(report(results, config), flush=True)
            write_json(results)

    try:
        results = run_benchmark(
            config, FLAGS.steps, FLAGS.burn_in, FLAGS.compare, FLAGS.torch_compile, jax_done
        )
    except (ValueError, ImportError) as error:
        sys.exit(f"error: {cli.one_line(error)}")
    # With --compare our figures are printed already.
    print(report_torch(results) if "torch" in results else report(results, config), flush=True)
    write_json(results)


def run() -> None:
    host_memory.restart_with_retained_memory()
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
