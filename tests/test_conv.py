"""vgg_jax.conv: the matmul convolution equals XLA's, forward and backward, and is a
drop-in replacement for nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import conv, models, train
from vgg_jax.conv import Plan

PARTS = ("xla", "im2col", "shifted", "winograd")
# (N, H, W, Cin, Cout): 1x1, 2x2, 3x5 maps, an RGB stem, a map big enough for the XLA plan.
SHAPES = [(2, 1, 1, 5, 4), (2, 2, 2, 8, 6), (2, 3, 5, 3, 7), (3, 6, 7, 20, 9), (2, 8, 8, 16, 8)]


def _inputs(shape, kernel_size=(3, 3)):
    n, h, w, c_in, c_out = shape
    x_key, k_key = jax.random.split(jax.random.key(sum(shape)))
    x = jax.random.normal(x_key, (n, h, w, c_in))
    kernel = jax.random.normal(k_key, (*kernel_size, c_in, c_out)) / np.sqrt(9 * c_in)
    return x, kernel


def _loss(conv_fn):
    # A non-linear loss so that the output gradient is not all ones.
    return lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel)))


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_conv_equals_xla_forward_and_gradients(shape):
    x, kernel = _inputs(shape)
    ours = jax.jit(lambda x, k: conv.conv_same(x, k, "matmul"))
    theirs = jax.jit(conv._xla_conv)
    _assert_close(ours(x, kernel), theirs(x, kernel))
    our_grads = jax.grad(_loss(ours), argnums=(0, 1))(x, kernel)
    their_grads = jax.grad(_loss(theirs), argnums=(0, 1))(x, kernel)
    for actual, expected in zip(our_grads, their_grads, strict=True):
        _assert_close(actual, expected)


# Each part computed every way (the other parts vary with it): covers every code path.
PLANS = [Plan(part, part, part) for part in PARTS] + [Plan("xla", "im2col", "shifted")]


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_every_part_every_way_gives_the_same_numbers(shape):
    """Whatever the shape-based choice, each way of computing each part is exact."""
    x, kernel = _inputs(shape)
    expected = jax.grad(_loss(conv._xla_conv), argnums=(0, 1))(x, kernel)
    for plan in PLANS:
        run = jax.jit(lambda x, k, plan=plan: conv._planned_conv(x, k, plan))
        _assert_close(run(x, kernel), conv._xla_conv(x, kernel))
        grads = jax.grad(_loss(run), argnums=(0, 1))(x, kernel)
        for actual, want in zip(grads, expected, strict=True):
            _assert_close(actual, want)


def test_other_kernel_sizes():
    x, kernel = _inputs((2, 4, 3, 3, 5), kernel_size=(5, 1))
    _assert_close(conv.conv_same(x, kernel, "matmul"), conv._xla_conv(x, kernel))
    grads = jax.grad(_loss(lambda x, k: conv.conv_same(x, k, "matmul")), (0, 1))(x, kernel)
    expected = jax.grad(_loss(conv._xla_conv), (0, 1))(x, kernel)
    for actual, want in zip(grads, expected, strict=True):
        _assert_close(actual, want)


def test_plan_follows_the_measured_crossovers():
    assert conv.plan(2, 2, 512, 512) == Plan("im2col", "im2col", "im2col")
    assert conv.plan(32, 32, 3, 64).forward == "im2col"
    assert conv.plan(8, 8, 256, 256) == Plan("winograd", "winograd", "winograd")
    assert conv.plan(8, 8, 256, 256, (5, 5)) == Plan("xla", "xla", "shifted")


@pytest.mark.parametrize("impl", ["auto", "matmul"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_module_is_a_drop_in_for_nn_conv(impl, use_bias):
    x, _ = _inputs((2, 5, 5, 3, 4))
    kwargs = {"padding": "SAME", "use_bias": use_bias, "kernel_init": models.TORCH_KERNEL_INIT}
    reference = nn.Conv(6, (3, 3), **kwargs)
    ours = conv.Conv(6, (3, 3), impl=impl, **kwargs)
    key = jax.random.key(3)
    ref_vars, our_vars = reference.init(key, x), ours.init(key, x)
    assert jax.tree.structure(ref_vars) == jax.tree.structure(our_vars)
    for a, b in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(our_vars), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # same initialisers, same keys
    _assert_close(ours.apply(ref_vars, x), reference.apply(ref_vars, x))


def test_module_bfloat16_and_strided_fallback():
    x, _ = _inputs((2, 6, 6, 4, 4))
    ours = conv.Conv(5, (3, 3), dtype=jnp.bfloat16, impl="matmul")
    reference = nn.Conv(5, (3, 3), dtype=jnp.bfloat16)
    variables = reference.init(jax.random.key(0), x)
    out = ours.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(reference.apply(variables, x), np.float32),
        atol=0.05,
    )
    strided = conv.Conv(5, (3, 3), strides=2, impl="matmul")
    expected = nn.Conv(5, (3, 3), strides=2).apply(variables, x)
    _assert_close(strided.apply(variables, x), expected)


def test_conv_class_and_unknown_impl():
    assert conv.conv_class("xla") is nn.Conv
    assert conv.conv_class("auto") is conv.Conv
    assert conv.conv_class("matmul") is conv.MatmulConv
    with pytest.raises(ValueError, match="conv_impl"):
        conv.conv_class("fast")
    with pytest.raises(ValueError, match="conv impl"):
        conv.conv_same(jnp.zeros((1, 2, 2, 1)), jnp.zeros((3, 3, 1, 1)), "fast")


def test_vgg_with_matmul_conv_matches_xla_conv(tiny_config):
    """The whole model: same parameter tree, same logits and gradients, either conv."""
    info = train.DatasetInfo(tuple("abc"), (120.0,) * 3, (60.0,) * 3, 16, 0, 0)
    images = jax.random.randint(jax.random.key(0), (4, 16, 16, 3), 0, 256).astype(jnp.uint8)
    models_by_impl = {}
    for impl in ("xla", "matmul"):
        tiny_config.conv_impl = impl
        models_by_impl[impl] = train.build_model(tiny_config, info)
    variables = models_by_impl["xla"].init(jax.random.key(1), images)
    other = models_by_impl["matmul"].init(jax.random.key(1), images)
    assert jax.tree.structure(variables) == jax.tree.structure(other)

    def loss(params, model):
        logits = model.apply({**variables, "params": params}, images)
        return jnp.sum(jnp.sin(logits))

    for impl, model in models_by_impl.items():
        models_by_impl[impl] = (
            model.apply(variables, images),
            jax.grad(loss)(variables["params"], model),
        )
    ours, theirs = models_by_impl["matmul"], models_by_impl["xla"]
    _assert_close(ours[0], theirs[0])
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(theirs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
