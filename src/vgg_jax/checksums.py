"""SHA-256 digests of a checkpoint's items, kept in its meta item under "digests", so
that a restore can tell a step read back exactly from one changed on disk (bit rot, a
truncated copy, a hand edit)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """(path, host array) of every leaf; a replicated array is read from this process."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        leaves.append((jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))))
    return leaves


def digest(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
    hasher = hashlib.sha256()
    for path, array in _host_leaves(tree):
        hasher.update(f"{path}|{array.dtype}|{array.shape}|".encode())
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def non_finite_leaves(tree: Any) -> list[str]:
    return [
        path
        for path, array in _host_leaves(tree)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()
    ]


def json_digest(value: Any) -> str:
    """SHA-256 of `value` as canonical JSON: it depends on the values a reader gets back,
    not on the file's layout (JSON round-trips Python floats exactly)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """The digest of a meta item, over everything in it but this digest itself."""
    digests = {k: v for k, v in meta.get("digests", {}).items() if k != "meta"}
    return json_digest({**meta, "digests": digests})


def iterator_state_digest(state: dict[str, Any] | bytes | str) -> str:
    """The digest of a grain iterator's state: a dict, or its JSON text (as bytes from
    grain's DataLoader iterators, or as read back from the data item's file)."""
    if isinstance(state, bytes | str):
        state = json.loads(state)
    return json_digest(state)


def data_digests(iterator_state: Any) -> list[str]:
    """The digests of every process's iterator state, sorted: each process saves its own
    file, process 0 the meta item that records them all."""
    local = iterator_state_digest(iterator_state)
    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(local), np.uint8))
    return sorted(bytes(np.asarray(row, np.uint8)).hex() for row in np.asarray(gathered))


def data_folder_digests(folder: str) -> list[str]:
    """The digests of every process's state file in a data item's folder, sorted; OSError
    or ValueError for a file that cannot be read as JSON."""
    names = [name for name in os.listdir(folder) if name.endswith(".json")]
    return sorted(iterator_state_digest(Path(folder, name).read_bytes()) for name in names)
