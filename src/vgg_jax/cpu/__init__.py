"""CPU speed work, kept out of the core and injected only where it applies.

- `conv.Conv`: 3x3 convolutions as Winograd transforms and matrix products;
- `layers.ByteDropout`, `layers.max_pool_2x2`: cheaper dropout masks and max-pool
  backward on XLA:CPU;
- `host_memory`: the CLIs restart once with glibc malloc settings that keep XLA:CPU's
  step buffers in the heap;
- `serialise_steps`: a guard against a deadlock of queued collectives on fake CPU
  devices;
- `run_once_compiler_options`: XLA:CPU options for programs that run once (the
  parameter initialisation);
- `save_replicated_arrays_whole`: orbax's checkpoint writer without its per-device
  slicing of replicated arrays, on several CPU devices.

`models.build_model` asks `layers_for(config.conv_impl)` which layers to build with: these
on a CPU backend ('auto') or everywhere ('matmul'), none (stock Flax) otherwise.
"""

from __future__ import annotations

import functools
from typing import Any


def backend() -> str:
    """The default JAX backend ('cpu', 'gpu', 'tpu'); tests force it here."""
    import jax  # not at import time: the CLIs import host_memory before JAX

    return jax.default_backend()


def uses_cpu_kernels(conv_impl: str) -> bool:
    """Whether a model built for `conv_impl` gets this package's layers."""
    return conv_impl == "matmul" or (conv_impl == "auto" and backend() == "cpu")


def layers_for(conv_impl: str) -> dict[str, Any]:
    """Keyword arguments for `models.create_model`: the CPU layers, or none."""
    if not uses_cpu_kernels(conv_impl):
        return {}
    from vgg_jax.cpu import conv
    from vgg_jax.cpu import layers as cpu_layers

    return {
        "conv": conv.Conv,
        "dropout": cpu_layers.ByteDropout,
        "max_pool": cpu_layers.max_pool_2x2,
    }


def several_cpu_devices() -> bool:
    """Whether this run is on several CPU devices (jax_num_cpu_devices, or one per
    process of a multi-process CPU run)."""
    import jax

    return backend() == "cpu" and jax.device_count() > 1


@functools.cache
def serialise_steps() -> bool:
    """Whether to wait for each step before dispatching the next. Only for several CPU
    devices: XLA:CPU can deadlock in a collective
    when many multi-device programs are queued at once (seen on 2 cores with 8 fake
    devices). Real accelerators and a single CPU device keep fully asynchronous steps."""
    return several_cpu_devices()


@functools.cache
def save_replicated_arrays_whole() -> None:
    """Registers orbax's array writer without replica-parallel saving, for this process.

    Orbax writes a replicated array in slices, one per device holding a copy, so that
    accelerators share the copy to the host. CPU devices already share the host's
    memory: there each slice is only an eager slicing operation, per array, device and
    save (experiments/RESULTS.md). The files are the same kind either way: any orbax
    reader restores them. Call only on several CPU devices."""
    import logging

    import jax
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a handler is replaced
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )
    finally:
        absl_logger.setLevel(level)


def run_once_compiler_options() -> dict[str, Any]:
    """XLA compiler options for a program that runs once per process (the parameter
    initialisation). On CPU, LLVM's optimisation of the random-number generator for every
    parameter is most of that program's compile time, and buys little for a single run;
    the values are the same bit for bit (tests/test_cpu.py). Other backends: none."""
    return {"xla_backend_optimization_level": 0} if backend() == "cpu" else {}
