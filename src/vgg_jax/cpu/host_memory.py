"""Keep freed host memory in the process, so that XLA:CPU does not page-fault its step
buffers in afresh on every step (experiments/RESULTS.md, "Speed", CPU).

Why: XLA:CPU mallocs each execution's temporaries (about a gigabyte for a VGG16-CIFAR
train step); glibc serves blocks that large with a fresh mmap (from a worker thread's
arena even with mmap off) and munmaps them on free. With one arena, no mmap, no trimming
and a 1 GiB top pad, freed blocks stay in the heap and the next step reuses them.

glibc reads these settings only at process start, so the CLIs restart themselves once
(same process id, arguments and streams) with GLIBC_TUNABLES set: only where JAX runs on
the CPU, never for a program read from stdin or given with -c, nor in an interactive
session or notebook. The cost: the process keeps its peak heap until it exits. Opt out
with VGG_JAX_KEEP_MEMORY=0, or set any glibc.malloc tunable yourself.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import platform
import signal
import sys
from collections.abc import Mapping, Sequence

from vgg_jax.preemption import PreemptionGuard

TUNABLES = (
    # Back the heap with transparent huge pages where the kernel allows it: far fewer
    # page faults while the heap grows, and fewer TLB misses on large activations.
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",
    "glibc.malloc.top_pad=1073741824",
)
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def accelerator_installed() -> bool:
    """Whether a JAX GPU/TPU plugin is installed (found without importing JAX)."""
    if any(importlib.util.find_spec(name) for name in ACCELERATOR_MODULES):
        return True
    namespace = importlib.util.find_spec("jax_plugins")
    locations = namespace.submodule_search_locations if namespace else None
    return bool(locations and list(pkgutil.iter_modules(locations)))


def jax_runs_on_cpu(environ: Mapping[str, str]) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_installed()


def replayable(orig_argv: Sequence[str]) -> bool:
    """Whether re-running `orig_argv` runs the same program: not for `python -c CODE`
    or a program read from stdin (`python - < x.py`, `python < x.py`)."""
    arguments = list(orig_argv[1:])
    while arguments and arguments[0].startswith("-") and arguments[0] not in ("-m", "-c", "-"):
        arguments.pop(0)  # interpreter options such as -u, -X importtime
    return bool(arguments) and arguments[0] not in ("-c", "-")


def restart_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart is not wanted: off
    Linux/glibc, off the CPU, opted out, or a glibc.malloc tunable already set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if environ.get("VGG_JAX_KEEP_MEMORY", "1") == "0" or not jax_runs_on_cpu(environ):
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in existing:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [existing, *TUNABLES]))}


def interactive() -> bool:
    """Whether this is an interactive Python session or an IPython/Jupyter kernel."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "IPython" in sys.modules


def restart_with_retained_memory() -> None:
    """Re-executes this Python command with the tunables above; returns only where no
    restart is wanted. Call it first thing in a CLI's entry point."""
    if interactive() or not replayable(sys.orig_argv):
        return
    env = restart_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # SIGTERM or Ctrl-C during the restart would find the new interpreter without its
    # handlers and kill it (status 143): held blocked across the exec (the mask and
    # pending signals survive it), they reach the handlers once preemption.PreemptionGuard
    # installs them and unblocks.
    signal.pthread_sigmask(signal.SIG_BLOCK, PreemptionGuard.SIGNALS)
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    finally:  # only reached if the exec failed
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PreemptionGuard.SIGNALS)
