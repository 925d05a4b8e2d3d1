"""Training and evaluation: the train state, the jitted steps, the set-up of a run and
its epoch loop."""

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

from vgg_jax import (
    checkpoint,
    configuration,
    cpu,
    data_sources,
    input_pipeline,
    models,
    optim,
    pretrained,
)
from vgg_jax.metrics_log import MetricsLog
from vgg_jax.preemption import Preempted, PreemptionGuard

logger = logging.getLogger(__name__)


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
            ema=ema if config.ema_decay else {},
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
        train_step, label_smoothing=config.label_smoothing, ema_decay=config.ema_decay
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
        return eval_step(state, batch, config.eval_flip_tta)

    return train_at, eval_at


def sum_metrics(total: dict[str, jax.Array] | None, new: dict[str, jax.Array]) -> dict:
    """Adds step metrics on the device (no host sync, except on fake CPU devices)."""
    total = new if total is None else jax.tree.map(jnp.add, total, new)
    if cpu.serialise_steps():
        jax.block_until_ready(total)
    return total


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
    info = data_sources.DatasetInfo(
        class_names=train_split.class_names,
        mean=mean,
        std=std,
        image_size=config.image_size,
        num_train_examples=train_split.num_examples_global,
        num_eval_examples=eval_split.num_examples_global,
    )
    return train_split, eval_split, info


# ------------------------------------------------------------------- a run: set-up, loop


@dataclasses.dataclass
class Run:
    """Everything the epoch loop needs, made once by `setup`."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    manager: Any  # orbax CheckpointManager
    log: MetricsLog
    info: data_sources.DatasetInfo
    train_data: input_pipeline.DeviceSplit
    eval_batches: dict[str, jax.Array]
    steps_per_epoch: int
    learning_rate_fn: optax.Schedule
    train_at: Callable[..., Any]
    eval_at: Callable[..., Any]
    data_key: jax.Array
    partial_sums: dict[str, float] | None  # metric sums of a resumed, unfinished epoch


def find_resume_step(manager, config: ml_collections.ConfigDict) -> int | None:
    """The newest usable checkpoint step, after checking its config matches; None if the
    workdir holds none."""
    steps = checkpoint.usable_steps(manager)
    if not steps:
        return None
    saved_config = checkpoint.read_json_item(manager, steps[0], "config")
    checkpoint.check_compatible(saved_config, config, str(manager.directory))
    return steps[0]


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, TrainState]:
    """Devices, checkpoint manager, data on the devices, model and state (restored when
    the workdir holds a checkpoint), metrics log and step functions, in that order."""
    if config.distributed:
        jax.distributed.initialize()
    configuration.validate(config, jax.device_count())
    mesh = input_pipeline.create_mesh()
    manager = checkpoint.create_manager(
        checkpoint.checkpoint_dir(workdir),
        keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    )
    try:
        return _prepare(config, workdir, mesh, manager)
    except BaseException:
        manager.close()  # an early error ends in its own message, not in orbax's
        raise


def _prepare(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, manager):
    resume_step = find_resume_step(manager, config)
    train_split, eval_split, info = load_data(config)
    source_variables = None
    if config.init_from:
        info, source_variables = starting_point(config, info, manager, resume_step)
    train_data = input_pipeline.put_train_split(train_split, mesh)
    eval_batch_size = config.eval_batch_size or config.batch_size
    eval_batches = input_pipeline.put_eval_batches(eval_split, eval_batch_size, mesh)
    steps_per_epoch = optim.steps_per_epoch(train_data.num_examples, config.batch_size)
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch or steps_per_epoch)
    logger.info(
        "%s: %d train / %d eval examples, %d classes; %d devices, %d steps of %d per epoch",
        config.dataset,
        info.num_train_examples,
        info.num_eval_examples,
        len(info.class_names),
        jax.device_count(),
        steps_per_epoch,
        config.batch_size,
    )
    learning_rate_fn = optim.create_learning_rate_schedule(config, steps_per_epoch)
    model = models.build_model(config, info)
    state = create_train_state(config, model, config.image_size, learning_rate_fn, mesh)
    if source_variables is not None:
        state = start_from(state, source_variables, config.init_from, mesh)
    log = MetricsLog(workdir, enabled=jax.process_index() == 0)
    meta = {}
    if resume_step is None:
        log.truncate_after(0)  # records of a run that died before its first checkpoint
    else:
        state, meta = restore_for_resume(manager, resume_step, state, mesh, steps_per_epoch)
        log.truncate_after(meta["epoch"])  # epochs logged but not checkpointed are redone
    train_at, eval_at = make_step_functions(config, mesh)
    run = Run(
        config=config,
        mesh=mesh,
        manager=manager,
        log=log,
        info=info,
        train_data=train_data,
        eval_batches=eval_batches,
        steps_per_epoch=steps_per_epoch,
        learning_rate_fn=learning_rate_fn,
        train_at=train_at,
        eval_at=eval_at,
        data_key=jax.random.fold_in(jax.random.key(config.seed), 1),
        partial_sums=meta.get("partial_train_sums"),
    )
    return run, state


def starting_point(
    config: ml_collections.ConfigDict,
    info: data_sources.DatasetInfo,
    manager,
    resume_step: int | None,
) -> tuple[data_sources.DatasetInfo, dict | None]:
    """For `config.init_from`: the dataset info with the source's input normalisation
    (the weights expect it), and the source's variables (None when resuming: the
    checkpoint holds the weights, and its meta the normalisation)."""
    if resume_step is not None:
        saved = checkpoint.read_meta(manager, resume_step)["dataset"]
        return dataclasses.replace(info, mean=tuple(saved["mean"]), std=tuple(saved["std"])), None
    source_model, variables = pretrained.load(config.init_from)
    mean = tuple(float(m) for m in source_model.mean)
    std = tuple(float(s) for s in source_model.std)
    logger.info("init_from %s: its input normalisation mean=%s std=%s", config.init_from, mean, std)
    return dataclasses.replace(info, mean=mean, std=std), variables


def start_from(state: TrainState, variables: dict, name: str, mesh: Mesh) -> TrainState:
    """`state` with the weights of `variables` wherever they fit (see
    `pretrained.merge_variables`, which says what was re-initialised: logged here)."""
    target = {"params": state.params, "batch_stats": state.batch_stats}
    merged, notes = pretrained.merge_variables(target, variables)
    for note in notes:
        logger.info("init_from %s: %s", name, note)
    merged = jax.device_put(merged, NamedSharding(mesh, P()))
    batch_stats = merged.get("batch_stats", state.batch_stats)
    state = state.replace(params=merged["params"], batch_stats=batch_stats)
    if state.ema:
        state = state.replace(ema={"params": merged["params"], "batch_stats": batch_stats})
    return state


def restore_for_resume(manager, step: int, state: TrainState, mesh: Mesh, steps_per_epoch: int):
    """The state saved at `step` and that checkpoint's meta."""
    state = checkpoint.restore_state(manager, step, state, NamedSharding(mesh, P()))
    meta = checkpoint.read_meta(manager, step)
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


def save_checkpoint(
    run: Run, state: TrainState, epoch: int, step_in_epoch: int, record=None, sums=None
) -> None:
    """Saves `state` with where it is in the data (`epoch` finished epochs plus
    `step_in_epoch` steps) and, mid-epoch, the epoch's partial metric sums."""
    meta = {
        "schema": checkpoint.META_SCHEMA,
        "dataset": run.info.to_json(),
        "steps_per_epoch": run.steps_per_epoch,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
    }
    if record is not None:
        meta.update(test_accuracy=record["test_accuracy"], record=record)
    if sums is not None:
        meta["partial_train_sums"] = {k: float(v) for k, v in jax.device_get(sums).items()}
    checkpoint.save(run.manager, state, run.config, meta, meta.get("test_accuracy"))


def close(run: Run) -> None:
    """Waits for the last save, then closes the manager and the log."""
    run.manager.wait_until_finished()
    run.manager.close()
    run.log.close()


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
    run: Run, state: TrainState, epoch: int, guard: PreemptionGuard
) -> tuple[TrainState, dict[str, jax.Array], bool]:
    """Runs the rest of one epoch from the state's step; stops early, after a whole step,
    on a signal. Returns the state, the summed metrics and whether the epoch finished."""
    config, steps = run.config, run.steps_per_epoch
    batches = input_pipeline.epoch_batches(
        run.train_data,
        jax.random.fold_in(run.data_key, epoch),
        steps=steps,
        batch_size=config.batch_size,
        augment=config.augment,
        mesh=run.mesh,
    )
    start = int(state.step) - epoch * steps
    sums = None
    if run.partial_sums is not None and start > 0:
        sums = {k: jnp.asarray(v, jnp.float32) for k, v in run.partial_sums.items()}
    running_loss = None
    with progress_bar(config, epoch, steps, start) as bar:
        for index in range(start, steps):
            state, metrics = run.train_at(state, batches, index)
            sums = sum_metrics(sums, metrics)
            bar.update(config.batch_size)
            if guard.requested and index + 1 < steps:
                return state, sums, False
            if (index + 1) % config.log_every_steps == 0:
                # Show the loss of one logging interval ago: it is done by now, so
                # reading it does not stall the queue of dispatched steps.
                if running_loss is not None:
                    bar.set_postfix(loss=f"{float(running_loss):.4f}")
                running_loss = sums["loss_sum"] / sums["count"]
    return state, sums, True


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
        run, state = setup(config, workdir)
        try:
            state = train_loop(run, state, guard)
        except Preempted:
            raise  # saved and closed already
        except BaseException:
            run.manager.close()
            raise
        close(run)
        return state


def train_loop(run: Run, state: TrainState, guard: PreemptionGuard) -> TrainState:
    """The epochs from the state's step to `config.num_epochs`: train, evaluate, log,
    checkpoint; on a signal, save and raise `Preempted`."""
    config = run.config
    first_epoch = int(state.step) // run.steps_per_epoch
    if first_epoch >= config.num_epochs:
        logger.info("already trained for %d epochs: nothing to do", config.num_epochs)
    for epoch in range(first_epoch, config.num_epochs):
        epoch_start = time.perf_counter()
        state, sums, finished = train_epoch(run, state, epoch, guard)
        if not finished:
            done = int(state.step) - epoch * run.steps_per_epoch
            save_checkpoint(run, state, epoch, done, sums=sums)
            where = f"in epoch {epoch + 1} after step {done} of {run.steps_per_epoch}"
            stop(run, state, guard, where)
        record = {"epoch": epoch + 1, "step": int(state.step)}
        record.update(summarise(sums, "train"))
        record.update(evaluate(state, run.eval_batches, run.eval_at))
        record["learning_rate"] = float(run.learning_rate_fn(int(state.step) - 1))
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        record["wall_time"] = time.time()  # when the epoch ended: curves against the clock
        log_epoch(record, config.num_epochs)
        run.log.write(record)
        last = epoch + 1 == config.num_epochs
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or last or guard.requested:
            save_checkpoint(run, state, epoch + 1, 0, record=record)
        if guard.requested and not last:
            stop(run, state, guard, f"after epoch {epoch + 1}")
    return state


def stop(run: Run, state: TrainState, guard: PreemptionGuard, where: str) -> None:
    close(run)
    raise Preempted(
        guard.signal_number,
        f"stopped by signal {guard.signal_number} {where} (step {int(state.step)}); "
        f"checkpoint saved in {run.manager.directory}; rerun the same command to resume",
    )
