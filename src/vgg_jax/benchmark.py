"""`python -m vgg_jax.benchmark`: the benchmark CLI, which lives in `vgg_jax.bench`."""

from vgg_jax.bench.benchmark import run

if __name__ == "__main__":
    run()
