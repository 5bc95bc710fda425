"""The one device rule of AniMind (embeddings, quantizer training, TIGER, LLM fine-tuning/inference).

``resolve_device(spec)``:

* ``"auto"`` (or ``""`` / ``None``): ``cuda`` (device 0) when ``torch.cuda.is_available()``, else ``cpu``;
* ``"cpu"``: the CPU;
* ``"cuda"`` / ``"cuda:N"``: that GPU; refused with ``DeviceError`` when CUDA is not available or fewer
  than ``N + 1`` GPUs are visible (never a silent fall-back to the CPU: a run asked for a GPU either
  gets one or fails before any work);
* anything else (``"tpu"``, ``"mps"`` typos, ...): ``DeviceError`` naming the accepted values.

``describe_device(device)`` is the human-readable label logged / put in metadata
(``"cuda (NVIDIA H200)"``, ``"cpu (2 threads)"``).
"""

from __future__ import annotations

from typing import Any


class DeviceError(ValueError, RuntimeError):
    """A device spec that cannot be honoured; the message names the spec and what is available.

    Subclasses both ``ValueError`` (bad setting) and ``RuntimeError`` (hardware missing), so callers
    written against either of the three former per-module rules keep working."""


ACCEPTED = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: Any = "auto"):
    """``torch.device`` for ``spec`` (``"auto" | "cpu" | "cuda" | "cuda:N"``, case-insensitive, or a
    ``torch.device``). Raises ``DeviceError`` (see the module docstring)."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (str(spec) if spec is not None else "auto").strip().lower() or "auto"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        try:
            dev = torch.device(text)
        except RuntimeError as exc:
            raise DeviceError(f"device must be {ACCEPTED}, got {spec!r}") from exc
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise DeviceError(f"device must be {ACCEPTED}, got {spec!r}")


def describe_device(device: Any = None) -> str:
    """Label for logs and metadata: ``"cuda (<GPU name>)"`` or ``"cpu (<N> threads)"``."""
    import torch

    dev = resolve_device(device if device is not None else "auto")
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev.index or 0)})"
    return f"cpu ({torch.get_num_threads()} threads)"
