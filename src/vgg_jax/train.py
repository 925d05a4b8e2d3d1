"""Training and evaluation: the train state, the jitted steps, the set-up of a run and
its epoch loop."""

from __future__ import annotations

import collections
import contextlib
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

from vgg_jax import checkpoint, config_checks, data, distributed, models, optim, pretrained, resume
from vgg_jax.metrics_log import MetricsLog
from vgg_jax.preemption import Preempted, PreemptionGuard
from vgg_jax.run import Run, stop_requested
from vgg_jax.workdir_lock import WorkdirLock

logger = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
    """Flax's train state plus BN statistics, the dropout key (raw uint32 key data, so
    that checkpoints hold plain arrays) and, when `config.ema_decay` > 0, the `ema` of
    params and BN statistics that evaluation and prediction use (else an empty dict)."""

    batch_stats: Any
    rng: jax.Array
    ema: Any = flax.struct.field(default_factory=dict)

    def model_variables(self) -> dict[str, Any]:
        """The trained weights as the model's variables (not the EMA)."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def eval_variables(self) -> dict[str, Any]:
        """The weights to evaluate: the EMA when there is one."""
        return self.ema or self.model_variables()


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
        state = TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=tx,
            batch_stats=variables.get("batch_stats", {}),
            rng=jax.random.key_data(dropout_key),
        )
        return state.replace(ema=state.model_variables()) if config.ema_decay else state

    out_shardings = NamedSharding(mesh, P()) if mesh is not None else None
    lowered = jax.jit(init, out_shardings=out_shardings).lower()
    options = models.backend_tuning(config).init_compiler_options
    return lowered.compile(compiler_options=options)()


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
    ema = jax.tree.map(lambda e, c: rate * e + (1.0 - rate) * c, state.ema, state.model_variables())
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

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, new_model_state)), grads = grad_fn(state.params)
    state = state.apply_gradients(
        grads=grads, batch_stats=new_model_state.get("batch_stats", state.batch_stats)
    )
    state = update_ema(state, ema_decay)
    count = batch["label"].shape[0]
    return state, {
        "loss_sum": loss * count,
        "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]),
        "count": jnp.asarray(count, jnp.float32),
    }


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
    if logits.shape[-1] > 5:
        metrics["correct_top5"] = jnp.sum(top_k_correct(logits, batch["label"], 5) * mask)
    if flip_tta:
        flipped = state.apply_fn(variables, batch["image"][:, :, ::-1], train=False)
        probabilities = jax.nn.softmax(logits) + jax.nn.softmax(flipped)
        metrics["correct_tta"] = jnp.sum((jnp.argmax(probabilities, -1) == batch["label"]) * mask)
    return metrics


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1 where the label is among the k highest logits, else 0."""
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def configured_train_step(config: ml_collections.ConfigDict) -> Callable[..., Any]:
    """`train_step` with the config's loss and EMA settings: what training runs, and
    what the benchmark times."""
    return functools.partial(
        train_step, label_smoothing=config.label_smoothing, ema_decay=config.ema_decay
    )


def make_step_functions(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted (train, eval) steps on one batch of global arrays, the state donated."""
    replicated = NamedSharding(mesh, P())
    train_fn = jax.jit(configured_train_step(config), donate_argnums=0, out_shardings=replicated)
    eval_fn = jax.jit(
        functools.partial(eval_step, flip_tta=config.eval_flip_tta), out_shardings=replicated
    )
    return train_fn, eval_fn


@jax.jit
def _add(total: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return jax.tree.map(jnp.add, total, new)


def sum_metrics(
    total: dict[str, jax.Array] | None, new: dict[str, jax.Array], wait: bool = False
) -> dict:
    """Adds step metrics on the device in one jitted call (an eager add per metric costs
    the host a dispatch each, every step); no host sync unless `wait`."""
    total = new if total is None else _add(total, new)
    if wait:
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
    if "correct_top5" in sums:
        summary[f"{prefix}_top5_accuracy"] = float(sums["correct_top5"]) / count
    if "correct_tta" in sums:
        summary[f"{prefix}_accuracy_flip_tta"] = float(sums["correct_tta"]) / count
    return summary


def evaluate(state: TrainState, batches, eval_fn, wait: bool = False) -> dict[str, float]:
    """Loss and accuracy over every evaluation example: `batches` are padded, masked
    evaluation batches; `wait` as for `sum_metrics`."""
    sums = None
    for batch in batches:
        sums = sum_metrics(sums, eval_fn(state, batch), wait)
    if sums is None or float(jax.device_get(sums["count"])) == 0:
        raise data.DatasetUnavailableError(
            "no readable image in the evaluation split: every one was skipped (the "
            "warnings above name them)"
        )
    return summarise(sums, "test")


# ------------------------------------------------------------------- a run: set-up, loop


def setup(
    config: ml_collections.ConfigDict, workdir: str, guard: PreemptionGuard | None = None
) -> tuple[Run, TrainState]:
    """The run and its state, restored when the workdir holds a checkpoint. `guard` ends
    the wait for the other processes of a distributed run."""
    distributed.start(config, guard)
    config_checks.validate(config, jax.device_count())
    mesh = data.create_mesh()
    tuning = models.backend_tuning(config)
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    manager = None
    try:
        manager = checkpoint.create_manager(
            checkpoint.checkpoint_dir(workdir),
            keep=config.keep_checkpoints,
            async_save=config.async_checkpointing,
            array_handler=tuning.array_handler,
        )
        run, state = _prepare(config, workdir, mesh, manager, tuning.wait_each_step)
    except BaseException:
        if manager is not None:
            manager.close()  # an early error ends in its own message, not in orbax's
        lock and lock.release()
        raise
    run.lock = lock
    return run, state


def _prepare(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, manager, wait_each_step: bool
):
    point = resume.find_resume_point(manager, config)
    normalisation, source_variables = starting_point(config, point)
    batches = data.create(config, mesh, normalisation)
    info, steps_per_epoch = batches.info, batches.steps_per_epoch
    logger.info(
        f"{config.dataset}: {info.num_train_examples} train / {info.num_eval_examples} eval "
        f"examples, {len(info.class_names)} classes; {jax.device_count()} devices, "
        f"{steps_per_epoch} steps of {config.batch_size} per epoch"
    )
    learning_rate_fn = optim.create_learning_rate_schedule(config, steps_per_epoch)
    model = models.build_model(config, info)
    state = create_train_state(config, model, config.image_size, learning_rate_fn, mesh)
    if source_variables is not None:
        state = pretrained.start_from(state, source_variables, config.init_from, mesh)
    meta = None
    if point is not None:
        resume.check_same_data(point, info, steps_per_epoch, str(manager.directory))
        state, meta = resume.restore_newest_intact(manager, point, state, NamedSharding(mesh, P()))
        if meta is not None:
            batches.restore(manager, int(state.step), point.saved_config)
    log = MetricsLog(workdir, enabled=jax.process_index() == 0)
    # Epochs logged but not checkpointed are redone (all of them without a checkpoint).
    log.truncate_after(meta["epoch"] if meta else 0)
    train_fn, eval_fn = make_step_functions(config, mesh)
    run = Run(
        config=config,
        manager=manager,
        log=log,
        input=batches,
        learning_rate_fn=learning_rate_fn,
        train_fn=train_fn,
        eval_fn=eval_fn,
        partial_sums=(meta or {}).get("partial_train_sums"),
        wait_each_step=wait_each_step,
    )
    return run, state


def starting_point(config: ml_collections.ConfigDict, point: resume.ResumePoint | None):
    """The input normalisation to use instead of the data's own, and the variables to
    start from: the checkpoint's normalisation when resuming; the source's normalisation
    and variables with `config.init_from`; otherwise (None, None)."""
    if point is not None:
        saved = point.meta["dataset"]
        return (tuple(saved["mean"]), tuple(saved["std"])), None
    if not config.init_from:
        return None, None
    source_model, variables = pretrained.load(config.init_from)
    mean = tuple(float(m) for m in source_model.mean)
    std = tuple(float(s) for s in source_model.std)
    logger.info("init_from %s: its input normalisation mean=%s std=%s", config.init_from, mean, std)
    return (mean, std), variables


def train_epoch(
    run: Run, state: TrainState, epoch: int, guard: PreemptionGuard
) -> tuple[TrainState, dict[str, jax.Array], bool]:
    """Runs the rest of one epoch from the state's step; stops early, after a whole step,
    on a signal. Returns the state, the summed metrics and whether the epoch finished."""
    config, steps = run.config, run.steps_per_epoch
    start = int(state.step) - epoch * steps
    sums = None
    if run.partial_sums is not None and start > 0:
        sums = {k: jnp.asarray(v, jnp.float32) for k, v in run.partial_sums.items()}
    running_loss = None
    in_flight = collections.deque()
    with run.progress_bar(epoch, start) as bar:
        for index, batch in enumerate(run.input.train_batches(epoch, start), start):
            state, metrics = run.train_fn(state, batch)
            sums = sum_metrics(sums, metrics, run.wait_each_step)
            # At most two steps queued ahead of the device: streamed batches waiting on
            # the device would otherwise pile up in its memory.
            in_flight.append(metrics["count"])
            if len(in_flight) > 2:
                jax.block_until_ready(in_flight.popleft())
            bar.update(config.batch_size)
            stop = stop_requested(guard, config, epoch * steps + index + 1, index)
            if stop and index + 1 < steps:
                return state, sums, False
            if (index + 1) % config.log_every_steps == 0:
                checkpoint.check_writes(run.manager)  # a failed save surfaces at once
                # Read the loss of one logging interval ago: it is done by now, so
                # reading it does not stall the queue of dispatched steps.
                if running_loss is not None:
                    run.check_finite(float(running_loss), int(state.step))
                    bar.set_postfix(loss=f"{float(running_loss):.4f}")
                running_loss = sums["loss_sum"] / sums["count"]
    return state, sums, True


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, guard: PreemptionGuard | None = None
) -> TrainState:
    """Trains and evaluates for `config.num_epochs` epochs in `workdir`, resuming from its
    checkpoints (docs/training.md); returns the final state. Raises `Preempted` after
    saving on SIGTERM/SIGINT, `DivergedError` if the loss becomes NaN or infinite."""
    if guard is None:
        # The guard covers set-up too: a signal during data loading or compilation is
        # answered after the first step, with a checkpoint.
        with PreemptionGuard() as guard:
            return train_and_evaluate(config, workdir, guard)
    run, state = setup(config, workdir, guard)
    try:
        state = train_loop(run, state, guard)
    except Preempted:
        raise  # saved and closed already
    except BaseException:
        with contextlib.suppress(checkpoint.CheckpointWriteError):  # the raised one says more
            run.close()  # the last good save completes; nothing after it is saved
        raise
    run.close()
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
            run.save(state, epoch, done, sums=sums)
            where = f"in epoch {epoch + 1} after step {done} of {run.steps_per_epoch}"
            run.stop(state, guard, where)
        record = {"epoch": epoch + 1, "step": int(state.step), **summarise(sums, "train")}
        run.check_finite(record["train_loss"], record["step"])
        training_seconds = time.perf_counter() - epoch_start
        record.update(evaluate(state, run.input.eval_batches(), run.eval_fn, run.wait_each_step))
        record["learning_rate"] = float(run.learning_rate_fn(int(state.step) - 1))
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        counts = run.input.take_epoch_counts()
        record["input_wait_fraction"] = counts.pop("input_wait_seconds") / training_seconds
        record.update(counts)
        record["wall_time"] = time.time()  # when the epoch ended: curves against the clock
        run.log_epoch(record)
        if run.lock:
            run.lock.check()  # WORKDIR/.lock removed by hand: written again
        last = epoch + 1 == config.num_epochs
        requested = stop_requested(guard, config, record["step"])
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or last or requested:
            run.save(state, epoch + 1, 0, record=record)
        if requested and not last:
            run.stop(state, guard, f"after epoch {epoch + 1}")
    return state
