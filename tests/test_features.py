"""Named-layer features and the perceptual loss: equal to torchvision's features[:k],
differentiable, jit-able, and computing nothing past the deepest layer asked for."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables, tiny_torchvision, torch_input

import vgg_jax
from vgg_jax import models, pretrained, spec

STAGES = ((8, 8), (16,), (16, 24))


def images(size=24, count=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    model = models.create_model("custom", 4, stages=STAGES, head="torchvision")
    return model, random_variables(model, 24)


def test_default_layers_are_every_block_s_last_convolution():
    assert spec.block_outputs(spec.STAGES["vgg16"]) == (
        "conv1_2",
        "conv2_2",
        "conv3_3",
        "conv4_3",
        "conv5_3",
    )
    model = models.vgg16_bn()
    shapes = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, method="features")[0],
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8),
    )
    assert {name: s.shape for name, s in shapes.items()} == {
        "conv1_2": (1, 64, 64, 64),
        "conv2_2": (1, 32, 32, 128),
        "conv3_3": (1, 16, 16, 256),
        "conv4_3": (1, 8, 8, 512),
        "conv5_3": (1, 4, 4, 512),
    }


@pytest.mark.parametrize("batch_norm", (False, True))
def test_features_equal_torchvision_features_prefix(batch_norm):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    reference = tiny_torchvision(STAGES, batch_norm)
    model, variables = pretrained.from_torchvision(reference.state_dict())
    batch = images()
    x = torch_input(batch, model.mean, model.std)
    layers = ("conv1_1", "conv1_2", "pool1", "conv3_1", "conv3_2", "pool3")
    for before_relu in (False, True):
        names = [n for n in layers if not (before_relu and n.startswith("pool"))]
        ours = model.apply(
            variables, batch, layers=names, before_relu=before_relu, method="features"
        )
        assert list(ours) == names
        for name in names:
            k = pretrained.torchvision_feature_index(STAGES, batch_norm, name, before_relu)
            with torch.no_grad():
                theirs = reference.features[:k](x).permute(0, 2, 3, 1).numpy()
            got = np.asarray(ours[name])
            assert np.abs(got - theirs).max() <= 1e-5 * np.abs(theirs).max(), (name, before_relu)


def test_nothing_past_the_deepest_layer_is_computed(tiny):
    model, variables = tiny
    # Variables holding only the first block: anything deeper would fail to find its own.
    first_block = {
        collection: {k: v for k, v in tree.items() if spec.block_of(k) == 1}
        for collection, tree in variables.items()
    }
    out = model.apply(first_block, images(), layers=("conv1_2",), method="features")
    assert out["conv1_2"].shape == (2, 24, 24, 8)
    with pytest.raises(Exception, match="conv2_1"):
        model.apply(first_block, images(), layers=("conv2_1",), method="features")

    def convolutions(layers):
        jaxpr = jax.make_jaxpr(
            lambda x: model.apply(variables, x, layers=layers, method="features")
        )(images())
        return str(jaxpr).count("conv_general_dilated")

    assert convolutions(("conv1_1",)) == 1
    assert convolutions(("conv2_1", "conv1_2")) == 3
    assert convolutions(None) == 5


def test_unknown_layers_are_named(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match=r"unknown feature layers \['conv5_3'\]"):
        model.apply(variables, images(), layers=("conv5_3",), method="features")
    with pytest.raises(ValueError, match="before_relu"):
        model.apply(variables, images(), layers=("pool1",), before_relu=True, method="features")


def test_gradients_with_respect_to_images_match_finite_differences(tiny):
    model, variables = tiny
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64)
        # numpy inputs and arithmetic outside the jitted functions: no eager operations
        # to compile one by one.
        variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
        x = images(size=8, count=1, seed=1).astype(np.float64)
        y = images(size=8, count=1, seed=2).astype(np.float64)

        def loss(x):
            return vgg_jax.perceptual_loss(
                x, y, model64, variables64, layers=("conv1_2", "conv3_2"), normalize_channels=True
            )

        gradient = np.asarray(jax.jit(jax.grad(loss))(x))
        assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0
        direction = np.random.default_rng(3).normal(size=x.shape)
        step = 1e-4
        loss = jax.jit(loss)
        numeric = (loss(x + step * direction) - loss(x - step * direction)) / (2 * step)
        analytic = np.vdot(gradient, direction)
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5)


def test_perceptual_loss_is_the_weighted_sum_of_feature_distances(tiny):
    model, variables = tiny
    x, y = images(seed=1).astype(np.float32), images(seed=2).astype(np.float32)
    layers, weights = ("conv1_2", "conv3_2"), (0.25, 2.0)
    features = jax.jit(partial(model.apply, layers=layers, method="features"))
    fx, fy = jax.device_get((features(variables, x), features(variables, y)))
    l2 = sum(w * np.mean((fx[n] - fy[n]) ** 2) for n, w in zip(layers, weights, strict=True))
    l1 = sum(w * np.mean(np.abs(fx[n] - fy[n])) for n, w in zip(layers, weights, strict=True))
    loss = jax.jit(
        vgg_jax.perceptual_loss, static_argnums=(2,), static_argnames=("layers", "distance")
    )
    kwargs = {"layers": layers, "layer_weights": weights}
    np.testing.assert_allclose(loss(x, y, model, variables, **kwargs), l2, rtol=1e-5)
    np.testing.assert_allclose(loss(x, y, model, variables, distance="l1", **kwargs), l1, rtol=1e-5)
    assert float(loss(x, x, model, variables)) == 0.0
    with pytest.raises(ValueError, match="layer_weights"):
        vgg_jax.perceptual_loss(x, y, model, variables, layers=layers, layer_weights=(1.0,))
    with pytest.raises(ValueError, match="distance"):
        vgg_jax.perceptual_loss(x, y, model, variables, distance="cosine")
