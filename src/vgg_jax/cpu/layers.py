"""VGG's dropout and max-pool in forms XLA:CPU runs faster (experiments/RESULTS.md);
neither has parameters, so checkpoints are the same with the stock layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (an odd last row or column is dropped) as a reshape and
    a max. Why: XLA:CPU differentiates reduce_window max into select_and_scatter, several
    times slower than this form's backward. A tied maximum shares its gradient among the
    tied inputs instead of giving it to the first; after a ReLU such ties are zeros, whose
    gradient the ReLU zeroes anyway."""
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ByteDropout(nn.Module):
    """nn.Dropout drawing one random byte per element instead of 32 bits. The rate is
    rounded to a multiple of 1/256 (0.3 -> 77/256 = 0.3008, 0.4 -> 0.3984, 0.5 exactly)
    and the kept values scaled by 1 / (1 - that rate), so the expectation is exact. Why:
    threefry costs the same per 32-bit word whatever the requested width, so four bytes
    per word make the masks 4x cheaper, a noticeable share of a CPU train step with the
    reference recipe's per-conv dropout."""

    rate: float
    deterministic: bool = False
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        threshold = round(self.rate * 256)
        if self.deterministic or threshold == 0:
            return x
        if threshold >= 256:
            return jnp.zeros_like(x)
        words = jax.random.bits(self.make_rng(self.rng_collection), (-(-x.size // 4),))
        noise = lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[: x.size]
        keep = noise.reshape(x.shape) >= threshold
        scale = jnp.asarray(256 / (256 - threshold), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros_like(x))
