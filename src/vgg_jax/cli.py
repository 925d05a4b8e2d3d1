"""What the command-line programs share: flag parsing that reports a bad flag or config
in one line, the log format, the checkpoint-reading flags."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging

from vgg_jax import config_checks, configuration, distributed

FLAGS = flags.FLAGS


def configure_logging(level: int = logging.INFO) -> None:
    """Our lines from `level` up with a short timestamp; other libraries (orbax, JAX)
    only from WARNING up, unless --verbosity asks for more."""
    absl_logging.get_absl_handler().setFormatter(
        ProcessFormatter("%(asctime)s %(message)s", "%H:%M:%S")
    )
    if "verbosity" in FLAGS and FLAGS["verbosity"].present:
        return
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("vgg_jax").setLevel(level)
    # absl.logging's logger: orbax logs its background threads' errors there, with their
    # tracebacks; the error that matters reaches our code and is reported in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    sys.unraisablehook = _quiet_unraisable


class ProcessFormatter(logging.Formatter):
    """Prefixes '[process N] ' to the lines of every process but the first of a
    distributed run (all of them write to one terminal or job log under Slurm)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        label = distributed.process_label()
        if label:
            record = logging.makeLogRecord({**record.__dict__, "message": label + record.message})
        return super().formatMessage(record)


def _quiet_unraisable(unraisable) -> None:
    """After a failed asynchronous save, tensorstore completes its remaining writes into
    orbax's closed event loop: one 'Event loop is closed' traceback each. Drop those."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value
    ):
        return
    sys.__unraisablehook__(unraisable)


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    """Ends a command after a failure the library has cleaned up after, with `message` as
    the only line on stderr. Skips the interpreter's teardown, where each of orbax's and
    tensorstore's abandoned reads and writes prints an 'Exception ignored in ...' traceback."""
    print(distributed.process_label() + message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_line(error: BaseException) -> str:
    """An exception's message on one line, without ml_collections' quotes and escapes."""
    text = re.sub(r"\\n|\s+", " ", str(error))
    return re.sub(r"[\\'\"]", "", text).strip()


def define_checkpoint_flags() -> None:
    """--workdir and --step, for the commands that read a checkpoint (`checkpoint_step`)."""
    flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints/ folder, or a step.")
    flags.DEFINE_string("step", "latest", "'latest', 'best' or a step number.")
    flags.register_validator(
        "step",
        lambda value: value in ("latest", "best") or value.isdigit(),
        "--step must be latest, best or a number",
    )


def checkpoint_step() -> int | str:
    """--step as `inference.load` takes it: 'latest', 'best' or a number."""
    return int(FLAGS.step) if FLAGS.step.isdigit() else FLAGS.step


def no_arguments(argv: list[str]) -> None:
    """For a command that takes flags only: anything else is a usage error."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, then the check of --config where there is one; any problem ends
    the program in one line."""
    try:
        argv = FLAGS(argv)
        if "config" in FLAGS:
            FLAGS.config.keys()  # a config file that failed to load raises here
            config_checks.validate(FLAGS.config)
        return argv
    except configuration.ConfigError as error:
        sys.exit(f"error: {error}")
    except SyntaxError as error:
        code = f"\n    {error.text.rstrip()}" if error.text else ""
        sys.exit(
            f"error: syntax error in the config file {error.filename}, line {error.lineno}: "
            f"{error.msg}{code}"
        )
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
    except Exception as error:  # noqa: BLE001 - the config file's own code failed
        where = traceback.extract_tb(error.__traceback__)[-1]
        sys.exit(
            f"error: the config file failed: {type(error).__name__}: {error} "
            f"({where.filename}, line {where.lineno})"
        )
