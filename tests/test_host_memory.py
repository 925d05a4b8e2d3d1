"""vgg_jax.host_memory: the CLIs restart once with glibc tunables that keep freed memory,
so that XLA:CPU's big per-step buffers stop page-faulting."""

import platform

import pytest
from conftest import run_cli

from vgg_jax import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux/glibc")
def test_restart_environment_adds_tunables_once_and_respects_the_user():
    env = host_memory.restart_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.x=1"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == ":".join(["glibc.rtld.x=1", *host_memory.TUNABLES])
    # Already restarted (or the user chose malloc settings): no second restart.
    assert host_memory.restart_environment(env) is None
    assert (
        host_memory.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) is None
    )
    assert host_memory.restart_environment({"VGG_JAX_KEEP_MEMORY": "0"}) is None


# Restarts, then times a jitted op whose 64 MiB output XLA allocates afresh on each call.
FAULTS = """
import os, resource, sys
from vgg_jax import host_memory
print("start", os.getpid(), flush=True)
host_memory.restart_with_retained_memory()
import jax, jax.numpy as jnp
double = jax.jit(lambda y: y * 2)
y = jnp.ones((16 * 2**20,))
for _ in range(3):
    double(y).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    double(y).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5
print("faults per call", faults, "args", sys.argv[1:], "tunables", os.environ.get("GLIBC_TUNABLES"))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux/glibc")
def test_restart_keeps_pid_and_arguments_and_stops_page_faults():
    result = run_cli("-c", FAULTS, "--flag=1", env={"VGG_JAX_KEEP_MEMORY": "1"})
    assert result.returncode == 0, result.stderr
    starts = [line for line in result.stdout.splitlines() if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # restarted once, same process
    last = result.stdout.splitlines()[-1]
    assert "args ['--flag=1']" in last and "glibc.malloc.top_pad" in last
    # 64 MiB = 16,384 pages: without the tunables each call faults them all in again.
    assert int(last.split()[3]) < 1000, last

    opted_out = run_cli("-c", FAULTS, env={"VGG_JAX_KEEP_MEMORY": "0"})
    assert opted_out.returncode == 0, opted_out.stderr
    assert opted_out.stdout.count("start") == 1
    assert int(opted_out.stdout.splitlines()[-1].split()[3]) > 10_000


def test_never_restarts_an_interactive_session(monkeypatch):
    def refuse(*args):
        raise AssertionError("execve called")

    monkeypatch.setattr(host_memory.os, "execve", refuse)
    monkeypatch.setattr(host_memory.sys, "ps1", ">>> ", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("VGG_JAX_KEEP_MEMORY", raising=False)
    assert host_memory.interactive()
    host_memory.restart_with_retained_memory()  # returns instead of replacing the process
