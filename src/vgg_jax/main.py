"""Command line: flags -> train.train_and_evaluate(config, workdir).

  python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16 \
      --config.batch_size=256 --config.num_epochs=1

The config is checked before anything heavy is imported or any data is read.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vgg_jax import cli
from vgg_jax.cpu import host_memory
from vgg_jax.preemption import Preempted

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events and checkpoints.")
config_flags.DEFINE_config_file(
    "config", None, "Path to a configuration file (configs/*.py).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.configure_logging()
    from vgg_jax import train  # imports JAX: only once the config has passed its check
    from vgg_jax.data_sources import DatasetUnavailableError
    from vgg_jax.pretrained import WeightsUnavailableError

    try:
        train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except (DatasetUnavailableError, WeightsUnavailableError, ValueError) as error:
        sys.exit(f"error: {error}")
    except ImportError as error:  # reading a .pth file without torch: the message says so
        sys.exit(f"error: {error}")


def run() -> None:
    host_memory.restart_with_retained_memory()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
