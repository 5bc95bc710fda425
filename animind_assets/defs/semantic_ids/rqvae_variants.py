"""``rqvae_variants``: the same quantizer library run under each named preset, one static partition
per preset, so their metrics (unique-ID fraction, perplexity per level, losses, samples/s, and
co-watch recall@K when ``user_interactions`` has positives) sit side by side in the UI.

Nothing runs at definition time; the big presets (``conservative``, ``aggressive``: 8 x 2048
codes, latent 256) are only trained when their partition is launched. Checkpoints land at
``<artifacts>/rqvae_variants/<partition>/model.pt`` (+ ``last.pt``) and never replace the
``rqvae_model`` checkpoint that feeds ``semantic_ids``.
"""


import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.semantic_ids.quantizer_fit import GROUP, QuantizerOverrides, run_quantizer
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.semantic_ids.quantizers import preset_config
from animind_assets.lib.semantic_ids.evaluation import cowatch_recall, positive_graph
from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, frame_vectors
from animind_assets.meta import scalar_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource
from animind_assets.launchpad import settings_defaults

VARIANTS = ["default", "rqkmeans", "rqvae", "conservative", "aggressive"]
variant_partitions = dg.StaticPartitionsDefinition(VARIANTS)


@settings_defaults("rqvae_variants")
class RqvaeVariantsConfig(QuantizerOverrides):
    resume: str = Field("", description="'' (fresh), 'last', 'best' or a checkpoint path/URL")
    dry_run: bool = Field(False, description="tiny bounded run (checkpoint under <partition>/dry_run/)")
    recall_k: int = Field(20, description="K of co-watch recall@K")
    recall_max_queries: int = Field(500, description="query items drawn with recall_seed")
    recall_min_support: int = Field(10, description="min positive users of a query item")
    recall_seed: int = Field(42, description="seed of the query draw")
    positive_status: int = Field(2, description="status counted as a positive (2 = completed)")
    positive_min_score: int = Field(7, description="minimum score of a positive")


@dg.asset(
    group_name=GROUP,
    partitions_def=variant_partitions,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="Quantizer presets compared per partition (default, rqkmeans, rqvae, conservative, aggressive).",
)
def rqvae_variants(
    context: dg.AssetExecutionContext,
    config: RqvaeVariantsConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    anime_embeddings: pl.DataFrame,
    user_interactions: pl.DataFrame,
) -> dg.MaterializeResult:
    variant = context.partition_key
    cfg = preset_config(variant, **config.overrides())
    store_dir = f"rqvae_variants/{variant}" + ("/dry_run" if config.dry_run else "")
    fit, md = run_quantizer(
        context,
        cfg,
        anime_embeddings,
        artifacts,
        mlflow,
        store_dir=store_dir,
        run_name=f"rqvae_variants[{variant}]",
        resume=config.resume,
        tags={"preset": variant, "partition": variant},
    )
    md["preset"] = dg.MetadataValue.text(variant)
    # co-watch recall of this variant's IDs (same procedure as semantic_id_report)
    ids, x = frame_vectors(anime_embeddings, "anime_id", "embedding", table="anime_embeddings")
    ids, x = ids[: fit.result.n_rows], x[: fit.result.n_rows]
    full = assign_semantic_ids(fit.result.codes, order_key=ids)
    ui = user_interactions
    graph = positive_graph(
        ui["user_id"].to_numpy(),
        ui["anime_id"].to_numpy(),
        ui["status"].to_numpy(),
        ui["score"].to_numpy(),
        item_universe=ids,
        completed_status=config.positive_status,
        min_score=config.positive_min_score,
    )
    rep = cowatch_recall(
        ids, full, x, graph, k=config.recall_k, min_support=config.recall_min_support,
        max_queries=config.recall_max_queries, seed=config.recall_seed,
    )
    k = config.recall_k
    if rep["status"] == "ok":
        md.update(
            scalar_metadata(
                {
                    f"recall@{k}_semantic_id": rep["methods"]["semantic_id"]["mean_recall"],
                    f"recall@{k}_embedding_cosine": rep["methods"]["embedding_cosine"]["mean_recall"],
                    f"recall@{k}_random": rep["methods"]["random"]["mean_recall"],
                    "recall_semantic_vs_cosine": float(rep["semantic_vs_cosine"]),
                    "recall_queries": rep["evaluated_queries"],
                }
            )
        )
    else:
        md["recall_status"] = dg.MetadataValue.text("skipped: no query item with enough positive users")
    md["unique_fraction_after_disambiguation"] = dg.MetadataValue.float(
        float(len(np.unique(full, axis=0)) / max(1, full.shape[0]))
    )
    return dg.MaterializeResult(metadata=md)
