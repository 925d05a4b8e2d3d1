"""CPU speed work, kept out of the core and injected only where it applies.

- `conv.Conv`: 3x3 convolutions as Winograd transforms and matrix products;
- `layers.ByteDropout`, `layers.max_pool_2x2`: cheaper dropout masks and max-pool
  backward on XLA:CPU;
- `host_memory`: the CLIs restart once with glibc malloc settings that keep XLA:CPU's
  step buffers in the heap;
- `serialise_steps`: a guard against a deadlock of queued collectives on fake CPU
  devices;
- `run_once_compiler_options`: XLA:CPU options for programs that run once (the
  parameter initialisation).

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


@functools.cache
def serialise_steps() -> bool:
    """Whether to wait for each step before dispatching the next. Only for several CPU
    devices (jax_num_cpu_devices): XLA:CPU can deadlock in a collective
    when many multi-device programs are queued at once (seen on 2 cores with 8 fake
    devices). Real accelerators and a single CPU device keep fully asynchronous steps."""
    import jax

    return backend() == "cpu" and jax.device_count() > 1


def run_once_compiler_options() -> dict[str, Any]:
    """XLA compiler options for a program that runs once per process (the parameter
    initialisation). On CPU, LLVM's optimisation of the random-number generator for every
    parameter is most of that program's compile time, and buys little for a single run;
    the values are the same bit for bit (tests/test_cpu.py). Other backends: none."""
    return {"xla_backend_optimization_level": 0} if backend() == "cpu" else {}
