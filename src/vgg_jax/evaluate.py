"""Re-evaluate a checkpoint on every example of its evaluation split.

  python -m vgg_jax.evaluate --workdir=/tmp/vgg16 [--step=best] [--data_dir=DIR]

Uses the dataset, split, image size and evaluation view stored with the checkpoint (its
config), so it prints what training's log printed for that step: loss, top-1, top-5
(more than 5 classes), flip-TTA (where the config asks). The split is streamed a batch
at a time: host memory does not grow with its size.
"""

from __future__ import annotations

import jax
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import checkpoint, cli, configuration, data, inference, models, train
from vgg_jax.cpu import host_memory
from vgg_jax.metrics_log import to_json

FLAGS = flags.FLAGS
cli.define_checkpoint_flags()
flags.DEFINE_string("data_dir", None, "Override the data_dir stored with the checkpoint.")
flags.DEFINE_integer("batch_size", 0, "Evaluation batch (0: the stored config's).", lower_bound=0)
flags.mark_flag_as_required("workdir")


def evaluate_checkpoint(
    predictor: inference.Predictor, data_dir: str | None = None, batch_size: int = 0
) -> dict[str, float]:
    """Test metrics of a loaded checkpoint, data-parallel over this process's devices."""
    config = predictor.config
    mesh = data.create_mesh()
    batch_size = batch_size or config.eval_batch_size or config.batch_size
    if batch_size % jax.device_count():
        raise configuration.ConfigError(
            f"--batch_size={batch_size} does not divide over {jax.device_count()} devices"
        )
    variables = jax.device_put(predictor.variables, NamedSharding(mesh, P()))
    state = train.TrainState(
        step=0,
        apply_fn=predictor.model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=None,
        opt_state=None,
        rng=None,
    )
    _, eval_fn = train.make_step_functions(config, mesh)
    counts = {"test_skipped_files": 0}
    batches = data.evaluation_batches(
        config, mesh, batch_size, predictor.class_names, data_dir, counts
    )
    metrics = train.evaluate(state, batches, eval_fn, models.backend_tuning(config).wait_each_step)
    return {**metrics, **{name: count for name, count in counts.items() if count}}


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    cli.configure_logging()
    expected = (
        checkpoint.NoCheckpointError,
        checkpoint.DamagedCheckpointError,
        data.DatasetUnavailableError,
        ValueError,
    )
    try:
        predictor = inference.load(FLAGS.workdir, cli.checkpoint_step())
        metrics = evaluate_checkpoint(predictor, FLAGS.data_dir, FLAGS.batch_size)
    except expected as error:
        cli.exit_with_error(f"error: {error}")
    print(to_json({"step": predictor.step, **metrics}))


def run() -> None:
    host_memory.restart_with_retained_memory()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
