"""One prepared GPU session, version 2: a queue of decisive runs within a budget.

  bash experiments/gpu_session.sh                 # on the device, from the repository root
  SKIP_DONE=1 bash experiments/gpu_session.sh     # the next window: skip what is committed
  SMALL=1 bash experiments/gpu_session.sh         # tiny settings on any machine (CI runs it)

The queue (experiments/gpu_queue.py), in issue 23's order; an item starts only if its
estimated seconds are left of BUDGET_S, else it is skipped and the next one tried:
  1. environment (GPU, versions) and two bf16 steps of the training command: a problem
     stops the session here, seconds in;
  2. peers on the same data: airbench94 (its own recipe and TTA, 5 runs) and the PyTorch
     twin with vgg16_fast's recipe (experiments/torch_twin_training.py), 30 epochs;
  3. ours at full width: vgg16_fast as shipped; two more seeds of it run at once on the
     one GPU (`pair_throughput`: does a second process raise the queue's throughput? If
     by >= 15%, the variants after it run two at a time); one-change variants;
  4. speed rows (ours against PyTorch, batch 1024, XLA GPU flags), which SKIP_DONE reruns
     only when the code they time changed (their key holds its digest);
  5. the streamed ImageNet-style path on upscaled CIFAR JPEGs written here, then the seed
     recipe towards its 200th epoch with what is left.

Environment: OUT (results; default experiments/results/gpu_session), WORK (scratch;
/tmp/vgg_gpu_session), BUDGET_S (default 540), SKIP_DONE=1, COMMITTED (default
experiments/results/gpu), PARALLEL (auto | 0 | 1: variants two at a time), SMALL=1,
CIFAR_NPZ (default .devdata/cifar10-jpeg.npz, else ../shared/data/cifar10-jpeg.npz),
TORCH_COMPILE=0, ONLY (comma-separated item ids: run only these).

OUT receives six files, each written as items end (the device tool returns 8):
session.log (the shell wrapper's copy of this output), env.json, results.jsonl (one
line per item that ran: id, key, definition, status, figures), curves.jsonl (every
epoch record of every training run, with its item id), raw.jsonl (each benchmark's and
airbench's own JSON) and summary.json (every item: what happened, or why skipped).
To commit a window: copy OUT to experiments/results/gpu/<YYYYMMDD_HHMM>/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gpu_queue
import gpu_steps
from gpu_queue import Item
from gpu_steps import REPO, log

SMALL = os.environ.get("SMALL", "0") == "1"
OUT = Path(os.environ.get("OUT") or REPO / "experiments" / "results" / "gpu_session")
WORK = Path(os.environ.get("WORK", "/tmp/vgg_gpu_session"))
BUDGET_S = float(os.environ.get("BUDGET_S", "540"))
PYTHON = os.environ.get("PYTHON", sys.executable)
SKIP_DONE = os.environ.get("SKIP_DONE", "0") == "1"
COMMITTED = Path(os.environ.get("COMMITTED") or REPO / "experiments" / "results" / "gpu")
PARALLEL = os.environ.get("PARALLEL", "auto")
ONLY = [name for name in os.environ.get("ONLY", "").split(",") if name]
TORCH_COMPILE = os.environ.get("TORCH_COMPILE", "0" if SMALL else "1") == "1"
PARALLEL_GAIN = 1.15  # two runs at once must finish >= 15% more work per second
DEADLINE = gpu_steps.START + BUDGET_S
# Overrides that shrink the training runs in SMALL mode (last, so they win).
SMALL_TRAIN = [
    "--config.model=vgg_tiny",
    "--config.num_epochs=2",
    "--config.warmup_epochs=0.5",
    "--config.max_steps_per_epoch=3",
    "--config.batch_size=16",
    "--config.dtype=float32",
]
SMALL_SPEED = ["--config.dtype=float32", "--config.model=vgg_tiny", "--steps=2", "--burn_in=1"]


def remaining() -> float:
    return DEADLINE - time.time()


def limit(item: Item) -> float:
    """Seconds an item may run: twice its estimate (60 s more at least), within the budget."""
    if SMALL:
        return remaining() - 5
    return min(remaining() - 10, max(2 * item.estimate_s, item.estimate_s + 60))


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


class Session:
    """What the runs share: the results files, the data, the environment's figures."""

    def __init__(self, archive: Path | None):
        self.summary = {"started": now(), "small": SMALL, "budget_s": BUDGET_S, "items": {}}
        self.summary.update({"skip_done": SKIP_DONE, "torch_compile": TORCH_COMPILE})
        self.archive = archive
        self.data = gpu_steps.digest(archive) if archive else None
        self.arrays = gpu_steps.lazy(self._arrays)
        self.folder = gpu_steps.lazy(
            lambda: gpu_steps.write_image_folder(archive, WORK / "cifar10")
        )
        self.committed = gpu_queue.committed_results(COMMITTED) if SKIP_DONE else []
        self.gpu = "unknown"
        self.rows: dict[str, dict] = {}  # this window's result rows, by id
        self.parallel = {"0": False, "1": True}.get(PARALLEL)

    def _arrays(self) -> Path:
        import cifar_arrays

        path = WORK / "cifar10_arrays.npz"
        if not path.exists():
            start = time.time()
            cifar_arrays.save(cifar_arrays.load(self.archive), path)
            log(f"decoded {self.archive} into {path} in {time.time() - start:.1f} s")
        return path

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - gpu_steps.START, 1)
        text = json.dumps(self.summary, indent=2, default=str) + "\n"
        (OUT / "summary.json").write_text(text)

    def skip(self, item: Item, reason: str) -> None:
        log(f"skip {item.id}: {reason}")
        self.summary["items"][item.id] = {"skipped": reason}
        self.write_summary()

    def record(self, item: Item, status: str, seconds: float, **figures) -> dict:
        """One result line (results.jsonl), written as the item ends."""
        row = {"id": item.id, "key": item.key, "status": status, "date": now(), "gpu": self.gpu}
        row.update({"seconds": round(seconds, 1), **figures, "definition": item.definition})
        with open(OUT / "results.jsonl", "a") as out:
            out.write(json.dumps(row, default=str) + "\n")
        self.rows[item.id] = row
        self.summary["items"][item.id] = {k: v for k, v in row.items() if k != "definition"}
        self.write_summary()
        log(f"{item.id}: {status}")
        return row

    def append(self, name: str, item_id: str, lines: list[dict]) -> None:
        with open(OUT / name, "a") as out:
            for line in lines:
                out.write(json.dumps({"item": item_id, **line}, default=str) + "\n")

    def why_not(self, item: Item, problems: dict[str, str]) -> str | None:
        """Why `item` does not run now (None: it does)."""
        if ONLY and item.id not in ONLY and item.kind != "environment":
            return "not in ONLY"
        if SMALL and not item.small:
            return "not in the SMALL rehearsal (the same code path as an item that is)"
        if item.id in problems:
            return f"invalid: {problems[item.id]}"
        if item.kind not in ("environment", "speed") and self.archive is None:
            return "no CIFAR-10 JPEG archive (set CIFAR_NPZ)"
        done = gpu_queue.done_in(self.committed, item) if item.kind != "environment" else None
        if done:
            return f"done: committed in {done['_file']}"
        if not SMALL and remaining() < item.estimate_s:
            return f"needs ~{item.estimate_s:.0f} s, {remaining():.0f} s left"
        return None


# ------------------------------------------------------------------------------- runs


def environment(session: Session, item: Item) -> bool:
    """Versions, devices and two bf16 steps of the real training command. False: stop."""
    entry: dict = {"date": now()}
    try:
        query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        smi = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=30)
        entry["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        entry["gpu"] = f"no nvidia-smi ({type(error).__name__})"
    session.gpu = entry["gpu"]
    result = subprocess.run(
        [PYTHON, "-c", gpu_steps.ENV_PROBE], cwd=REPO, capture_output=True, text=True
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("ENV ")]
    if result.returncode or not lines:
        entry["error"] = result.stderr.strip()[-3000:]
        session.record(item, "failed", time.time() - gpu_steps.START, **entry)
        log("STOP: the import check failed:\n" + entry["error"])
        return False
    entry.update(json.loads(lines[0][4:]))
    log("environment: " + json.dumps(entry))
    workdir = WORK / "sanity"
    shutil.rmtree(workdir, ignore_errors=True)
    command = [PYTHON, "-m", "vgg_jax.main", "--config=configs/smoke.py", f"--workdir={workdir}"]
    command += ["--config.num_epochs=1", "--config.max_steps_per_epoch=2"]
    command += ["--config.progress_bar=False"]
    # bfloat16 is what the device runs; on a CPU (SMALL) it is slow to compile.
    command += ["--config.dtype=float32", "--config.synthetic_eval_size=64"] if SMALL else []
    command += [] if SMALL else ["--config.dtype=bfloat16"]
    [(status, seconds)] = gpu_steps.run_processes([command], min(150.0, remaining()))
    records = gpu_steps.read_records(workdir / "metrics.jsonl")
    entry["sanity"] = {"status": status, "seconds": round(seconds, 1), "records": records}
    (OUT / "env.json").write_text(json.dumps(entry, indent=2) + "\n")
    ok = status == 0 and bool(records)
    session.record(item, "done" if ok else "failed", seconds, **entry)
    if not ok:
        log("STOP: the sanity run of the training command failed (see above)")
    elif not SMALL and not entry.get("cuda_available"):
        log("STOP: PyTorch sees no CUDA device: the peers cannot run on this machine")
        return False
    return ok


def airbench(session: Session, item: Item) -> None:
    out = WORK / "airbench.json"
    out.unlink(missing_ok=True)
    command = [PYTHON, "experiments/airbench_cifar.py", f"--data={session.arrays()}"]
    command += [f"--folder={WORK / 'airbench'}", f"--json={out}", f"--runs={1 if SMALL else 5}"]
    [(status, seconds)] = gpu_steps.run_processes([command], limit(item))
    result = json.loads(out.read_text()) if out.exists() else {}
    session.append("raw.jsonl", item.id, [result] if result else [])
    figures = {"exit_status": status, **result.get("mean", {})}
    figures.update(
        {k: result[k] for k in ("skipped", "error", "cpu_check", "files") if k in result}
    )
    done = status == 0 and "mean" in result
    session.record(
        item, "done" if done else "skipped" if "skipped" in result else "failed", seconds, **figures
    )


def twin(session: Session, item: Item) -> None:
    metrics = WORK / "twin_metrics.jsonl"
    metrics.unlink(missing_ok=True)
    command = [PYTHON, "experiments/torch_twin_training.py", f"--config={gpu_queue.FAST}"]
    command += [f"--data={session.arrays()}", f"--metrics={metrics}"]
    command += ["--torch_compile" if TORCH_COMPILE else "--notorch_compile"]
    command += (
        [o for o in SMALL_TRAIN if "model" not in o] + ["--config.width=0.125"] if SMALL else []
    )
    launch = time.time()
    [(status, seconds)] = gpu_steps.run_processes([command], limit(item))
    records = gpu_steps.read_records(metrics)
    row = gpu_steps.curve_row(records, launch)
    session.append("curves.jsonl", item.id, records)
    done = status == 0 and row["epochs_done"] == expected_epochs(gpu_queue.FAST, [])
    session.record(item, "done" if done else "failed", seconds, exit_status=status, **row)


def expected_epochs(config: str, overrides: list[str]) -> int:
    return gpu_queue.epochs_of(config, overrides + (SMALL_TRAIN if SMALL else []))


def train(session: Session, items: list[Item], envs: list[dict] | None = None) -> list[dict]:
    """Trains the items' configs with our CLI, all at once; one result line each."""
    commands, workdirs = [], []
    for item in items:
        workdir = WORK / item.id
        shutil.rmtree(workdir, ignore_errors=True)
        command = [PYTHON, "-m", "vgg_jax.main", f"--config={item.definition['config']}"]
        command += [f"--workdir={workdir}", "--config.progress_bar=False"]
        command += ["--config.dataset=image_folder", f"--config.data_dir={session.folder()}"]
        commands.append(command + item.definition["overrides"] + (SMALL_TRAIN if SMALL else []))
        workdirs.append(workdir)
    launch = time.time()
    timeout = min(limit(item) for item in items)
    results = gpu_steps.run_processes(commands, timeout, envs)
    rows = []
    for item, workdir, command, (status, seconds) in zip(
        items, workdirs, commands, results, strict=True
    ):
        records = gpu_steps.read_records(workdir / "metrics.jsonl")
        row = gpu_steps.curve_row(records, launch)
        session.append("curves.jsonl", item.id, records)
        epochs = expected_epochs(item.definition["config"], item.definition["overrides"])
        done = status == 0 and row.get("final_epoch") == epochs
        figures = {"exit_status": status, "command": " ".join(command), "runs_at_once": len(items)}
        rows.append(session.record(item, "done" if done else "failed", seconds, **figures, **row))
    return rows


def pair(session: Session, item: Item) -> None:
    """Two seeds of the shipped recipe at once, each process given 45% of the GPU's memory;
    throughput against ours_fast alone (this window's, else a committed one on this GPU)."""
    members = gpu_queue.pair_members(session.data, SMALL)
    memory = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
    start = time.time()
    rows = train(session, members, [memory, memory])
    wall = time.time() - start
    single = session.rows.get("ours_fast")
    if single is None or single["status"] != "done":
        single = next(
            (
                r
                for r in session.committed
                if r.get("id") == "ours_fast"
                and r.get("status") == "done"
                and r.get("gpu") == session.gpu
            ),
            None,
        )
    figures = {"pair_wall_s": round(wall, 1), "members": [m.id for m in members]}
    status = "incomplete"
    if single and all(row["status"] == "done" for row in rows):
        gain = 2 * single["seconds"] / wall
        epoch_gain = (
            2 * single["median_epoch_seconds"] / max(r["median_epoch_seconds"] for r in rows)
        )
        figures.update(
            single_run_s=single["seconds"],
            throughput_gain_wall=round(gain, 3),
            throughput_gain_epochs=round(epoch_gain, 3),
            parallel_helps=gain >= PARALLEL_GAIN,
        )
        status = "done"
        if session.parallel is None:
            session.parallel = gain >= PARALLEL_GAIN
    session.record(item, status, wall, **figures)


def speed(session: Session, item: Item) -> None:
    definition = item.definition
    out = WORK / "speed" / f"{item.id}.json"
    out.unlink(missing_ok=True)
    settings = [f"--config.batch_size={definition['batch_size']}"]
    settings += ["--config.dtype=bfloat16", "--steps=20", "--burn_in=10"]
    if SMALL:
        settings = [*SMALL_SPEED, "--config.batch_size=8", "--config.image_size=32"]
    compare = definition["compare"]
    command = [PYTHON, "-m", "vgg_jax.benchmark", f"--config={definition['config']}", *settings]
    command += [f"--compare={compare}", f"--json={out}"]
    command += ["--torch_compile" if TORCH_COMPILE else "--notorch_compile"]
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), definition["xla_flags"]]))
    # PyTorch runs in the same process after JAX: JAX must not take the memory.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_FLAGS": flags}
    [(status, seconds)] = gpu_steps.run_processes([command], limit(item), [env])
    results = json.loads(out.read_text()) if out.exists() else None
    session.append("raw.jsonl", item.id, [results] if results else [])
    row = gpu_steps.speed_row(results) if results else {}
    done = status == 0 and results is not None
    session.record(
        item,
        "done" if done else "failed",
        seconds,
        exit_status=status,
        xla_flags=definition["xla_flags"],
        **row,
    )


def stream(session: Session, item: Item) -> None:
    """configs/vgg16_imagenet.py streamed from upscaled CIFAR JPEGs by the host's cores,
    against the same steps on synthetic data already on the device: images/s and the
    fraction of the step time spent waiting for input."""
    size, counts = (64, (24, 9)) if SMALL else (256, (12800, 500))
    start = time.time()
    folder = gpu_steps.write_upscaled_folder(session.arrays(), WORK / "upscaled", counts, size)
    figures: dict = {"folder_s": round(time.time() - start, 1), "image_side": size}
    ok = True
    for name, arguments in gpu_steps.stream_arguments(folder, counts[0], SMALL).items():
        workdir = WORK / f"stream_{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        command = [PYTHON, "-m", "vgg_jax.main", f"--workdir={workdir}", *arguments]
        [(status, seconds)] = gpu_steps.run_processes([command], limit(item) / 2)
        records = gpu_steps.read_records(workdir / "metrics.jsonl")
        session.append("curves.jsonl", f"{item.id}_{name}", records)
        figures[name] = {"exit_status": status, "seconds": round(seconds, 1)}
        figures[name].update(gpu_steps.stream_row(records, batch=8 if SMALL else 128))
        ok = ok and status == 0 and len(records) == (2 if SMALL else 3)
    session.record(item, "done" if ok else "failed", time.time() - start, **figures)


def seed(session: Session, item: Item) -> None:
    """The seed recipe with what is left. Its workdir is kept: rerun in the same window
    (the machine stays), it resumes from the checkpoint the budget's SIGTERM saved."""
    workdir = WORK / "seed_vgg16"
    command = [PYTHON, "-m", "vgg_jax.main", f"--config={gpu_queue.SEED}", f"--workdir={workdir}"]
    command += ["--config.progress_bar=False", "--config.dataset=image_folder"]
    command += [f"--config.data_dir={session.folder()}", *(SMALL_TRAIN if SMALL else [])]
    launch = time.time()
    [(status, seconds)] = gpu_steps.run_processes([command], remaining() - 15)
    records = gpu_steps.read_records(workdir / "metrics.jsonl")
    row = gpu_steps.curve_row(records, launch)
    session.append("curves.jsonl", item.id, records)
    done = status == 0 and row.get("final_epoch") == expected_epochs(gpu_queue.SEED, [])
    state = "done" if done else "stopped" if status == 124 else "failed"
    session.record(item, state, seconds, exit_status=status, command=" ".join(command), **row)


RUNS = {"airbench": airbench, "twin": twin, "pair": pair, "speed": speed}
RUNS.update({"stream": stream, "seed": seed, "train": lambda s, i: train(s, [i])})


def run_queue(session: Session, items: list[Item], problems: dict[str, str]) -> bool:
    """Runs the queue; False if the environment check stopped it."""
    handled: set[str] = set()
    for index, item in enumerate(items):
        if item.id in handled:
            continue
        reason = session.why_not(item, problems)
        if reason:
            session.skip(item, reason)
            continue
        if item.kind == "environment":
            if not environment(session, item):
                return False
            continue
        partner = None
        if session.parallel and item.kind == "train" and item.id != "ours_fast":
            candidates = [
                o for o in items[index + 1 :] if o.kind == "train" and o.id not in handled
            ]
            partner = next((o for o in candidates if session.why_not(o, problems) is None), None)
        if partner and (SMALL or remaining() >= 1.3 * max(item.estimate_s, partner.estimate_s)):
            handled.add(partner.id)
            memory = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
            train(session, [item, partner], [memory, memory])
            continue
        try:
            RUNS[item.kind](session, item)
        except Exception as error:  # noqa: BLE001 - one item's fault must not end the queue
            log(f"{item.id} raised {type(error).__name__}: {error}")
            session.record(item, "failed", 0.0, error=f"{type(error).__name__}: {error}")
    return True


def preflight() -> tuple[Path | None, list[str]]:
    """Carried wheels installed, modules and data present. Returns (archive, problems):
    any problem is a STOP, before the machine's time goes into runs."""
    problems = []
    try:
        installed = gpu_steps.install_carried_wheels(PYTHON)
        if installed:
            log(f"installed carried wheels: {', '.join(installed)}")
    except RuntimeError as error:
        problems.append(str(error))
    required = ["ml_collections", "tensorboardX", "grain"] + (
        [] if SMALL else ["airbench", "torch"]
    )
    for module, error in gpu_steps.missing_modules(PYTHON, required).items():
        problems.append(f"module {module} cannot be imported ({error}): carry its wheel in .whl/")
    archive = gpu_steps.find_archive()
    if archive is None and not SMALL:
        problems.append("no CIFAR-10 JPEG archive: carry it as .devdata/cifar10-jpeg.npz")
    return archive, problems


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    log(f"budget {BUDGET_S:.0f} s; results in {OUT}; SKIP_DONE={int(SKIP_DONE)}")
    archive, problems = preflight()
    if problems:
        for problem in problems:
            log(f"STOP: {problem}")
        return 3
    session = Session(archive)
    items = gpu_queue.build_queue(session.data or "none", SMALL)
    invalid = gpu_queue.check_train_items(items + gpu_queue.pair_members("none", SMALL))
    session.summary["not_queued"] = gpu_queue.NOT_QUEUED
    ok = run_queue(session, items, invalid)
    gpu_steps.print_table(session.summary)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
