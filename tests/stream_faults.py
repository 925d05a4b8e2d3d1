"""Runs a streamed training command, applies one fault to its process tree, and prints
JSON about what followed: exit status, stderr's last lines, seconds until the trainer
stopped, which of its child processes outlived it, and what is left in /dev/shm.

  python tests/stream_faults.py {kill_worker|kill_trainer|none} -- TRAINING COMMAND...

Meant to run in a private mount namespace with its own /dev/shm (tests/test_workers.py),
so that what is left there can only be this run's.
"""

import json
import os
import signal
import subprocess
import sys
import time


def children(pid: int) -> dict[int, str]:
    """pid -> command line of each live child process of `pid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found[int(entry)] = command
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    fault, command = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    trainer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 240
    workers: list[int] = []
    while trainer.poll() is None and time.monotonic() < deadline:
        seen.update(children(trainer.pid))
        workers = [pid for pid, cmd in seen.items() if "spawn_main" in cmd and alive(pid)]
        if fault != "none" and len(workers) >= 2:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # the workers are decoding batches now
    seen.update(children(trainer.pid))
    faulted = time.monotonic()
    if fault == "kill_worker":
        os.kill(workers[0], signal.SIGKILL)
    elif fault == "kill_trainer":
        os.kill(trainer.pid, signal.SIGKILL)
    try:
        _, stderr = trainer.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        trainer.kill()
        _, stderr = trainer.communicate()
    stopped = time.monotonic() - faulted
    # Give what outlives the trainer a few seconds to notice (they poll once a second).
    for _ in range(50):
        survivors = [pid for pid in seen if alive(pid)]
        if not survivors:
            break
        time.sleep(0.2)
    report = {
        "returncode": trainer.returncode,
        "stderr_tail": stderr.strip().splitlines()[-12:],
        "seconds_to_stop": round(stopped, 2),
        "workers_seen": len(workers),
        "children_seen": sorted(seen.values()),
        "survivors": [seen[pid] for pid in seen if alive(pid)],
        "shm": sorted(os.listdir("/dev/shm")),
    }
    for pid in seen:  # leave nothing behind, whatever the verdict
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
