"""vgg_jax.cpu: the CPU kernels compute what the stock layers compute, forward and
backward; they are used only on a CPU backend; the malloc restart of the CLIs."""

import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli

from vgg_jax import cpu, models
from vgg_jax.cpu import conv, host_memory, layers
from vgg_jax.cpu.conv import Plan
from vgg_jax.data import DatasetInfo

# (N, H, W, Cin, Cout): 1x1, 2x2, 3x5 maps, an RGB stem, Winograd-sized maps (even, odd).
SHAPES = [(2, 1, 1, 5, 4), (2, 2, 2, 8, 6), (2, 3, 5, 3, 7), (3, 6, 7, 20, 9), (2, 8, 8, 16, 8)]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _inputs(shape, kernel_size=(3, 3)):
    # numpy draws: each jax.random call would compile a program of its own per shape.
    n, h, w, c_in, c_out = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, h, w, c_in), np.float32)
    kernel = rng.standard_normal((*kernel_size, c_in, c_out), np.float32) / np.sqrt(9 * c_in)
    return x, kernel.astype(np.float32)


def _loss(conv_fn):
    # A non-linear loss so that the output gradient is not all ones.
    return lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel)))


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=2e-5, atol=2e-5)


def _assert_same_conv(ours, x, kernel):
    theirs = jax.jit(conv._xla_conv)
    _assert_close(ours(x, kernel), theirs(x, kernel))
    # Jitted whole: eager operations around the convolution would each compile alone.
    our_grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1)))(x, kernel)
    their_grads = jax.jit(jax.grad(_loss(theirs), argnums=(0, 1)))(x, kernel)
    for actual, expected in zip(our_grads, their_grads, strict=True):
        _assert_close(actual, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_planned_conv_equals_xla_forward_and_gradients(shape):
    _assert_same_conv(jax.jit(conv.conv_same), *_inputs(shape))


@pytest.mark.parametrize(
    "plan", [conv.WINOGRAD, Plan("im2col", "im2col", "im2col"), Plan("xla", "im2col", "xla")]
)
def test_every_way_of_computing_each_part_is_exact(plan):
    """Whatever the shape-based choice, each way of computing each part is exact."""
    for shape in (SHAPES[0], SHAPES[2]):
        _assert_same_conv(
            jax.jit(lambda x, k, plan=plan: conv._planned_conv(x, k, plan)), *_inputs(shape)
        )


def test_other_kernel_sizes_fall_back_to_xla():
    _assert_same_conv(jax.jit(conv.conv_same), *_inputs((2, 4, 3, 3, 5), kernel_size=(5, 1)))


def test_plan_follows_the_measured_crossovers():
    assert conv.plan(2, 2, 512) == Plan("im2col", "im2col", "im2col")
    assert conv.plan(32, 32, 3).forward == "im2col"
    assert conv.plan(8, 8, 256) == conv.WINOGRAD


@pytest.mark.parametrize("use_bias", [True, False])
def test_module_is_a_drop_in_for_nn_conv(use_bias):
    x, _ = _inputs((2, 5, 5, 3, 4))
    kwargs = {"padding": "SAME", "use_bias": use_bias, "kernel_init": models.TORCH_KERNEL_INIT}
    reference = nn.Conv(6, (3, 3), **kwargs)
    ours = conv.Conv(6, (3, 3), **kwargs)
    key = jax.random.key(3)
    ref_vars, our_vars = jax.jit(reference.init)(key, x), jax.jit(ours.init)(key, x)
    assert jax.tree.structure(ref_vars) == jax.tree.structure(our_vars)
    for a, b in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(our_vars), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # same initialisers, same keys
    _assert_close(jax.jit(ours.apply)(ref_vars, x), jax.jit(reference.apply)(ref_vars, x))


def test_module_bfloat16_and_strided_fallback():
    x, _ = _inputs((2, 6, 6, 4, 4))
    ours = conv.Conv(5, (3, 3), dtype=jnp.bfloat16)
    reference = nn.Conv(5, (3, 3), dtype=jnp.bfloat16)
    variables = jax.jit(reference.init)(jax.random.key(0), x)
    out = jax.jit(ours.apply)(variables, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(jax.jit(reference.apply)(variables, x), np.float32),
        atol=0.05,
    )
    strided = conv.Conv(5, (3, 3), strides=2)
    expected = jax.jit(nn.Conv(5, (3, 3), strides=2).apply)(variables, x)
    _assert_close(jax.jit(strided.apply)(variables, x), expected)


INFO = DatasetInfo(tuple("abc"), (120.0,) * 3, (60.0,) * 3, 16, 0, 0)


@pytest.mark.slow
def test_vgg_with_cpu_layers_matches_stock_layers(tiny_config):
    """The whole model: same parameter tree, same logits and gradients, either way."""
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    built = {}
    for impl in ("xla", "matmul"):
        tiny_config.conv_impl = impl
        built[impl] = models.build_model(tiny_config, INFO)
    assert built["matmul"].conv is conv.Conv and built["xla"].conv is nn.Conv
    variables = jax.jit(built["xla"].init)(jax.random.key(1), images)
    other = jax.eval_shape(built["matmul"].init, jax.random.key(1), images)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, other)

    def logits_and_gradients(model):
        def loss(params):
            return jnp.sum(jnp.sin(model.apply({**variables, "params": params}, images)))

        # Jitted: one compilation per model rather than one per operation.
        return jax.jit(lambda v: (model.apply(v, images), jax.grad(loss)(v["params"])))(variables)

    results = {impl: logits_and_gradients(model) for impl, model in built.items()}
    ours, theirs = results["matmul"], results["xla"]
    _assert_close(ours[0], theirs[0])
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(theirs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerator_backends_build_with_stock_flax_layers(tiny_config, monkeypatch, backend):
    monkeypatch.setattr(cpu, "backend", lambda: backend)
    tiny_config.conv_impl = "auto"
    model = models.build_model(tiny_config, INFO)
    assert (model.conv, model.dropout, model.max_pool) == (
        nn.Conv,
        nn.Dropout,
        models.max_pool_2x2,
    )
    assert not cpu.uses_cpu_kernels("auto")
    monkeypatch.setattr(cpu, "backend", lambda: "cpu")
    model = models.build_model(tiny_config, INFO)
    assert (model.conv, model.dropout, model.max_pool) == (
        conv.Conv,
        layers.ByteDropout,
        layers.max_pool_2x2,
    )


def test_initialisation_compiled_for_one_run_gives_the_same_parameters(tiny_config, monkeypatch):
    from vgg_jax import train

    tiny_config.conv_impl = "xla"
    model = models.build_model(tiny_config, INFO)
    state = train.create_train_state(tiny_config, model, 16, lambda step: 0.1)
    params_key, _ = jax.random.split(jax.random.key(tiny_config.seed))
    images = jnp.zeros((1, 16, 16, 3), jnp.uint8)
    fully_optimised = jax.jit(lambda: model.init(params_key, images, train=False))()
    assert cpu.tuning("xla").init_compiler_options  # a CPU backend: the options apply
    for ours, theirs in zip(
        jax.tree.leaves((state.params, state.batch_stats)),
        jax.tree.leaves((fully_optimised["params"], fully_optimised["batch_stats"])),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs)
    monkeypatch.setattr(cpu, "backend", lambda: "gpu")
    assert cpu.tuning("auto") == cpu.Tuning()  # off a CPU, the tuning changes nothing


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2)])
def test_max_pool_2x2_equals_flax_max_pool(shape):
    """Same values as nn.max_pool (odd sizes drop the last row/column), and the same
    gradient where the maximum is unique (random floats)."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape, np.float32)
    pooled = jax.jit(models.max_pool_2x2)(x)
    np.testing.assert_array_equal(jax.jit(layers.max_pool_2x2)(x), pooled)
    weights = rng.standard_normal(pooled.shape, np.float32)
    ours = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x) * weights)))(x)
    theirs = jax.jit(jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) * weights)))(x)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.9])
def test_byte_dropout_drops_at_the_rounded_rate_and_keeps_the_mean(rate):
    x = jnp.ones((64, 33, 17), jnp.float32)  # an odd size: not a multiple of 4 bytes
    layer = layers.ByteDropout(rate)
    out = layer.apply({}, x, rngs={"dropout": jax.random.key(0)})
    effective = round(rate * 256) / 256
    dropped = float(jnp.mean(out == 0))
    assert abs(dropped - effective) < 0.01  # 36k elements: ~5 standard deviations
    assert set(np.unique(np.asarray(out))) == {0.0, np.float32(1 / (1 - effective))}
    assert abs(float(jnp.mean(out)) - 1.0) < 0.03
    other = layer.apply({}, x, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(out, other)
    assert layers.ByteDropout(rate, deterministic=True).apply({}, x) is x
    ones = layers.ByteDropout(1.0).apply({}, x, rngs={"dropout": jax.random.key(0)})
    assert np.all(ones == 0)


# ------------------------------------------------------------------------ host memory


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux/glibc")
def test_restart_environment_adds_tunables_once_and_respects_the_user():
    cpu_only = {"JAX_PLATFORMS": "cpu"}
    env = host_memory.restart_environment({**cpu_only, "GLIBC_TUNABLES": "glibc.rtld.x=1"})
    assert env["GLIBC_TUNABLES"] == ":".join(["glibc.rtld.x=1", *host_memory.TUNABLES])
    # Already restarted (or the user chose malloc settings): no second restart.
    assert host_memory.restart_environment(env) is None
    chosen = {**cpu_only, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    assert host_memory.restart_environment(chosen) is None
    assert host_memory.restart_environment({**cpu_only, "VGG_JAX_KEEP_MEMORY": "0"}) is None
    # JAX on a GPU or TPU: XLA:CPU's buffers are not the problem there.
    assert host_memory.restart_environment({"JAX_PLATFORMS": "cuda"}) is None


def test_no_restart_where_an_accelerator_plugin_is_installed(monkeypatch):
    monkeypatch.setattr(host_memory, "accelerator_installed", lambda: True)
    assert not host_memory.jax_runs_on_cpu({})
    assert host_memory.jax_runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    monkeypatch.setattr(host_memory, "accelerator_installed", lambda: False)
    assert host_memory.jax_runs_on_cpu({})


def test_programs_from_stdin_or_dash_c_are_never_replayed():
    assert host_memory.replayable(["python", "-m", "vgg_jax.main", "--config=x"])
    assert host_memory.replayable(["python", "-u", "script.py"])
    assert not host_memory.replayable(["python", "-c", "print(1)"])
    assert not host_memory.replayable(["python", "-"])
    assert not host_memory.replayable(["python"])


# Restarts, then times a jitted op whose 64 MiB output XLA allocates afresh on each call.
FAULTS = """
import os, resource, sys
from vgg_jax.cpu import host_memory
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


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux/glibc")
def test_restart_keeps_pid_and_arguments_and_stops_page_faults(tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    env = {"VGG_JAX_KEEP_MEMORY": "1", "JAX_PLATFORMS": "cpu"}
    result = _run_script(script, "--flag=1", env=env)
    assert result.returncode == 0, result.stderr
    starts = [line for line in result.stdout.splitlines() if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # restarted once, same process
    last = result.stdout.splitlines()[-1]
    assert "args ['--flag=1']" in last and "glibc.malloc.top_pad" in last
    # 64 MiB = 16,384 pages: without the tunables each call faults them all in again.
    assert int(last.split()[3]) < 1000, last

    opted_out = _run_script(script, env={"VGG_JAX_KEEP_MEMORY": "0"})
    assert opted_out.returncode == 0, opted_out.stderr
    assert opted_out.stdout.count("start") == 1
    assert int(opted_out.stdout.splitlines()[-1].split()[3]) > 10_000

    # The same program given with -c is run once, without the restart.
    inline = run_cli("-c", FAULTS, env=env)
    assert inline.returncode == 0 and inline.stdout.count("start") == 1


def _run_script(script, *args, env):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_never_restarts_an_interactive_session(monkeypatch):
    def refuse(*args):
        raise AssertionError("execve called")

    monkeypatch.setattr(host_memory.os, "execve", refuse)
    monkeypatch.setattr(host_memory.sys, "ps1", ">>> ", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("VGG_JAX_KEEP_MEMORY", raising=False)
    assert host_memory.interactive()
    host_memory.restart_with_retained_memory()  # returns instead of replacing the process


# Restarts after (mode 'pending') a SIGTERM arrived while signals were held, as one
# arriving during the restart is; the restarted process reports its signal mask at start
# and whether its guard received the signal.
SIGNAL_DURING_RESTART = """
import os, signal, sys
if os.environ.get("GLIBC_TUNABLES"):
    held = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    from vgg_jax.preemption import PreemptionGuard
    guard = PreemptionGuard().install()
    print("held", held, "requested", guard.requested, "signal", guard.signal_number)
    sys.exit(0)
from vgg_jax.cpu import host_memory
if sys.argv[1] == "pending":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)
host_memory.restart_with_retained_memory()
"""


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux/glibc")
def test_a_signal_during_the_restart_reaches_the_guard(tmp_path):
    script = tmp_path / "signal_during_restart.py"
    script.write_text(SIGNAL_DURING_RESTART)
    env = {"VGG_JAX_KEEP_MEMORY": "1", "JAX_PLATFORMS": "cpu"}
    # The restart holds SIGTERM and SIGINT blocked across the exec ...
    quiet = _run_script(script, "none", env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.split() == ["held", "True", "requested", "False", "signal", "None"]
    # ... so that one that arrives meanwhile waits for the guard instead of killing the
    # new interpreter (status 143), and the guard's installation delivers it.
    pending = _run_script(script, "pending", env=env)
    assert pending.returncode == 0, pending.stderr
    assert pending.stdout.split()[:4] == ["held", "True", "requested", "True"]
