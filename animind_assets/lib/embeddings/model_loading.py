"""Model resolution and identity: which local folder a model spec means, on which device and dtype it
runs, and the fingerprint of the vectors a config produces (no model load, no Dagster).

Device choice: ``resolve_device`` delegates to the one shared rule in ``lib.common.device``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from animind_assets.lib.common.fingerprint import json_fingerprint
from animind_assets.lib.embeddings import onnx_backend
from animind_assets.lib.embeddings.config import (
    EMBEDDED_MODELS,
    FINGERPRINT_VERSION,
    PRECISIONS,
    EmbeddingConfig,
    EmbeddingError,
)


def embedded_model_path(name: str = "all-MiniLM-L6-v2") -> Path:
    """Folder of a model shipped inside an installed PyPI package (offline)."""
    import importlib

    key = name.lower()
    if key not in EMBEDDED_MODELS:
        raise EmbeddingError(f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED_MODELS)}")
    package = EMBEDDED_MODELS[key]
    try:
        mod = importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - dependency is in pyproject
        raise EmbeddingError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r} (pip install it)"
        ) from exc
    folder = Path(mod.__file__).resolve().parent / "model"
    if not (folder / "config.json").exists():
        raise EmbeddingError(f"embedded model {name!r}: no model files under {folder}")
    return folder


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """``embedded:NAME`` | existing local folder | Hugging Face model id -> local folder.

    Hub ids are resolved through the local Hugging Face cache; they are downloaded only when
    ``HF_HUB_OFFLINE`` is not set (a token, if needed, is read by huggingface_hub from ``HF_TOKEN``).
    """
    spec = model.strip()
    if not spec:
        raise EmbeddingError("model must not be empty")
    if spec.lower() == "embedded" or spec.lower().startswith("embedded:"):
        name = spec.split(":", 1)[1] if ":" in spec else "all-MiniLM-L6-v2"
        return embedded_model_path(name or "all-MiniLM-L6-v2")
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EmbeddingError(f"model path {local.resolve()} is not a folder")
        return local.resolve()
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise EmbeddingError(f"model folder {local.resolve()} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=spec,
            revision=revision,
            local_files_only=offline,
            ignore_patterns=["onnx/*", "openvino/*", "*.onnx", "*.msgpack", "*.h5", "*.ot", "flax_model*", "tf_model*"],
        )
    except Exception as exc:
        hint = " (HF_HUB_OFFLINE is set: only models already in the local Hugging Face cache can be used)" if offline else ""
        raise EmbeddingError(f"model {spec!r} (revision {revision or 'default'}) could not be resolved{hint}: {exc}") from exc
    return Path(folder).resolve()


_IDENTITY_CACHE: dict[tuple, str] = {}
_SAMPLE = 1 << 20


def folder_identity(folder: str | os.PathLike) -> str:
    """Cheap content identity of a model folder: every file's relative name and size, the full content
    of small files (configs, tokenizer) and the first/last MiB of large ones (weights)."""
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    key = (str(root), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    cached = _IDENTITY_CACHE.get(key)
    if cached:
        return cached
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rel.lower() in ("readme.md",):
            continue
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(p, "rb") as fh:
            if size <= 2 * _SAMPLE:
                h.update(fh.read())
            else:
                h.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    ident = h.hexdigest()[:16]
    _IDENTITY_CACHE[key] = ident
    return ident


def resolve_device(device: str):
    """``lib.common.device.resolve_device`` (the one device rule: ``auto|cpu|cuda|cuda:N`` ->
    ``torch.device``); a bad spec or a missing CUDA device raises ``EmbeddingError``."""
    from animind_assets.lib.common.device import DeviceError
    from animind_assets.lib.common.device import resolve_device as _resolve

    try:
        return _resolve(device)
    except DeviceError as exc:
        raise EmbeddingError(str(exc)) from None


def resolve_dtype(precision: str, device):
    """``precision`` on ``device`` -> torch dtype (auto = bf16 on CUDA, fp32 on CPU); half precision on
    CPU raises ``EmbeddingError``."""
    import torch

    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise EmbeddingError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cpu":
        if p in ("fp16", "bf16"):
            raise EmbeddingError(
                f"precision {p!r} requested on CPU: half precision is only supported on CUDA here; "
                "use precision 'auto' or 'fp32' on CPU (or device 'cuda')"
            )
        return torch.float32
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[p]


def dtype_name(dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def model_display_name(cfg: EmbeddingConfig) -> str:
    """``model`` or ``model@revision`` as stored in the ``model`` column."""
    return cfg.model if not cfg.revision else f"{cfg.model}@{cfg.revision}"


def model_fingerprint(cfg: EmbeddingConfig, folder: Path | None = None, dtype=None) -> str:
    """Identity of the vectors a config produces: the model folder's content identity plus every setting
    that changes vectors (pooling, prefix, truncate_dim, max_length, normalize, resolved dtype and, when
    not ``none``, ``quantize`` with the int8 recipe id). 16 hex chars. Computed without loading the model."""
    cfg.validate()
    folder = folder or resolve_model_path(cfg.model, cfg.revision)
    if dtype is None:
        dtype = resolve_dtype(cfg.precision, resolve_device(cfg.device))
    return json_fingerprint(
        {
            "v": FINGERPRINT_VERSION,
            "model_identity": folder_identity(folder),
            "pooling": cfg.pooling,
            "prefix": cfg.prefix,
            "truncate_dim": cfg.truncate_dim,
            "max_length": cfg.max_length,
            "normalize": cfg.normalize,
            "dtype": dtype_name(dtype),
            # only when set, so fp32 fingerprints of earlier builds stay valid
            **({"quantize": cfg.quantize, "int8_recipe": onnx_backend.int8_recipe_id()} if cfg.quantize == "int8" else {}),
        }
    )

