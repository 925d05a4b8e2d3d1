"""Training and evaluation: the train state, the jitted steps, and the epoch loop."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from vgg_jax import checkpoint, data_sources, input_pipeline, models, optim
from vgg_jax.conv import conv_class
from vgg_jax.metrics_log import MetricsLog
from vgg_jax.preemption import Preempted, PreemptionGuard

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(train_state.TrainState):
    """Params, optimiser state and step (from flax), plus BN statistics, the dropout key
    (raw uint32 key data, so that checkpoints hold plain arrays) and, when
    `config.ema_decay` > 0, an exponential moving average of params and BN statistics
    (`ema`, else an empty dict) that evaluation and prediction use."""

    batch_stats: Any
    rng: jax.Array
    ema: Any = flax.struct.field(default_factory=dict)

    def eval_variables(self) -> dict[str, Any]:
        """The weights to evaluate: the EMA when there is one."""
        if self.ema:
            return self.ema
        return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a predictor needs to know about the training data."""

    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    num_train_examples: int
    num_eval_examples: int


def build_model(config: ml_collections.ConfigDict, info: DatasetInfo) -> models.VGG:
    """The VGG that `config` describes, normalising inputs with the dataset's statistics."""
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    return models.create_model(
        config.model,
        len(info.class_names),
        width=config.width,
        batch_norm=config.batch_norm,
        conv_dropout=config.conv_dropout,
        head=config.head,
        head_dropout=config.head_dropout,
        dtype=DTYPES[config.dtype],
        mean=info.mean,
        std=info.std,
        stages=config.get("stages"),
        conv=conv_class(config.get("conv_impl", "auto")),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: models.VGG,
    image_size: int,
    learning_rate_fn: optax.Schedule,
    mesh: Mesh | None = None,
) -> TrainState:
    """Initialises parameters from `config.seed`, replicated over the mesh if given."""
    tx = optim.create_optimizer(config, learning_rate_fn)
    params_key, dropout_key = jax.random.split(jax.random.key(config.seed))

    def init() -> TrainState:
        images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
        variables = model.init(params_key, images, train=False)
        batch_stats = variables.get("batch_stats", {})
        ema = {"params": variables["params"], "batch_stats": batch_stats}
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=tx,
            batch_stats=batch_stats,
            rng=jax.random.key_data(dropout_key),
            ema=ema if config.get("ema_decay") else {},
        )

    out_shardings = NamedSharding(mesh, P()) if mesh is not None else None
    return jax.jit(init, out_shardings=out_shardings)()


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def update_ema(state: TrainState, decay: float) -> TrainState:
    """Moves the EMA towards the current weights. The effective decay ramps up as
    (1 + step) / (10 + step) so that early averages are not dominated by the init."""
    if not state.ema:
        return state
    rate = jnp.minimum(decay, (1.0 + state.step) / (10.0 + state.step))
    current = {"params": state.params, "batch_stats": state.batch_stats}
    ema = jax.tree.map(lambda e, c: rate * e + (1.0 - rate) * c, state.ema, current)
    return state.replace(ema=ema)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch of uint8 images; returns summed (not averaged) metrics so
    that an epoch's metrics are plain sums."""
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss = cross_entropy_loss(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, new_model_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    state = state.apply_gradients(
        grads=grads, batch_stats=new_model_state.get("batch_stats", state.batch_stats)
    )
    state = update_ema(state, ema_decay)
    count = batch["label"].shape[0]
    metrics = {
        "loss_sum": loss * count,
        "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]),
        "count": jnp.asarray(count, jnp.float32),
    }
    return state, metrics


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], flip_tta: bool = False
) -> dict[str, jax.Array]:
    """Summed loss and correct predictions over the unmasked examples of a batch (with
    the EMA weights when there are some). With `flip_tta`, also the accuracy of the
    mean of the probabilities for the image and its mirror image, as `correct_tta`."""
    variables = state.eval_variables()
    logits = state.apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"]
    loss = cross_entropy_loss(logits, batch["label"])
    metrics = {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    if flip_tta:
        flipped = state.apply_fn(variables, batch["image"][:, :, ::-1], train=False)
        probabilities = jax.nn.softmax(logits) + jax.nn.softmax(flipped)
        metrics["correct_tta"] = jnp.sum((jnp.argmax(probabilities, -1) == batch["label"]) * mask)
    return metrics


def configured_train_step(config: ml_collections.ConfigDict) -> Callable[..., Any]:
    """`train_step` with the config's loss and EMA settings: what training runs, and
    what the benchmark times."""
    return functools.partial(
        train_step,
        label_smoothing=config.label_smoothing,
        ema_decay=config.get("ema_decay", 0.0),
    )


def make_step_functions(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted steps that take a whole epoch's batches plus an index, so one dispatch
    per step moves nothing between host and device. The state is donated."""
    replicated = NamedSharding(mesh, P())
    step = configured_train_step(config)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=replicated)
    def train_at(state, epoch_batches, index):
        batch = jax.tree.map(lambda array: array[index], epoch_batches)
        return step(state, batch)

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_at(state, eval_batches, index):
        batch = jax.tree.map(lambda array: array[index], eval_batches)
        return eval_step(state, batch, config.get("eval_flip_tta", False))

    return train_at, eval_at


def sum_metrics(total: dict[str, jax.Array] | None, new: dict[str, jax.Array]) -> dict:
    """Adds step metrics on the device (no host sync, except on fake CPU devices)."""
    total = new if total is None else jax.tree.map(jnp.add, total, new)
    if serialise_steps():
        jax.block_until_ready(total)
    return total


@functools.cache
def serialise_steps() -> bool:
    """Whether to wait for each step before dispatching the next. Only for several CPU
    devices (xla_force_host_platform_device_count): XLA:CPU can deadlock in a collective
    when many multi-device programs are queued at once (seen on 2 cores with 8 fake
    devices). Real accelerators and a single CPU device keep fully asynchronous steps."""
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def summarise(sums: dict[str, jax.Array], prefix: str) -> dict[str, float]:
    """Device sums -> host means (this is the one host sync per epoch and split)."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    summary = {
        f"{prefix}_loss": float(sums["loss_sum"]) / count,
        f"{prefix}_accuracy": float(sums["correct"]) / count,
    }
    if "correct_tta" in sums:
        summary[f"{prefix}_accuracy_flip_tta"] = float(sums["correct_tta"]) / count
    return summary


def evaluate(state: TrainState, eval_batches: dict[str, jax.Array], eval_at) -> dict[str, float]:
    """Loss and accuracy over every evaluation example."""
    sums = None
    for index in range(eval_batches["label"].shape[0]):
        sums = sum_metrics(sums, eval_at(state, eval_batches, index))
    return summarise(sums, "test")


def check_batch_size(batch_size: int, device_count: int, name: str = "batch_size") -> None:
    if batch_size <= 0 or batch_size % device_count:
        raise ValueError(
            f"{name}={batch_size} must be a positive multiple of the device count "
            f"({device_count}); try {max(1, batch_size // device_count) * device_count}"
        )


def source_kwargs(config: ml_collections.ConfigDict, data_dir: str | None = None) -> dict:
    """The arguments of `data_sources.load_split` that `config` determines, for this
    process's share of a split."""
    return {
        "data_dir": data_dir or config.data_dir,
        "image_size": config.image_size,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "synthetic_sizes": (config.synthetic_train_size, config.synthetic_eval_size),
        "synthetic_classes": config.synthetic_classes,
    }


def load_data(config: ml_collections.ConfigDict):
    """Both splits of this process, in host memory, and what a predictor needs of them."""
    kwargs = source_kwargs(config)
    train_split = data_sources.load_split(config.dataset, config.train_split, **kwargs)
    eval_split = data_sources.load_split(config.dataset, config.eval_split, **kwargs)
    mean, std = input_pipeline.channel_stats(train_split.images)
    if jax.process_count() > 1:
        # Every process must build the same model: take process 0's statistics.
        from jax.experimental import multihost_utils

        mean, std = (
            tuple(float(v) for v in multihost_utils.broadcast_one_to_all(jnp.asarray(s)))
            for s in (mean, std)
        )
    info = DatasetInfo(
        class_names=train_split.class_names,
        mean=mean,
        std=std,
        image_size=config.image_size,
        num_train_examples=train_split.num_examples_global,
        num_eval_examples=eval_split.num_examples_global,
    )
    return train_split, eval_split, info


def check_resumable(manager, config: ml_collections.ConfigDict) -> int | None:
    """The newest usable checkpoint step, after checking its config matches; None if the
    workdir holds none."""
    steps = checkpoint.usable_steps(manager)
    if not steps:
        return None
    saved_config = checkpoint.read_json_item(manager, steps[0], "config")
    checkpoint.check_compatible(saved_config, config, str(manager.directory))
    return steps[0]


def log_epoch(record: dict[str, Any], num_epochs: int) -> None:
    logger.info(
        "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.5g  %.1fs",
        record["epoch"],
        num_epochs,
        record["train_loss"],
        record["train_accuracy"],
        record["test_loss"],
        record["test_accuracy"],
        record["learning_rate"],
        record["epoch_seconds"],
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains for `config.num_epochs` passes, evaluating on every test example after each;
    logs to WORKDIR/metrics.jsonl and TensorBoard; checkpoints to WORKDIR/checkpoints and
    resumes from there. Raises `Preempted` after saving if SIGTERM/SIGINT arrives.
    Returns the final state."""
    # The guard covers set-up too: a signal during data loading or compilation is
    # answered after the first step, with a checkpoint.
    with PreemptionGuard() as guard:
        return _train_and_evaluate(config, workdir, guard)


def restore_for_resume(manager, step: int, state: TrainState, mesh: Mesh, steps_per_epoch: int):
    """The state saved at `step` and the partial metric sums of its epoch."""
    state = checkpoint.restore_state(manager, step, state, NamedSharding(mesh, P()))
    meta = checkpoint.read_json_item(manager, step, "meta")
    if meta["steps_per_epoch"] != steps_per_epoch:
        raise checkpoint.IncompatibleCheckpointError(
            f"{manager.directory} was written with {meta['steps_per_epoch']} steps per "
            f"epoch, this run has {steps_per_epoch}: the dataset changed; use a new --workdir"
        )
    logger.info(
        "resuming from %s/%d: epoch %d, step %d of %d",
        manager.directory,
        step,
        meta["epoch"] + 1,
        meta["step_in_epoch"],
        steps_per_epoch,
    )
    return state, meta


def progress_bar(config: ml_collections.ConfigDict, epoch: int, steps: int, done: int) -> tqdm:
    return tqdm(
        total=steps * config.batch_size,
        initial=done * config.batch_size,
        desc=f"epoch {epoch + 1}/{config.num_epochs}",
        unit="img",
        unit_scale=True,
        leave=False,
        disable=not config.progress_bar or jax.process_index() != 0,
    )


def train_epoch(
    state: TrainState,
    batches: dict[str, jax.Array],
    train_at,
    steps: range,
    sums: dict[str, jax.Array] | None,
    bar: tqdm,
    guard: PreemptionGuard,
    log_every_steps: int,
) -> tuple[TrainState, dict[str, jax.Array], bool]:
    """Runs `steps` of one epoch; stops early, after a whole step, on a signal.
    Returns the state, the summed metrics and whether the epoch was completed."""
    running_loss = None
    for index in steps:
        state, metrics = train_at(state, batches, index)
        sums = sum_metrics(sums, metrics)
        bar.update(batches["label"].shape[1])
        if guard.requested and index + 1 < steps.stop:
            return state, sums, False
        if (index + 1) % log_every_steps == 0:
            # Show the loss computed one logging interval ago: it is done by now, so
            # reading it does not stall the queue of dispatched steps.
            if running_loss is not None:
                bar.set_postfix(loss=f"{float(running_loss):.4f}")
            running_loss = sums["loss_sum"] / sums["count"]
    return state, sums, True


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, guard: PreemptionGuard
) -> TrainState:
    if config.get("distributed"):
        jax.distributed.initialize()
    device_count = jax.device_count()
    check_batch_size(config.batch_size, device_count)
    eval_batch_size = config.eval_batch_size or config.batch_size
    check_batch_size(eval_batch_size, device_count, "eval_batch_size")
    mesh = input_pipeline.create_mesh()
    manager = checkpoint.create_manager(
        checkpoint.checkpoint_dir(workdir),
        keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    )
    resume_step = check_resumable(manager, config)

    train_split, eval_split, info = load_data(config)
    train_data = input_pipeline.put_train_split(train_split, mesh)
    eval_batches = input_pipeline.put_eval_batches(eval_split, eval_batch_size, mesh)
    del train_split, eval_split
    steps_per_epoch = optim.steps_per_epoch(train_data.num_examples, config.batch_size)
    if config.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    logger.info(
        "%s: %d train / %d eval examples, %d classes; %d devices, %d steps of %d per epoch",
        config.dataset,
        info.num_train_examples,
        info.num_eval_examples,
        len(info.class_names),
        device_count,
        steps_per_epoch,
        config.batch_size,
    )

    model = build_model(config, info)
    learning_rate_fn = optim.create_learning_rate_schedule(config, steps_per_epoch)
    state = create_train_state(config, model, config.image_size, learning_rate_fn, mesh)
    log = MetricsLog(workdir, enabled=jax.process_index() == 0)
    partial_sums = None
    if resume_step is None:
        log.truncate_after(0)  # records of a run that died before its first checkpoint
    else:
        state, meta = restore_for_resume(manager, resume_step, state, mesh, steps_per_epoch)
        partial_sums = meta.get("partial_train_sums")
        log.truncate_after(meta["epoch"])  # epochs logged but not checkpointed are redone

    train_at, eval_at = make_step_functions(config, mesh)
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    base_meta = {"dataset_info": dataclasses.asdict(info), "steps_per_epoch": steps_per_epoch}

    def save(epoch: int, step_in_epoch: int, record=None, sums=None) -> None:
        meta = {**base_meta, "epoch": epoch, "step_in_epoch": step_in_epoch}
        if record is not None:
            meta["test_accuracy"] = record["test_accuracy"]
            meta["record"] = record
        if sums is not None:
            meta["partial_train_sums"] = {k: float(v) for k, v in jax.device_get(sums).items()}
        checkpoint.save(manager, state, config, meta, meta.get("test_accuracy"))

    def finish() -> None:
        manager.wait_until_finished()  # the last save is complete before we return
        manager.close()
        log.close()

    def stop(where: str) -> None:
        finish()
        raise Preempted(
            guard.signal_number,
            f"stopped by signal {guard.signal_number} {where} (step {int(state.step)}); "
            f"checkpoint saved in {manager.directory}; rerun the same command to resume",
        )

    first_step = int(state.step)
    if first_step >= config.num_epochs * steps_per_epoch:
        logger.info("already trained for %d epochs: nothing to do", config.num_epochs)
    for epoch in range(first_step // steps_per_epoch, config.num_epochs):
        epoch_start = time.perf_counter()
        batches = input_pipeline.epoch_batches(
            train_data,
            jax.random.fold_in(data_key, epoch),
            steps=steps_per_epoch,
            batch_size=config.batch_size,
            augment=config.augment,
            mesh=mesh,
        )
        start_index = int(state.step) - epoch * steps_per_epoch
        sums = None
        if partial_sums is not None and start_index > 0:
            sums = {k: jnp.asarray(v, jnp.float32) for k, v in partial_sums.items()}
        bar = progress_bar(config, epoch, steps_per_epoch, start_index)
        state, sums, completed = train_epoch(
            state,
            batches,
            train_at,
            range(start_index, steps_per_epoch),
            sums,
            bar,
            guard,
            config.log_every_steps,
        )
        bar.close()
        if not completed:
            done = int(state.step) - epoch * steps_per_epoch
            save(epoch, done, sums=sums)
            stop(f"in epoch {epoch + 1} after step {done} of {steps_per_epoch}")
        record = {"epoch": epoch + 1, "step": int(state.step)}
        record.update(summarise(sums, "train"))
        record.update(evaluate(state, eval_batches, eval_at))
        record["learning_rate"] = float(learning_rate_fn(int(state.step) - 1))
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        record["wall_time"] = time.time()  # when the epoch ended: curves against the clock
        log_epoch(record, config.num_epochs)
        log.write(record)
        last_epoch = epoch + 1 == config.num_epochs
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or last_epoch or guard.requested:
            save(epoch + 1, 0, record=record)
        if guard.requested and not last_epoch:
            stop(f"after epoch {epoch + 1}")
    finish()
    return state
