"""Command line: flags -> train.train_and_evaluate(config, workdir).

  python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16 \
      --config.batch_size=256 --config.num_epochs=1
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vgg_jax import host_memory, train
from vgg_jax.data_sources import DatasetUnavailableError
from vgg_jax.preemption import Preempted

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events and checkpoints.")
config_flags.DEFINE_config_file(
    "config", None, "Path to a configuration file (configs/*.py).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def configure_logging() -> None:
    """Our INFO lines with a short timestamp; other libraries only from WARNING up."""
    absl_logging.get_absl_handler().setFormatter(
        logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    )
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("vgg_jax").setLevel(logging.INFO)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    configure_logging()
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except (DatasetUnavailableError, ValueError) as error:
        sys.exit(f"error: {error}")


def one_line(error: BaseException) -> str:
    """An exception's message on one line, without the quoting and escaped newlines
    that ml_collections wraps around it."""
    text = re.sub(r"\\n|\s+", " ", str(error))
    return re.sub(r"[\\'\"]", "", text).strip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad or unknown override reported in one line."""
    try:
        argv = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises here
        return argv
    except OSError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        sys.exit(f"error: cannot load the config file: {reason}")
    except flags.Error as error:
        sys.exit(f"error: {one_line(error)}")
    except (AttributeError, KeyError) as error:
        # ml_collections raises these for a field the config does not have.
        sys.exit(f"error: unknown config field: {one_line(error)}")
    except (TypeError, ValueError) as error:
        sys.exit(f"error: bad config value: {one_line(error)}")


def run() -> None:
    host_memory.restart_with_retained_memory()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
