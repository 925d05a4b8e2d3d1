"""Fine-tuning: another model's weights merged into this one's wherever they fit."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import spec
from vgg_jax.pretrained.registry import WeightFormatError

logger = logging.getLogger(__name__)


def _float32(leaf: Any) -> jax.Array:
    return jnp.asarray(leaf, jnp.float32)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def _describe(shapes: Any) -> str:
    """{'kernel': (3, 3, 3, 64), 'bias': (64,)} -> 'bias (64,), kernel (3, 3, 3, 64)'."""
    leaves = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return ", ".join(f"{path[-1].key} {shape}" for path, shape in leaves)


def merge_variables(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict, list]:
    """`target` (a fresh model's params and batch_stats) with every layer taken from
    `source` where the shapes agree, and notes on what was not. The convolutional layers
    must all agree (else WeightFormatError); head layers that differ stay fresh."""
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


def start_from(state: Any, variables: dict, name: str, mesh: Mesh) -> Any:
    """A train state with the weights of `variables` wherever they fit (the notes of
    `merge_variables` logged), replicated on `mesh`, in its EMA too when it keeps one."""
    target = {"params": state.params, "batch_stats": state.batch_stats}
    merged, notes = merge_variables(target, variables)
    for note in notes:
        logger.info("init_from %s: %s", name, note)
    merged = jax.device_put(merged, NamedSharding(mesh, P()))
    batch_stats = merged.get("batch_stats", state.batch_stats)
    state = state.replace(params=merged["params"], batch_stats=batch_stats)
    if state.ema:
        state = state.replace(ema={"params": merged["params"], "batch_stats": batch_stats})
    return state
