"""The one owner of AniMind's PyTorch checkpoint files (quantizer ``model.pt``/``last.pt``, TIGER
``best.pt``/``last.pt``): plain-type payloads, atomic saves, ``torch.load(weights_only=True)`` loads.

* ``save_payload(payload, dest)`` converts numpy scalars/arrays and tuples to plain Python / tensors
  (so the file loads with ``weights_only=True``) and writes it through ``storage.atomic_file``
  (temp file + rename): a crash never leaves a half-written checkpoint at ``dest``.
* ``load_payload(src)`` is the only ``torch.load`` of the project. It always passes
  ``weights_only=True``: a file whose pickle names any class or function outside PyTorch's tensor
  allow-list (a planted ``os.system`` reducer, a pickled model object, numpy objects) is refused with
  ``CheckpointError`` naming the file, *before* any of its code can run.
* ``require_finished(payload, src)`` refuses a checkpoint whose ``finished`` marker is not ``True``
  (a training run that was interrupted or stopped before its schedule ended).
* ``config_diff(saved, requested, fields)`` lists the fields that differ between the checkpoint's config
  and the requested one (used by the resume checks, rule 6 of issue 12).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from animind_assets.lib.common.storage import as_path, atomic_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not plain data, not finished, wrong kind, or incompatible
    with the requested configuration. The message names the file (and the fields concerned)."""


def plain(obj: Any) -> Any:
    """Recursively convert numpy scalars -> Python numbers, numpy arrays -> tensors and
    non-int/str dict keys -> ``str`` so the value survives ``torch.load(weights_only=True)``."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def save_payload(payload: Mapping[str, Any], dest: str | os.PathLike) -> str:
    """Write ``payload`` (a dict of tensors / state dicts / plain values) atomically to ``dest``
    (local path or fsspec URL). Returns ``str(dest)``."""
    data = plain(dict(payload))
    with atomic_file(dest) as tmp:
        torch.save(data, tmp)
    return str(dest)


def load_payload(src: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(src, weights_only=True)`` of a dict checkpoint.

    Raises ``FileNotFoundError`` (naming ``src``) when missing and ``CheckpointError`` when the file is
    not a plain-type dict checkpoint (pickled classes/functions, truncated or foreign files)."""
    path = as_path(src)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    with path.open("rb") as fh:
        buf = io.BytesIO(fh.read())
    try:
        payload = torch.load(buf, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            f"{src} is not a plain-data checkpoint and was NOT loaded: it references Python objects outside "
            f"PyTorch's weights-only allow-list ({detail.strip()[:200]}). Only tensors, numbers, strings, "
            "lists and dicts are accepted; a file like this can run code when unpickled."
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{src} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{src} holds a {type(payload).__name__}, expected a dict checkpoint")
    return payload


def require_finished(payload: Mapping[str, Any], src: str | os.PathLike, what: str = "model") -> None:
    """Raise ``CheckpointError`` unless ``payload["finished"] is True`` (see the module docstring)."""
    if payload.get("finished") is not True:
        epoch = payload.get("epoch", payload.get("state", {}).get("step") if isinstance(payload.get("state"), dict) else None)
        raise CheckpointError(
            f"{src} is an unfinished {what} checkpoint (finished={payload.get('finished')!r}, at epoch/step {epoch}): "
            "its training run was interrupted or stopped early. Finish it (resume) or re-train before using it."
        )


def config_diff(saved: Mapping[str, Any], requested: Mapping[str, Any], fields: Iterable[str]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, requested value)}`` for each of ``fields`` whose values differ
    (lists and tuples compare equal element-wise)."""

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    out = {}
    for f in fields:
        a, b = norm(saved.get(f)), norm(requested.get(f))
        if a != b:
            out[f] = (a, b)
    return out


def format_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """``"codebook_size: 256 (checkpoint) -> 128 (requested); ..."``."""
    return "; ".join(f"{k}: {a!r} (checkpoint) -> {b!r} (requested)" for k, (a, b) in diff.items())
