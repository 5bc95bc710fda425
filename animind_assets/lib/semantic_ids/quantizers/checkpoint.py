"""Quantizer checkpoints: one ``torch.save`` dict of tensors and plain Python values only, so it
loads with ``torch.load(weights_only=True)`` (no pickled classes, no numpy objects).

Layout::

    {"format": "animind-quantizer", "format_version": 1, "kind": "rqvae" | "rqkmeans",
     "which": "best" | "last", "input_dim": int, "config": QuantizerConfig.to_dict(),
     "model_state": state_dict, "optimizer_state": dict | None,
     "epoch": int, "global_step": int, "best_val": float, "best_epoch": int, "bad_epochs": int,
     "finished": bool, "history": [per-epoch metric dicts], "input_fingerprint": str,
     "metrics": {name: float | int | str}}

Writes go through ``lib.storage.atomic_file`` (temp file + rename), so a crash never leaves a
half-written checkpoint at the deterministic path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from animind_assets.lib.common.checkpoint import CheckpointError, load_payload, require_finished, save_payload
from animind_assets.lib.semantic_ids.quantizers.config import QuantizerConfig

FORMAT = "animind-quantizer"
FORMAT_VERSION = 1


def _plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to plain Python so weights_only loading works."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if np is not None and isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def save_checkpoint(payload: dict[str, Any], dest: str | os.PathLike) -> str:
    """Atomic save through ``lib.common.checkpoint.save_payload`` (plain types only)."""
    data = dict(payload)
    data["format"] = FORMAT
    data["format_version"] = FORMAT_VERSION
    for key in ("config", "history", "metrics"):
        if key in data:
            data[key] = _plain(data[key])
    return save_payload(data, dest)


def load_checkpoint(src: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict (``torch.load(weights_only=True)`` via ``lib.common.checkpoint``).

    Raises ``FileNotFoundError`` when missing and ``CheckpointError`` (a ``ValueError``) for pickled
    objects, foreign files and newer format versions; each message names the file."""
    try:
        payload = load_payload(src, map_location=map_location)
    except FileNotFoundError:
        raise FileNotFoundError(f"quantizer checkpoint not found: {src}") from None
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{src} is not an AniMind quantizer checkpoint (format={payload.get('format')!r})")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{src} has checkpoint format_version {payload['format_version']} > supported {FORMAT_VERSION}")
    return payload


def load_quantizer(src: str | os.PathLike, map_location: str | torch.device = "cpu", *, require_finished_model: bool = True):
    """``(model, payload)`` with the model in eval mode, ready for ``model.codes(x)``.

    By default an unfinished checkpoint (``finished`` not ``True``: its training run was killed or stopped
    with ``stop_after_epochs`` before the schedule ended) is refused with ``CheckpointError``."""
    from animind_assets.lib.semantic_ids.quantizers.model import build_model

    payload = load_checkpoint(src, map_location)
    if require_finished_model:
        require_finished(payload, src, what=f"{payload.get('kind', 'quantizer')} quantizer")
    cfg = QuantizerConfig.from_dict(payload["config"])
    model = build_model(int(payload["input_dim"]), cfg)
    model.load_state_dict(payload["model_state"])
    model.eval()
    return model, payload
