"""Export a trained checkpoint's weights for PyTorch.

  python -m vgg_jax.export --workdir=/tmp/vgg16 [--step=best] --format=torchvision OUT.pth
  python -m vgg_jax.export --workdir=/tmp/vgg16 --format=safetensors OUT.safetensors

Heads torchvision has ('torchvision'; 'imagenet' at 224 pixels) are written in its VGG
layout, the others in the PyTorch twin's (vgg_jax.bench.torch_reference; needs torch).
OUT.json records what a reader (`predict --weights=OUT`) needs (docs/pretrained.md).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags

from vgg_jax import checkpoint, cli, inference, pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined by `run` only: absl refuses a flag defined twice, and the other commands
    that import `export_checkpoint` define --workdir and --step too."""
    cli.define_checkpoint_flags()
    flags.DEFINE_enum(
        "format", "torchvision", ["torchvision", "safetensors"], "A torch .pth or .safetensors."
    )
    flags.mark_flag_as_required("workdir")


class ExportError(ValueError):
    """The weights cannot be written where asked."""


def check_destination(out: str) -> None:
    """The output file's folder must exist and be writable: checked before the checkpoint
    is read, and without a library's traceback."""
    target = os.path.abspath(os.path.expanduser(out))
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise ExportError(f"{out} is a folder: give a file name, e.g. {out}/model.pth")
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {out}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {folder} is not writable")


def export_checkpoint(
    workdir: str, out: str, file_format: str = "torchvision", step: int | str = "latest"
) -> tuple[inference.Predictor, str, str | None]:
    """Writes the weights of a checkpoint to `out` (and `out`.json); returns the loaded
    predictor, the layout written and the PyTorch constructor that takes it."""
    check_destination(out)
    predictor = inference.load(workdir, step)
    model, info = predictor.model, predictor.info
    state, layout = pretrained.export_state_dict(model, predictor.variables, info.image_size)
    if layout == "torchvision":
        constructor = pretrained.torchvision_constructor(model)
    else:
        twin = "vgg_jax.bench.torch_reference.build_torch_model"
        constructor = f"{twin}(model, {info.image_size})"
    about = {
        "layout": layout,
        "constructor": constructor,
        "num_classes": model.num_classes,
        "class_names": list(info.class_names),
        # The input size the model was trained at, and the augmentation that decides its
        # evaluation view (pretrained.predictor reads both: data/views.eval_view).
        "image_size": info.image_size,
        "augment": predictor.config.augment,
        "mean": list(model.mean),
        "std": list(model.std),
    }
    pretrained.write_state_dict(state, out, file_format, about)
    return predictor, layout, constructor


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give one output file, e.g. OUT.pth")
    cli.configure_logging(logging.WARNING)  # the result lines below are the output
    out = argv[1]
    # OSError covers checkpoint.NoCheckpointError (a FileNotFoundError).
    expected = (checkpoint.DamagedCheckpointError, ImportError, ValueError, OSError)
    try:
        predictor, layout, constructor = export_checkpoint(
            FLAGS.workdir, out, FLAGS.format, cli.checkpoint_step()
        )
    except expected as error:
        cli.exit_with_error(f"error: {error}")
    print(f"wrote {out} ({layout} layout) and {out}.json")
    model = predictor.model
    if layout == "torch_reference":
        print(f"load: {constructor} (takes uint8 NHWC images, normalises itself)")
        return
    mean = ", ".join(f"{m / 255:.4f}" for m in model.mean)
    std = ", ".join(f"{s / 255:.4f}" for s in model.std)
    if constructor is None:
        print(
            f"stages {model.stages} are no torchvision preset: torchvision's VGG class "
            "cannot build them; vgg_jax.pretrained.from_torchvision reads the file"
        )
    else:
        print(f"load: {constructor}.load_state_dict(..., strict=True)")
    print(f"inputs: RGB NCHW in 0..1, normalised with mean=({mean}), std=({std})")


def run() -> None:
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
