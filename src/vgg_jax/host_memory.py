"""Keep freed host memory in the process, so that XLA:CPU does not page-fault its
buffers in afresh on every step.

Why: XLA:CPU allocates each execution's temporaries (1.1 GB for a VGG16-CIFAR train step
at batch 128) with malloc, and glibc serves blocks that large with a fresh mmap and
hands them back with munmap on free; blocks requested from a worker thread's own arena
fall back to mmap even when mmap is switched off. So every step touched ~330,000 new
4 KiB pages, and the kernel's page-fault and zeroing work took ~0.3 s of a 2.3 s step on
the 2-core machine of experiments/RESULTS.md. With one arena, no mmap, no trimming and a
1 GiB top pad, freed blocks stay in the heap and the next step reuses them: 0 page
faults per step once the heap has grown to its working size.

glibc reads these settings only at process start (calling mallopt() later, even before
importing JAX, left ~100,000 faults per step), so the command-line entry points restart
themselves once with GLIBC_TUNABLES set: same process id, arguments and streams. The
cost: the process keeps its peak heap until it exits, which suits a training or
benchmark process. Importing the library changes nothing. Opt out with
VGG_JAX_KEEP_MEMORY=0, or set any glibc.malloc tunable yourself.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = (
    # Back the heap with transparent huge pages where the kernel allows it (THP
    # "madvise" or "always"): 512x fewer page faults while the heap grows, and fewer TLB
    # misses on 100 MB activations (VGG16-CIFAR train step 1.36 -> 1.28 s).
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",
    "glibc.malloc.top_pad=1073741824",
)


def restart_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart is not wanted: off
    Linux/glibc, opted out, or a glibc.malloc tunable already set (by us or the user)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if environ.get("VGG_JAX_KEEP_MEMORY", "1") == "0":
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in existing:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [existing, *TUNABLES]))
    return env


def interactive() -> bool:
    """Whether this is an interactive Python session or an IPython/Jupyter kernel."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "IPython" in sys.modules


def restart_with_retained_memory() -> None:
    """Re-executes this Python command with the tunables above, unless not wanted.
    Returns only when no restart is wanted; call it first thing in a CLI's entry point.
    Never replaces an interactive interpreter or a notebook kernel (a CLI's `run()`
    called from Jupyter or Colab just runs without the settings)."""
    if interactive():
        return
    env = restart_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
