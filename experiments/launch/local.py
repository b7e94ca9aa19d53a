r"""Starts the processes of one multi-process run on this machine: a pod slice in miniature.

    python -m experiments.launch.local --num_processes 2 --cpu_devices 4 -- \
        python -m experiments.vsepp.main --config=experiments/vsepp/configs/shapes.py \
        --workdir=/tmp/vsepp_2x4

runs the command as processes 0 and 1 of one cluster, each with 4 CPU devices: 8 devices
in all, the processes computing together over gloo, through the same code path as the
hosts of a TPU pod slice (``jaxeff.train.distributed.initialize_distributed``, per-process
data loading, orbax's multi-host checkpoints). Anyone can run it; the tests do.

Each process gets the variables ``initialize_distributed`` reads: the coordinator on a
free localhost port, the number of processes and its own index. With ``--cpu_devices``
it runs on that many CPU devices (``JAX_PLATFORMS=cpu``,
``--xla_force_host_platform_device_count``); without, on whatever this machine has.

* Output goes to the terminal, or to ``--log_dir/process<i>.out`` and ``.err``.
* When a process fails, the others are stopped (SIGTERM, then SIGKILL after
  ``--grace_seconds``) and the launcher exits with the failed process's code.
* SIGTERM sent to the launcher is passed to every process (a preemption rehearsal: they
  save a checkpoint and exit); Ctrl-C stops them the same way.
* If the launcher itself is killed, its processes are killed too (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

from jaxeff.train.distributed import COORDINATOR_ADDRESS_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    port: int,
    *,
    cpu_devices: int | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` (default ``os.environ``) plus
    the cluster variables and, with ``cpu_devices``, a CPU-only JAX with that many devices."""
    env = dict(os.environ if base is None else base)
    env[COORDINATOR_ADDRESS_ENV] = f"localhost:{port}"
    env[NUM_PROCESSES_ENV] = str(num_processes)
    env[PROCESS_ID_ENV] = str(process_id)
    if cpu_devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={cpu_devices}"])
    return env


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the launcher dies (Linux ``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _stop(procs, grace_seconds: float) -> None:
    """SIGTERM to every running process, SIGKILL to those still running after the grace."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell does


class Outcome(NamedTuple):
    """How the processes of :func:`launch` ended."""

    codes: list[int]  # exit code of each process (negative: killed by that signal)
    failed: int | None  # the process that failed first by itself, or None


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    cpu_devices: int | None = None,
    log_dir: str | None = None,
    port: int | None = None,
    grace_seconds: float = 30.0,
) -> Outcome:
    """Runs ``command`` as processes ``0 .. num_processes - 1`` of one cluster, waits for them.

    Args:
      command: the program and its arguments, the same for every process.
      num_processes: how many processes.
      cpu_devices: run each on this many CPU devices (a CPU cluster over gloo).
      log_dir: write process ``i``'s output to ``log_dir/process<i>.out`` and ``.err``
        instead of the terminal.
      port: the coordinator's port on localhost; default a free one.
      grace_seconds: how long stopped processes get to exit before SIGKILL.

    Returns:
      An :class:`Outcome`: the exit code of every process and the one that failed first.
      When one fails, the others are stopped and report what stopping them gave.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be positive, got {num_processes}.")
    if not command:
        raise ValueError("command must not be empty.")
    port = free_port() if port is None else port
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
    procs, files = [], []
    failed = None

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for i in range(num_processes):
            out = err = None
            if log_dir is not None:
                out = open(os.path.join(log_dir, f"process{i}.out"), "w")
                err = open(os.path.join(log_dir, f"process{i}.err"), "w")
                files += [out, err]
            env = process_env(i, num_processes, port, cpu_devices=cpu_devices)
            procs.append(
                subprocess.Popen(list(command), env=env, stdout=out, stderr=err, preexec_fn=preexec)
            )
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):  # one failed: the others would hang
                failed = next(i for i, c in enumerate(codes) if c not in (None, 0))
                _stop(procs, grace_seconds)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs, grace_seconds)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:  # nothing outlives the launcher
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    codes = [p.returncode for p in procs]
    if failed is None and any(codes):  # all ended at once, or after a forwarded signal
        failed = next(i for i, c in enumerate(codes) if c)
    return Outcome(codes, failed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.launch.local",
        description="Run a command as N processes of one JAX cluster on this machine.",
        usage="%(prog)s --num_processes N [--cpu_devices D] [--log_dir DIR] -- COMMAND ...",
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--cpu_devices", type=int, default=None)
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--grace_seconds", type=float, default=30.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        parser.error("put the command after `--`.")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    outcome = launch(
        argv[split + 1 :],
        num_processes=args.num_processes,
        cpu_devices=args.cpu_devices,
        log_dir=args.log_dir,
        port=args.port,
        grace_seconds=args.grace_seconds,
    )
    if outcome.failed is None:
        return 0
    for i, code in enumerate(outcome.codes):
        cause = " (failed first)" if i == outcome.failed else ""
        print(f"process {i} exited with code {code}{cause}", file=sys.stderr)
    return _exit_code(outcome.codes[outcome.failed])


if __name__ == "__main__":
    sys.exit(main())
