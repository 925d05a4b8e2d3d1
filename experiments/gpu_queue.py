"""The GPU session's queue: what runs, in which order, how an item is identified, and when
it counts as done (experiments/gpu_session.py runs it).

An item is identified by its `id` (a name such as `fast_ls02`) and its `key`: the first
16 hex digits of the SHA-256 of its `definition`, the JSON of everything its result
depends on: the kind of run, the config file's path and the SHA-256 of its text, the
overrides, the data archive's digest, and for speed rows (and the PyTorch twin, the
stream) the digest of the code they time (`code_digest`: models.py, optim.py, the step
functions of train.py, the PyTorch twin). So a changed config file, override, archive or
step makes a new key, and the item runs again; an edit elsewhere (checkpointing, logging)
does not.

An item is done when a line of a committed `experiments/results/gpu/**/results.jsonl`
has its id, its key and `"status": "done"`: the run ended normally (every epoch trained,
the seed recipe's 200th included; a benchmark's JSON written). A run stopped by the
budget, failed or skipped is not done. With SKIP_DONE=1 the session skips done items.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FAST = "configs/vgg16_fast.py"
SEED = "configs/vgg16.py"
# The code a speed row times (whole files, and train.py's step functions only).
STEP_FILES = (
    "src/vgg_jax/models.py",
    "src/vgg_jax/optim.py",
    "src/vgg_jax/bench/torch_reference.py",
)
STEP_FUNCTIONS = (
    "cross_entropy_loss",
    "update_ema",
    "train_step",
    "eval_step",
    "configured_train_step",
    "make_step_functions",
)
TWIN_FILES = ("experiments/torch_twin_training.py", "src/vgg_jax/bench/torch_reference.py")
STREAM_FILES = tuple(
    sorted(str(p.relative_to(REPO)) for p in (REPO / "src/vgg_jax/data").glob("*.py"))
)
# XLA:GPU flags tried on the CIFAR step (JAX's GPU performance tips; XLA's
# debug_options_flags.cc): CUDA graphs for every command type, and none.
COMMAND_BUFFERS_ALL = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
    " --xla_gpu_graph_min_graph_size=1"
)
COMMAND_BUFFERS_NONE = "--xla_gpu_enable_command_buffer="
TRITON_GEMM_ANY = "--xla_gpu_triton_gemm_any=true"
# Variants of the shipped fast recipe for a model that over-fits, one change each
# (id, overrides, H200 seconds estimate, in the SMALL rehearsal).
FAST_VARIANTS = (
    ("fast_crop4", ["--config.crop_padding=4", "--config.flip_only_last_epochs=0"], 90, True),
    ("fast_ls02", ["--config.label_smoothing=0.2"], 90, False),
    ("fast_l2_1e3", ["--config.l2=0.001"], 90, False),
    ("fast_ema", ["--config.ema_decay=0.999"], 95, False),
    ("fast_b256", ["--config.batch_size=256", "--config.learning_rate=0.2"], 70, False),
    ("fast_b512", ["--config.batch_size=512", "--config.learning_rate=0.4"], 60, False),
    ("fast_40ep", ["--config.num_epochs=40"], 115, False),
    ("fast_60ep", ["--config.num_epochs=60"], 160, False),
)
NOT_QUEUED = {
    "cutout": "no config option (the core has none; not added for the session)",
    "mirror+translate TTA": "not implemented; flip-TTA is reported with every run",
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One queued run. `estimate_s`: H200 seconds it needs, start-up included; it starts
    only if that much of the budget is left."""

    id: str
    group: str
    definition: dict[str, Any]
    estimate_s: float
    small: bool = True  # also run in the SMALL rehearsal

    @property
    def kind(self) -> str:
        return self.definition["kind"]

    @property
    def key(self) -> str:
        text = json.dumps({"id": self.id, **self.definition}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode() + b"\0" + (REPO / path).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def function_sources(path: str, names: tuple[str, ...]) -> str:
    """The source text of the named top-level functions of a module."""
    text = (REPO / path).read_text()
    found = {
        node.name: ast.get_source_segment(text, node)
        for node in ast.parse(text).body
        if isinstance(node, ast.FunctionDef) and node.name in names
    }
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{path} has no function {', '.join(missing)}: update gpu_queue.py")
    return "\n".join(found[name] for name in names)


def code_digest() -> str:
    """What a speed row's figures depend on: see the module docstring."""
    digest = hashlib.sha256(file_digest(*STEP_FILES).encode())
    digest.update(function_sources("src/vgg_jax/train.py", STEP_FUNCTIONS).encode())
    return digest.hexdigest()[:16]


def train_item(item_id, config, overrides, estimate, small, data, group="ours") -> Item:
    definition = {
        "kind": "train",
        "config": config,
        "config_sha": file_digest(config),
        "overrides": list(overrides),
        "data": data,
    }
    return Item(item_id, group, definition, estimate, small)


def speed_item(item_id, config, batch, estimate, small, *, compare="none", xla_flags=""):
    definition = {
        "kind": "speed",
        "config": config,
        "config_sha": file_digest(config),
        "batch_size": batch,
        "compare": compare,
        "xla_flags": xla_flags,
        "code": code_digest(),
    }
    return Item(item_id, "speed", definition, estimate, small)


def build_queue(data: str, small: bool) -> list[Item]:
    """Every item in the issue's order. `data`: the CIFAR archive's digest."""
    items = [
        Item("environment", "environment", {"kind": "environment"}, 40),
        Item("airbench94", "peers", {"kind": "airbench", "version": "0.1.8", "data": data}, 50),
        Item(
            "torch_twin_fast",
            "peers",
            {
                "kind": "twin",
                "config": FAST,
                "config_sha": file_digest(FAST),
                "code": file_digest(*TWIN_FILES),
                "data": data,
            },
            180,
        ),
        train_item("ours_fast", FAST, [], 90, True, data),
        Item("pair_throughput", "ours", {"kind": "pair", "config_sha": file_digest(FAST)}, 140),
    ]
    items += [train_item(i, FAST, o, e, s, data) for i, o, e, s in FAST_VARIANTS]
    items += [
        speed_item("speed_cifar_b512", SEED, 512, 75, True, compare="torch"),
        speed_item("speed_224_b128", "configs/tf_benchmark.py", 128, 75, False, compare="torch"),
        speed_item("speed_cifar_b1024", SEED, 1024, 45, False),
        speed_item(
            "speed_cifar_b512_cmdbuf_all", SEED, 512, 45, False, xla_flags=COMMAND_BUFFERS_ALL
        ),
        speed_item(
            "speed_cifar_b512_cmdbuf_none", SEED, 512, 45, False, xla_flags=COMMAND_BUFFERS_NONE
        ),
        speed_item("speed_cifar_b512_triton_gemm", SEED, 512, 45, False, xla_flags=TRITON_GEMM_ANY),
        Item(
            "stream_224",
            "rest",
            {
                "kind": "stream",
                "config": "configs/vgg16_imagenet.py",
                "code": file_digest(*STREAM_FILES),
            },
            150,
        ),
        Item(
            "seed_vgg16_200",
            "rest",
            {
                "kind": "seed",
                "config": SEED,
                "config_sha": file_digest(SEED),
                "epochs": 200,
                "data": data,
            },
            60,
        ),
    ]
    if small:  # keys of the rehearsal never match a real run's
        items = [dataclasses.replace(i, definition={**i.definition, "small": True}) for i in items]
    return items


def pair_members(data: str, small: bool) -> list[Item]:
    """The two runs the throughput item starts at once: the shipped recipe, seeds 1 and 2
    (more seeds of the baseline, against which a variant's difference is judged)."""
    members = [
        train_item(f"ours_fast_seed{s}", FAST, [f"--config.seed={s}"], 90, True, data)
        for s in (1, 2)
    ]
    if small:
        members = [
            dataclasses.replace(i, definition={**i.definition, "small": True}) for i in members
        ]
    return members


def committed_results(folder: Path) -> list[dict[str, Any]]:
    """Every line of every results.jsonl under `folder` (sessions' folders, committed)."""
    rows = []
    for path in sorted(folder.glob("**/results.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append({**json.loads(line), "_file": str(path)})
    return rows


def done_in(rows: list[dict[str, Any]], item: Item) -> dict[str, Any] | None:
    """The committed row that makes `item` done, if any (see the module docstring)."""
    for row in rows:
        if row.get("id") == item.id and row.get("key") == item.key and row.get("status") == "done":
            return row
    return None


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """`--config.FIELD=VALUE` overrides applied as the CLI would (literal values)."""
    for override in overrides:
        field, _, text = override.removeprefix("--config.").partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(config[field], float) and isinstance(value, int):
            value = float(value)
        config[field] = value
    return config


def check_train_items(items: list[Item]) -> dict[str, str]:
    """Each training item's config with its overrides, validated as the CLI validates it:
    a typo fails here, in a second, not minutes into a GPU window. Returns {id: problem}
    (an override that changes nothing against the shipped file is one)."""
    from vgg_jax import config_checks, configuration

    problems = {}
    for item in items:
        if item.kind != "train":
            continue
        try:
            config = configuration.load_config_file(REPO / item.definition["config"])
            before = config.to_dict()
            apply_overrides(config, item.definition["overrides"])
            config_checks.validate(config)
            if item.definition["overrides"] and config.to_dict() == before:
                problems[item.id] = "its overrides are the shipped config's values already"
        except Exception as error:  # noqa: BLE001 - any fault of the item is reported
            problems[item.id] = f"{type(error).__name__}: {error}"
    return problems


def epochs_of(config: str, overrides: list[str]) -> int:
    """The number of epochs a training item's run must reach to be done."""
    from vgg_jax import configuration

    loaded = configuration.load_config_file(REPO / config)
    return apply_overrides(loaded, overrides).num_epochs
