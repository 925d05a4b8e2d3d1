"""ImageNet VGG weights from torchvision and Keras as Flax variables, and back to PyTorch.

model, variables = vgg_jax.pretrained.load("torchvision:vgg16_bn")   # download once, cached
model, variables = vgg_jax.pretrained.from_torchvision("vgg16_bn.pth", "vgg16_bn")
model, variables = vgg_jax.pretrained.from_keras("vgg16_weights_tf_dim_ordering_tf_kernels.h5")
logits = model.apply(variables, uint8_images)                        # NHWC, 0..255 RGB
feats = model.apply(variables, uint8_images, layers=("conv3_3",), method="features")
state_dict = vgg_jax.pretrained.to_torchvision(model, variables)    # torch tensors

The returned model carries the source's preprocessing as its `mean` / `std`, so it takes
raw RGB images: torchvision's mean/std on 0..1 RGB (here in 0..255 units); Keras' "caffe"
mode (BGR, mean subtraction, no scaling) as an RGB mean with std 1 and the channel swap
folded into the first convolution's kernel, which is exact.

torchvision's layout: `features.{i}` (conv, [BN,] ReLU per convolution, a max-pool per
block), `avgpool` (AdaptiveAvgPool2d((7, 7)), the 'torchvision' head here),
`classifier.{0,3,6}`. Its convolutions keep a bias ahead of BN, ours have none: the bias
is folded into the BN running mean (BN(x + b) with mean m is BN(x) with mean m - b), and
exported as a zero bias, so ours -> torchvision -> ours is exact. Its first classifier
layer reads the pooled map in C, H, W order, ours in H, W, C: the rows are permuted.

Reading `.pth` files needs PyTorch (the `torch` extra); `.safetensors` and Keras `.h5`
files (h5py) do not. Nothing else is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models, spec
from vgg_jax.data import views
from vgg_jax.data.info import DatasetInfo, imagenet_class_names

if TYPE_CHECKING:
    from vgg_jax import inference

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
TORCH_EXTRA_HINT = "pip install 'vgg-jax[torch]'"
POOL = spec.HEADS["torchvision"]["pool"]


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """A published weight file and the digest that identifies it.

    torchvision names its files with the first hex digits of their SHA-256 (what
    torch.hub checks); Keras publishes an MD5. `digest` may be such a prefix."""

    url: str
    algorithm: str  # 'sha256' | 'md5'
    digest: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _torchvision_file(name: str) -> WeightFile:
    url = f"https://download.pytorch.org/models/{name}.pth"
    return WeightFile(url, "sha256", name.rsplit("-", 1)[1])


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
# keras.applications.vgg16 / vgg19: the URLs and the MD5s Keras itself checks.
WEIGHT_FILES: dict[str, WeightFile] = {
    "torchvision:vgg11": _torchvision_file("vgg11-8a719046"),
    "torchvision:vgg11_bn": _torchvision_file("vgg11_bn-6002323d"),
    "torchvision:vgg13": _torchvision_file("vgg13-19584684"),
    "torchvision:vgg13_bn": _torchvision_file("vgg13_bn-abd245e5"),
    "torchvision:vgg16": _torchvision_file("vgg16-397923af"),
    "torchvision:vgg16_bn": _torchvision_file("vgg16_bn-6c64b313"),
    "torchvision:vgg19": _torchvision_file("vgg19-dcbb9e9d"),
    "torchvision:vgg19_bn": _torchvision_file("vgg19_bn-c79401a0"),
    "keras:vgg16": WeightFile(
        f"{_KERAS_URL}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        "md5",
        "64373286793e3c8b2b4e3219cbf3544b",
    ),
    "keras:vgg16_notop": WeightFile(
        f"{_KERAS_URL}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    "keras:vgg19": WeightFile(
        f"{_KERAS_URL}/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        "md5",
        "cbe5617147190e668d6c5d5026f83318",
    ),
    "keras:vgg19_notop": WeightFile(
        f"{_KERAS_URL}/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5",
        "253f8cb515780f3b799900260a226db6",
    ),
}


class WeightsUnavailableError(RuntimeError):
    """Published weights are neither cached nor downloadable; the message says where to
    put the file."""


class WeightFormatError(ValueError):
    """A weight file or state dict is not the layout it was read as."""


# ------------------------------------------------------------------------ class names


# ---------------------------------------------------------------------- getting files


def cache_dir() -> Path:
    """Where downloaded weights are kept: $VGG_JAX_CACHE, else $XDG_CACHE_HOME/vgg_jax,
    else ~/.cache/vgg_jax."""
    if os.environ.get("VGG_JAX_CACHE"):
        return Path(os.environ["VGG_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "vgg_jax"


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _check_digest(path: Path, weight_file: WeightFile) -> None:
    actual = _digest(path, weight_file.algorithm)
    if not actual.startswith(weight_file.digest):
        raise WeightFormatError(
            f"{path}: {weight_file.algorithm} {actual} does not match the published "
            f"{weight_file.digest}; delete it and retry (a partial or different file)"
        )


def fetch(name: str, timeout: float = 30.0) -> Path:
    """The local path of published weights (`WEIGHT_FILES`), downloaded into
    `cache_dir()` on first use; the file's digest is checked every time it is fetched.
    Offline (or with VGG_JAX_OFFLINE=1), raises `WeightsUnavailableError` naming the URL
    and where to put the file."""
    if name not in WEIGHT_FILES:
        raise ValueError(f"unknown weights {name!r}; choose one of {sorted(WEIGHT_FILES)}")
    weight_file = WEIGHT_FILES[name]
    path = cache_dir() / weight_file.filename
    if not path.exists():
        _download(weight_file, path, timeout)
    _check_digest(path, weight_file)
    return path


def _download(weight_file: WeightFile, path: Path, timeout: float) -> None:
    if os.environ.get("VGG_JAX_OFFLINE") == "1":
        raise WeightsUnavailableError(
            f"not downloading {weight_file.url} (VGG_JAX_OFFLINE=1); download it elsewhere "
            f"and put it at {path}"
        )
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Into a temporary file next to the target, renamed when whole and checked: an
        # interrupted download never looks like a cached file.
        with (
            urllib.request.urlopen(weight_file.url, timeout=timeout) as response,
            tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as file,
        ):
            partial = Path(file.name)
            shutil.copyfileobj(response, file, 1 << 20)
        _check_digest(partial, weight_file)
        os.replace(partial, path)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise WeightsUnavailableError(
            f"cannot download {weight_file.url} ({reason}); download it elsewhere and "
            f"put it at {path}"
        ) from None
    finally:
        if partial is not None and partial.exists():
            partial.unlink()


# -------------------------------------------------------------------------- sources


def load(source: str | os.PathLike, arch: str | None = None) -> tuple[models.VGG, dict]:
    """(model, variables) from published weights by name ('torchvision:vgg16_bn',
    'keras:vgg19', see `WEIGHT_FILES`), a weight file (.pth/.pt/.bin or .safetensors in
    torchvision's layout, Keras .h5), or a training workdir / checkpoint of this package."""
    text = os.fspath(source)
    if text in WEIGHT_FILES:
        reader = from_keras if text.startswith("keras:") else from_torchvision
        return reader(fetch(text), arch or _arch_name(*spec.PRETRAINED[text]))
    path = Path(text).expanduser()
    if path.is_dir():
        return from_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{text}: no such file or folder, and not one of {sorted(WEIGHT_FILES)}"
        )
    if path.suffix == ".h5":
        return from_keras(path, arch)
    if path.suffix in (*TORCH_SUFFIXES, ".safetensors"):
        return from_torchvision(path, arch)
    raise WeightFormatError(
        f"{path}: unknown weight file type; expected .pth/.pt/.bin/.safetensors "
        "(torchvision's layout) or .h5 (Keras)"
    )


def from_checkpoint(path: str | os.PathLike, step: int | str = "latest") -> tuple[models.VGG, dict]:
    """(model, variables) of a checkpoint written by `python -m vgg_jax.main`."""
    from vgg_jax import inference

    predictor = inference.load(path, step)
    return predictor.model, predictor.variables


def _arch_name(model_name: str, batch_norm: bool) -> str:
    return model_name + ("_bn" if batch_norm else "")


def _preset_of(stages: tuple[tuple[int, ...], ...]) -> str | None:
    return next((name for name, known in spec.STAGES.items() if known == stages), None)


def _check_arch(arch: str | None, stages, batch_norm: bool, what: str) -> str:
    """The preset name for stages (or 'custom'), after checking it is `arch` if given."""
    preset = _preset_of(stages)
    found = _arch_name(preset, batch_norm) if preset else f"a custom VGG {stages}"
    if arch is not None:
        base = arch.removesuffix("_bn")
        if base not in spec.STAGES:
            raise ValueError(f"unknown arch {arch!r}; e.g. 'vgg16' or 'vgg16_bn'")
        if (spec.STAGES[base], arch.endswith("_bn")) != (stages, batch_norm):
            raise WeightFormatError(f"{what} holds {found}, not {arch}")
    return preset or "custom"


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

        with _reraised_as(WeightFormatError, f"{path}: not a readable safetensors file"):
            return load_file(path), str(path), path
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs PyTorch: {TORCH_EXTRA_HINT} (or use a .safetensors file)"
        ) from None
    with _reraised_as(WeightFormatError, f"{path}: not a readable PyTorch file"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise WeightFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: _numpy(v) for k, v in state.items()}, str(path), path


@contextlib.contextmanager
def _reraised_as(kind: type[Exception], message: str):
    """Whatever a weight file's reader or writer raises (torch: RuntimeError or
    UnpicklingError; safetensors: SafetensorError) as one `kind` error naming the file."""
    try:
        yield
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - the libraries' own error types vary
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else ""
        raise kind(f"{message} ({reason or type(error).__name__})") from None


def _sidecar(path: Path | None) -> dict[str, Any]:
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
    stages, block, previous = [], [], None
    for index in conv_indices:
        if previous is not None and index - previous not in (step, step + 1):
            raise WeightFormatError(f"{what}: features.{index} is not where a VGG has one")
        if previous is not None and index - previous == step + 1:
            stages.append(tuple(block))
            block = []
        block.append(int(state[f"features.{index}.weight"].shape[0]))
        previous = index
    stages.append(tuple(block))
    return tuple(stages), batch_norm


def _check_keys(state: Mapping[str, Any], expected: set[str], what: str) -> None:
    found = {key for key in state if not key.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise WeightFormatError(
            f"{what} is not torchvision's VGG layout: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _torchvision_features(state: Mapping[str, Any], layout, batch_norm: bool):
    """The convolutional stack's params and BN statistics. torchvision's convolutions keep
    a bias before BN; ours have none, so it is folded into the running mean."""

    def get(key):
        return np.asarray(state[key], np.float32)

    params: dict[str, dict] = {}
    batch_stats: dict[str, dict] = {}
    conv_bias = {}
    for index, layer in layout:
        if layer.startswith("conv"):
            params[layer] = {"kernel": get(f"features.{index}.weight").transpose(2, 3, 1, 0)}
            if batch_norm:
                conv_bias[layer] = get(f"features.{index}.bias")
            else:
                params[layer]["bias"] = get(f"features.{index}.bias")
        else:
            conv = "conv" + layer.removeprefix("bn")
            params[layer] = {
                "scale": get(f"features.{index}.weight"),
                "bias": get(f"features.{index}.bias"),
            }
            batch_stats[layer] = {
                "mean": get(f"features.{index}.running_mean") - conv_bias[conv],
                "var": get(f"features.{index}.running_var"),
            }
    return params, batch_stats


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

    def get(key):
        return np.asarray(state[key], np.float32)

    fc1 = get("classifier.0.weight")
    hidden = spec.HEADS["torchvision"]["hidden"]
    shapes = (fc1.shape, get("classifier.3.weight").shape)
    if shapes != ((hidden[0], channels * POOL * POOL), (hidden[1], hidden[0])):
        raise WeightFormatError(f"{what}: classifier {shapes} is not torchvision's VGG head")
    return {
        "fc1": {"kernel": _fc1_kernel(fc1, channels), "bias": get("classifier.0.bias")},
        "fc2": {"kernel": get("classifier.3.weight").T, "bias": get("classifier.3.bias")},
        "classifier": {
            "kernel": get("classifier.6.weight").T,
            "bias": get("classifier.6.bias"),
        },
    }


def from_torchvision(
    source: Mapping[str, Any] | str | os.PathLike, arch: str | None = None
) -> tuple[models.VGG, dict]:
    """torchvision VGG weights -> (model, variables) for the matching preset with the
    'torchvision' head (adaptive 7x7 pool, fc4096 x2, the classifier).

    `source`: a state dict (torch tensors or numpy arrays) or a file (.pth/.pt/.bin, read
    with `torch.load(weights_only=True)`; or .safetensors). `arch` ('vgg16_bn', ...) is
    checked against the weights; None: inferred. The class count is the classifier's.
    The model normalises with torchvision's ImageNet mean/std, or with what
    `python -m vgg_jax.export` recorded next to the file (FILE.json).
    """
    state, what, path = _read_state_dict(source)
    stages, batch_norm = _infer_stages(state, what)
    name = _check_arch(arch, stages, batch_norm, what)
    layout = torchvision_layout(stages, batch_norm)
    expected = {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    for index, layer in layout:
        expected |= {f"features.{index}.weight", f"features.{index}.bias"}
        if layer.startswith("bn"):
            expected |= {f"features.{index}.running_mean", f"features.{index}.running_var"}
    _check_keys(state, expected, what)

    params, batch_stats = _torchvision_features(state, layout, batch_norm)
    params |= _torchvision_head(state, stages[-1][-1], what)
    sidecar = _sidecar(path)
    model = models.create_model(
        name,
        params["classifier"]["kernel"].shape[1],
        batch_norm=batch_norm,
        head="torchvision",
        stages=stages,
        mean=tuple(sidecar.get("mean", spec.IMAGENET_MEAN)),
        std=tuple(sidecar.get("std", spec.IMAGENET_STD)),
    )
    variables = {"params": params}
    if batch_norm:
        variables["batch_stats"] = batch_stats
    return model, jax.tree.map(jnp.asarray, variables)


# ---------------------------------------------------------------------------- Keras

KERAS_HEAD = {"fc1": "fc1", "fc2": "fc2", "predictions": "classifier"}


def _keras_h5_layers(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> [kernel, bias] from a Keras weight file: the legacy layout of the
    published files (`layer_names`, `weight_names` attributes; also inside a whole-model
    file's `model_weights`) or Keras 3's `.weights.h5` (layers/*/vars/0, 1)."""
    import h5py

    layers: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as file:
        root = file.get("model_weights", file)
        if "layer_names" in root.attrs:
            for name in root.attrs["layer_names"]:
                name = name.decode() if isinstance(name, bytes) else str(name)
                group = root[name]
                weight_names = [
                    w.decode() if isinstance(w, bytes) else str(w)
                    for w in group.attrs.get("weight_names", [])
                ]
                if weight_names:
                    layers[name] = [np.asarray(group[w]) for w in weight_names]
        elif "layers" in root:
            for key, group in root["layers"].items():
                values = group.get("vars")
                if values is None or not len(values):
                    continue
                name = values.attrs.get("name", key)
                name = name.decode() if isinstance(name, bytes) else str(name)
                layers[name] = [np.asarray(values[str(i)]) for i in range(len(values))]
        else:
            raise WeightFormatError(f"{path}: not a Keras weight file (no layer_names)")
    return layers


def from_keras(source: Any, arch: str | None = None) -> tuple[models.VGG, dict]:
    """Keras VGG16 / VGG19 weights -> (model, variables) for the matching preset with the
    'imagenet' head (flatten, fc4096 x2, the classifier), normalising as Keras' "caffe"
    mode does.

    `source`: a Keras weight file (.h5; read with h5py, no TensorFlow) or a Keras model
    (`keras.applications.VGG16(...)`). The model takes the input size the Keras model was
    built for (224 for the published weights): Keras flattens the last map, no pooling.
    A 'notop' file gives the convolutions only: for `features`, or to fine-tune from.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        layers, what = _keras_h5_layers(path), str(path)
    else:
        layers = {layer.name: layer.get_weights() for layer in source.layers}
        what = f"Keras model {getattr(source, 'name', '')}".strip()
    convs = {}
    for name, values in layers.items():
        match = re.fullmatch(r"block(\d+)_conv(\d+)", name)
        if match and values:
            convs[(int(match[1]), int(match[2]))] = values
    if not convs:
        raise WeightFormatError(f"{what} has no blockB_convI layers: not a Keras VGG")
    stages = []
    for block in range(1, max(b for b, _ in convs) + 1):
        count = max((i for b, i in convs if b == block), default=0)
        if count == 0 or any((block, i) not in convs for i in range(1, count + 1)):
            raise WeightFormatError(f"{what}: block{block}'s convolutions are incomplete")
        stages.append(tuple(int(convs[(block, i)][0].shape[-1]) for i in range(1, count + 1)))
    stages = tuple(stages)
    name = _check_arch(arch, stages, False, what)
    params = {}
    for (block, index), (kernel, bias) in sorted(convs.items()):
        kernel = np.asarray(kernel, np.float32)
        if (block, index) == (1, 1):
            kernel = kernel[:, :, ::-1, :]  # Keras feeds BGR: swap the input channels
        params[f"conv{block}_{index}"] = {"kernel": kernel, "bias": np.asarray(bias, np.float32)}
    present = [keras_name for keras_name in KERAS_HEAD if layers.get(keras_name)]
    if present and len(present) != len(KERAS_HEAD):
        raise WeightFormatError(f"{what} has {present} of the head's {list(KERAS_HEAD)}")
    for keras_name in present:
        kernel, bias = layers[keras_name]
        params[KERAS_HEAD[keras_name]] = {
            "kernel": np.asarray(kernel, np.float32),
            "bias": np.asarray(bias, np.float32),
        }
    _check_keras_shapes(params, what)
    num_classes = params["classifier"]["kernel"].shape[1] if present else 1000
    model = models.create_model(
        name,
        num_classes,
        batch_norm=False,
        head="imagenet",
        stages=stages,
        mean=spec.CAFFE_MEAN_RGB,
        std=spec.CAFFE_STD,
    )
    return model, jax.tree.map(jnp.asarray, {"params": params})


def _check_keras_shapes(params: dict[str, dict[str, np.ndarray]], what: str) -> None:
    """Each layer's weights must fit the one before it (3x3 kernels, channels chained,
    a flattened square map into fc1), or the model would fail only when applied."""
    channels = 3

    def check(name: str, kernel_shape: tuple, bias_shape: tuple) -> None:
        kernel, bias = params[name]["kernel"].shape, params[name]["bias"].shape
        if kernel != kernel_shape or bias != bias_shape:
            raise WeightFormatError(
                f"{what}: {name} has a kernel of shape {kernel} and a bias of shape {bias}; "
                f"the layers before it need {kernel_shape} and {bias_shape}"
            )

    convs = sorted((n for n in params if n.startswith("conv")), key=_conv_order)
    for name in convs:
        out = params[name]["kernel"].shape[-1]
        check(name, (3, 3, channels, out), (out,))
        channels = out
    if "fc1" not in params:
        return
    rows = params["fc1"]["kernel"].shape[0] if params["fc1"]["kernel"].ndim == 2 else 0
    side = round((rows / channels) ** 0.5)
    width = channels * max(side, 1) ** 2
    for name in ("fc1", "fc2", "classifier"):
        units = params[name]["kernel"].shape[-1]
        check(name, (width, units), (units,))
        width = units


def _conv_order(name: str) -> tuple[int, int]:
    block, index = name.removeprefix("conv").split("_")
    return int(block), int(index)


# ------------------------------------------------------------------------ fine-tuning


def _float32(leaf: Any) -> jax.Array:
    return jnp.asarray(leaf, jnp.float32)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def _describe(shapes: Any) -> str:
    """{'kernel': (3, 3, 3, 64), 'bias': (64,)} -> 'bias (64,), kernel (3, 3, 3, 64)'."""
    leaves = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return ", ".join(f"{path[-1].key} {shape}" for path, shape in leaves)


def merge_variables(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict, list]:
    """`target` (a freshly initialised model's params and batch_stats) with every layer
    taken from `source` where the shapes agree, and notes on what was not.

    The convolutional layers (conv*, bn*) must all agree: a mismatch there raises
    `WeightFormatError`. Head layers that differ (the classifier when the class count
    differs, fc layers of another head) keep their fresh initialisation."""
    target_params, source_params = target["params"], source["params"]
    target_stats = target.get("batch_stats", {})
    source_stats = source.get("batch_stats", {})
    backbone_here = {name for name in target_params if spec.block_of(name)}
    backbone_there = {name for name in source_params if spec.block_of(name)}
    if backbone_here != backbone_there:
        only_there = sorted(backbone_there - backbone_here)[:4]
        only_here = sorted(backbone_here - backbone_there)[:4]
        raise WeightFormatError(
            f"init_from: the source's convolutional layers are not this model's (only in the "
            f"source: {only_there}; only here: {only_here}): set model, batch_norm and width "
            "to the source's"
        )
    params, stats = dict(target_params), dict(target_stats)
    notes, loaded = [], 0
    for name in target_params:
        here = _shapes({"p": target_params[name], "s": target_stats.get(name, {})})
        if name in source_params:
            there = _shapes({"p": source_params[name], "s": source_stats.get(name, {})})
            if here == there:
                params[name] = jax.tree.map(_float32, source_params[name])
                if name in source_stats:
                    stats[name] = jax.tree.map(_float32, source_stats[name])
                loaded += 1
                continue
            if spec.block_of(name):
                raise WeightFormatError(
                    f"init_from: {name} is {_describe(there['p'])} in the source, "
                    f"{_describe(here['p'])} here: set model, batch_norm and width to the source's"
                )
            if name == "classifier":
                source_classes = source_params[name]["kernel"].shape[-1]
                target_classes = target_params[name]["kernel"].shape[-1]
                notes.append(
                    f"classifier re-initialised: the source has {source_classes} classes, "
                    f"this dataset {target_classes}"
                )
            else:
                notes.append(
                    f"{name} re-initialised: {_describe(there['p'])} in the source, "
                    f"{_describe(here['p'])} here"
                )
        else:
            notes.append(f"{name} re-initialised: not in the source")
    unused = sorted(set(source_params) - set(target_params))
    if unused:
        notes.append(f"not used from the source: {', '.join(unused)}")
    notes.insert(0, f"{loaded} of {len(target_params)} layers loaded")
    merged = {"params": params}
    if target_stats:
        merged["batch_stats"] = stats
    return merged, notes


# ------------------------------------------------------------------ classifying images


def predictor(source: str | os.PathLike, arch: str | None = None) -> inference.Predictor:
    """An `inference.Predictor` (`predict`, `top_k` with ImageNet's class names) for
    anything `load` takes; pictures are resized and cropped as the source library does
    for its weights (`views.torchvision_view`, `views.keras_view`), or, for a file written
    by `python -m vgg_jax.export`, at the size and in the view its training evaluated."""
    from vgg_jax import configuration, inference

    text = os.fspath(source)
    if Path(text).expanduser().is_dir():
        return inference.load(text)
    model, variables = load(source, arch)
    if "classifier" not in variables["params"]:
        raise ValueError(f"{text} holds the convolutions only (no classifier): use features")
    keras_source = text.startswith("keras:") or text.endswith(".h5")
    stages = tuple(tuple(block) for block in model.stages)
    channels = stages[-1][-1]
    side = round((variables["params"]["fc1"]["kernel"].shape[0] // channels) ** 0.5)
    image_size = 224 if model.head == "torchvision" else side * 2 ** len(stages)
    sidecar = {} if keras_source or text in WEIGHT_FILES else _sidecar(Path(text).expanduser())
    if "image_size" in sidecar:  # exported by vgg_jax.export: the size it was trained at
        image_size = sidecar["image_size"]
        if not isinstance(image_size, int) or image_size < 1:
            raise WeightFormatError(f"{text}.json: image_size {image_size!r} is no size")
    config = configuration.default_config()
    preset = _preset_of(stages)
    config.model = preset or "vgg16"
    config.stages = None if preset else stages
    config.batch_norm = model.batch_norm
    config.conv_dropout = "none"
    config.head = model.head
    config.image_size = image_size
    config.dataset = text
    if "class_names" in sidecar:
        class_names = tuple(sidecar["class_names"])
    elif model.num_classes == 1000:
        class_names = imagenet_class_names()
    else:
        class_names = tuple(str(i) for i in range(model.num_classes))
    info = DatasetInfo(class_names, tuple(model.mean), tuple(model.std), image_size, 0, 0)
    if "image_size" in sidecar:  # our own training's evaluation view (vgg_jax.load's)
        config.augment = sidecar.get("augment", "none")
        view = views.eval_view(config)
    else:
        source_view = views.keras_view if keras_source else views.torchvision_view
        view = functools.partial(source_view, size=image_size)
    return inference.Predictor(config, variables, info, step=0, view=view)


# ----------------------------------------------------------------------------- export


def torchvision_state_dict(model: models.VGG, variables: Mapping[str, Any]) -> dict:
    """Our variables in torchvision's VGG layout, as numpy arrays (no torch needed):
    `torchvision.models.vgg16_bn(num_classes=N).load_state_dict(..., strict=True)`.

    Needs a head torchvision has: 'torchvision', or 'imagenet' on a 7x7 last map (224
    pixels). The BN variants get zero convolution biases (ours have none)."""
    head = spec.HEADS[model.head]
    if head["hidden"] != spec.HEADS["torchvision"]["hidden"] or head["linear"]:
        raise ValueError(
            f"head {model.head!r} is not torchvision's VGG head; export it with "
            "vgg_jax.bench.torch_reference.build_torch_model instead"
        )
    params = jax.device_get(variables["params"])
    stats = jax.device_get(variables.get("batch_stats", {}))
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
            put(f"features.{index}.weight", params[layer]["scale"])
            put(f"features.{index}.bias", params[layer]["bias"])
            put(f"features.{index}.running_mean", stats[layer]["mean"])
            put(f"features.{index}.running_var", stats[layer]["var"])
            state[f"features.{index}.num_batches_tracked"] = np.zeros((), np.int64)
    hidden = fc1.shape[1]
    put(
        "classifier.0.weight",
        fc1.reshape(POOL, POOL, channels, hidden).transpose(3, 2, 0, 1).reshape(hidden, -1),
    )
    put("classifier.0.bias", params["fc1"]["bias"])
    put("classifier.3.weight", np.asarray(params["fc2"]["kernel"]).T)
    put("classifier.3.bias", params["fc2"]["bias"])
    put("classifier.6.weight", np.asarray(params["classifier"]["kernel"]).T)
    put("classifier.6.bias", params["classifier"]["bias"])
    return state


def to_torchvision(model: models.VGG, variables: Mapping[str, Any]) -> dict:
    """Our variables as a torchvision VGG state dict of torch tensors (needs torch)."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"to_torchvision needs PyTorch: {TORCH_EXTRA_HINT}") from None
    return {k: torch.from_numpy(v) for k, v in torchvision_state_dict(model, variables).items()}


def torchvision_constructor(model: models.VGG) -> str | None:
    """The torchvision call that builds `model`'s architecture, e.g.
    'torchvision.models.vgg16_bn(num_classes=10)'; None for other stages (torchvision's
    VGG class fixes fc1 at 512 x 7 x 7 inputs: `from_torchvision` reads those)."""
    preset = _preset_of(tuple(tuple(block) for block in model.stages))
    if preset not in ("vgg11", "vgg13", "vgg16", "vgg19"):
        return None
    arch = _arch_name(preset, model.batch_norm)
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
    try:
        from vgg_jax.bench import torch_reference
    except ImportError:
        raise ImportError(
            f"head {model.head!r} exports in the layout of vgg_jax.bench.torch_reference, which "
            f"needs PyTorch: {TORCH_EXTRA_HINT}"
        ) from None
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
        with _reraised_as(OSError, f"cannot write {path}"):
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata)
    elif file_format == "torchvision":
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"writing .pth files needs PyTorch: {TORCH_EXTRA_HINT} (or --format=safetensors)"
            ) from None
        with _reraised_as(OSError, f"cannot write {path}"):
            arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
            torch.save(arrays, path)
    else:
        raise ValueError(f"format must be 'torchvision' or 'safetensors', got {file_format!r}")
    Path(f"{path}.json").write_text(json.dumps(about, indent=1) + "\n")
