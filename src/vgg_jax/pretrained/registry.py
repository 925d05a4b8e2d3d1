"""Published weights by name, the download cache, and the errors and names the readers
share."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from vgg_jax import spec

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
TORCH_EXTRA_HINT = "pip install 'vgg-jax[torch]'"
POOL = spec.HEADS["torchvision"]["pool"]


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """A published weight file and its digest, or a prefix of it: torchvision names its
    files with the first hex digits of their SHA-256 (what torch.hub checks)."""

    url: str
    algorithm: str  # 'sha256' | 'md5'
    digest: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _torchvision_file(name: str) -> WeightFile:
    url = f"https://download.pytorch.org/models/{name}.pth"
    return WeightFile(url, "sha256", name.rsplit("-", 1)[1])


def _keras_file(model: str, suffix: str, md5: str) -> WeightFile:
    """keras.applications.vgg16 / vgg19's files, with the MD5s Keras itself checks."""
    url = "https://storage.googleapis.com/tensorflow/keras-applications"
    return WeightFile(
        f"{url}/{model}/{model}_weights_tf_dim_ordering_tf_kernels{suffix}.h5", "md5", md5
    )


WEIGHT_FILES: dict[str, WeightFile] = {
    "torchvision:vgg11": _torchvision_file("vgg11-8a719046"),
    "torchvision:vgg11_bn": _torchvision_file("vgg11_bn-6002323d"),
    "torchvision:vgg13": _torchvision_file("vgg13-19584684"),
    "torchvision:vgg13_bn": _torchvision_file("vgg13_bn-abd245e5"),
    "torchvision:vgg16": _torchvision_file("vgg16-397923af"),
    "torchvision:vgg16_bn": _torchvision_file("vgg16_bn-6c64b313"),
    "torchvision:vgg19": _torchvision_file("vgg19-dcbb9e9d"),
    "torchvision:vgg19_bn": _torchvision_file("vgg19_bn-c79401a0"),
    "keras:vgg16": _keras_file("vgg16", "", "64373286793e3c8b2b4e3219cbf3544b"),
    "keras:vgg16_notop": _keras_file("vgg16", "_notop", "6d6bbae143d832006294945121d1f1fc"),
    "keras:vgg19": _keras_file("vgg19", "", "cbe5617147190e668d6c5d5026f83318"),
    "keras:vgg19_notop": _keras_file("vgg19", "_notop", "253f8cb515780f3b799900260a226db6"),
}


class WeightsUnavailableError(RuntimeError):
    """Published weights are neither cached nor downloadable; the message says where to
    put the file."""


class WeightFormatError(ValueError):
    """A weight file or state dict is not the layout it was read as."""


# ---------------------------------------------------------------------- getting files


def cache_dir() -> Path:
    """Where downloaded weights are kept: $VGG_JAX_CACHE, else $XDG_CACHE_HOME/vgg_jax,
    else ~/.cache/vgg_jax."""
    if os.environ.get("VGG_JAX_CACHE"):
        return Path(os.environ["VGG_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "vgg_jax"


def _check_digest(path: Path, weight_file: WeightFile) -> None:
    with open(path, "rb") as file:
        actual = hashlib.file_digest(file, weight_file.algorithm).hexdigest()
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
    return fetch_file(weight_file, cache_dir() / weight_file.filename, timeout)


def fetch_file(weight_file: WeightFile, path: Path, timeout: float = 30.0) -> Path:
    """`path`, downloaded from `weight_file.url` if missing; its digest checked."""
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


def arch_name(model_name: str, batch_norm: bool) -> str:
    return model_name + ("_bn" if batch_norm else "")


def preset_of(stages: tuple[tuple[int, ...], ...]) -> str | None:
    return next((name for name, known in spec.STAGES.items() if known == stages), None)


def check_arch(arch: str | None, stages, batch_norm: bool, what: str) -> str:
    """The preset name for stages (or 'custom'), after checking it is `arch` if given."""
    preset = preset_of(stages)
    found = arch_name(preset, batch_norm) if preset else f"a custom VGG {stages}"
    if arch is not None:
        base = arch.removesuffix("_bn")
        if base not in spec.STAGES:
            raise ValueError(f"unknown arch {arch!r}; e.g. 'vgg16' or 'vgg16_bn'")
        if (spec.STAGES[base], arch.endswith("_bn")) != (stages, batch_norm):
            raise WeightFormatError(f"{what} holds {found}, not {arch}")
    return preset or "custom"


def import_torch(what: str, hint: str = TORCH_EXTRA_HINT, otherwise: str = ""):
    """torch, imported here (only these paths need it); without it, an ImportError
    saying `what` needs PyTorch, how to install it, and what `otherwise` does without."""
    try:
        import torch
    except ImportError:
        alternative = f" (or {otherwise})" if otherwise else ""
        raise ImportError(f"{what} needs PyTorch: {hint}{alternative}") from None
    return torch


@contextlib.contextmanager
def reraised_as(kind: type[Exception], message: str):
    """Whatever a weight file's reader or writer raises (the libraries' types vary) as one
    `kind` error naming the file."""
    try:
        yield
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - the libraries' own error types vary
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else ""
        raise kind(f"{message} ({reason or type(error).__name__})") from None
