"""``mmopt optimize --processes N``: the same command started N times as ranks of one run, the way ``torchrun`` and
``accelerate launch`` start them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), on this machine.

The workers share the distillation (``mmopt.distill.parallel``); rank 0 alone writes the output and prints.
When a worker fails the others are stopped, and the run's exit code is the first failure's.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from mmopt.errors import EXIT_INTERRUPTED, UserError

POLL_S = 0.2


def strip_option(args: list[str], option: str = "--processes") -> list[str]:
    """``args`` without ``--processes N`` / ``--processes=N``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(count: int, args: list[str]) -> int:
    """Run ``python -m mmopt ARGS`` as ``count`` ranks; return 0 when all succeeded, else the first failure's code."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(f"--processes {count}: this process is already one of {os.environ['WORLD_SIZE']} that a "
                        "launcher started", hint="drop --processes, or the launcher")
    env = {**os.environ, "WORLD_SIZE": str(count), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    # One process per core would otherwise each start a thread per core: N times oversubscribed.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    command = [sys.executable, "-m", "mmopt", *args]
    workers = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(count)]
    try:
        return _wait(workers)
    except KeyboardInterrupt:
        _stop(workers)
        return EXIT_INTERRUPTED


def _wait(workers: list[subprocess.Popen]) -> int:
    """Wait for every worker; once one fails, stop the rest (they would wait for it) and return its code."""
    while True:
        codes = [w.poll() for w in workers]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(workers)
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)


def _stop(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)       # unwinds like Ctrl-C: a worker's temporary output is removed
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
