import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables

from vgg_jax import models, spec


def count_params(model, image_size):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def test_vgg16_imagenet_parameter_count_matches_the_paper():
    # torchvision's vgg16 (the paper's configuration D): 138,357,544 parameters.
    assert count_params(models.vgg16(1000), 224) == 138_357_544


@pytest.mark.parametrize(
    ("build", "expected"),
    [(models.vgg11, 132_863_336), (models.vgg13, 133_047_848), (models.vgg19, 143_667_240)],
)
def test_other_paper_stacks_match_torchvision_counts(build, expected):
    assert count_params(build(1000), 224) == expected


def test_paddle_cifar_vgg16_structure():
    model = models.create_model("vgg16", 10, conv_dropout="paddle", head="cifar")
    assert model.conv_dropout == (
        (0.3, 0.0),
        (0.4, 0.0),
        (0.4, 0.4, 0.0),
        (0.4, 0.4, 0.0),
        (0.4, 0.4, 0.0),
    )
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    params = variables["params"]
    # Convolutions carry no bias under BN; the head is fc512 -> BN -> fc512 -> fc10.
    assert "bias" not in params["conv1_1"]
    assert params["fc1"]["kernel"].shape == (512, 512)
    assert params["fc2"]["kernel"].shape == (512, 512)
    assert params["classifier"]["kernel"].shape == (512, 10)
    assert "fc_bn1" in variables["batch_stats"]


def test_width_multiplier_scales_every_convolution():
    model = models.create_model("vgg16", 10, width=0.25)
    assert model.stages[0] == (16, 16) and model.stages[-1] == (128, 128, 128)


def test_conv_dropout_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="conv_dropout"):
        models.create_model("vgg11", 10, conv_dropout="lots")


def test_unknown_model_and_head_are_named():
    with pytest.raises(ValueError, match="vgg17"):
        models.create_model("vgg17", 10)
    with pytest.raises(ValueError, match="resnet"):
        models.create_model("vgg11", 10, head="resnet")


def _tiny(**kwargs):
    return models.create_model("vgg_tiny", 5, conv_dropout="0.3", head="cifar", **kwargs)


def test_eval_mode_is_deterministic_and_ignores_the_rest_of_the_batch():
    model = _tiny()
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    variables = random_variables(model, 16)  # numpy draws: nothing to compile
    apply = jax.jit(model.apply)
    full, again, alone = (
        apply(variables, images),
        apply(variables, images),
        apply(variables, images[:1]),
    )
    np.testing.assert_array_equal(full, again)
    # Running averages, not batch statistics: one image gives the same logits alone.
    np.testing.assert_allclose(full[:1], alone, rtol=1e-5, atol=1e-5)


def test_train_mode_uses_dropout_and_updates_batch_statistics():
    model = _tiny()
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    variables = random_variables(model, 16)

    @jax.jit
    def train_logits(key):
        return model.apply(
            variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )

    logits_a, state_a = train_logits(jax.random.key(2))
    logits_b, _ = train_logits(jax.random.key(3))
    assert not np.allclose(logits_a, logits_b)  # different dropout masks
    old_mean = variables["batch_stats"]["bn1_1"]["mean"]
    new_mean = state_a["batch_stats"]["bn1_1"]["mean"]
    assert not np.allclose(old_mean, new_mean)


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
    model = _tiny(dtype=jnp.bfloat16)
    images = jnp.zeros((2, 16, 16, 3), jnp.uint8)
    # Dtypes only: traced, not compiled.
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(model.apply, variables, images).dtype == jnp.float32


def test_no_batch_norm_means_no_batch_stats_and_biases_on_convs():
    model = models.create_model("vgg_tiny", 3, batch_norm=False, head="tf_benchmark")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))
    assert "batch_stats" not in variables
    assert "bias" in variables["params"]["conv1_1"]


def test_linear_head_is_only_the_classifier():
    model = models.create_model("vgg11", 10, head="linear")
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
    assert [name for name in params if not name.startswith(("conv", "bn"))] == ["classifier"]
    assert params["classifier"]["kernel"].shape == (512, 10)


@pytest.mark.parametrize("head", sorted(spec.HEADS))
def test_every_head_applies_head_dropout_in_training(head):
    # The linear head once ignored head_dropout (no hidden layer to put it after).
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)

    def train_logits(rate, seed):
        model = models.create_model("vgg_tiny", 5, head=head, head_dropout=rate)
        variables = random_variables(model, 16)
        logits, _ = model.apply(
            variables,
            images,
            train=True,
            rngs={"dropout": jax.random.key(seed)},
            mutable=["batch_stats"],
        )
        return np.asarray(logits)

    np.testing.assert_array_equal(train_logits(0.0, 2), train_logits(0.0, 3))
    assert not np.allclose(train_logits(0.5, 2), train_logits(0.5, 3))
