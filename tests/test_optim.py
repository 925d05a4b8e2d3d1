import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS

from vgg_jax import optim
from vgg_jax.configuration import load_config_file


@pytest.fixture
def config():
    return load_config_file(CONFIGS / "vgg16.py")


def test_discexp_decays_exactly_every_100_epochs_of_samples(config):
    steps_per_epoch = 50000 // 128  # 390; the decay counts samples, not steps
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
    boundary = -(-50000 * 100 // 128)  # the first step whose samples_seen >= 5,000,000
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(boundary - 1)) == pytest.approx(0.1)
    assert float(schedule(boundary)) == pytest.approx(0.01)
    assert float(schedule(2 * boundary)) == pytest.approx(0.001, rel=1e-5)


def test_discexp_at_exactly_100_epochs_when_batches_divide_the_epoch(config):
    config.batch_size = 100
    schedule = optim.create_learning_rate_schedule(config, 500)
    assert float(schedule(500 * 100 - 1)) == pytest.approx(0.1)
    assert float(schedule(500 * 100)) == pytest.approx(0.01)


def test_multistep_cosine_and_onecycle_boundaries(config):
    config.num_epochs = 10
    config.schedule = "multistep"
    config.lr_boundaries_epochs = (5, 8)
    multistep = optim.create_learning_rate_schedule(config, 10)
    assert [float(multistep(s)) for s in (49, 50, 79, 80)] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001]
    )
    config.schedule = "cosine"
    config.warmup_epochs = 2
    cosine = optim.create_learning_rate_schedule(config, 10)
    assert float(cosine(0)) == 0.0
    assert float(cosine(20)) == pytest.approx(0.1)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    config.schedule = "onecycle"
    onecycle = optim.create_learning_rate_schedule(config, 10)
    assert float(onecycle(10)) == pytest.approx(0.05)
    assert float(onecycle(20)) == pytest.approx(0.1)
    assert float(onecycle(60)) == pytest.approx(0.05)
    assert float(onecycle(100)) == pytest.approx(0.0, abs=1e-7)


def test_unknown_schedule_is_named(config):
    config.schedule = "sawtooth"
    with pytest.raises(ValueError, match="sawtooth"):
        optim.create_learning_rate_schedule(config, 10)


def test_coupled_l2_enters_the_gradient_before_momentum(config):
    config.learning_rate, config.momentum, config.l2 = 0.1, 0.9, 0.01
    tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
    w = jnp.array([1.0, -2.0])
    g1, g2 = jnp.array([0.5, 0.25]), jnp.array([-1.0, 0.5])
    state = tx.init(w)
    u1, state = tx.update(g1, state, w)
    w1 = w + u1
    u2, _ = tx.update(g2, state, w1)
    w2 = w1 + u2
    # Paddle / PyTorch: v = mu * v + (g + l2 * w); w -= lr * v.
    v1 = g1 + 0.01 * w
    expect_w1 = w - 0.1 * v1
    v2 = 0.9 * v1 + g2 + 0.01 * expect_w1
    np.testing.assert_allclose(w1, expect_w1, rtol=1e-6)
    np.testing.assert_allclose(w2, expect_w1 - 0.1 * v2, rtol=1e-6)


def test_decoupled_weight_decay_skips_the_momentum_buffer(config):
    config.l2, config.weight_decay, config.momentum = 0.0, 0.5, 0.9
    tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
    w = jnp.array([2.0])
    state = tx.init(w)
    u1, state = tx.update(jnp.array([0.0]), state, w)
    np.testing.assert_allclose(u1, -0.1 * 0.5 * w)
    u2, _ = tx.update(jnp.array([0.0]), state, w + u1)
    # Nothing was accumulated in momentum, so step 2 is decay of the new weights only.
    np.testing.assert_allclose(u2, -0.1 * 0.5 * (w + u1), rtol=1e-6)
