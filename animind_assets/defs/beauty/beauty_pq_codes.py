"""``beauty_pq_codes``: long, unordered semantic IDs for RPG, by product quantization of item vectors
(one row per item: ``item_id``, ``codes`` = n_codebooks ints in 0..codebook_size-1).

Thin layer over ``animind_assets.lib.retrieval.pq`` (standardize -> PCA -> OPQ with faiss, or plain PQ
with scikit-learn k-means). RPG (Hou et al., KDD 2025) uses OPQ with 32 codebooks x 256 codes on Beauty.

``vectors`` picks what is quantized: ``"sasrec"`` (default) = the item embeddings of ``sasrec_model``,
``"text"`` = ``beauty_embeddings`` (MiniLM on the item words), ``"text+sasrec"`` = both. On Beauty the ~5-word
titles give codes with almost no next-item signal (per-codebook information gain 0.006 nats for text codes
against 0.044 for SASRec-embedding codes, ``docs/beauty.md``), and RPG measured R@10 0.0129 on text codes
against 0.0468 on SASRec codes, so the default follows the measurement.
"""

import time

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP, load_sasrec_asset
from animind_assets.lib.common.plots import histogram_png
from animind_assets.lib.retrieval.pq import VECTOR_SOURCES, PQConfig, combine_item_vectors, product_quantize
from animind_assets.lib.retrieval.sasrec import sasrec_item_vectors
from animind_assets.lib.semantic_ids.assign import frame_vectors
from animind_assets.meta import image_md, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports
from animind_assets.launchpad import settings_defaults

ASSET = "beauty_pq_codes"


@settings_defaults("beauty_pq_codes")
class BeautyPqCodesConfig(dg.Config):
    n_codebooks: int = Field(32, description="codes per item (sub-vectors)")
    codebook_size: int = Field(256, description="codes per codebook (power of two for faiss)")
    standardize: bool = Field(True, description="z-score every embedding dimension first")
    pca_dim: int = Field(128, description="PCA dimension before PQ (0 = keep; must be divisible by n_codebooks for faiss)")
    method: str = Field("pq", description="'pq' (plain PQ) | 'opq' (rotation + PQ, faiss only)")
    backend: str = Field("auto", description="'auto' (faiss when installed) | 'faiss' | 'sklearn' (plain PQ only)")
    n_iter: int = Field(25, description="k-means / OPQ iterations")
    seed: int = Field(42, description="random seed")
    vectors: str = Field("sasrec", description="what is quantized: 'sasrec' (sasrec_model item embeddings) | 'text' "
                         "(beauty_embeddings) | 'text+sasrec' (both, each block standardized)")
    num_threads: int = Field(2, description="threads for faiss / k-means")

    def to_lib(self) -> PQConfig:
        return PQConfig(**self.model_dump(exclude={"vectors"})).validate()


@dg.asset(
    group_name=GROUP,
    deps=["sasrec_model"],
    kinds={"polars", "duckdb"},
    description="Product-quantization semantic IDs (n_codebooks unordered codes per item) of the item vectors "
    "(sasrec_model item embeddings by default, or beauty_embeddings), for RPG.",
)
def beauty_pq_codes(
    context: dg.AssetExecutionContext,
    config: BeautyPqCodesConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    beauty_embeddings: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    if config.vectors not in VECTOR_SOURCES:
        raise ValueError(f"beauty_pq_codes: vectors={config.vectors!r}; expected one of {VECTOR_SOURCES}")
    ids, text = frame_vectors(beauty_embeddings, "item_id", "embedding", table="beauty_embeddings")
    if ids.tolist() != list(range(len(ids))):
        missing = sorted(set(range(int(ids.max()) + 1)) - set(ids.tolist()))[:5]
        raise ValueError(f"beauty_embeddings: item_id must be 0..{len(ids) - 1} without gaps (missing e.g. {missing})")
    parts = [text] if "text" in config.vectors else []
    if "sasrec" in config.vectors:
        model, _ = load_sasrec_asset(artifacts, f"beauty_pq_codes: vectors={config.vectors!r} (or set vectors: text)")
        emb = sasrec_item_vectors(model)
        if emb.shape[0] != len(ids):
            raise ValueError(f"sasrec_model has {emb.shape[0]} items but beauty_embeddings has {len(ids)}; "
                             "rematerialize sasrec_model on the current beauty_interactions")
        parts.append(emb)
    x = combine_item_vectors(parts)
    context.log.info(f"beauty_pq_codes: quantizing {config.vectors} vectors {x.shape}")
    res = product_quantize(x, config.to_lib(), log=context.log.info)
    df = pl.DataFrame({"item_id": ids.astype(np.int64), "codes": res.codes.tolist()},
                      schema={"item_id": pl.Int64, "codes": pl.List(pl.Int64)})
    export = exports.write(df, ASSET)
    _, counts = np.unique(res.codes, axis=0, return_counts=True)
    md = {
        **table_metadata(df),
        **scalar_metadata({**{k: v for k, v in res.stats.items()}, "items_sharing_an_id": int(counts[counts > 1].sum()),
                           "vectors": config.vectors, "vector_dim": int(x.shape[1]),
                           "materialize_seconds": round(time.perf_counter() - t0, 2)}),
        "parquet_export": dg.MetadataValue.path(export),
        "code_usage": image_md(histogram_png(np.bincount(res.codes[:, 0], minlength=config.codebook_size),
                                             "items per code (codebook 1)", "items"), "Code usage"),
    }
    return dg.Output(df, metadata=md)


@dg.asset_check(asset=beauty_pq_codes, blocking=True, description="one row per item, codes in range, fixed length")
def beauty_pq_codes_valid(beauty_pq_codes: pl.DataFrame) -> dg.AssetCheckResult:
    lengths = beauty_pq_codes["codes"].list.len()
    codes = np.asarray(beauty_pq_codes["codes"].to_list()) if beauty_pq_codes.height else np.zeros((0, 0))
    ok = (beauty_pq_codes.height > 0 and lengths.n_unique() == 1 and beauty_pq_codes["item_id"].is_unique().all()
          and codes.min() >= 0)
    return dg.AssetCheckResult(passed=bool(ok), metadata={"rows": beauty_pq_codes.height, "code_lengths": int(lengths.n_unique())})
