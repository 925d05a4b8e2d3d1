"""Re-evaluate a checkpoint on every example of its evaluation split.

  python -m vgg_jax.evaluate --workdir=/tmp/vgg16 [--step=best] [--data_dir=DIR]

Uses the dataset, split and image size stored with the checkpoint.
"""

from __future__ import annotations

import jax
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import (
    checkpoint,
    cli,
    configuration,
    data_sources,
    inference,
    input_pipeline,
    inputs,
    train,
)
from vgg_jax.cpu import host_memory
from vgg_jax.metrics_log import to_json

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints/ folder, or a step.")
flags.DEFINE_string("step", "latest", "'latest', 'best' or a step number.")
flags.DEFINE_string("data_dir", None, "Override the data_dir stored with the checkpoint.")
flags.DEFINE_integer("batch_size", 0, "Evaluation batch (0: the training batch size).")
flags.mark_flag_as_required("workdir")
flags.register_validator("step", inference.valid_step, "--step must be latest, best or a number")
flags.register_validator("batch_size", lambda value: value >= 0, "--batch_size must be >= 0")


def evaluate_checkpoint(
    predictor: inference.Predictor, data_dir: str | None = None, batch_size: int = 0
) -> dict[str, float]:
    """Test loss and accuracy of a loaded checkpoint, data-parallel over all devices."""
    config = predictor.config
    mesh = input_pipeline.create_mesh()
    split = data_sources.load_split(
        config.dataset,
        config.eval_split,
        class_names=predictor.class_names,
        **inputs.source_kwargs(config, data_dir),
    )
    batch_size = batch_size or config.batch_size
    if batch_size % jax.device_count():
        raise configuration.ConfigError(
            f"--batch_size={batch_size} does not divide over {jax.device_count()} devices"
        )
    batches = input_pipeline.put_eval_batches(split, batch_size, mesh)
    state = train.TrainState(
        step=0,
        apply_fn=predictor.model.apply,
        params=jax.device_put(predictor.variables["params"], NamedSharding(mesh, P())),
        batch_stats=jax.device_put(predictor.variables["batch_stats"], NamedSharding(mesh, P())),
        tx=None,
        opt_state=None,
        rng=None,
    )
    _, eval_fn = train.make_step_functions(config, mesh)
    steps = ((batches, index) for index in range(batches["label"].shape[0]))
    return train.evaluate(state, steps, eval_fn)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.configure_logging()
    expected = (
        checkpoint.NoCheckpointError,
        checkpoint.DamagedCheckpointError,
        data_sources.DatasetUnavailableError,
        ValueError,
    )
    try:
        predictor = inference.load(FLAGS.workdir, inference.parse_step(FLAGS.step))
        metrics = evaluate_checkpoint(predictor, FLAGS.data_dir, FLAGS.batch_size)
    except expected as error:
        cli.exit_with_error(f"error: {error}")
    print(to_json({"step": predictor.step, **metrics}))


def run() -> None:
    host_memory.restart_with_retained_memory()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
