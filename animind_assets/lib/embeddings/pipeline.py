"""The threaded embedding pipeline: one tokenizer thread feeding ``workers`` inference threads.

The producer walks the texts in windows (a small first window so inference starts at once; the next
windows are tokenized while the previous ones are being embedded) and queues ready batches; each
worker runs whole batches (batch-level parallelism: on a few CPU cores this avoids the per-op
synchronisation of splitting every small GEMM across threads) and writes its rows into the output
matrix. On CUDA, results stay on the device and are copied back every 16 batches. Errors in any
thread stop the others and are re-raised in the caller. No Dagster here.
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np

from animind_assets.lib.common.progress import Progress

Batch = tuple[np.ndarray, dict]


def run_pipeline(
    n: int,
    batches: Callable[[int, int], Iterator[Batch]],
    forward: Callable[[dict], object],
    *,
    workers: int,
    window: int,
    first_window: int,
    prefetch_batches: int,
    progress: Progress | None = None,
) -> np.ndarray:
    """Embed ``n`` texts -> ``float32 (n, dim)``.

    ``batches(start, stop)`` yields ``(indices, features)`` for texts ``start:stop`` (indices absolute);
    ``forward(features)`` returns a (B, dim) float torch tensor (run under ``torch.inference_mode`` in
    the worker threads). Raises the first exception of any thread."""
    import torch

    out: np.ndarray | None = None
    out_lock = threading.Lock()
    q: queue.Queue = queue.Queue(maxsize=max(2, prefetch_batches * workers))
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer() -> None:
        try:
            start, size = 0, min(window, first_window)
            while start < n:
                for item in batches(start, min(n, start + size)):
                    if not put(item):
                        return
                start, size = start + size, window
        except BaseException as exc:  # surfaced in the caller
            errors.append(exc)
            stop.set()
        finally:
            for _ in range(workers):
                put(None)

    def store(idx: np.ndarray, vec: np.ndarray) -> None:
        nonlocal out
        with out_lock:
            if out is None:
                out = np.empty((n, vec.shape[1]), dtype=np.float32)
            out[idx] = vec

    def worker() -> None:
        pending: list[tuple[np.ndarray, object]] = []

        def flush() -> None:
            if pending:
                vecs = torch.cat([v for _, v in pending]).cpu().numpy()
                store(np.concatenate([i for i, _ in pending]), vecs)
                pending.clear()

        try:
            with torch.inference_mode():
                while not stop.is_set():
                    try:
                        item = q.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is None:
                        break
                    idx, feats = item
                    vec = forward(feats)
                    if vec.device.type == "cpu":
                        store(idx, vec.numpy())
                    else:
                        pending.append((idx, vec))
                        if len(pending) >= 16:
                            flush()
                    if progress is not None:
                        with out_lock:
                            progress.update(len(idx))
                flush()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    try:
        prod = threading.Thread(target=producer, name="embed-tokenize", daemon=True)
        prod.start()
        if workers == 1:
            worker()
        else:
            pool = [threading.Thread(target=worker, name=f"embed-infer-{i}", daemon=True) for i in range(workers)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        if errors:
            stop.set()
        prod.join()
    finally:
        trim_heap()
    if errors:
        raise errors[0]
    assert out is not None
    return out


def trim_heap() -> None:
    """Give freed activation memory back to the OS (glibc keeps it in per-thread arenas otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - non-glibc libc
            pass
