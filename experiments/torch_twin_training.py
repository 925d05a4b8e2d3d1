"""Trains the PyTorch twin (`bench.torch_reference`) with a config's recipe, on the same
CIFAR-10 arrays as ours: the peer that says whether a gap is the recipe or our code.

  python experiments/torch_twin_training.py --config=configs/vgg16_fast.py \
      --data=cifar10-jpeg.npz --metrics=twin.jsonl [--notorch_compile] [--config.X=...]

Everything `vgg_jax.main` does with that config, from the same `models.VGG`, `optim`
schedule, `data.stats` normalisation and `views.crop_padding`, except the random draws
(data order, crops, PyTorch's default initialisation from the distribution ours draws
from) and what `unsupported` refuses in one line. Writes one record per epoch (the keys
of our metrics.jsonl) to --metrics as the epoch ends, and with --json a summary with the
seconds from launch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags
from torch.nn import functional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import cifar_arrays  # noqa: E402

from vgg_jax import cli, optim  # noqa: E402
from vgg_jax.bench import torch_reference  # noqa: E402
from vgg_jax.data import sharding, stats, views  # noqa: E402
from vgg_jax.data.info import DatasetInfo  # noqa: E402

FLAGS = flags.FLAGS
EVAL_BATCH = 1000


def unsupported(config: ml_collections.ConfigDict) -> list[str]:
    """The config's settings that this loop does not reproduce."""
    checks = {
        "ema_decay": config.ema_decay == 0,
        "weight_decay": config.weight_decay == 0,
        "grad_clip_norm": config.grad_clip_norm == 0,
        "optimizer": config.optimizer == "sgd",
        "augment": config.augment in ("none", "crop_flip"),
        "init_from": not config.init_from,
        "freeze": config.freeze == "none",
        "backbone_lr_factor": config.backbone_lr_factor == 1.0,
    }
    return [f"{name}={config[name]!r}" for name, ok in checks.items() if not ok]


def learning_rates(config: ml_collections.ConfigDict, steps_per_epoch: int) -> np.ndarray:
    """optim's schedule at every step: the rate step k's update uses (optax counts from 0)."""
    import jax
    import jax.numpy as jnp

    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
    total = max(1, config.num_epochs * steps_per_epoch)
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)), np.float64)


def crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """uint8 NHWC: pad `padding` zero pixels a side, crop a window of the original size at
    a random offset per image, flip half of them left-right (as data.device's)."""
    count, height, width, _ = images.shape
    device = images.device
    if padding:
        padded = functional.pad(images, (0, 0, padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator, device=device)
        rows = offsets[:, :1] + torch.arange(height, device=device)
        cols = offsets[:, 1:] + torch.arange(width, device=device)
        index = torch.arange(count, device=device)[:, None, None]
        images = padded[index, rows[:, :, None], cols[:, None, :]]
    if not flip:
        return images
    flips = torch.rand(count, generator=generator, device=device) < 0.5
    return torch.where(flips[:, None, None, None], images.flip(2), images)


def epoch_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: ml_collections.ConfigDict,
    epoch: int,
    steps: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's shuffled, augmented full batches."""
    batch = config.batch_size
    order = torch.randperm(len(labels), generator=generator, device=images.device)
    for step in range(steps):
        chosen = order[step * batch : (step + 1) * batch]
        batch_images = images[chosen]
        if config.augment == "crop_flip":
            padding = views.crop_padding(config, epoch)
            batch_images = crop_flip(batch_images, padding, generator)
        yield batch_images, labels[chosen]


@torch.no_grad()
def evaluate(runner: torch_reference.Runner, images, labels) -> dict[str, float]:
    """Loss, accuracy and flip-TTA accuracy over every image (the last batch padded, so
    that a compiled forward sees one shape)."""
    sums = torch.zeros(3, device=runner.device)
    for start in range(0, len(labels), EVAL_BATCH):
        batch = images[start : start + EVAL_BATCH]
        batch_labels = labels[start : start + EVAL_BATCH]
        real = len(batch_labels)
        if real < EVAL_BATCH:
            batch = functional.pad(batch, (0, 0, 0, 0, 0, 0, 0, EVAL_BATCH - real))
        logits = runner.forward(batch).float()[:real]
        flipped = runner.forward(batch.flip(2)).float()[:real]
        loss = functional.cross_entropy(logits, batch_labels, reduction="sum")
        tta = logits.softmax(-1) + flipped.softmax(-1)
        sums += torch.stack(
            [
                loss,
                (logits.argmax(-1) == batch_labels).sum().float(),
                (tta.argmax(-1) == batch_labels).sum().float(),
            ]
        )
    loss_sum, correct, correct_tta = (float(value) for value in sums.cpu())
    count = len(labels)
    return {
        "test_loss": loss_sum / count,
        "test_accuracy": correct / count,
        "test_accuracy_flip_tta": correct_tta / count,
    }


def dataset_info(
    config: ml_collections.ConfigDict, arrays: cifar_arrays.CifarArrays
) -> DatasetInfo:
    """Class names and the normalisation ours computes for the same training images."""
    sizes = (len(arrays.train_labels), len(arrays.test_labels))
    return stats.dataset_info(config, arrays.classes, sizes, lambda s: arrays.train_images[s])


def train(
    config: ml_collections.ConfigDict,
    arrays: cifar_arrays.CifarArrays,
    metrics_path: str | Path | None = None,
    compile_model: bool = True,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Trains the twin for config.num_epochs; returns (and appends to `metrics_path`) one
    record per epoch."""
    problems = unsupported(config)
    if problems:
        raise ValueError("the PyTorch twin does not implement " + ", ".join(problems))
    if arrays.train_images.shape[1] != config.image_size:
        raise ValueError(f"images are {arrays.train_images.shape[1]} px, not {config.image_size}")
    device = device or torch_reference.default_device()
    torch.backends.cudnn.benchmark = True
    steps = sharding.limited_steps(config, len(arrays.train_labels))
    rates = learning_rates(config, steps)
    twin = torch_reference.Runner(config, dataset_info(config, arrays), device, float(rates[0]))
    if compile_model:
        # The model only: the optimiser's rate, a Python float that changes every step,
        # would make a compiled step recompile.
        twin.compile(train_step=False)
    images = torch.from_numpy(arrays.train_images).to(device)
    labels = torch.from_numpy(arrays.train_labels).to(device)
    test_images = torch.from_numpy(arrays.test_images).to(device)
    test_labels = torch.from_numpy(arrays.test_labels).to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    records = []
    for epoch in range(config.num_epochs):
        start = time.perf_counter()
        sums = torch.zeros(2, device=device)
        batches = epoch_batches(images, labels, config, epoch, steps, generator)
        for index, (batch_images, batch_labels) in enumerate(batches):
            rate = float(rates[epoch * steps + index])
            loss, logits = twin.train_step(batch_images, batch_labels, rate)
            correct = (logits.argmax(-1) == batch_labels).sum().float()
            sums += torch.stack([loss * len(batch_labels), correct])
        loss_sum, correct = (float(value) for value in sums.cpu())
        seen = steps * config.batch_size
        record = {"epoch": epoch + 1, "step": (epoch + 1) * steps}
        record.update({"train_loss": loss_sum / seen, "train_accuracy": correct / seen})
        record.update(evaluate(twin, test_images, test_labels))
        record["learning_rate"] = float(rates[(epoch + 1) * steps - 1])
        record["epoch_seconds"] = time.perf_counter() - start
        record["wall_time"] = time.time()
        records.append(record)
        if metrics_path:
            with open(metrics_path, "a") as out:
                out.write(json.dumps(record) + "\n")
        print(
            f"twin epoch {epoch + 1}/{config.num_epochs}  train loss {record['train_loss']:.4f}"
            f" acc {record['train_accuracy']:.4f}  test acc {record['test_accuracy']:.4f}"
            f" (flip-TTA {record['test_accuracy_flip_tta']:.4f})  {record['epoch_seconds']:.1f}s",
            flush=True,
        )
    return records


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Path to a configuration file.")
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("data", None, "CIFAR JPEG archive, or arrays from cifar_arrays.save.")
    flags.mark_flag_as_required("data")
    flags.DEFINE_string("metrics", None, "Append one JSON record per epoch to this file.")
    flags.DEFINE_string("json", None, "Write a summary (seconds from launch) to this file.")
    flags.DEFINE_bool("torch_compile", True, "torch.compile the model.")


def main(argv: list[str]) -> None:
    launch = time.time()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        arrays = cifar_arrays.load(FLAGS.data)
        records = train(FLAGS.config, arrays, FLAGS.metrics, FLAGS.torch_compile)
    except (OSError, KeyError, ValueError) as error:
        sys.exit(f"error: {cli.one_line(error)}")
    if FLAGS.json:
        summary = {
            **torch_reference.environment(torch_reference.default_device()),
            "torch_compile": FLAGS.torch_compile,
            "config": FLAGS.config.to_dict(),
            "launch_to_end_s": time.time() - launch,
            "final": records[-1] if records else None,
        }
        Path(FLAGS.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def run() -> None:
    import jax

    # The schedule is evaluated with JAX: on the CPU, leaving the GPU's memory to PyTorch.
    jax.config.update("jax_platforms", "cpu")
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
