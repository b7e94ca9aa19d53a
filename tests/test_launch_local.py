"""The local launcher: N processes of one cluster on this machine, stopped together.

The processes here are small Python programs (no JAX), so each test takes about a
second; tests/test_vsepp_multihost.py runs the VSE++ experiment through the launcher.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.launch import local
from jaxeff.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Launching from this process (JAX running) forks; the child only sets its parent-death
# signal before exec, which is safe.
in_process = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


@in_process
def test_each_process_gets_the_cluster_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=x")
    code = f"""
        import json, os
        keys = ["JAXEFF_COORDINATOR_ADDRESS", "JAXEFF_NUM_PROCESSES", "JAXEFF_PROCESS_ID",
                "JAX_PLATFORMS", "XLA_FLAGS"]
        path = os.path.join({str(tmp_path)!r}, os.environ["JAXEFF_PROCESS_ID"])
        with open(path, "w") as f:
            json.dump({{k: os.environ.get(k) for k in keys}}, f)
    """
    assert local.launch(python(code), num_processes=3, cpu_devices=2) == ([0, 0, 0], None)
    envs = [json.loads((tmp_path / str(i)).read_text()) for i in range(3)]
    assert len({e[distributed.COORDINATOR_ADDRESS_ENV] for e in envs}) == 1
    assert envs[0][distributed.COORDINATOR_ADDRESS_ENV].startswith("localhost:")
    for i, env in enumerate(envs):
        assert env[distributed.NUM_PROCESSES_ENV] == "3"
        assert env[distributed.PROCESS_ID_ENV] == str(i)
        assert env["JAX_PLATFORMS"] == "cpu"
        # The device count is replaced, other XLA flags kept.
        assert env["XLA_FLAGS"] == "--xla_dump_to=x --xla_force_host_platform_device_count=2"


@in_process
def test_a_failed_process_stops_the_others(tmp_path):
    code = """
        import os, sys, time
        if os.environ["JAXEFF_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(60)  # would wait for process 1 forever
    """
    start = time.monotonic()
    outcome = local.launch(python(code), num_processes=2, grace_seconds=5)
    assert outcome == ([-signal.SIGTERM, 3], 1)  # process 0 was stopped
    assert time.monotonic() - start < 30
    # The command line reports the failure with the failed process's exit code.
    args = ["--num_processes", "2", "--log_dir", str(tmp_path), "--", *python(code)]
    assert local.main(args) == 3
    assert (tmp_path / "process1.err").exists()


def start_launcher(tmp_path, code, num_processes=2):
    """The launcher as a command in a session of its own, with ``code`` as the processes."""
    command = [sys.executable, "-m", "experiments.launch.local"]
    command += ["--num_processes", str(num_processes), "--grace_seconds", "5", "--"]
    return subprocess.Popen(
        [*command, *python(code)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        start_new_session=True,
        stderr=open(tmp_path / "launcher.err", "w"),
    )


def kill_group(launcher):
    """Kills whatever is left of the launcher's session (it and its processes)."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()


def wait_for_files(paths, timeout=60):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"missing: {[p for p in paths if not p.exists()]}"
        time.sleep(0.05)


# Each process writes its pid, then waits; on SIGTERM it records it and exits cleanly.
WAITER = """
    import os, signal, sys, time
    folder, pid = {folder!r}, os.environ["JAXEFF_PROCESS_ID"]
    def stop(signum, frame):
        open(os.path.join(folder, "stopped." + pid), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    with open(os.path.join(folder, "pid." + pid + ".tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(folder, "pid." + pid + ".tmp"), os.path.join(folder, "pid." + pid))
    time.sleep(60)
"""


def test_sigterm_reaches_every_process(tmp_path):
    launcher = start_launcher(tmp_path, WAITER.format(folder=str(tmp_path)))
    try:
        wait_for_files([tmp_path / "pid.0", tmp_path / "pid.1"])
        launcher.send_signal(signal.SIGTERM)  # a preemption notice
        assert launcher.wait(timeout=30) == 0, (tmp_path / "launcher.err").read_text()
        assert (tmp_path / "stopped.0").exists() and (tmp_path / "stopped.1").exists()
    finally:
        kill_group(launcher)


def test_processes_die_with_the_launcher(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.fail("the launcher ties its processes to its own life on Linux only")
    launcher = start_launcher(tmp_path, WAITER.format(folder=str(tmp_path)))
    pids = []
    try:
        wait_for_files([tmp_path / "pid.0", tmp_path / "pid.1"])
        pids = [int((tmp_path / f"pid.{i}").read_text()) for i in range(2)]
        launcher.kill()  # no chance to clean up
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids)
    finally:
        for p in pids:  # the processes this test started, if the check failed
            if alive(p):
                os.kill(p, signal.SIGKILL)
        kill_group(launcher)
