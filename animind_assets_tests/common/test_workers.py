"""``lib/common/workers.process_pool``: spawned workers end when the process that started them is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from animind_assets.lib.common.workers import process_pool

REPO = Path(__file__).resolve().parents[2]


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_worker_exits_when_its_parent_is_killed(tmp_path):
    """The parent is SIGKILLed while its worker sleeps in a 10-minute job: the worker must be gone within
    seconds (a plain ProcessPoolExecutor worker would sleep on, holding its core and memory)."""
    script = textwrap.dedent(f"""
        import os, time
        from animind_assets.lib.common.workers import process_pool
        pool = process_pool(1)
        pid = pool.submit(os.getpid).result()
        pool.submit(time.sleep, 600)
        open({str(tmp_path / 'worker.pid')!r}, "w").write(str(pid))
        time.sleep(600)
    """)
    err = open(tmp_path / "parent.err", "w")  # the killed parent's resource tracker reports its semaphores there
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stderr=err)
    pid_file = tmp_path / "worker.pid"
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None, f"the parent exited early (rc {parent.returncode}): {(tmp_path / 'parent.err').read_text()}"
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert worker != parent.pid and _running(worker)
        time.sleep(1.0)  # the worker is now inside time.sleep(600)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = _running(worker)
        if alive:
            os.kill(worker, signal.SIGKILL)
        assert not alive, "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        err.close()


def test_process_pool_runs_jobs_and_refuses_no_workers():
    with process_pool(2) as pool:
        assert list(pool.map(abs, [-1, -2, 3])) == [1, 2, 3]
    with pytest.raises(ValueError, match="processes must be >= 1"):
        process_pool(0)
