"""The one device rule of AniMind (embeddings, quantizer training, TIGER, LLM fine-tuning/inference).

``resolve_device(spec)``:

* ``"auto"`` (or ``""`` / ``None``): ``cuda`` (device 0) when ``torch.cuda.is_available()``, else ``cpu``;
* ``"cpu"``: the CPU;
* ``"cuda"`` / ``"cuda:N"``: that GPU; refused with ``DeviceError`` when CUDA is not available or fewer
  than ``N + 1`` GPUs are visible (never a silent fall-back to the CPU: a run asked for a GPU either
  gets one or fails before any work);
* anything else (``"tpu"``, ``"mps"`` typos, ...): ``DeviceError`` naming the accepted values.

``describe_device(device)`` is the human-readable label logged / put in metadata
(``"cuda (NVIDIA H200)"``, ``"cpu (2 threads)"``). ``cpu_info()`` reads the CPU's model and vector extensions
from ``/proc/cpuinfo``; ``cpu_bf16_warning()`` says when bf16 autocast would be slower than float32 on this CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
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


CPU_EXTENSIONS = [("AVX2", "avx2"), ("FMA", "fma"), ("AVX-512F", "avx512f"), ("AVX512-VNNI", "avx512_vnni"),
                  ("AVX-VNNI", "avx_vnni"), ("AVX512-BF16", "avx512_bf16"), ("AMX-INT8", "amx_int8"),
                  ("AMX-BF16", "amx_bf16")]


def cpu_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """The CPU's model name, logical CPU count and the vector extensions that matter for torch kernels.

    Returns ``{"model": str, "cpus": int, "extensions": [names present], "missing": [names absent]}`` with names
    from ``CPU_EXTENSIONS`` (``"AMX-BF16"``, ...). Where ``cpuinfo`` cannot be read (not Linux), the model is
    ``"unknown"`` and every extension is listed as missing."""
    model, flags = "unknown", set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = val.strip()
            elif key == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "extensions": [n for n, f in CPU_EXTENSIONS if f in flags],
            "missing": [n for n, f in CPU_EXTENSIONS if f not in flags]}


def cpu_bf16_warning(bf16: bool, device: Any = "auto", info: dict | None = None) -> str | None:
    """A warning when bf16 autocast is asked for on a CPU without AMX-BF16 (else ``None``).

    Measured on a Xeon without AMX-BF16 (AVX512-BF16 only), 2 threads, 2 Dec 2026: the LM fine-tune ran at 0.61x the
    tokens/s of float32 (``benchmarks.llm_speed --variants 4,5``) and TIGER's training at 0.81-0.88x its steps/s
    (``benchmarks.tiger_speed``); on Xeons with AMX-BF16 bf16 is the faster setting. ``info`` defaults to
    ``cpu_info()``; a CUDA ``device`` never warns."""
    if not bf16 or resolve_device(device).type == "cuda":
        return None
    info = info if info is not None else cpu_info()
    if "AMX-BF16" in info["extensions"] or info["model"] == "unknown":
        return None
    return (f"bf16 autocast on a CPU without AMX-BF16 ({info['model']}; extensions: "
            f"{', '.join(info['extensions']) or '-'}): bf16 is emulated or partly vectorised here and measured slower "
            f"than float32 (on a Xeon with AVX512-BF16 only: 0.61x the LM fine-tune's tokens/s, 0.81-0.88x TIGER's steps/s); "
            "leave bf16 off on this machine")
