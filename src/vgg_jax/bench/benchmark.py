"""The step-speed benchmark (`python -m vgg_jax.benchmark`, docs/benchmarking.md), and with
--input=DIR the host input pipeline's (bench/input_speed.py). It times the step training
runs (train.make_step_functions, on the training path's mesh), so that a figure here is
one of training; the TF reference's method otherwise: burn-in, then mean +- std seconds
per batch, each step waited for.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from vgg_jax import cli, config_checks, data, models, optim, train
from vgg_jax.bench import profiling
from vgg_jax.cpu import host_memory

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags; defined when the CLI runs, so that importing this module defines
    none (tests and notebooks import it)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a configuration file (configs/*.py).", lock_config=True
    )
    flags.mark_flag_as_required("config")
    flags.DEFINE_integer("steps", 20, "Timed steps per figure (after the burn-in).")
    flags.DEFINE_integer("burn_in", 10, "Untimed steps before timing (as the TF reference).")
    flags.DEFINE_enum("compare", "none", ["none", "torch"], "Also time the same net in PyTorch.")
    flags.DEFINE_string("json", None, "Write every number to this JSON file.")
    flags.DEFINE_bool("torch_compile", True, "With --compare=torch: try torch.compile first.")
    flags.DEFINE_string("input", None, "Time the host input pipeline on DIR/train instead.")
    flags.DEFINE_list(
        "input_workers", ["1", "2"], "With --input: counts of workers (and of threads) to time."
    )


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
    flops = (compiled.cost_analysis() or {}).get("flops")  # None where XLA has no count
    return compiled, seconds, float(flops) if flops else None


def setup(config: ml_collections.ConfigDict) -> tuple[Mesh, models.VGG, train.TrainState, dict]:
    """The mesh, model, initial train state and one random batch a benchmark times."""
    mesh = data.create_mesh()
    config_checks.validate(config, jax.device_count())
    info = data.DatasetInfo.without_data(config)
    model = models.build_model(config, info)
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=1000)
    state = train.create_train_state(config, model, config.image_size, schedule, mesh)
    batch = random_batch(config, len(info.class_names), NamedSharding(mesh, P("data")))
    return mesh, model, state, batch


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
    forward_flops = profiling.analytic_flops(model, config.image_size)
    device, devices = jax.devices()[0], mesh.devices.size
    peak, peak_how = profiling.device_peak(device, config.dtype)
    if peak is not None and device.platform != "cpu":
        # CPU 'devices' (fake or not) share one CPU, whose peak is already the total.
        peak, peak_how = peak * devices, f"{devices} x {peak_how}"

    def figure(name, times, compile_s, xla_flops, flops_per_image) -> dict[str, Any]:
        batch_size = config.batch_size
        return {
            "name": name,
            **profiling.summarise_times(times, batch_size, flops_per_image, peak),
            "compile_s": compile_s,
            # XLA counts the whole (global) batch; shards on several devices are each counted.
            "flops_per_image_xla": xla_flops * devices / batch_size if xla_flops else None,
            "peak_memory_bytes": profiling.peak_memory_bytes(device),
        }

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def forward(state, images):
        return state.apply_fn(state.eval_variables(), images, train=False)

    train_jit, _ = train.make_step_functions(config, mesh)
    forward_exe, forward_compile, forward_xla = _compile(forward, state, batch["image"])
    forward_times = profiling.time_steps(lambda: forward_exe(state, batch["image"]), steps, burn_in)
    train_exe, train_compile, train_xla = _compile(train_jit, state, batch)
    train_times = profiling.time_steps(repeated_step(train_exe, state, batch), steps, burn_in)
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    return {
        "framework": "jax",
        "jax_version": jax.__version__,
        "device": device.device_kind,
        "platform": device.platform,
        "devices": devices,
        "conv_impl": config.conv_impl,
        "parameters": params,
        "peak_flops": peak,
        "peak_assumption": peak_how,
        "forward": figure("forward", forward_times, forward_compile, forward_xla, forward_flops),
        "forward_backward": figure(
            "forward_backward", train_times, train_compile, train_xla, 3 * forward_flops
        ),
    }


def format_figure(figure: dict[str, Any]) -> str:
    """One line per figure, as the TF reference printed it, plus throughput and efficiency."""
    fraction, memory = figure["fraction_of_peak"], figure["peak_memory_bytes"]
    return (
        f"{figure['name']:>16}: {figure['mean_s']:.4f} +- {figure['std_s']:.4f} s/batch "
        f"(median {figure['median_s']:.4f}), "
        f"{figure['images_per_s']:.1f} images/s, {figure['tflops']:.3f} TFLOP/s"
        f" ({'n/a' if fraction is None else f'{100 * fraction:.1f}%'} of peak), "
        f"compile {figure['compile_s']:.1f} s, peak memory "
        f"{'n/a' if memory is None else f'{memory / 2**30:.2f} GiB'}"
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
        "num_classes": len(data.DatasetInfo.without_data(config).class_names),
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
        from vgg_jax.bench import torch_reference  # torch is optional: import it only here

        results["torch"] = torch_reference.benchmark_torch(config, steps, burn_in, torch_compile)
        results["ratio"] = ratios(results["jax"], results["torch"])
    return results


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    cli.configure_logging()
    logging.getLogger("vgg_jax").setLevel(logging.WARNING)
    config = FLAGS.config

    def write(text: str, results: dict[str, Any]) -> None:
        print(text, flush=True)
        if FLAGS.json:
            path = Path(FLAGS.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    if FLAGS.input:
        from vgg_jax.bench import input_speed  # tf.data is imported only for this
        from vgg_jax.data import workers

        workers.EXIT_ON_WORKER_DEATH = True  # a dead worker: one line, not a hang

        try:
            counts = [int(w) for w in FLAGS.input_workers]
            results = input_speed.run(config, FLAGS.input, counts, FLAGS.steps, FLAGS.burn_in)
        except (ValueError, data.DatasetUnavailableError) as error:
            sys.exit(f"error: {cli.one_line(error)}")
        write(input_speed.report(results), results)
        return
    try:
        # Our numbers are printed and saved first: they survive a PyTorch part that fails
        # or hangs.
        results = run_benchmark(
            config,
            FLAGS.steps,
            FLAGS.burn_in,
            FLAGS.compare,
            FLAGS.torch_compile,
            lambda results: write(report(results, config), results),
        )
    except (ValueError, ImportError, data.DatasetUnavailableError) as error:
        sys.exit(f"error: {cli.one_line(error)}")
    if "torch" in results:
        write(report_torch(results), results)


def run() -> None:
    host_memory.restart_with_retained_memory()
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
