"""torchvision's VGG layout in and out: state dicts, .pth / .safetensors files, and the
files `python -m vgg_jax.export` writes (with their FILE.json sidecar)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models, spec
from vgg_jax.pretrained.registry import (
    POOL,
    WeightFormatError,
    arch_name,
    check_arch,
    import_torch,
    preset_of,
    reraised_as,
)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _read_state_dict(source: Any) -> tuple[dict[str, np.ndarray], str, Path | None]:
    if isinstance(source, Mapping):
        return {k: _numpy(v) for k, v in source.items()}, "the state dict", None
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        with reraised_as(WeightFormatError, f"{path}: not a readable safetensors file"):
            return load_file(path), str(path), path
    torch = import_torch(f"reading {path}", otherwise="use a .safetensors file")
    with reraised_as(WeightFormatError, f"{path}: not a readable PyTorch file"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise WeightFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: _numpy(v) for k, v in state.items()}, str(path), path


def read_sidecar(path: Path | None) -> dict[str, Any]:
    """What `python -m vgg_jax.export` writes next to a weight file (FILE.json):
    normalisation and class names. Empty for files from elsewhere."""
    if path is None or not Path(f"{path}.json").is_file():
        return {}
    try:
        about = json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError) as error:
        raise WeightFormatError(f"{path}.json: unreadable ({error})") from None
    if not isinstance(about, dict):
        raise WeightFormatError(f"{path}.json: not a JSON object")
    return about


def torchvision_layout(stages: Sequence[Sequence[int]], batch_norm: bool) -> list[tuple[int, str]]:
    """(index in torchvision's `features`, our layer name) for each convolution and BN."""
    layout, index = [], 0
    for block_index, block in enumerate(stages, start=1):
        for conv_index in range(1, len(block) + 1):
            layout.append((index, f"conv{block_index}_{conv_index}"))
            index += 1
            if batch_norm:
                layout.append((index, f"bn{block_index}_{conv_index}"))
                index += 1
            index += 1  # ReLU
        index += 1  # max-pool
    return layout


def torchvision_feature_index(
    stages: Sequence[Sequence[int]], batch_norm: bool, layer: str, before_relu: bool = False
) -> int:
    """k such that torchvision's `features[:k]` ends with our feature `layer`."""
    ends = {}
    for index, name in torchvision_layout(stages, batch_norm):
        key = "conv" + name.removeprefix("bn").removeprefix("conv")
        ends[key] = index + 1 if before_relu else index + 2  # + the ReLU
    for block_index, block in enumerate(stages, start=1):
        ends[f"pool{block_index}"] = ends[f"conv{block_index}_{len(block)}"] + (
            0 if before_relu else 1
        )
    return ends[layer]


def _infer_stages(state: Mapping[str, np.ndarray], what: str):
    """Stages and BN from the indices of a torchvision-layout state dict's convolutions:
    within a block they are 2 apart (conv, ReLU) or 3 with BN; a pool adds one."""
    conv_indices = sorted(
        int(key.split(".")[1])
        for key, value in state.items()
        if re.fullmatch(r"features\.\d+\.weight", key) and value.ndim == 4
    )
    if not conv_indices:
        raise WeightFormatError(f"{what} has no features.N.weight convolutions")
    batch_norm = any(key.endswith(".running_mean") for key in state)
    step = 3 if batch_norm else 2
    stages, previous = [[]], conv_indices[0] - step
    for index in conv_indices:
        if index - previous == step + 1:  # a max-pool between: the next block
            stages.append([])
        elif index - previous != step:
            raise WeightFormatError(f"{what}: features.{index} is not where a VGG has one")
        stages[-1].append(int(state[f"features.{index}.weight"].shape[0]))
        previous = index
    return tuple(tuple(block) for block in stages), batch_norm


# Our head's layers -> their index in torchvision's `classifier`.
HEAD_INDEX = {"fc1": 0, "fc2": 3, "classifier": 6}
# A BN layer's tensors in torchvision -> ours (collection, name).
BN_NAMES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _torchvision_features(state: Mapping[str, Any], layout) -> dict[str, dict]:
    """The convolutional stack's params and BN statistics. torchvision's convolutions keep
    a bias before BN; ours have none, so it is folded into the running mean."""
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for index, layer in layout:
        prefix = f"features.{index}"
        if layer.startswith("conv"):
            kernel = state[f"{prefix}.weight"].transpose(2, 3, 1, 0)
            variables["params"][layer] = {"kernel": kernel, "bias": state[f"{prefix}.bias"]}
            continue
        for name, (collection, ours) in BN_NAMES.items():
            variables[collection].setdefault(layer, {})[ours] = state[f"{prefix}.{name}"]
        conv = variables["params"]["conv" + layer.removeprefix("bn")]
        variables["batch_stats"][layer]["mean"] = state[f"{prefix}.running_mean"] - conv.pop("bias")
    return variables


def _fc1_kernel(weight: np.ndarray, channels: int, block: int = 256) -> np.ndarray:
    """torch's fc1 weight (out, C*H*W) as our kernel (H*W*C, out). The same values as
    `weight.reshape(out, C, H, W).transpose(2, 3, 1, 0).reshape(-1, out)`, transposed a
    block of rows at a time: in one piece, the strided copy of VGG16's 400 MB matrix
    misses the cache on almost every element (experiments/RESULTS.md)."""
    out = np.empty((POOL * POOL * channels, weight.shape[0]), weight.dtype)
    for start in range(0, weight.shape[0], block):
        rows = weight[start : start + block].reshape(-1, channels, POOL, POOL)
        out[:, start : start + block] = rows.transpose(0, 2, 3, 1).reshape(len(rows), -1).T
    return out


def _torchvision_head(state: Mapping[str, Any], channels: int, what: str) -> dict[str, dict]:
    """fc1, fc2 and the classifier; fc1's inputs are reordered from torch's (C, H, W)
    flattening to ours (H, W, C)."""
    fc1 = state["classifier.0.weight"]
    hidden = spec.HEADS["torchvision"]["hidden"]
    shapes = (fc1.shape, state["classifier.3.weight"].shape)
    if shapes != ((hidden[0], channels * POOL * POOL), (hidden[1], hidden[0])):
        raise WeightFormatError(f"{what}: classifier {shapes} is not torchvision's VGG head")
    head = {
        layer: {"kernel": state[f"classifier.{i}.weight"].T, "bias": state[f"classifier.{i}.bias"]}
        for layer, i in HEAD_INDEX.items()
    }
    head["fc1"]["kernel"] = _fc1_kernel(fc1, channels)
    return head


def from_torchvision(
    source: Mapping[str, Any] | str | os.PathLike, arch: str | None = None
) -> tuple[models.VGG, dict]:
    """torchvision VGG weights (a state dict, a .pth/.pt/.bin file read with
    `torch.load(weights_only=True)`, or .safetensors) -> (model, variables) with the
    'torchvision' head. `arch` ('vgg16_bn', ...) is checked against the weights if given.
    The model normalises as torchvision's ImageNet models, or as FILE.json says."""
    state, what, path = _read_state_dict(source)
    stages, batch_norm = _infer_stages(state, what)
    name = check_arch(arch, stages, batch_norm, what)
    layout = torchvision_layout(stages, batch_norm)
    expected = {f"classifier.{i}.{p}" for i in HEAD_INDEX.values() for p in ("weight", "bias")}
    for index, layer in layout:
        names = BN_NAMES if layer.startswith("bn") else ("weight", "bias")
        expected |= {f"features.{index}.{name}" for name in names}
    found = {key for key in state if not key.endswith("num_batches_tracked")}
    if found != expected:
        raise WeightFormatError(
            f"{what} is not torchvision's VGG layout: missing {sorted(expected - found)[:5]}, "
            f"unexpected {sorted(found - expected)[:5]}"
        )
    state = {key: np.asarray(state[key], np.float32) for key in expected}
    variables = _torchvision_features(state, layout)
    variables["params"] |= _torchvision_head(state, stages[-1][-1], what)
    if not batch_norm:
        del variables["batch_stats"]
    sidecar = read_sidecar(path)
    model = models.create_model(
        name,
        variables["params"]["classifier"]["kernel"].shape[1],
        batch_norm=batch_norm,
        head="torchvision",
        stages=stages,
        mean=tuple(sidecar.get("mean", spec.IMAGENET_MEAN)),
        std=tuple(sidecar.get("std", spec.IMAGENET_STD)),
    )
    return model, jax.tree.map(jnp.asarray, variables)


# ----------------------------------------------------------------------------- export


def torchvision_state_dict(model: models.VGG, variables: Mapping[str, Any]) -> dict:
    """Our variables in torchvision's VGG layout (strict=True loads them), as numpy arrays:
    for the 'torchvision' head, or 'imagenet' on a 7x7 last map (224 pixels). The BN
    variants get zero convolution biases (ours have none)."""
    head = spec.HEADS[model.head]
    if head["hidden"] != spec.HEADS["torchvision"]["hidden"] or head["linear"]:
        raise ValueError(
            f"head {model.head!r} is not torchvision's VGG head; export it with "
            "vgg_jax.bench.torch_reference.build_torch_model instead"
        )
    variables = jax.device_get(dict(variables))
    params = variables["params"]
    channels = model.stages[-1][-1]
    fc1 = np.asarray(params["fc1"]["kernel"], np.float32)
    if fc1.shape[0] != POOL * POOL * channels:
        raise ValueError(
            f"fc1 reads a {fc1.shape[0] // channels}-pixel map, torchvision's a 7x7 one: only "
            "head='torchvision' or a 224-pixel 'imagenet' model exports to its layout"
        )
    state: dict[str, np.ndarray] = {}

    def put(key, value):
        state[key] = np.array(value, np.float32, order="C")  # a writable copy: torch wants one

    for index, layer in torchvision_layout(model.stages, model.batch_norm):
        if layer.startswith("conv"):
            kernel = np.asarray(params[layer]["kernel"], np.float32)
            put(f"features.{index}.weight", kernel.transpose(3, 2, 0, 1))
            bias = params[layer]["bias"] if "bias" in params[layer] else np.zeros(kernel.shape[-1])
            put(f"features.{index}.bias", bias)
        else:
            for name, (collection, ours) in BN_NAMES.items():
                put(f"features.{index}.{name}", variables[collection][layer][ours])
            state[f"features.{index}.num_batches_tracked"] = np.zeros((), np.int64)
    hidden = fc1.shape[1]
    # fc1's inputs from our (H, W, C) flattening to torch's (C, H, W).
    fc1 = fc1.reshape(POOL, POOL, channels, hidden).transpose(3, 2, 0, 1).reshape(hidden, -1)
    for layer, index in HEAD_INDEX.items():
        kernel = fc1 if layer == "fc1" else np.asarray(params[layer]["kernel"]).T
        put(f"classifier.{index}.weight", kernel)
        put(f"classifier.{index}.bias", params[layer]["bias"])
    return state


def to_torchvision(model: models.VGG, variables: Mapping[str, Any]) -> dict:
    """Our variables as a torchvision VGG state dict of torch tensors (needs torch)."""
    torch = import_torch("to_torchvision")
    return {k: torch.from_numpy(v) for k, v in torchvision_state_dict(model, variables).items()}


def torchvision_constructor(model: models.VGG) -> str | None:
    """The torchvision call that builds `model`'s architecture, e.g.
    'torchvision.models.vgg16_bn(num_classes=10)'; None for other stages (torchvision's
    VGG class fixes fc1 at 512 x 7 x 7 inputs: `from_torchvision` reads those)."""
    preset = preset_of(tuple(tuple(block) for block in model.stages))
    if preset not in ("vgg11", "vgg13", "vgg16", "vgg19"):
        return None
    arch = arch_name(preset, model.batch_norm)
    return f"torchvision.models.{arch}(num_classes={model.num_classes})"


def export_state_dict(
    model: models.VGG, variables: Mapping[str, Any], image_size: int
) -> tuple[dict[str, np.ndarray], str]:
    """Numpy state dict and its layout: 'torchvision' (torchvision's VGG, for the heads it
    has) or 'torch_reference' (`torch_reference.build_torch_model(model, image_size)`,
    the PyTorch twin, for the others; needs torch)."""
    try:
        return torchvision_state_dict(model, variables), "torchvision"
    except ValueError:
        pass
    import_torch(
        f"head {model.head!r} exports in the layout of vgg_jax.bench.torch_reference, which"
    )
    from vgg_jax.bench import torch_reference

    twin = torch_reference.build_torch_model(model, image_size)
    torch_reference.load_flax_variables(twin, variables)
    state = {k: v.detach().cpu().numpy() for k, v in twin.state_dict().items()}
    return state, "torch_reference"


def write_state_dict(
    state: Mapping[str, np.ndarray], path: str | os.PathLike, file_format: str, about: dict
) -> None:
    """Writes `state` as a torch .pth ('torchvision'; needs torch) or a .safetensors file
    ('safetensors'; `about` also goes into its metadata), and `about` as PATH.json."""
    path = Path(path).expanduser()
    if file_format == "safetensors":
        from safetensors.numpy import save_file

        metadata = {"format": "pt", **{k: json.dumps(v) for k, v in about.items()}}
        with reraised_as(OSError, f"cannot write {path}"):
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata)
    elif file_format == "torchvision":
        torch = import_torch("writing .pth files", otherwise="--format=safetensors")
        with reraised_as(OSError, f"cannot write {path}"):
            arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
            torch.save(arrays, path)
    else:
        raise ValueError(f"format must be 'torchvision' or 'safetensors', got {file_format!r}")
    Path(f"{path}.json").write_text(json.dumps(about, indent=1) + "\n")
