"""Loading configuration files by path (they are plain Python, not package modules)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the Python file at `path`."""
    path = os.fspath(path)
    name = "vgg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sibling_config(anchor_file: str, name: str = "default") -> ml_collections.ConfigDict:
    """The config of `name`.py in the same folder as `anchor_file`: lets a preset extend
    configs/default.py wherever the configs folder lives and whatever the working dir."""
    return load_config_file(
        os.path.join(os.path.dirname(os.path.abspath(anchor_file)), name + ".py")
    )
