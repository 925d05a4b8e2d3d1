"""Classify image files with a trained checkpoint.

  python -m vgg_jax.predict --workdir=/tmp/vgg16 [--step=best] dog.png cat.jpg
  python -m vgg_jax.predict --weights=torchvision:vgg16_bn dog.png    # ImageNet weights

Prints each image's top-5 classes with probabilities. Unreadable files get one error
line each; the others are still predicted; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import sys

from absl import app, flags

from vgg_jax import checkpoint, cli, inference, pretrained

FLAGS = flags.FLAGS
cli.define_checkpoint_flags()
flags.DEFINE_string(
    "weights",
    None,
    "Instead of --workdir: published weights ('torchvision:vgg16_bn', 'keras:vgg16') or a "
    "weight file (.pth, .safetensors, .h5).",
)
flags.DEFINE_integer("top", 5, "How many classes to print per image.", lower_bound=1)
flags.mark_flags_as_mutual_exclusive(["workdir", "weights"], required=True)


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    cli.configure_logging()
    try:
        if FLAGS.weights:
            predictor = pretrained.predictor(FLAGS.weights)
        else:
            predictor = inference.load(FLAGS.workdir, cli.checkpoint_step())
    except (
        checkpoint.DamagedCheckpointError,
        pretrained.WeightsUnavailableError,
        FileNotFoundError,  # checkpoint.NoCheckpointError too
        ImportError,
        ValueError,
    ) as error:
        cli.exit_with_error(f"error: {error}")
    results, errors = inference.predict_files(predictor, paths)
    for path, probabilities in results:
        ranked = predictor.top_k(probabilities[None], FLAGS.top)[0]
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)


def run() -> None:
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
