"""Text embeddings for catalog items: fast (CPU and GPU), incremental, domain-generic. No Dagster here:
``animind_assets.defs.embeddings.anime_embeddings`` / ``defs.beauty.beauty_embeddings`` wrap it for their catalogs.

One concern per module:

* ``config``: ``EmbeddingConfig`` (every knob), constants, errors.
* ``model_loading``: model spec -> local folder (``embedded:NAME``, folder, hub id), device and dtype,
  ``model_fingerprint`` (identity of the vectors a config produces; no model load).
* ``batching``: tokenize, length-sort, cut and pad batches; ``pipeline``: the tokenizer thread + inference
  worker threads; ``pooling``: mean / cls / last_token / max pooling.
* ``encoder``: the loaded model, backend choice (PyTorch / ONNX Runtime, int8 quality gate),
  ``embed_texts`` and ``get_embedder``; ``onnx_backend``: ONNX export, transformer fusions, int8
  quantization, ONNX Runtime session.
* ``incremental``: ``build_embeddings`` (reuse unchanged rows, embed new/changed, drop removed).
* ``stats``: norms, pairwise cosine, collapse and NaN checks used by the asset checks.

Public API (re-exported here)::

    from animind_assets.lib.embeddings import EmbeddingConfig, embed_texts, build_embeddings

``embed_texts(texts, cfg) -> float32 (len(texts), dim)``; ``build_embeddings(ids, texts, previous_df,
cfg, id_column=...) -> (polars table, EmbeddingStats)``; see each module for shapes and errors.
"""

from animind_assets.lib.embeddings import onnx_backend
from animind_assets.lib.embeddings.config import (
    BACKENDS,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    FINGERPRINT_VERSION,
    INT8_GATE_FLOOR_COSINE,
    INT8_GATE_MIN_COSINE,
    INT8_GATE_SAMPLE,
    OUTPUT_COLUMNS,
    POOLING_MODES,
    PRECISIONS,
    QUANTIZE_MODES,
    EmbeddingConfig,
    EmbeddingError,
    NonFiniteEmbeddingError,
    QuantizationGateError,
)
from animind_assets.lib.embeddings.encoder import (
    TextEmbedder,
    clear_cache,
    embed_texts,
    get_embedder,
)
from animind_assets.lib.embeddings.incremental import EmbeddingStats, build_embeddings
from animind_assets.lib.embeddings.model_loading import (
    dtype_name,
    embedded_model_path,
    folder_identity,
    model_display_name,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from animind_assets.lib.embeddings.onnx_backend import default_cache_dir
from animind_assets.lib.embeddings.pooling import pool
from animind_assets.lib.embeddings.stats import (
    CheckOutcome,
    check_finite,
    check_no_collapse,
    check_unit_norm,
    cosine_summary,
    embedding_matrix,
    identical_vector_pairs,
    nonfinite_rows,
    norm_stats,
    pairwise_cosine_sample,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "FINGERPRINT_VERSION",
    "INT8_GATE_FLOOR_COSINE",
    "INT8_GATE_MIN_COSINE",
    "INT8_GATE_SAMPLE",
    "OUTPUT_COLUMNS",
    "POOLING_MODES",
    "PRECISIONS",
    "QUANTIZE_MODES",
    "CheckOutcome",
    "EmbeddingConfig",
    "EmbeddingError",
    "EmbeddingStats",
    "NonFiniteEmbeddingError",
    "QuantizationGateError",
    "TextEmbedder",
    "build_embeddings",
    "check_finite",
    "check_no_collapse",
    "check_unit_norm",
    "clear_cache",
    "cosine_summary",
    "default_cache_dir",
    "dtype_name",
    "embed_texts",
    "embedded_model_path",
    "embedding_matrix",
    "folder_identity",
    "get_embedder",
    "identical_vector_pairs",
    "model_display_name",
    "model_fingerprint",
    "nonfinite_rows",
    "norm_stats",
    "onnx_backend",
    "pairwise_cosine_sample",
    "pool",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]
