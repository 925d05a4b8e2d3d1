"""The same VGG in PyTorch, layer for layer from a `models.VGG` (speed reference for
`vgg_jax.benchmark --compare=torch`, export layout for heads torchvision lacks). NHWC
flattening, so dense weights copy over unchanged; BN momentum 0.9 in Flax is 0.1 here;
SGD with coupled L2 (`weight_decay`) as optim's. One known difference: PyTorch keeps the
unbiased batch variance in BN's running variance, Flax the biased one (no timing and no
eval logits after a copy change). PyTorch is optional: import this module lazily.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import torch
from torch import nn

from vgg_jax import models, optim, spec
from vgg_jax.bench import profiling
from vgg_jax.data.info import DatasetInfo

logger = logging.getLogger(__name__)


class Normalise(nn.Module):
    """uint8 NHWC images -> normalised float NCHW (a channels_last view, no copy)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.permute(0, 3, 1, 2)


class FlattenNHWC(nn.Module):
    """Flattens in (H, W, C) order, as the Flax model does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def _features(vgg: models.VGG) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    channels = 3
    for block_index, block in enumerate(vgg.stages):
        for conv_index, features in enumerate(block):
            suffix = f"{block_index + 1}_{conv_index + 1}"
            conv = nn.Conv2d(channels, features, 3, padding=1, bias=not vgg.batch_norm)
            layers.append((f"conv{suffix}", conv))
            if vgg.batch_norm:
                layers.append((f"bn{suffix}", nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)))
            layers.append((f"relu{suffix}", nn.ReLU(inplace=True)))
            rate = vgg.conv_dropout[block_index][conv_index] if vgg.conv_dropout else 0.0
            if rate > 0:
                layers.append((f"drop{suffix}", nn.Dropout(rate)))
            channels = features
        layers.append((f"pool{block_index + 1}", nn.MaxPool2d(2, 2)))
    return layers


def _head(vgg: models.VGG, in_features: int) -> list[tuple[str, nn.Module]]:
    head = spec.HEADS[vgg.head]
    rate = head["dropout"] if vgg.head_dropout is None else vgg.head_dropout
    use_bn = head["batch_norm"] and vgg.batch_norm
    layers: list[tuple[str, nn.Module]] = []
    if "pool" in head:
        layers.append(("avgpool", nn.AdaptiveAvgPool2d((head["pool"], head["pool"]))))
    layers.append(("flatten", FlattenNHWC()))
    width = in_features
    if head["dropout_first"]:
        layers.append(("fc_in_drop", nn.Dropout(rate)))
    for index, features in enumerate(head["hidden"]):
        layers.append((f"fc{index + 1}", nn.Linear(width, features)))
        if use_bn:
            layers.append((f"fc_bn{index + 1}", nn.BatchNorm1d(features, eps=1e-5, momentum=0.1)))
        layers.append((f"fc_relu{index + 1}", nn.ReLU(inplace=True)))
        layers.append((f"fc_drop{index + 1}", nn.Dropout(rate)))
        width = features
    for index, features in enumerate(head["linear"], start=len(head["hidden"]) + 1):
        layers.append((f"fc{index}", nn.Linear(width, features)))
        width = features
    layers.append(("classifier", nn.Linear(width, vgg.num_classes)))
    return layers


def build_torch_model(vgg: models.VGG, image_size: int) -> nn.Sequential:
    """The PyTorch twin of `vgg` (same layer names as the Flax parameter tree)."""
    layers: list[tuple[str, nn.Module]] = [("normalise", Normalise(vgg.mean, vgg.std))]
    layers += _features(vgg)
    size = spec.head_input_side(vgg.head, image_size // 2 ** len(vgg.stages))
    layers += _head(vgg, size * size * vgg.stages[-1][-1])
    return nn.Sequential(OrderedDict(layers))


def _tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(jax.device_get(value), dtype=np.float32))


def load_flax_variables(model: nn.Sequential, variables: Mapping[str, Any]) -> None:
    """Copies Flax `{'params', 'batch_stats'}` into the twin: conv kernels HWIO -> OIHW,
    dense kernels (in, out) -> (out, in), BN scale/bias/mean/var."""
    modules = dict(model.named_children())
    stats = variables.get("batch_stats", {})
    with torch.no_grad():
        for name, params in variables["params"].items():
            module = modules[name]
            kernel = _tensor(params["kernel"]) if "kernel" in params else None
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(kernel.permute(3, 2, 0, 1))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(kernel.T)
            else:  # BatchNorm
                module.weight.copy_(_tensor(params["scale"]))
                module.running_mean.copy_(_tensor(stats[name]["mean"]))
                module.running_var.copy_(_tensor(stats[name]["var"]))
            if "bias" in params:
                module.bias.copy_(_tensor(params["bias"]))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device) -> dict[str, Any]:
    """Which PyTorch ran where: the head of every PyTorch summary."""
    return {
        "framework": "torch",
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }


class Runner:
    """The twin (seeded, channels_last), its SGD, and its eval forward and train step (loss,
    backward, SGD) under the config's autocast; eager, or compiled by `compile`."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        info: DatasetInfo,
        device: torch.device,
        learning_rate: float,
    ):
        torch.manual_seed(config.seed)
        self.vgg = models.build_model(config, info)
        model = build_torch_model(self.vgg, config.image_size)
        self.model = model.to(device, memory_format=torch.channels_last)
        self.device = device
        self.dtype = torch.bfloat16 if config.dtype == "bfloat16" else None
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=learning_rate,
            momentum=config.momentum,
            weight_decay=config.l2,
            nesterov=config.nesterov,
        )
        self.label_smoothing = config.label_smoothing
        self.forward_fn = self.model
        self.train_fn = self._train_step

    def _autocast(self):
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None)

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits = self.forward_fn(images).float()
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            return self.forward_fn(images)

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, learning_rate: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) on the device, not synchronised; at `learning_rate` if given."""
        if learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
        self.model.train()
        return self.train_fn(images, labels)

    def compile(self, train_step: bool = True) -> None:
        """torch.compile the model, and with `train_step` the whole step (optimiser too;
        the model inside it is traced into the same graph)."""
        self.forward_fn = torch.compile(self.model)
        if train_step:
            self.train_fn = torch.compile(self._train_step)


def _wait_for(device: torch.device) -> Callable[[Any], None] | None:
    """time_steps' wait: CUDA runs asynchronously, so its queue is drained."""
    return (lambda _: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _first_calls(runner: Runner, calls, compile_model: bool) -> tuple[str, list[float]]:
    """The mode, and the seconds of each call's first run (compilation included):
    torch.compile'd if asked, eager where compiling fails."""
    wait = _wait_for(runner.device)
    mode = "eager"
    if compile_model:
        try:
            runner.compile()
            return "torch.compile", [profiling.time_steps(c, 1, 0, wait)[0] for c in calls]
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
            logger.warning("torch.compile failed, timing eager mode: %s", error)
            runner.forward_fn, runner.train_fn = runner.model, runner._train_step
            mode = f"eager (torch.compile failed: {type(error).__name__})"
    return mode, [profiling.time_steps(c, 1, 0, wait)[0] for c in calls]


def benchmark_torch(
    config: ml_collections.ConfigDict, steps: int, burn_in: int, compile_model: bool = True
) -> dict[str, Any]:
    """Times the twin's forward and train step like `benchmark.benchmark_jax` does."""
    device = default_device()
    info = DatasetInfo.without_data(config)
    # The rate the JAX benchmark's state starts at (its schedule's first step).
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=1000)
    runner = Runner(config, info, device, float(schedule(0)))
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, len(info.class_names), shape[:1], generator=generator).to(device)
    calls = {
        "forward": lambda: runner.forward(images),
        "forward_backward": lambda: runner.train_step(images, labels),
    }
    mode, compile_seconds = _first_calls(runner, calls.values(), compile_model)
    forward_flops = profiling.analytic_flops(runner.vgg, config.image_size)
    # The same machine as the JAX run, so the same assumed peak.
    peak, peak_how = profiling.device_peak(jax.devices()[0], config.dtype)
    figures = {}
    for (name, call), flops, compile_s in zip(
        calls.items(), (forward_flops, 3 * forward_flops), compile_seconds, strict=True
    ):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = profiling.time_steps(call, steps, burn_in, _wait_for(device))
        figures[name] = {
            "name": name,
            **profiling.summarise_times(times, config.batch_size, flops, peak),
            "compile_s": compile_s,
            "peak_memory_bytes": (
                int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
            ),
        }
    return {
        **environment(device),
        "mode": mode,
        "parameters": sum(parameter.numel() for parameter in runner.model.parameters()),
        "peak_assumption": peak_how,
        **figures,
    }
