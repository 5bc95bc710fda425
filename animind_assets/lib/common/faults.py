"""Crash points for fault tests (issue 12: "the fault tests really kill a process").

``crash_point(name)`` does nothing unless the environment variable ``ANIMIND_CRASH_AT`` equals
``name``; then the current process kills itself with SIGKILL (no cleanup, no ``finally`` blocks, no
atexit: exactly what an OOM kill or ``kill -9`` does). Production code calls it at the points where a
crash is most damaging (between a DuckDB commit and its Parquet export, after a training epoch), and
the tests run a subprocess with the variable set and check what is left on disk.
"""

from __future__ import annotations

import os
import signal

ENV = "ANIMIND_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process when ``$ANIMIND_CRASH_AT == name`` (see the module docstring)."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
