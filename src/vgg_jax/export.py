"""Export a trained checkpoint's weights for PyTorch.

  python -m vgg_jax.export --workdir=/tmp/vgg16 [--step=best] --format=torchvision OUT.pth
  python -m vgg_jax.export --workdir=/tmp/vgg16 --format=safetensors OUT.safetensors

Models with a head torchvision has ('torchvision'; 'imagenet' at 224 pixels) are written
in torchvision's VGG layout: `torchvision.models.vgg16_bn(num_classes=N)` loads them with
strict=True. Other heads ('cifar', 'tf_benchmark') are written in the layout of
`vgg_jax.bench.torch_reference.build_torch_model(model, image_size)`, the PyTorch twin, which
takes uint8 NHWC images and normalises them itself (writing it needs torch). OUT.json,
next to OUT, records the layout, the input normalisation and the class names.
"""

from __future__ import annotations

from absl import app, flags

from vgg_jax import checkpoint, cli, inference, pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints/ folder, or a step.")
flags.DEFINE_string("step", "latest", "'latest', 'best' or a step number.")
flags.DEFINE_enum(
    "format", "torchvision", ["torchvision", "safetensors"], "A torch .pth or .safetensors."
)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give one output file, e.g. OUT.pth")
    out = argv[1]
    try:
        predictor = inference.load(FLAGS.workdir, inference.parse_step(FLAGS.step))
        model, info = predictor.model, predictor.info
        state, layout = pretrained.export_state_dict(model, predictor.variables, info.image_size)
        if layout == "torchvision":
            constructor = pretrained.torchvision_constructor(model)
        else:
            constructor = (
                f"vgg_jax.bench.torch_reference.build_torch_model(model, {info.image_size})"
            )
        about = {
            "layout": layout,
            "constructor": constructor,
            "num_classes": model.num_classes,
            "class_names": list(info.class_names),
            "image_size": info.image_size,
            "mean": list(model.mean),
            "std": list(model.std),
        }
        pretrained.write_state_dict(state, out, FLAGS.format, about)
    except (checkpoint.NoCheckpointError, ImportError, ValueError, OSError) as error:
        cli.exit_with_error(f"error: {error}")
    print(f"wrote {out} ({layout} layout) and {out}.json")
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
    app.run(main)


if __name__ == "__main__":
    run()
