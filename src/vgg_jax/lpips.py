"""LPIPS (Zhang et al. 2018), the VGG variant, as the `lpips` PyTorch package computes it,
step for step in its order (docs/pretrained.md#lpips)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models, pretrained, spec
from vgg_jax.pretrained import registry

VERSIONS = ("0.1", "0.0")
# The reference's relu1_2 .. relu5_3 and its lin0 .. lin4 on top of them.
LAYERS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
# lpips.ScalingLayer's constants, on images in [-1, 1]: float32 numbers there (also in a
# float64 run of it), so float32 numbers here.
SHIFT = tuple(np.array([-0.030, -0.088, -0.188], np.float32).tolist())
SCALE = tuple(np.array([0.458, 0.448, 0.450], np.float32).tolist())
EPS = 1e-10  # lpips.normalize_tensor's, added to the norm
MIN_SIZE = 16  # conv5_3 comes after four 2x2 pools
LPIPS_EXTRA_HINT = "pip install 'vgg-jax[lpips]'"

# The files the `lpips` package (0.1.4) ships, at a fixed commit of its repository.
_REPOSITORY = (
    "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
    "082bb24f84c091ea94de2867d34c4544f68e0963/lpips/weights"
)
WEIGHT_FILES = {
    version: pretrained.WeightFile(f"{_REPOSITORY}/v{version}/vgg.pth", "sha256", digest)
    for version, digest in (
        ("0.1", "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
        ("0.0", "b9e4236260c3dd988fc79d2a48d645d885afcbb21f9fd595e6744cf7419b582c"),
    )
}


def weights_path(version: str, timeout: float = 30.0) -> Path:
    """The learned layers' file for `version`: the installed `lpips` package's, else the
    official repository's, downloaded once into `pretrained.cache_dir()/lpips/v{version}`.
    Offline (or VGG_JAX_OFFLINE=1) without the package: `WeightsUnavailableError` naming
    the URL and where to put the file."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    weight_file = WEIGHT_FILES[version]
    # find_spec locates the package without importing it (and torch with it).
    package = importlib.util.find_spec("lpips")
    for folder in (package and package.submodule_search_locations) or ():
        path = Path(folder) / "weights" / f"v{version}" / "vgg.pth"
        if path.is_file():
            return registry.fetch_file(weight_file, path)
    path = pretrained.cache_dir() / "lpips" / f"v{version}" / weight_file.filename
    try:
        return registry.fetch_file(weight_file, path, timeout)
    except pretrained.WeightsUnavailableError as error:
        raise pretrained.WeightsUnavailableError(
            f"{error} (or {LPIPS_EXTRA_HINT}, which ships it)"
        ) from None


def load_linear_layers(source: str | os.PathLike) -> dict[str, np.ndarray]:
    """{'conv1_2': (64,) weights, ...} from a version ('0.1', '0.0') or a file in the
    reference's layout (lin0.model.1.weight .. lin4, each (1, C, 1, 1); read with
    `torch.load(weights_only=True)`: nothing is unpickled but tensors)."""
    path = weights_path(source) if source in VERSIONS else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    torch = registry.import_torch(f"reading LPIPS's learned layers ({path})", LPIPS_EXTRA_HINT)
    state = torch.load(path, map_location="cpu", weights_only=True)
    channels = [block[-1] for block in spec.STAGES["vgg16"]]
    weights = {}
    for index, (name, count) in enumerate(zip(LAYERS, channels, strict=True)):
        key = f"lin{index}.model.1.weight"
        value = state.get(key) if isinstance(state, Mapping) else None
        if value is None or tuple(value.shape) != (1, count, 1, 1):
            raise pretrained.WeightFormatError(
                f"{path}: no {key} of shape (1, {count}, 1, 1): not LPIPS's VGG layers"
            )
        weights[name] = value.detach().cpu().numpy().reshape(count).astype(np.float32)
        if (weights[name] < 0).any():
            raise pretrained.WeightFormatError(f"{path}: {key} has negative weights")
    return weights


def _vgg16_convolutions(backbone: Any) -> dict[str, Any]:
    """The convolutions' params of a torchvision VGG16 (no BN): a published name, a
    .pth/.safetensors file or state dict in torchvision's layout, or a (model, variables)
    pair of this package."""
    if isinstance(backbone, tuple):
        model, variables = backbone
        stages = tuple(tuple(block) for block in model.stages)
        if stages != spec.STAGES["vgg16"] or model.batch_norm:
            raise pretrained.WeightFormatError(
                f"LPIPS's VGG variant needs VGG16 without BN, got stages {stages} "
                f"with batch_norm={model.batch_norm}"
            )
    else:
        if isinstance(backbone, str) and backbone in pretrained.WEIGHT_FILES:
            if backbone != "torchvision:vgg16":
                raise ValueError(f"LPIPS's VGG variant uses torchvision:vgg16, not {backbone}")
            backbone = pretrained.fetch(backbone)
        model, variables = pretrained.from_torchvision(backbone, "vgg16")
    return {name: v for name, v in variables["params"].items() if name.startswith("conv")}


class LPIPS:
    """The LPIPS distance with a VGG16 backbone (docs/pretrained.md#lpips). `linear`: a file
    of learned layers in the reference's layout (None: the published ones); `dtype`: the
    VGG's compute dtype. `metric(x, y)` runs the jitted, pure `metric.apply`."""

    def __init__(
        self,
        backbone: Any = "torchvision:vgg16",
        version: str = "0.1",
        spatial: bool = False,
        *,
        linear: str | os.PathLike | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        self.version, self.spatial = version, bool(spatial)
        # The VGG normalises its input as (x - mean) / std: the ScalingLayer exactly, with
        # the same operations on the same float32 constants; version 0.0 feeds x itself.
        mean, std = (SHIFT, SCALE) if version == "0.1" else ((0.0,) * 3, (1.0,) * 3)
        self.model = models.create_model(
            "vgg16", 1, batch_norm=False, mean=mean, std=std, dtype=dtype
        )
        self.dtype = jnp.promote_types(dtype, jnp.float32)  # of everything but the VGG
        variables = {
            "backbone": {"params": _vgg16_convolutions(backbone)},
            "linear": load_linear_layers(version if linear is None else linear),
        }
        self.variables = jax.tree.map(lambda v: jnp.asarray(v, self.dtype), variables)
        self._jitted_apply = jax.jit(self.apply)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """(N,) distances, or (N, H, W) maps with `spatial`, of float NHWC images in [-1, 1]."""
        return self._jitted_apply(self.variables, x, y)

    def apply(self, variables: Mapping[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
        """What `metric(x, y)` returns, from `variables` (`metric.variables`' structure)."""
        _check_images(x, y)
        both = jnp.concatenate([jnp.asarray(x), jnp.asarray(y)]).astype(self.dtype)
        features = self.model.apply(variables["backbone"], both, layers=LAYERS, method="features")
        height, width = x.shape[1:3]
        total = jnp.zeros((x.shape[0], height, width) if self.spatial else x.shape[:1], self.dtype)
        for name in LAYERS:
            fx, fy = jnp.split(features[name].astype(self.dtype), 2)
            squared = (_unit_channels(fx) - _unit_channels(fy)) ** 2
            weighted = jnp.einsum(
                "nhwc,c->nhw",
                squared,
                variables["linear"][name],
                precision=jax.lax.Precision.HIGHEST,  # no TF32 passes on GPUs
            )
            if self.spatial:  # the reference's upsample(): torch's bilinear, half-pixel centres
                total = total + jax.image.resize(weighted, total.shape, "bilinear")
            else:
                total = total + jnp.mean(weighted, axis=(1, 2))
        return total


def _check_images(x: Any, y: Any) -> None:
    shape, dtype = np.shape(x), jnp.result_type(x)
    if np.shape(y) != shape:
        raise ValueError(f"x and y must have the same shape, got {shape} and {np.shape(y)}")
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"LPIPS takes RGB images (N, H, W, 3), got shape {shape}")
    if not all(jnp.issubdtype(jnp.result_type(images), jnp.floating) for images in (x, y)):
        raise ValueError(f"LPIPS takes float images in [-1, 1] (uint8: x / 127.5 - 1), got {dtype}")
    if min(shape[1:3]) < MIN_SIZE:
        raise ValueError(f"LPIPS's VGG needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {shape}")


def _unit_channels(features: jax.Array) -> jax.Array:
    """features / (norm + eps) over channels, as lpips.normalize_tensor. sqrt's derivative
    is infinite at 0 (an all-zero vector after a ReLU): taken where the sum is positive
    only, the values are the same and the gradient finite."""
    squares = jnp.sum(features**2, axis=-1, keepdims=True)
    positive = squares > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
    return features / (norm + EPS)
