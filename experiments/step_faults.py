"""Time the jitted train step and count the page faults each step takes.

  python experiments/step_faults.py --config=configs/vgg16.py [--steps=10] [--warmup=3] \
      [--config.batch_size=128 ...]

Prints XLA's temporary buffer size, every step's seconds, and the minor page faults
and system CPU time per step (getrusage). It does not restart itself with
vgg_jax.cpu.host_memory's settings; compare runs with and without them, e.g.
GLIBC_TUNABLES=$(python -c "from vgg_jax.cpu import host_memory as h; print(':'.join(h.TUNABLES))").
"""

from __future__ import annotations

import resource

from absl import app, flags
from ml_collections import config_flags

from vgg_jax import cli, train
from vgg_jax.bench import benchmark, profiling

config_flags.DEFINE_config_file("config", None, "Path to a configuration file.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    mesh, _, state, batch = benchmark.setup(config)
    train_fn, _ = train.make_step_functions(config, mesh)
    compiled = train_fn.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    if memory is not None:
        print(f"XLA temporary buffers: {memory.temp_size_in_bytes / 1e6:.0f} MB")
    one_step = benchmark.repeated_step(compiled, state, batch)
    profiling.time_steps(one_step, steps=0, burn_in=FLAGS.warmup)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = profiling.time_steps(one_step, steps=FLAGS.steps, burn_in=0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print("step seconds:", " ".join(f"{t:.3f}" for t in times))
    print(
        f"min {min(times):.3f} s, mean {sum(times) / len(times):.3f} s; per step: "
        f"{(after.ru_minflt - before.ru_minflt) / len(times):.0f} minor page faults, "
        f"{(after.ru_stime - before.ru_stime) / len(times):.3f} s system CPU"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
