"""Worker processes that never outlive the process that started them.

A ``concurrent.futures.ProcessPoolExecutor`` worker that is busy with a long job (an hour of beam search) does not
notice that its parent is gone: killed by a signal, by the out-of-memory killer or by a scheduler, the parent leaves
its workers running, holding the cores and memory the next run needs. ``process_pool`` starts spawned workers whose
first act is a daemon thread that waits on the parent's sentinel (``multiprocessing.parent_process()``: a pipe that
becomes readable when the parent exits, however it exits) and then ends the worker with ``os._exit``.

This module never imports Dagster.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import ProcessPoolExecutor

# exit status of a worker ended because its parent went away (128 + SIGHUP, as a shell reports a hung-up job)
PARENT_GONE_EXIT = 129


def _exit_when_parent_exits() -> None:
    """Worker initializer: a daemon thread that ends this process (``os._exit(PARENT_GONE_EXIT)``) once the parent
    process has exited. A no-op in a process without a multiprocessing parent."""
    parent = mp.parent_process()
    if parent is None:  # pragma: no cover - only called in spawned workers
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel; returns when the parent is gone
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def process_pool(processes: int) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``processes`` *spawned* workers (a fresh interpreter each: no forked torch or
    OpenMP state) that exit on their own when this process exits, even when it is killed (SIGKILL included) in the
    middle of a job. Jobs and results must be picklable. ValueError for ``processes < 1``."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    return ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn"),
                               initializer=_exit_when_parent_exits)
