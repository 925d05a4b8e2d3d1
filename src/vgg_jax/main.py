"""Command line: flags -> train.train_and_evaluate(config, workdir).

  python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16 \
      --config.batch_size=256 --config.num_epochs=1

The config is checked before anything heavy is imported or any data is read. Every
expected failure ends in one line and a non-zero status.
"""

from __future__ import annotations

from vgg_jax.preemption import SECOND_INTERRUPT_MESSAGE, Preempted, PreemptionGuard

# Installed before anything slow (the imports below included), so that SIGTERM during
# start-up is answered with a checkpoint after the first step rather than by dying.
_guard = PreemptionGuard(exit_on_second_interrupt=True)
if __name__ == "__main__":
    _guard.install()

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vgg_jax import cli, distributed  # noqa: E402
from vgg_jax.cpu import host_memory  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events and checkpoints.")
config_flags.DEFINE_config_file(
    "config", None, "Path to a configuration file (configs/*.py).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    cli.configure_logging()
    from vgg_jax import train  # imports JAX: only once the config has passed its check
    from vgg_jax.checkpoint import CheckpointWriteError
    from vgg_jax.data import workers
    from vgg_jax.data.info import DatasetUnavailableError
    from vgg_jax.pretrained import WeightsUnavailableError
    from vgg_jax.workdir_lock import WorkdirBusyError

    workers.EXIT_ON_WORKER_DEATH = True  # one line and exit 1: a crash the rerun resumes
    expected = (
        CheckpointWriteError,
        DatasetUnavailableError,
        workers.InputWorkerError,
        WeightsUnavailableError,
        WorkdirBusyError,
        FloatingPointError,
        ValueError,
        ImportError,  # reading a .pth file without torch: the message says so
    )

    try:
        train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir), _guard)
    except Preempted as stopped:
        print(f"{distributed.process_label()}{stopped}", file=sys.stderr)
        sys.exit(stopped.exit_code)
    except distributed.DistributedStartError as error:  # a wait abandoned in a thread
        message = str(error) if error.exit_code in (0, 130) else f"error: {error}"
        cli.exit_with_error(message, error.exit_code)
    except expected as error:  # train_and_evaluate has closed the run: nothing is pending
        # A failed save or read can be a collective whose peer died: say that.
        cli.exit_with_error(f"error: {distributed.lost_peer_message(error) or error}")
    except OSError as error:  # a full disk, a read-only workdir, ...
        cli.exit_with_error(f"error: {error.strerror or error}: {error.filename or FLAGS.workdir}")
    except RuntimeError as error:
        # os._exit also skips JAX's shutdown barrier, which a dead peer never reaches.
        message = distributed.lost_peer_message(error)
        if message is None:
            raise
        cli.exit_with_error(f"error: {message}")


def run() -> None:
    _guard.install()
    if not _guard.requested:  # a restart would forget a signal already received
        host_memory.restart_with_retained_memory()
    try:
        app.run(main, flags_parser=cli.parse_flags)
    except KeyboardInterrupt:  # a second Ctrl-C: the user wants out now
        print(SECOND_INTERRUPT_MESSAGE, file=sys.stderr)
        sys.exit(130)
    finally:
        _guard.uninstall()


if __name__ == "__main__":
    run()
