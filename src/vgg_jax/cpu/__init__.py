"""CPU speed work, kept out of the core: injected only through `models.backend_tuning`
(what each module does: docs/architecture.md)."""

from __future__ import annotations

import dataclasses
from typing import Any


def backend() -> str:
    """The default JAX backend ('cpu', 'gpu', 'tpu'); tests force it here."""
    import jax  # not at import time: the CLIs import host_memory before JAX

    return jax.default_backend()


def uses_cpu_kernels(conv_impl: str) -> bool:
    """Whether a model built for `conv_impl` gets this package's layers."""
    return conv_impl == "matmul" or (conv_impl == "auto" and backend() == "cpu")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What a backend's speed work changes in a run; the defaults change nothing."""

    # keyword arguments for `models.create_model`: the conv, dropout and max-pool layers
    layers: dict[str, Any] = dataclasses.field(default_factory=dict)
    # XLA options for a program that runs once per process (the parameter initialisation)
    init_compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # wait for each step (and each metric sum) before dispatching the next
    wait_each_step: bool = False
    # orbax's writer for jax.Array leaves (`checkpoint.create_manager` registers it)
    array_handler: Any = None


def tuning(conv_impl: str) -> Tuning:
    """The CPU speed work for `conv_impl`: off a CPU only the layers of 'matmul' apply.

    - init_compiler_options: on CPU, LLVM's optimisation of the random-number generator
      for every parameter is most of the initialisation's compile time and buys little for
      a single run; the values are the same bit for bit (tests/test_cpu.py);
    - wait_each_step: on several CPU devices only, where XLA:CPU can deadlock in a
      collective when many multi-device programs are queued at once (seen on 2 cores with
      8 fake devices). Accelerators and a single CPU device keep asynchronous steps;
    - array_handler: orbax writes a replicated array in slices, one per device holding a
      copy, so that accelerators share the copy to the host. CPU devices already share
      the host's memory: there each slice is only an eager slicing operation per array,
      device and save (experiments/RESULTS.md). The files are the same kind either way.
    """
    layers = {}
    if uses_cpu_kernels(conv_impl):
        from vgg_jax.cpu import conv
        from vgg_jax.cpu import layers as cpu_layers

        layers = {
            "conv": conv.Conv,
            "dropout": cpu_layers.ByteDropout,
            "max_pool": cpu_layers.max_pool_2x2,
        }
    if backend() != "cpu":
        return Tuning(layers=layers)
    import jax
    import orbax.checkpoint as ocp

    several_devices = jax.device_count() > 1
    return Tuning(
        layers=layers,
        init_compiler_options={"xla_backend_optimization_level": 0},
        wait_each_step=several_devices,
        array_handler=(
            ocp.type_handlers.ArrayHandler(use_replica_parallel=False) if several_devices else None
        ),
    )
